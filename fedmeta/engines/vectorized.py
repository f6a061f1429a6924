"""The vectorised engine's backend: a cohort's inner loops batched with ``torch.func.vmap``.

It is *not* a second implementation of the algorithm. Per client it uses the
same functions the Flower ClientApp and the sequential engine use
(:func:`train_schedule`, :func:`eval_schedule`, :func:`inner_config`,
:func:`client_side_clip`), and it runs the same pure functions
(:func:`fedmeta.meta.inner_loop`, :func:`fedmeta.meta.evaluate`,
:func:`fedmeta.meta.maml.maml_client_update`) under
``vmap(inner_loop, in_dims=(None, None, 0, 0, 0, 0, None, None))`` (model,
theta, x, y, present, schedule, cfg, record_at): the model and theta are
broadcast, each client brings its own data and batch schedule, in chunks of
``simulation.chunk_size`` clients. Algorithms without a batched form here
(``local``) call :func:`train_client` per client. The server side (Reptile
step, DP clipping and noise, accountant, evaluation summary) is the shared
round loop in :mod:`fedmeta.federation`.

Runs on ``simulation.device`` (``cpu``, ``cuda[:i]``, or ``auto``: CUDA when available);
the population stays in host memory and each chunk is copied to the device.

Data layout
-----------
The population lives in a :class:`ClientStore`: one flat row buffer per
modality, ``[rows, *shape]``, plus ``y`` and ``present``, holding the built
clients' rows back to back, and per-client offsets and sizes (a ragged store:
a client costs its own rows, so one large client does not make every slot
large). Clients are filled lazily from ``dataset.client(cid)`` the first time
they are sampled, so a large population is a few tensors, never one Python
object per client.

Unequal client sizes (e.g. a Dirichlet partition)
-------------------------------------------------
Clients are grouped by the shape of their batch schedule (and, for
evaluation, by their query size); within a group they are stacked per
chunk, with padding (zeros) up to the largest support set among them. The schedule indexes only a client's
own support rows, so padding is never sampled, and query rows are gathered
per client, so evaluation sees exactly the rows ``evaluate_client`` sees.
Clients of equal size (the synthetic dataset) form one group.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from fedmeta.config import Config
from fedmeta.data.base import validation_clients
from fedmeta.data.base import ClientData, check_client
from fedmeta.data.store import mapped_store
from fedmeta.client import (
    CURVE_STEPS,
    ClientSizes,
    client_side_clip,
    configure_torch,
    eval_schedule,
    inner_config,
    model_for,
    resolve_device,
    train_plan,
)
from fedmeta.federation import ClientUpdate, Params, Replies, RunError, StackedUpdates
from fedmeta.components import components_of
from fedmeta.engines.base import InProcessEngine
from fedmeta.meta.algorithm import ClientStates, client_step
from fedmeta.registry import ENGINES

# One intra-op thread: measured fastest for the default model on a 2-core machine
# (see docs/benchmarks.md, section 2); a second thread only adds contention.
THREADS = 1



def _user_frame(tb) -> str:
    """`` at file.py:LINE in func: `source` `` for the innermost frame outside torch, fedmeta and the stdlib: the user's failing line."""
    import os
    import sysconfig
    import traceback

    import fedmeta

    skip = tuple(os.path.dirname(m.__file__) for m in (torch, fedmeta)) + (sysconfig.get_paths()["stdlib"],)
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith(skip)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


@contextmanager
def vmap_errors(cfg: Config) -> Iterator[None]:
    """A model or algorithm that ``torch.func.vmap`` cannot trace becomes one line naming the failing op and the user's line."""
    try:
        yield
    except RunError:
        raise
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
        text = str(err).strip().splitlines()
        first = text[0] if text else type(err).__name__
        if "vmap" not in str(err) and "Batching rule" not in str(err) and "batched" not in str(err) and ".item()" not in str(err):
            raise
        if "data-dependent control flow" in first:  # torch's one message for both cases, several hundred characters long
            first = "vmap: .item() or data-dependent control flow (a Python if/while on a tensor's value) is not supported"
        raise RunError(
            f"simulation.engine = 'vectorized': torch.func.vmap cannot run this model/algorithm "
            f"({cfg.model.factory} / {cfg.meta.algorithm}){_user_frame(err.__traceback__)}: {type(err).__name__}: {first[:300]}; "
            "use simulation.engine = 'sequential' (or 'flower')"
        ) from None


class ClientStore:
    """A population held as flat row buffers, filled from ``dataset.client(cid)`` on first use,
    or mapped from disk when the dataset is a store (``data.dataset = "store"``, :mod:`fedmeta.data.store`).

    Built clients (a ragged store): ``x[name]``: ``[rows, *shape]``; ``y``: ``[rows, ...]``;
    ``present``: ``[rows, M]``, one buffer per field holding every built client's rows back to back
    (appended in the order clients are built; the capacity doubles when full), and per client
    ``start``/``n``/``n_support``: ``[P]``. A client costs its own rows, never the largest client's.
    Mapped: a store's arrays as they are on disk: version 2's flat rows and per-client offsets (read
    as the buffers above), or version 1's padded ``[P, rows, *shape]`` slots (``padded``).
    Reads stack per client; a row past a client's ``n`` reads as zero (``present`` False), never as
    another client's rows or unfilled memory.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.size = int(dataset.num_clients)
        # a memory-mapped store (fedmeta.data.store): the stacked arrays already exist on disk; read rows on use
        # seen through wrappers that only regroup clients, never through ones that change them (SampleDropout...)
        source = mapped_store(dataset)
        self.mapped = source is not None
        self.padded = False  # a version-1 store: one slot of `rows` rows per client (read as [cid, row])
        if self.mapped:
            self.x, self.y, self.present, self.n, self.n_support = source.arrays()
            self.padded = not source.ragged
            if source.ragged:  # version 2: flat rows + offsets, read as the in-memory buffers are
                self.start = source.starts()
            self.built = torch.ones(self.size, dtype=torch.bool)
            return
        self.built = torch.zeros(self.size, dtype=torch.bool)
        self.n = torch.zeros(self.size, dtype=torch.long)
        self.n_support = torch.zeros(self.size, dtype=torch.long)
        self.start = torch.zeros(self.size, dtype=torch.long)  # a built client's first row in the buffers
        self.x: dict[str, Tensor] = {}
        self.y: Tensor | None = None
        self.present: Tensor | None = None
        self.used = 0  # rows filled (the built clients' sizes, summed)
        self.capacity = 0  # rows allocated

    # -- filling -----------------------------------------------------------------
    def ensure(self, cids: Sequence[int]) -> None:
        """Build (once) every client in ``cids`` that is not stored yet (a memory-mapped store has them all)."""
        if self.mapped:
            return
        for cid in cids:
            if not self.built[cid]:
                # the spec's modalities, dtypes and shapes, or one line: a slot is never left unfilled
                self._put(int(cid), check_client(self.dataset.client(int(cid)), self.dataset.spec, int(cid)))

    def _grow(self, rows: int, like: ClientData) -> None:
        """(Re)allocate the buffers to ``rows`` rows, keeping the rows filled so far (``torch.empty``: rows
        not yet filled cost no resident memory)."""

        def grow(old: Tensor | None, t: Tensor) -> Tensor:  # t: one client's [n, *shape]
            new = torch.empty((rows, *t.shape[1:]), dtype=t.dtype)
            if old is not None:
                new[: self.used] = old[: self.used]
            return new

        self.x = {k: grow(self.x.get(k), v) for k, v in like.x.items()}
        self.y, self.present = grow(self.y, like.y), grow(self.present, like.present)
        self.capacity = rows

    def _put(self, cid: int, data: ClientData) -> None:
        n, s = data.n, self.used
        if s + n > self.capacity:
            self._grow(max(s + n, 2 * self.capacity), data)
        for k, v in data.x.items():
            self.x[k][s : s + n] = v
        self.y[s : s + n] = data.y
        self.present[s : s + n] = data.present
        self.start[cid], self.n[cid], self.n_support[cid] = s, n, data.n_support
        self.used = s + n
        self.built[cid] = True

    def allocated(self) -> int:
        """Elements allocated for the clients' rows (all fields): ``capacity`` rows, not clients x largest."""
        return sum(v.numel() for v in (*self.x.values(), self.y, self.present) if v is not None)

    # -- reading -----------------------------------------------------------------
    def client(self, cid: int) -> ClientData:
        """One stored client as a :class:`ClientData` of views (no copy)."""
        n = int(self.n[cid])
        if self.padded:
            return ClientData(
                x={k: v[cid, :n] for k, v in self.x.items()}, y=self.y[cid, :n], present=self.present[cid, :n], n_support=int(self.n_support[cid])
            )
        s = int(self.start[cid])
        return ClientData(
            x={k: v[s : s + n] for k, v in self.x.items()}, y=self.y[s : s + n], present=self.present[s : s + n], n_support=int(self.n_support[cid])
        )

    def support(self, cids: Tensor, device: torch.device, rows: int | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The first ``rows`` rows of ``cids`` (default: up to the largest support set among them), stacked.

        Rows past a client's own support set are padding for the batch: its schedule never indexes them.
        """
        rows = int(self.n_support[cids].max()) if rows is None else rows
        if not self.padded:
            return self.take(cids, torch.arange(rows).expand(len(cids), rows), device)
        out = (
            {k: v[cids, :rows].to(device) for k, v in self.x.items()},
            self.y[cids, :rows].to(device),
            self.present[cids, :rows].to(device),
        )
        self._release()
        return out

    def gather(self, cids: Tensor, start: Tensor, length: int, device: torch.device) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Rows ``start[i] .. start[i] + length`` of each client ``cids[i]``, stacked (no padding)."""
        return self.take(cids, start.unsqueeze(1) + torch.arange(length), device)

    def take(self, cids: Tensor, rows: Tensor, device: torch.device) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Rows ``rows[i]`` (``[C, k]`` row numbers) of each client ``cids[i]``, stacked: ``[C, k, ...]``."""
        if self.padded:
            c = cids.unsqueeze(1)
            out = {k: v[c, rows].to(device) for k, v in self.x.items()}, self.y[c, rows].to(device), self.present[c, rows].to(device)
            self._release()
            return out
        past = rows >= self.n[cids].unsqueeze(1)  # padding: reads as zero, not as the next client's rows
        flat = torch.where(past, 0, self.start[cids].unsqueeze(1) + rows)
        x, y, present = {k: v[flat] for k, v in self.x.items()}, self.y[flat], self.present[flat]
        self._release()  # a mapped (version-2) store: the rows are copies now
        if bool(past.any()):
            for t in (*x.values(), y, present):
                t[past] = 0
        return {k: v.to(device) for k, v in x.items()}, y.to(device), present.to(device)

    def _release(self) -> None:
        """A mapped store: the rows were copied out (indexing copies), so unmap the pages read (see StoreDataset.release)."""
        if self.mapped and hasattr(self.dataset, "release"):
            self.dataset.release()

    def query(self, cids: Tensor, device: torch.device) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Stacked query rows of ``cids``; they must all have the same query size."""
        return self.gather(cids, self.n_support[cids], int(self.n[cids[0]] - self.n_support[cids[0]]), device)


def _groups(keys: list[tuple], chunk_size: int) -> Iterator[list[int]]:
    """Positions with equal keys, in chunks of at most ``chunk_size``, in order of first appearance."""
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for pos, key in enumerate(keys):
        by_key[key].append(pos)
    for positions in by_key.values():
        for start in range(0, len(positions), chunk_size):
            yield positions[start : start + chunk_size]


class VectorizedBackend:
    """The Backend of ``simulation.engine = "vectorized"`` (see the module docstring)."""

    name = "vectorized"

    def __init__(self, cfg: Config, components) -> None:
        """``components``: the run's :class:`~fedmeta.components.Components` (or a built dataset: ``cfg``'s components around it)."""
        configure_torch(THREADS)
        components = components_of(cfg, components)
        self.cfg = cfg
        self.dataset = dataset = components.dataset()
        self.spec = dataset.spec
        self.device = resolve_device(cfg.simulation.device)
        self.model = model_for(cfg, self.spec, components).to(self.device)
        self.algorithm = components.algorithm
        self.chunk_size = cfg.simulation.chunk_size
        self.store = ClientStore(dataset)
        self.client_states = ClientStates(self.algorithm)  # a stateful method's per-client state (host memory)
        self._compiled = None  # simulation.compile: the compiled vmapped update

    def populations(self) -> tuple[list[int], list[int]]:
        return list(self.dataset.train_clients), list(self.dataset.heldout_clients)

    def validation_population(self) -> list[int]:
        return validation_clients(self.dataset)

    def prefetch(self, cids: Sequence[int] | None = None) -> None:
        """Build clients ahead of the rounds (default: the whole population)."""
        self.store.ensure(range(self.store.size) if cids is None else cids)

    def _update(self, query_dim: int | None):
        """The vmapped ``client_step`` (``client_update`` with the client's state); with ``simulation.compile`` compiled once per backend (inductor, static shapes)."""
        algorithm = self.algorithm
        update = vmap(
            lambda model, th, st, sup, qry, sch, ic: client_step(algorithm, model, th, st, sup, qry, sch, ic),
            in_dims=(None, None, 0, 0, query_dim, 0, None), randomness="error",
        )
        if not self.cfg.simulation.compile:
            return update
        if self._compiled is None:
            self._compiled = torch.compile(update, dynamic=False)
        return self._compiled

    def _on_device(self, params: Params) -> Params:
        return {k: v.to(self.device) for k, v in params.items()}

    # -- training ----------------------------------------------------------------
    def train_chunks(self, theta: Params, cids: list[int], server_round: int) -> list[TrainChunk]:
        """The algorithm's ``client_update`` vmapped over chunks of clients with equal-shaped batch schedules
        and meta-query sizes: the cohort's work, stacked per chunk (what a Ray worker returns, see
        :mod:`fedmeta.engines.ray_cluster`). :meth:`train` turns it into one ``ClientUpdate`` per client."""
        cfg, store, algorithm = self.cfg, self.store, self.algorithm
        store.ensure(cids)
        icfg = inner_config(cfg, self.spec)
        sizes = zip(store.n_support[cids].tolist(), (store.n - store.n_support)[cids].tolist())  # no per-client ClientData views
        plans = [train_plan(cfg, algorithm, ClientSizes(s, q), server_round, cid) for cid, (s, q) in zip(cids, sizes)]
        theta_d = self._on_device(theta)
        query_dim = 0 if algorithm.needs_query else None
        update = self._update(query_dim)
        out: list[TrainChunk] = []
        for chunk in _groups([(*plans[p][1].shape, plans[p][0].n_query) for p in range(len(cids))], self.chunk_size):
            idx = torch.tensor([cids[p] for p in chunk])
            schedule = torch.stack([plans[p][1] for p in chunk])  # [C, steps, b]
            rows = max(plans[p][0].n_inner for p in chunk)
            if schedule[0].numel() < rows:  # copy only the rows the schedules visit, in visiting order (never the padding)
                support = store.take(idx, schedule.flatten(1), self.device)
                schedule = torch.arange(schedule[0].numel()).view(schedule.shape[1:]).expand_as(schedule)
            else:
                support = store.support(idx, self.device, rows=rows)
            schedule = schedule.to(self.device)
            query = None
            if algorithm.needs_query:
                start = torch.tensor([plans[p][0].query_start for p in chunk])
                query = store.gather(idx, start, plans[chunk[0]][0].n_query, self.device)
            members = [cids[p] for p in chunk]  # the chunk's client states, gathered and scattered as [C, *shape] rows
            state = {k: v.to(self.device) for k, v in self.client_states.gather(members, theta).items()}
            with vmap_errors(self.cfg):
                phi, metrics, state = update(self.model, theta_d, state, support, query, schedule, icfg)
            self.client_states.scatter(members, state)
            out.append(TrainChunk(
                positions=list(chunk),
                phi={k: v.detach().cpu() for k, v in phi.items()},
                metrics={k: v.detach().cpu().tolist() for k, v in metrics.items()},
                num_examples=store.n_support[idx].tolist(),
            ))
        return out

    def train(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        """``train_client`` for the whole cohort (see :meth:`train_chunks`), as one :class:`StackedUpdates`."""
        return Replies(results=cohort_updates(self.cfg, theta, cids, self.train_chunks(theta, cids, server_round)))

    # -- evaluation --------------------------------------------------------------
    def evaluate_chunks(self, theta: Params, cids: list[int], server_round: int) -> list[EvalChunk]:
        """``evaluate_client`` for the whole cohort, per chunk: query loss/accuracy before, during and after adaptation."""
        cfg, store = self.cfg, self.store
        store.ensure(cids)
        icfg = inner_config(cfg, self.spec, evaluation=True, algorithm=self.algorithm)
        marks = tuple(s for s in CURVE_STEPS if 0 < s <= icfg.steps)
        n_query = (store.n - store.n_support)[cids].tolist()
        schedules = [eval_schedule(cfg, ClientSizes(s, q), server_round, cid, icfg.steps) for cid, s, q in zip(cids, store.n_support[cids].tolist(), n_query)]
        theta_d = self._on_device(theta)
        out: list[EvalChunk] = []
        keys = [(*s.shape, q) for s, q in zip(schedules, n_query)]
        for chunk in _groups(keys, self.chunk_size):
            idx = torch.tensor([cids[p] for p in chunk])
            sx, sy, sp = store.support(idx, self.device)
            qx, qy, qp = store.query(idx, self.device)
            schedule = torch.stack([schedules[p] for p in chunk]).to(self.device)
            with vmap_errors(self.cfg):
                columns = vmap(
                    lambda th, sup, qry, sch: self.algorithm.evaluate(self.model, th, sup, qry, sch, icfg, marks),
                    in_dims=(None, 0, 0, 0),
                    randomness="error",
                )(theta_d, (sx, sy, sp), (qx, qy, qp), schedule)
            out.append(EvalChunk(
                positions=list(chunk),
                metrics={k: v.detach().cpu().tolist() for k, v in columns.items()},
                num_examples=[n_query[p] for p in chunk],
            ))
        return out

    def evaluate(self, theta: Params, cids: list[int], server_round: int) -> Replies:
        """``evaluate_client`` for the whole cohort (see :meth:`evaluate_chunks`)."""
        return Replies(results=eval_results(cids, self.evaluate_chunks(theta, cids, server_round)))


# -- a chunk's results, and the per-client replies the round loop takes (shared with the Ray workers) -------------


@dataclass
class TrainChunk:
    """One vmap chunk's training results: ``phi[k][j]`` is the client at cohort position ``positions[j]``."""

    positions: list[int]
    phi: dict[str, Tensor]
    metrics: dict[str, list[float]]
    num_examples: list[int]


@dataclass
class EvalChunk:
    positions: list[int]
    metrics: dict[str, list[float]]
    num_examples: list[int]


def client_updates(cfg: Config, theta: Params, cids: list[int], chunks: list[TrainChunk]) -> list[ClientUpdate]:
    """One ``ClientUpdate`` per cohort position, in cohort order (client-mode DP clips each phi here, as a client would)."""
    updates: list[ClientUpdate | None] = [None] * len(cids)
    for ch in chunks:
        for j, p in enumerate(ch.positions):
            phi_j = client_side_clip(cfg, theta, {k: v[j] for k, v in ch.phi.items()})
            n = int(ch.num_examples[j])
            updates[p] = ClientUpdate(cids[p], phi_j, n, {"num-examples": n} | {k: float(v[j]) for k, v in ch.metrics.items()})
    missing = [cids[p] for p, u in enumerate(updates) if u is None]
    if missing:
        raise RunError(f"vectorized engine: no result for clients {missing[:5]} (internal error)")
    return updates


def stacked_updates(cids: list[int], chunks: list[TrainChunk]) -> StackedUpdates:
    """The chunks' results as one :class:`StackedUpdates` in cohort order (no per-client dicts)."""
    positions = [p for ch in chunks for p in ch.positions]
    if sorted(positions) != list(range(len(cids))):
        missing = sorted(set(range(len(cids))) - set(positions))
        raise RunError(f"vectorized engine: no result for clients {[cids[p] for p in missing[:5]]} (internal error)")
    if len(chunks) == 1 and positions == list(range(len(cids))):
        ch = chunks[0]
        return StackedUpdates(list(cids), ch.phi, [int(n) for n in ch.num_examples], ch.metrics)
    order = torch.empty(len(cids), dtype=torch.long)
    order[torch.tensor(positions)] = torch.arange(len(cids))  # cohort position -> row of the concatenation
    phi = {k: torch.cat([ch.phi[k] for ch in chunks])[order] for k in chunks[0].phi}
    flat_n = [int(n) for ch in chunks for n in ch.num_examples]
    flat_m = {k: [v for ch in chunks for v in ch.metrics[k]] for k in chunks[0].metrics}
    rows = order.tolist()
    return StackedUpdates(list(cids), phi, [flat_n[r] for r in rows], {k: [v[r] for r in rows] for k, v in flat_m.items()})


def cohort_updates(cfg: Config, theta: Params, cids: list[int], chunks: list[TrainChunk]) -> "StackedUpdates | list[ClientUpdate]":
    """Stacked updates, or one ``ClientUpdate`` per client where each client clips its own (``privacy.mode = "client"``)."""
    if cfg.privacy.enabled and cfg.privacy.mode == "client":
        return client_updates(cfg, theta, cids, chunks)
    return stacked_updates(cids, chunks)


def eval_results(cids: list[int], chunks: list[EvalChunk]) -> list[tuple[int, dict[str, float]]]:
    """``(cid, metrics)`` per cohort position, in cohort order."""
    metrics: list[dict[str, float]] = [{} for _ in cids]
    for ch in chunks:
        for j, p in enumerate(ch.positions):
            metrics[p] = {k: float(v[j]) for k, v in ch.metrics.items()} | {"num-examples": int(ch.num_examples[j])}
    return list(zip(cids, metrics))


@ENGINES.register("vectorized")
class VectorizedEngine(InProcessEngine):
    """``simulation.engine = "vectorized"``: :class:`VectorizedBackend`, or with ``simulation.workers = N`` the Ray workers'
    :class:`~fedmeta.engines.ray_cluster.RayVectorizedBackend` (which rebuild the components from the config)."""

    def clients_elsewhere(self, cfg: Config) -> str | None:
        return "simulation.workers: Ray workers run in other processes" if cfg.simulation.workers else None

    def backend(self, cfg: Config, components):
        if cfg.simulation.workers:
            from fedmeta.engines.ray_cluster import RayVectorizedBackend

            return RayVectorizedBackend(cfg, components)
        return VectorizedBackend(cfg, components)
