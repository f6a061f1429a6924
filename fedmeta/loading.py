"""``fedmeta.load_run(DIR)``: a finished run's config, data spec and model with the learned θ loaded.

    cfg, spec, model = fedmeta.load_run("runs/k10")
    logits = model(x, present)            # x: modality name -> [B, *shape] (see spec.modalities)

The spec comes from ``summary.json`` (``data_spec``), so the data is not needed;
older runs without it rebuild the dataset from ``config.json``. ``model.pt``
loads with ``weights_only=True``. Methods with extra meta-state (Meta-SGD's
learning rates) keep it in ``DIR/meta_state.pt`` (``torch.load`` it likewise).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fedmeta.results import MODEL, SUMMARY, RunDirError, read_run_config


class LoadedRun(NamedTuple):
    config: Any  # fedmeta.config.Config
    spec: Any  # fedmeta.data.DatasetSpec
    model: torch.nn.Module


def load_run(run_dir: str | Path, *, model: Any = None, dataset: Any = None, algorithm: Any = None) -> LoadedRun:
    """``(config, spec, model)`` of the finished run in ``run_dir``; one-line ``RunDirError`` if it is not one.

    ``model``, ``dataset``, ``algorithm``: the objects given to :func:`fedmeta.simulate`, for a run that recorded
    them as ``"<local>:..."`` (no importable reference; without them that is a one-line ``ComponentError``).
    """
    from fedmeta.components import resolve_components
    from fedmeta.config import ConfigError, build_config
    from fedmeta.data.base import spec_from_dict

    d = Path(run_dir)
    raw = read_run_config(d, option="load_run")
    try:
        cfg = build_config(raw)
    except ConfigError as err:
        raise RunDirError(f"load_run {d}: config.json: {err}") from None
    if not (d / MODEL).is_file():
        raise RunDirError(f"load_run {d}: no {MODEL} there (the run has not finished; resume it with fedmeta simulate --resume {d})")
    spec = None
    if (d / SUMMARY).is_file():
        try:
            data_spec = json.loads((d / SUMMARY).read_text()).get("data_spec")
        except (OSError, ValueError, AttributeError):
            data_spec = None
        if isinstance(data_spec, dict):
            spec = spec_from_dict(data_spec)
    components = resolve_components(cfg, model=model, dataset=dataset, algorithm=algorithm, with_engine=False)
    if spec is None:
        spec = components.dataset().spec
    model = components.model(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(d / MODEL, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt, truncated, hostile: one line
        raise RunDirError(f"load_run {d / MODEL}: not loadable ({type(err).__name__})") from None
    expected = {k: tuple(v.shape) for k, v in model.named_parameters()}
    got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()) else None
    if got != expected:
        raise RunDirError(f"load_run {d / MODEL}: its parameters do not match the model of {d / 'config.json'}")
    model.load_state_dict(state, strict=False)  # model.pt holds the meta-parameters; buffers come from the factory
    model.eval()
    return LoadedRun(cfg, spec, model)
