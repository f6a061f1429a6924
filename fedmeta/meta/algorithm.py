"""The algorithm seam: one object holds everything that differs between meta-learning methods.

Every engine (sequential, vectorised, the Flower ClientApp) and the server's
round loop call the methods below and never branch on an algorithm's name.
A method is a subclass of :class:`MetaAlgorithm`, registered by name
(:func:`register`) or named in a config as ``meta.algorithm = "package.module:Name"``.

What a method decides
---------------------
* :meth:`~MetaAlgorithm.client_update`: the client's update, a **pure function on
  tensors** (no ``.item()``, no Python branching on tensor values), so the
  vectorised engine can ``torch.func.vmap`` it over a cohort. It gets the
  meta-parameters (the model's parameters plus any extra meta-state, see
  below), the client's support rows, its meta-query rows (only when
  :attr:`~MetaAlgorithm.needs_query`), and the batch schedule (``[steps, b]``
  row indices into the support rows). It returns the client's *new*
  meta-parameters (same keys) and scalar metric tensors. The server then
  applies ``theta <- theta + beta * mean_i(new_i - theta)`` to every key, with
  clipping and noise when DP is on: a method that wants meta-gradient descent
  returns ``theta - g`` (see MAML below).
* :meth:`~MetaAlgorithm.step_size`: the server's beta for a round.
* :meth:`~MetaAlgorithm.check_config`: refuse settings the method cannot honour (one line).
* :meth:`~MetaAlgorithm.adapt`: how a client adapts at evaluation, and
  :attr:`~MetaAlgorithm.adapts_at_eval` (FedAvg: no adaptation).
* :meth:`~MetaAlgorithm.extra_state`: extra meta-parameters the method learns
  alongside theta (e.g. Meta-SGD's per-parameter learning rates). Their keys
  must contain ``/`` (:data:`EXTRA_SEP`) so they never collide with the
  model's parameter names (which use dots). They are aggregated, clipped and
  noised with theta, checkpointed, and never passed to the model.

The six built-ins (``reptile``, ``fedavg``, ``fedavg_ft``, ``fomaml``, ``maml``,
``local``) are defined here; ``metasgd`` lives in :mod:`fedmeta.meta.metasgd`,
written against this public seam only, as a user's method would be.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from fedmeta.meta.aggregate import aggregate_stacked
from fedmeta.meta.client_state import ClientStates  # noqa: F401 - re-exported: the stores live in fedmeta.meta.client_state
from fedmeta.meta.inner import InnerConfig, Params, adaptation_metrics, inner_loop
from fedmeta.meta.maml import Set, maml_client_update
from fedmeta.meta.outer import ServerAdam, apply_step, linear_anneal
from fedmeta.errors import ComponentError
from fedmeta.registry import METHODS, raised

if TYPE_CHECKING:
    from fedmeta.config import Config

EXTRA_SEP = "/"


def model_params(params: Params) -> Params:
    """The model's own parameters: everything but the algorithm's extra meta-state."""
    return {k: v for k, v in params.items() if EXTRA_SEP not in k}


def extra_params(params: Params) -> Params:
    return {k: v for k, v in params.items() if EXTRA_SEP in k}


class MetaAlgorithm:
    """Base class of meta-learning methods; subclass it and override what differs.

    The defaults are Reptile's: ``client_update`` runs the inner loop from theta
    on the support rows and returns phi; ``step_size`` anneals linearly from
    ``meta.outer_lr`` to ``meta.outer_lr_final``; ``adapt`` runs the same inner
    loop at evaluation.
    """

    name: str = ""
    needs_query: bool = False  # client_update needs a meta-query split (MAML family)
    adapts_at_eval: bool = True  # False: "after" equals "before" (FedAvg)

    class Params(BaseModel):
        """The method's own hyper-parameters, filled from the config's ``[meta.params]`` table (none by default).

        A method declares ``class Params(BaseModel)`` (fields with bounds); ``self.params`` is the validated
        instance, and a bad value is one line naming ``meta.params.<field>``.
        """

        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def __init__(self, cfg: "Config") -> None:
        self.cfg = cfg
        self.params = self.Params.model_validate(cfg.meta.params)

    def check_config(self) -> None:
        """Refuse settings this method cannot honour: raise ``ValueError("section.key: why (got ...)")``.

        Called once before a run starts; the message becomes one ``config error`` line. None by default.
        """

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this method cannot use (e.g. one without ``embed``): raise ``ValueError("model.factory: why")``.

        Called once the run's model is built (:func:`fedmeta.client.model_for`), before any round. None by default.
        """

    # -- meta-state ----------------------------------------------------------------
    def extra_state(self, theta: Params) -> Params:
        """Extra meta-parameters to learn alongside ``theta`` (keys contain ``/``); none by default."""
        return {}

    # -- client state (kept per client across rounds, never sent) -------------------
    def init_client_state(self, theta: Params) -> Params:
        """A client's state before its first round (tensors, e.g. SCAFFOLD's c_i, Ditto's personal model).

        A method that overrides this is *stateful*: its ``client_update`` takes the state as a last
        argument and returns ``(params, metrics, state)``; the engine keeps the state (the simulation
        engines per client id, checkpointed with the run; a Flower ClientApp in ``context.state``) and
        never sends it to the server. ``theta`` is the model's parameters at that client's first round.
        """
        return {}

    @property
    def stateful(self) -> bool:
        return type(self).init_client_state is not MetaAlgorithm.init_client_state

    # -- client side (pure, vmappable) ---------------------------------------------
    def client_update(
        self, model: nn.Module, params: Params, support: Set, query: Set | None, schedule: Tensor, icfg: InnerConfig
    ) -> tuple[Params, dict[str, Tensor]]:
        phi, loss, _ = inner_loop(model, model_params(params), *support, schedule, icfg)
        return phi | extra_params(params), {"train_loss": loss}

    def adapt(
        self, model: nn.Module, params: Params, support: Set, schedule: Tensor, icfg: InnerConfig, record_at: tuple[int, ...] = ()
    ) -> tuple[Params, dict[int, Params]]:
        """The model's parameters after ``len(schedule)`` adaptation steps (and after each step in ``record_at``)."""
        phi, _, recorded = inner_loop(model, model_params(params), *support, schedule, icfg, record_at=record_at)
        return phi, recorded

    def evaluate(
        self, model: nn.Module, params: Params, support: Set, query: Set, schedule: Tensor, icfg: InnerConfig, at_steps: tuple[int, ...] = ()
    ) -> dict[str, Tensor]:
        """The evaluation hook: scalar metric tensors of one client (pure, vmappable).

        Default: adapt on the support rows (:meth:`adapt`), score on the query rows: ``loss_before``,
        ``acc_before``, ``loss_after``, ``acc_after`` and ``loss_at_<s>``/``acc_at_<s>`` for ``s`` in ``at_steps``.
        A metric-based method (Prototypical Networks) replaces it.
        """
        return adaptation_metrics(model, params, support, query, schedule, icfg, at_steps, self.adapt)

    # -- server side ---------------------------------------------------------------
    def step_size(self, server_round: int) -> float:
        m, total = self.cfg.meta, self.cfg.simulation.rounds
        return linear_anneal(server_round, total, m.outer_lr, m.outer_lr_final)

    def init_server_state(self, theta: Params, num_clients: int) -> dict[str, Any]:
        """The server state this method keeps across rounds (plain data: checkpointed with the run).

        Default: ServerAdam's moments when ``meta.server_optimizer = "adam"``, else nothing.
        ``num_clients`` is the training population's size (e.g. SCAFFOLD's N).
        """
        return {"adam": ServerAdam().state_dict()} if self.cfg.meta.server_optimizer == "adam" else {}

    def aggregate(self, deltas: Params, weights: list[float], state: dict[str, Any]) -> Params:
        """How the clients' updates combine: ``meta.aggregation`` (weighted mean, median, trimmed mean, Krum).

        ``deltas[k][i]`` is client i's ``phi_i - theta`` of parameter ``k``: the cohort stacked per key
        (``[N, *shape]``), so an aggregate is one reduction per key, never a Python loop over clients.

        Replaced, not called, when DP is on: the private server (:class:`fedmeta.privacy.server.PrivateServer`)
        clips each delta, sums and noises them instead, then calls :meth:`server_apply`.
        """
        m = self.cfg.meta
        return aggregate_stacked(deltas, weights, m.aggregation, m.trim_fraction, self.cfg.simulation.max_weight, m.krum_malicious, m.krum_keep)

    def server_apply(self, theta: Params, mean: Params, server_round: int, state: dict[str, Any]) -> tuple[Params, dict[str, Any], dict[str, float]]:
        """The outer step from the aggregate: ``theta + beta * mean`` (or ServerAdam's step); returns (theta, state, info)."""
        beta = self.step_size(server_round)
        info: dict[str, float] = {"beta": beta}
        if "adam" not in state:
            return apply_step(theta, mean, beta), state, info
        m = self.cfg.meta
        adam = ServerAdam(m.server_beta1, m.server_beta2, m.server_eps)
        adam.load_state_dict(state["adam"])
        theta = apply_step(theta, adam.update(mean, beta), 1.0)
        return theta, state | {"adam": adam.state_dict()}, info

    def server_update(
        self, theta: Params, deltas: Params, weights: list[float], server_round: int, state: dict[str, Any]
    ) -> tuple[Params, dict[str, Any], dict[str, float]]:
        """The whole server hook: :meth:`aggregate` then :meth:`server_apply`; returns (theta, state, info).

        ``deltas``: the cohort's ``phi_i - theta`` stacked per key (``[N, *shape]``), as in :meth:`aggregate`.

        A method may override this instead of the two halves; DP then cannot wrap it and
        :func:`build_algorithm` refuses ``privacy.enabled`` for it (see :attr:`private_server`).
        """
        return self.server_apply(theta, self.aggregate(deltas, weights, state), server_round, state)

    @property
    def private_server(self) -> bool:
        """Whether DP can wrap this server hook: only when it is ``aggregate`` + ``server_apply`` (``server_update`` not overridden)."""
        return type(self).server_update is MetaAlgorithm.server_update

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def client_step(
    algorithm: MetaAlgorithm, model: nn.Module, params: Params, state: Params, support: Set, query: Set | None, schedule: Tensor, icfg: InnerConfig
) -> tuple[Params, dict[str, Tensor], Params]:
    """What every engine calls: the method's ``client_update`` with its client state, as ``(params, metrics, state)``.

    Pure (vmappable over ``state``, ``support``, ``query`` and ``schedule``); a stateless method's state is ``{}``.
    """
    if algorithm.stateful:
        return algorithm.client_update(model, params, support, query, schedule, icfg, state)
    new, metrics = algorithm.client_update(model, params, support, query, schedule, icfg)
    return new, metrics, state


#: The registered methods (name -> class): the contents of :data:`fedmeta.registry.METHODS`.
REGISTRY: dict[str, type[MetaAlgorithm]] = METHODS.entries
#: Class decorator: ``@register("name")`` makes a :class:`MetaAlgorithm` available as ``meta.algorithm = name``.
register = METHODS.register


@register("reptile")
class Reptile(MetaAlgorithm):
    """Nichol et al. 2018: clients return phi = inner_loop(theta); beta annealed linearly."""


@register("fedavg")
class FedAvg(MetaAlgorithm):
    """FedAvg in the same harness: beta = 1 (the weighted mean of phi), no adaptation at evaluation."""

    adapts_at_eval = False

    def step_size(self, server_round: int) -> float:
        return 1.0


@register("fedavg_ft")
class FedAvgFineTune(FedAvg):
    """FedAvg training, evaluated after fine-tuning on the support set (a strong baseline)."""

    adapts_at_eval = True


@register("local")
class Local(MetaAlgorithm):
    """No federation: theta never leaves its initialisation (beta = 0); every client adapts from theta_0."""

    def client_update(self, model, params, support, query, schedule, icfg):
        nan = torch.full((), float("nan"), dtype=support[1].dtype if support[1].is_floating_point() else torch.float32)
        return {k: v.detach().clone() for k, v in params.items()}, {"train_loss": nan}

    def step_size(self, server_round: int) -> float:
        return 0.0


@register("maml")
class MAML(MetaAlgorithm):
    """Finn et al. 2017, second order: clients return theta - g, g the meta-gradient through the inner loop."""

    needs_query = True
    second_order = True

    def client_update(self, model, params, support, query, schedule, icfg):
        phi, inner, q = maml_client_update(model, params, support, query, schedule, icfg, second_order=self.second_order)
        return phi, {"train_loss": inner, "query_loss": q}


@register("fomaml")
class FOMAML(MAML):
    """First-order MAML: the meta-gradient is the query gradient at phi."""

    second_order = False


def builtin_names() -> tuple[str, ...]:
    """Every registered method name: the built-ins, and any a user's module registered (once imported)."""
    return METHODS.names()


def resolve_algorithm(name: str) -> type[MetaAlgorithm]:
    """A registered name, ``"package.module:Name"`` (a class, or a name that module ``@register``s) -> the class;
    one-line ``ComponentError`` otherwise."""
    obj = METHODS.resolve(name)
    if not (isinstance(obj, type) and issubclass(obj, MetaAlgorithm)):
        raise ComponentError(f"config error: meta.algorithm: {name!r} is not a subclass of fedmeta.meta.MetaAlgorithm (got {obj!r})")
    return obj


def build_algorithm(cfg: "Config", cls: type[MetaAlgorithm] | None = None) -> MetaAlgorithm:
    """The run's algorithm object: ``cls`` (None: the class ``meta.algorithm`` names) built from ``cfg`` and checked.

    Called once per run, by :func:`fedmeta.components.resolve_components`; everything below gets the object.
    """
    name = cfg.meta.algorithm
    if cls is None:
        cls = resolve_algorithm(name)
    elif not (isinstance(cls, type) and issubclass(cls, MetaAlgorithm)):
        raise ComponentError(f"config error: meta.algorithm: {name!r} is not a subclass of fedmeta.meta.MetaAlgorithm (got {cls!r})")
    try:
        algo = cls(cfg)
    except ValidationError as err:  # the method's Params refused meta.params
        from fedmeta.config import _format_error

        raise ComponentError(_format_error(err, ("meta", "params"))) from None
    except Exception as err:  # noqa: BLE001 - a user's __init__ may raise anything
        raise raised("meta.algorithm", name, err) from None
    try:
        algo.check_config()
        if cfg.privacy.enabled and not algo.private_server:
            raise ValueError(
                f"privacy.enabled: {name!r} overrides server_update, which the DP wrapper cannot make private "
                "(override aggregate/server_apply instead); set privacy.enabled = false"
            )
    except ValueError as err:
        raise ComponentError(f"config error: {str(err).splitlines()[0] if str(err) else 'meta.algorithm: refused by ' + repr(name)}") from None
    return algo


def initial_meta_parameters(model: nn.Module, algorithm: MetaAlgorithm) -> Params:
    """theta_0: the model's parameters plus the algorithm's extra meta-state."""
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    extra = algorithm.extra_state(theta)
    bad = [k for k in extra if EXTRA_SEP not in k]
    if bad:
        raise ComponentError(f"config error: meta.algorithm: extra_state keys must contain {EXTRA_SEP!r} (got {bad[:3]})")
    return theta | {k: v.detach().clone() for k, v in extra.items()}

