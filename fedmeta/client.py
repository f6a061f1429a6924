"""What one client does in a round, shared by every engine and the Flower ClientApp.

``train_client`` runs the configured algorithm's client update from theta
(:mod:`fedmeta.meta.algorithm`); ``evaluate_client`` scores theta on the query
set before and after the algorithm's adaptation. The batch order comes from ``client_seed(run seed, round, client id)``
so every engine visits the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import Tensor, nn

from fedmeta.config import Config
from fedmeta.data import ClientData, DatasetSpec
from fedmeta.data.base import client_group
from fedmeta.meta import InnerConfig, Params, batch_schedule, client_seed
from fedmeta.meta.algorithm import MetaAlgorithm, build_algorithm, client_step, model_params
from fedmeta.meta.maml import split_support
from fedmeta.models import build_model_for

# Salts that keep the random streams of different purposes apart.
TRAIN_STREAM, EVAL_STREAM = 1, 2
CURVE_STEPS = (1, 5, 10)


def configure_torch(threads: int = 1) -> None:
    """Small models run fastest single-threaded; two threads per process oversubscribe 2 cores badly."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def model_for(cfg: Config, spec: DatasetSpec, components=None) -> nn.Module:
    """The run's model (its components' model factory), initialised from ``simulation.seed``; the method may refuse it (``check_model``).

    ``components``: the run's :class:`~fedmeta.components.Components` (every engine passes them); None resolves
    ``cfg``'s (a script's or a test's single call).
    """
    if components is None:
        from fedmeta.components import resolve_components

        components = resolve_components(cfg, with_engine=False)
    model = build_model_for(cfg, spec, components.model_factory)
    try:
        components.algorithm.check_model(model)
    except ValueError as err:
        from fedmeta.components import ComponentError

        raise ComponentError(f"config error: {str(err).splitlines()[0]}") from None
    return model


def _algorithm(cfg: Config, algorithm: MetaAlgorithm | None) -> MetaAlgorithm:
    """The run's algorithm object as given (every engine passes it); None builds ``cfg``'s (a script's or a test's single call)."""
    return build_algorithm(cfg) if algorithm is None else algorithm


def inner_config(cfg: Config, spec: DatasetSpec, evaluation: bool = False, algorithm: MetaAlgorithm | None = None) -> InnerConfig:
    """The inner loop's settings: training (``meta.inner_steps``, ``meta.inner_lr``) or, with ``evaluation``,
    test-time adaptation (``meta.eval_steps``, ``meta.eval_lr``; ``eval_lr = 0`` means the training rate)."""
    if not evaluation:
        return InnerConfig.from_meta(cfg.meta, spec.task)
    steps = cfg.meta.eval_steps if _algorithm(cfg, algorithm).adapts_at_eval else 0  # e.g. FedAvg: "after" equals "before"
    return replace(InnerConfig.from_meta(cfg.meta, spec.task, steps=steps), lr=cfg.meta.eval_lr or cfg.meta.inner_lr)


def train_schedule(cfg: Config, data: "ClientData | ClientSizes", server_round: int, cid: int) -> Tensor:
    seed = client_seed(cfg.simulation.seed, TRAIN_STREAM, server_round, cid)
    return batch_schedule(data.n_support, cfg.meta.inner_steps, cfg.meta.inner_batch_size, seed)


def eval_schedule(cfg: Config, data: "ClientData | ClientSizes", server_round: int, cid: int, steps: int) -> Tensor:
    seed = client_seed(cfg.simulation.seed, EVAL_STREAM, server_round, cid)
    return batch_schedule(data.n_support, steps, cfg.meta.inner_batch_size, seed)


@dataclass(frozen=True)
class TrainRows:
    """Which of a client's rows a training update uses (written once, for every engine).

    The inner loop indexes rows ``0 .. n_inner``; an algorithm that ``needs_query`` gets the
    meta-query rows ``query_start .. query_start + n_query``: the client's query set
    (``meta.maml_query_fraction = 0``) or the last fraction of its support rows (then the inner
    loop sees only the rest, and the query set stays untouched). A client with a single support row
    has nothing to hold back: that row is both (rows 0..1), rather than one small client ending the run.
    """

    n_inner: int
    query_start: int
    n_query: int


def train_rows(cfg: Config, algorithm: MetaAlgorithm, data: "ClientData | ClientSizes") -> TrainRows:
    if not algorithm.needs_query:
        return TrainRows(data.n_support, 0, 0)
    if cfg.meta.maml_query_fraction == 0:
        return TrainRows(data.n_support, data.n_support, data.n_query)
    if data.n_support < 2:  # no row to hold back: the lone row is the inner loop's and the meta-query's (a small
        return TrainRows(data.n_support, 0, data.n_support)  # client trains, never crashes the run; its query set stays untouched)
    n_inner = split_support(data.n_support, cfg.meta.maml_query_fraction)
    return TrainRows(n_inner, n_inner, data.n_support - n_inner)


@dataclass(frozen=True)
class ClientSizes:
    """All :func:`train_plan` reads of a client: its support and query sizes (an engine that stores the
    population as tensors, the vectorised one, plans a cohort from these without building ``ClientData`` views)."""

    n_support: int
    n_query: int


def train_plan(cfg: Config, algorithm: MetaAlgorithm, data: "ClientData | ClientSizes", server_round: int, cid: int) -> tuple[TrainRows, Tensor]:
    """The rows and the batch schedule of one client's training update (``data``: the client, or just its sizes)."""
    rows = train_rows(cfg, algorithm, data)
    return rows, train_schedule(cfg, replace(data, n_support=rows.n_inner), server_round, cid)


def train_client(model: nn.Module, theta: Params, data: ClientData, cfg: Config, spec: DatasetSpec, server_round: int, cid: int,
                 algorithm: MetaAlgorithm | None = None) -> tuple[Params, dict[str, float]]:
    """The algorithm's client update from theta; metrics carry ``num-examples`` (support size) and its own metrics.

    A stateful method starts from a fresh client state here (see :func:`train_client_state`).
    """
    phi, metrics, _ = train_client_state(model, theta, data, cfg, spec, server_round, cid, None, algorithm)
    return phi, metrics


def train_client_state(
    model: nn.Module, theta: Params, data: ClientData, cfg: Config, spec: DatasetSpec, server_round: int, cid: int, state: Params | None,
    algorithm: MetaAlgorithm | None = None,
) -> tuple[Params, dict[str, float], Params]:
    """:func:`train_client` with the client's state (None: the method's ``init_client_state``); also returns the new state.

    ``algorithm``: the run's algorithm object (every engine and the ClientApp pass it).
    """
    algorithm = _algorithm(cfg, algorithm)
    if state is None:
        state = algorithm.init_client_state(model_params(theta)) if algorithm.stateful else {}
    rows, schedule = train_plan(cfg, algorithm, data, server_round, cid)
    inner = data.rows(0, rows.n_inner)
    support = (inner.x, inner.y, inner.present)
    query = None
    if algorithm.needs_query:
        q = data.rows(rows.query_start, rows.query_start + rows.n_query)
        query = (q.x, q.y, q.present)
    phi, metrics, state = client_step(algorithm, model, theta, state, support, query, schedule, inner_config(cfg, spec, algorithm=algorithm))
    phi = client_side_clip(cfg, theta, {k: v.detach() for k, v in phi.items()})
    return phi, {"num-examples": data.n_support} | {k: float(v) for k, v in metrics.items()}, {k: v.detach() for k, v in state.items()}


def evaluate_client(model: nn.Module, theta: Params, data: ClientData, cfg: Config, spec: DatasetSpec, server_round: int, cid: int,
                    algorithm: MetaAlgorithm | None = None) -> dict[str, float]:
    """Query loss/accuracy before and after ``meta.eval_steps`` adaptation steps (the algorithm's ``adapt``).

    Also ``loss_at_<s>``/``acc_at_<s>`` for s in 1, 5, 10 that are <= eval_steps (adaptation curves).
    """
    algorithm = _algorithm(cfg, algorithm)
    icfg = inner_config(cfg, spec, evaluation=True, algorithm=algorithm)
    s, q = data.support(), data.query()
    schedule = eval_schedule(cfg, data, server_round, cid, icfg.steps)
    metrics = algorithm.evaluate(model, theta, (s.x, s.y, s.present), (q.x, q.y, q.present), schedule, icfg, CURVE_STEPS)
    out = {k: float(v) for k, v in metrics.items()}
    out["num-examples"] = data.n_query
    return out


@lru_cache(maxsize=4)
def _components(cfg_json: str):
    from fedmeta.components import resolve_components
    from fedmeta.config import config_from_json

    return resolve_components(config_from_json(cfg_json), with_engine=False)


def components_for(cfg: Config):
    """A client process's components of ``cfg`` (the ClientApp's, a Ray worker's): resolved once per process and config."""
    return _components(cfg.model_dump_json())


def dataset_for(cfg: Config):
    """The config's dataset, cached per process (clients themselves are built on demand)."""
    return components_for(cfg).dataset()


@lru_cache(maxsize=64)
def _client_data(cfg_json: str, cid: int) -> ClientData:
    return _components(cfg_json).dataset().client(cid)


def client_data_for(cfg: Config, cid: int) -> ClientData:
    return _client_data(cfg.model_dump_json(), cid)


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:i]``; ``auto`` takes CUDA when it is available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from fedmeta.federation import RunError

        raise RunError(f"device: {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def resolve_client(cfg: Config, node_config: dict) -> tuple[int, ClientData, DatasetSpec, str]:
    """This node's client: (client id, data, spec, group: ``"train"``, ``"validation"`` or ``"test"``).

    A deployed SuperNode names its partition directory (``partition-dir``); a
    simulated one gets ``partition-id`` into the config's dataset.
    """
    if "partition-dir" in node_config:
        return _load_dir(str(node_config["partition-dir"]))
    pid = int(node_config.get("partition-id", -1))
    ds = dataset_for(cfg)
    if not 0 <= pid < ds.num_clients:
        raise ValueError(f"partition-id {pid} is outside the dataset's {ds.num_clients} clients")
    return pid, client_data_for(cfg, pid), ds.spec, client_group(ds, pid)


@lru_cache(maxsize=2)
def _load_dir(path: str):
    from fedmeta.data.disk import load_client_with_id

    data, spec, group, cid = load_client_with_id(path)
    return cid, data, spec, group


def client_side_clip(cfg: Config, theta: Params, phi: Params) -> Params:
    """With ``privacy.mode = "client"`` the client clips its update before it leaves the device.

    Not Flower's ``fixedclipping_mod``: that mod expects the clipping norm from
    Flower's DP wrapper strategy in the message config and clips NumPy arrays in
    place, while this one function must also run inside the sequential and
    vectorised engines on tensors. The formula is the same (``clip_update``).
    """
    if not (cfg.privacy.enabled and cfg.privacy.mode == "client"):
        return phi
    from fedmeta.privacy import clip_update

    clipped, _ = clip_update({k: phi[k] - theta[k] for k in theta}, cfg.privacy.clip_norm)
    return {k: theta[k] + clipped[k] for k in theta}
