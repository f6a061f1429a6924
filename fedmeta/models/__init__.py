"""Models: the built-in multimodal net, and the model-factory seam (``model.factory``).

A model factory is ``callable(spec: DatasetSpec, cfg: Config) -> torch.nn.Module``
whose ``forward(x: dict[str, Tensor], present: Tensor) -> Tensor`` takes the
modality tensors and the ``[B, M]`` bool presence mask. If the module defines
``loss(outputs, y) -> Tensor`` (a scalar mean) that loss is used everywhere a
loss is computed; otherwise cross-entropy (classification) or MSE (regression).
The built-in factory is :func:`multimodal_net`; the config names a factory as
``model.factory = "package.module:callable"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from fedmeta.models.multimodal import MultimodalNet, build_model
from fedmeta.registry import MODELS

if TYPE_CHECKING:
    from fedmeta.config import Config
    from fedmeta.data.base import DatasetSpec

__all__ = ["MultimodalNet", "build_model", "build_model_for", "multimodal_net", "resolve_model_factory"]


@MODELS.register("multimodal_net")
def multimodal_net(spec: "DatasetSpec", cfg: "Config") -> nn.Module:
    """The built-in factory (``model.factory`` default): encoders per modality, fusion, head."""
    m = cfg.model
    return MultimodalNet(spec, m.embed_dim, m.hidden_dim, m.fusion, m.image_encoder)


def resolve_model_factory(reference: str) -> Callable[..., Any]:
    """``model.factory`` -> the factory: a registered name (:data:`fedmeta.registry.MODELS`) or ``"package.module:attr"``."""
    from fedmeta.errors import ComponentError

    factory = MODELS.resolve(reference)
    if not callable(factory):
        raise ComponentError(f"config error: model.factory: {reference!r} is not callable")
    return factory


def build_model_for(cfg: "Config", spec: "DatasetSpec", factory: Callable[..., Any] | None = None) -> nn.Module:
    """The config's model for ``spec``, with initial weights drawn from ``simulation.seed``.

    ``factory``: the resolved model factory (:class:`fedmeta.components.Components` passes it); None resolves ``model.factory``.
    """
    from fedmeta.errors import ComponentError
    from fedmeta.registry import raised

    factory = resolve_model_factory(cfg.model.factory) if factory is None else factory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.simulation.seed)
        try:
            model = factory(spec, cfg)
        except ComponentError:
            raise
        except Exception as err:  # noqa: BLE001 - a user's factory may raise anything
            raise raised("model.factory", cfg.model.factory, err) from None
    if not isinstance(model, nn.Module):
        raise ComponentError(f"config error: model.factory: {cfg.model.factory!r} returned {type(model).__name__}, expected a torch.nn.Module")
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if not floating:
        raise ComponentError(f"config error: model.factory: {cfg.model.factory!r} built a module without floating-point parameters")
    return model
