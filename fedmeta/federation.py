"""The round loop every engine shares.

An engine supplies a *backend* that runs clients (Flower messages, a Python
loop, or ``vmap``); everything else happens here, once: cohort sampling,
the Reptile/FedAvg step (with clipping and noise when DP is on), privacy
accounting, evaluation, metrics, checkpoints and resume.

Random streams are derived from (seed, purpose, round), not carried as state,
so a resumed run draws exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedmeta.config import Config
from fedmeta.meta.aggregate import finite_number, weighted_average
from fedmeta.meta.inner import Params, client_seed
from fedmeta.meta.algorithm import MetaAlgorithm, build_algorithm, extra_params, model_params
from fedmeta.meta.client_state import open_client_states
from fedmeta.meta.outer import difference
from fedmeta.meta.robust import norm_outliers
from fedmeta.results import CHECKPOINT, CONFIG, SUMMARY, RunWriter, check_resume, read_run_config

log = logging.getLogger("fedmeta")
SAMPLE_STREAM, NOISE_STREAM, HELDOUT_STREAM, VALIDATION_STREAM = 11, 12, 13, 14


@dataclass
class ClientUpdate:
    cid: int
    phi: Params
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StackedUpdates:
    """A cohort's training updates kept stacked (the vectorised engine's reply; issue 21).

    ``phi[k][i]`` is client ``cids[i]``'s new value of parameter ``k``; ``metrics[name][i]`` its metric.
    The round loop screens, aggregates and steps on these tensors directly; iterating yields one
    :class:`ClientUpdate` per client (views, no copy) for code that wants them one at a time.
    """

    cids: list[int]
    phi: Params
    num_examples: list[int]
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cids)

    def __iter__(self):
        for i, cid in enumerate(self.cids):
            n = int(self.num_examples[i])
            yield ClientUpdate(cid, {k: v[i] for k, v in self.phi.items()}, n,
                               {"num-examples": n} | {k: float(v[i]) for k, v in self.metrics.items()})

    def select(self, keep: list[int]) -> "StackedUpdates":
        """The updates at positions ``keep`` (in that order)."""
        if list(keep) == list(range(len(self.cids))):
            return self
        idx = torch.tensor(keep, dtype=torch.long)
        return StackedUpdates([self.cids[i] for i in keep], {k: v[idx] for k, v in self.phi.items()},
                              [self.num_examples[i] for i in keep], {k: [v[i] for i in keep] for k, v in self.metrics.items()})


def stacked_phi(updates: "list[ClientUpdate] | StackedUpdates") -> Params:
    """The cohort's phi as one stacked tensor per key (a list of updates is stacked once)."""
    if isinstance(updates, StackedUpdates):
        return updates.phi
    return {k: torch.stack([u.phi[k] for u in updates]) for k in updates[0].phi}


def update_norms(updates: "list[ClientUpdate] | StackedUpdates", theta: Params) -> list[float]:
    """``||phi_i - theta||`` per update, computed on stacked tensors with one host sync for the cohort."""
    if len(updates) == 0:
        return []
    phi = stacked_phi(updates)
    n = len(updates)  # reshape, not flatten(1): a 0-d parameter (a learnt temperature) is [N] stacked
    per_key = [(phi[k] - theta[k]).to(torch.float64).pow(2).reshape(n, -1).sum(1) for k in theta]
    return torch.stack(per_key).sum(0).sqrt().tolist()


@dataclass
class Replies:
    """What a backend got back from one round's clients."""

    results: list[Any] = field(default_factory=list)  # ClientUpdate for train, (cid, metrics) for evaluate
    failures: int = 0  # no reply, error reply, or timeout
    rejected: list[str] = field(default_factory=list)  # malformed replies, with reasons


class Backend(Protocol):
    name: str

    def populations(self) -> tuple[list[int], list[int]]:
        """(training client ids, held-out client ids)."""

    def train(self, theta: Params, cids: list[int], server_round: int) -> Replies: ...

    def evaluate(self, theta: Params, cids: list[int], server_round: int) -> Replies: ...


from fedmeta.errors import RunError  # noqa: E402,F401 - defined in fedmeta.errors


def _rng(cfg: Config, stream: int, server_round: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng(client_seed(cfg.simulation.seed, stream, server_round, attempt))


def sample_rate(cfg: Config, population_size: int) -> float:
    """q = clients_per_round / N (at most 1): Poisson sampling's inclusion probability, and the accountant's q."""
    return min(1.0, cfg.simulation.clients_per_round / population_size)


def sample_cohort(cfg: Config, population: list[int], server_round: int, attempt: int = 0, seed: int | None = None) -> list[int]:
    """The cohort of one round's attempt: the only client sampler (every engine, private or not).

    ``simulation.sampling = "poisson"``: every client joins independently with
    probability :func:`sample_rate` (the cohort may be empty); this is what the
    privacy accountant assumes, and the config refuses DP with anything else.
    ``"fixed"``: ``clients_per_round`` distinct clients uniformly without
    replacement. Population order is kept. The draws depend only on
    (simulation.seed, round, attempt), so a resumed run samples what an
    uninterrupted one would have. A private run passes ``seed``, its
    server-secret seed of this round and attempt
    (:meth:`fedmeta.privacy.server.ServerPrivacy.sampling_seed`), so the cohort
    cannot be recomputed from the config.
    """
    rng = _rng(cfg, SAMPLE_STREAM, server_round, attempt) if seed is None else np.random.default_rng(seed)
    if cfg.simulation.sampling == "poisson":
        q = sample_rate(cfg, len(population))
        return [c for c in population if rng.random() < q]
    k = min(cfg.simulation.clients_per_round, len(population))
    # sample positions, not ids: Flower node ids are 64-bit and would not survive a numpy array
    return sorted(population[i] for i in rng.choice(len(population), size=k, replace=False))


def _mean(results: list[dict[str, float]], key: str, weight: str = "num-examples") -> float:
    """Weighted mean of a reported metric; non-finite values and bad weights are dropped (NaN if none is left)."""
    return weighted_average([(r[key], r.get(weight, 1)) for r in results if key in r])


EVAL_KEYS = ("loss_before", "loss_after", "acc_before", "acc_after", "loss_at_1", "loss_at_5", "loss_at_10", "acc_at_1", "acc_at_5", "acc_at_10")


def _unusable(m: dict[str, Any], keys: list[str], weight: str = "num-examples") -> str:
    """Why one client's reply cannot enter the means over ``keys`` ("" if it can)."""
    w = m.get(weight, 1)
    if not (finite_number(w) and w > 0):
        return f"{weight} {w!r} (an empty query set?)"
    for k in keys:
        if not finite_number(m.get(k)):
            return f"{k} {m.get(k)!r}"
    return ""


def summarise_eval(replies: Replies, prefix: str = "") -> dict[str, float]:
    """The weighted mean of every evaluation key, every mean over the *same* clients.

    A client whose weight is not a positive number (e.g. an empty query set) or whose value of a
    key is missing or non-finite is left out of *all* the means and its reason appended to
    ``replies.rejected`` (the round loop counts and logs it). Keys no client reports finite (the
    accuracies of a regression task) are means of nothing: NaN, and no reason to drop anyone.
    """
    metrics = [(cid, m) for cid, m in replies.results]
    keys = [k for k in EVAL_KEYS if any(k in m for _, m in metrics)]
    checked = [k for k in keys if any(finite_number(m.get(k)) for _, m in metrics)]
    kept = []
    for cid, m in metrics:
        why = _unusable(m, checked)
        if why:
            replies.rejected.append(f"client {cid}: evaluation reply left out of every mean: {why}")
        else:
            kept.append(m)
    return {f"{prefix}{k}": _mean(kept, k) for k in keys}


def screen_updates(updates: "list[ClientUpdate] | StackedUpdates", theta: Params, max_norm: float,
                   max_norm_ratio: float = 0.0) -> tuple["list[ClientUpdate] | StackedUpdates", list[str]]:
    """Drop updates that are non-finite or whose ||phi - theta|| exceeds ``max_norm`` (every engine), then
    those above ``max_norm_ratio`` x the cohort's median norm (:func:`fedmeta.meta.robust.norm_outliers`; 0 = off).

    Takes and returns a list of :class:`ClientUpdate` or a :class:`StackedUpdates`; the norms come
    from :func:`update_norms` (stacked, one host sync per round).
    """
    stacked = isinstance(updates, StackedUpdates)
    cids = updates.cids if stacked else [u.cid for u in updates]
    keep, norms, rejected = [], [], []
    for i, (cid, norm) in enumerate(zip(cids, update_norms(updates, theta))):
        if not math.isfinite(norm):
            rejected.append(f"client {cid}: update contains NaN or Inf")
        elif norm > max_norm:
            rejected.append(f"client {cid}: update norm {norm:.3g} exceeds simulation.max_update_norm={max_norm:g}")
        else:
            keep.append(i)
            norms.append(norm)
    outliers, bound = norm_outliers(norms, max_norm_ratio)
    for j in outliers:
        rejected.append(f"client {cids[keep[j]]}: update norm {norms[j]:.3g} exceeds simulation.max_norm_ratio={max_norm_ratio:g} "
                        f"x the cohort's median norm {bound / max_norm_ratio:.3g} (bound {bound:.3g})")
    drop = set(outliers)
    keep = [i for j, i in enumerate(keep) if j not in drop]
    return (updates.select(keep) if stacked else [updates[i] for i in keep]), rejected


MAX_CLIENT_METRICS = 32


def client_metrics(updates: list[ClientUpdate], reserved: dict[str, Any], dropped: list[str] | None = None) -> dict[str, float]:
    """The cohort's weighted mean of each metric the algorithm reports (``train_loss``, MAML's ``query_loss``...).

    Only keys that *every* update carries are kept, never one the round loop writes itself
    (``reserved``, ``epsilon``, evaluation keys...), and at most :data:`MAX_CLIENT_METRICS`:
    one client cannot add, overwrite or flood the round's record. Every mean is over the same
    updates: one with a non-finite value of a kept key is left out of all of them, its reason
    appended to ``dropped`` (the round loop counts it in ``rejected``; its update was still applied). A key
    that no update reports finite is NaN and drops no one (as :func:`summarise_eval` does).
    """
    if not updates:
        return {}
    common = set.intersection(*(set(u.metrics) for u in updates)) - {"num-examples"} - set(reserved)
    loop_keys = {"failures", "rejected", "skipped", "time_s", "stopped", "epsilon", "delta", "clip_norm",
                 "noise_multiplier", "sample_rate", "accountant", *EVAL_KEYS}
    keys = sorted(k for k in common - loop_keys if not k.startswith(("heldout_", "val_")))[:MAX_CLIENT_METRICS]
    # a key no update reports finite (local's train_loss: it trains nothing) is a mean of nothing: NaN, no one dropped
    checked = [k for k in keys if any(finite_number(u.metrics.get(k)) for u in updates)]
    weighted = []
    for u in updates:
        m = u.metrics | {"num-examples": u.num_examples}
        why = _unusable(m, checked)
        if why:
            if dropped is not None:
                dropped.append(f"client {u.cid}: training metrics left out of every mean: {why}")
        else:
            weighted.append(m)
    return {k: _mean(weighted, k) for k in keys}


def noise_generator(cfg: Config, privacy: Any, server_round: int, attempt: int = 0, release: int = 0) -> torch.Generator:
    """DP noise seeding call site: the generator of one round's DP noise (used by the private server hook).

    From the server's secret (the same noise when a resume re-runs this round, and nobody else can draw it), or,
    with ``privacy.reproducible_noise = true``, from the config: anyone holding it can regenerate this noise.
    ``release`` > 0: a re-run round whose output differs from its recorded release(s) (:meth:`Server.release`).
    """
    if privacy.secret is not None:
        return privacy.noise_generator(NOISE_STREAM, server_round, attempt, release)
    keys = (cfg.simulation.seed, NOISE_STREAM, server_round) + ((attempt, release) if release else ())
    return torch.Generator().manual_seed(
        client_seed(*keys) if cfg.simulation.deterministic else int.from_bytes(os.urandom(8), "little") >> 1
    )


class AlgorithmServer:
    """The algorithm's own server hook, as the round loop drives it (no DP: nothing to stop on, account or report)."""

    def __init__(self, algorithm: MetaAlgorithm) -> None:
        self.algorithm = algorithm

    def update(self, theta: Params, deltas: list[Params], weights: list[float], server_round: int, state: dict[str, Any],
               attempt: int = 0, release: int = 0):
        return self.algorithm.server_update(theta, deltas, weights, server_round, state)

    #: no DP: the noise and cohorts need no secret (``privacy.server.PrivateServer`` says otherwise)
    secret_noise = False

    def sampling_seed(self, stream: int, server_round: int, attempt: int) -> int | None:
        return None  # the cohort is drawn from the config's seed

    def budget_exhausted(self) -> str | None:
        return None

    def account_round(self, releases: int = 1) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class Server:
    """Server state and the outer step: theta, the algorithm's server state, and its server hook.

    ``hook`` is the algorithm's server hook (:meth:`MetaAlgorithm.server_update`) or, with
    ``privacy.enabled``, :class:`fedmeta.privacy.server.PrivateServer` wrapping it (clip, noise,
    account); ``privacy`` is that wrapper's ``ServerPrivacy`` (mechanism, accountant), else None.
    """

    def __init__(self, cfg: Config, theta: Params, num_train_clients: int, algorithm: MetaAlgorithm | None = None) -> None:
        self.cfg = cfg
        self.theta = {k: v.detach().clone() for k, v in theta.items()}
        self.num_train = num_train_clients
        self.algorithm = algorithm if algorithm is not None else build_algorithm(cfg)  # None: a test's or script's single server
        self.state = self.algorithm.init_server_state(self.theta, num_train_clients)
        self.hook: Any = AlgorithmServer(self.algorithm)
        self.privacy = None
        if cfg.privacy.enabled:
            from fedmeta.privacy.server import PrivateServer

            self.hook = PrivateServer(self.algorithm, cfg, num_train_clients, sample_rate(cfg, num_train_clients), noise_generator)
            self.privacy = self.hook.privacy

    @property
    def secret_noise(self) -> bool:
        """A private run whose noise and cohorts come from the server's secret (not ``privacy.reproducible_noise``)."""
        return self.hook.secret_noise

    def cohort(self, population: list[int], server_round: int, attempt: int = 0) -> list[int]:
        """This round's cohort: :func:`sample_cohort`, from the server's secret in a private run."""
        seed = self.hook.sampling_seed(SAMPLE_STREAM, server_round, attempt)
        return sample_cohort(self.cfg, population, server_round, attempt, seed=seed)

    def step(self, updates: "list[ClientUpdate] | StackedUpdates", server_round: int, attempt: int = 0, release: int = 0) -> dict[str, float]:
        """Apply one outer step from the clients' phi through the server hook; returns round info (beta, clip, ...).

        The hook gets the cohort's deltas stacked per key (``[N, *shape]``: one reduction per key, issue 21).
        """
        if len(updates):
            deltas = difference(stacked_phi(updates), self.theta)  # broadcast: theta has no cohort axis
        else:  # a private round with no replies still releases (noise alone)
            deltas = {k: v.new_zeros((0, *v.shape)) for k, v in self.theta.items()}
        weights = list(updates.num_examples) if isinstance(updates, StackedUpdates) else [u.num_examples for u in updates]
        self.theta, self.state, info = self.hook.update(self.theta, deltas, weights, server_round, self.state,
                                                        attempt=attempt, release=release)
        return info

    def release(self, updates: "list[ClientUpdate] | StackedUpdates", server_round: int, attempt: int,
                recorded: list[str]) -> tuple[dict[str, float], str | None]:
        """A private round's step that never re-uses the noise of an earlier, different release (issue 17).

        ``recorded``: the digests (:func:`~fedmeta.privacy.server.release_digest`) of the thetas this
        (round, attempt) already released before a crash, in release order (``releases.jsonl``). The step
        is tried with each recorded release's noise in turn; the same output as a recorded one is a
        re-release (nothing new). Else the output is a new release, with noise keyed by a fresh release
        counter. Every distinct release is charged: the attempt's own charge (``account_round``, already
        made) plus the recorded releases that the restored accountant did not see, plus the new one.
        Returns the round info and the new release's digest to record (None: a recorded one went out again).
        """
        import copy

        from fedmeta.privacy.server import release_digest

        clipper = self.privacy.clipper
        before = copy.deepcopy((self.theta, self.state, self.privacy.clip_norm, None if clipper is None else vars(clipper)))
        for release in range(len(recorded) + 1):
            if release:  # undo the tried step: the next try starts from the same theta and state
                theta, state, clip, clip_state = copy.deepcopy(before)
                self.theta, self.state, self.privacy.clip_norm = theta, state, clip
                if clipper is not None:
                    vars(clipper).update(clip_state)
            info = self.step(updates, server_round, attempt, release=release)
            digest = release_digest(self.theta)
            if release < len(recorded) and digest == recorded[release]:
                self.hook.account_round(len(recorded) - 1)
                return info, None
        self.hook.account_round(len(recorded))
        if recorded:
            log.warning("round %s: the re-run round's output differs from its earlier release; fresh noise, "
                        "charged as release %d of this round", server_round, len(recorded) + 1)
        return info, digest

    @property
    def optimizer(self):
        """ServerAdam's state as a :class:`~fedmeta.meta.outer.ServerAdam` (read-only view; None without it), as before the hook moved."""
        if "adam" not in self.state:
            return None
        from fedmeta.meta.outer import ServerAdam

        adam = ServerAdam(self.cfg.meta.server_beta1, self.cfg.meta.server_beta2, self.cfg.meta.server_eps)
        adam.load_state_dict(self.state["adam"])
        return adam

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "algorithm": self.state, "privacy": self.hook.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta = state["theta"]
        if "algorithm" in state:
            self.state = state["algorithm"]
        elif state.get("optimizer") is not None:  # a checkpoint written before the server hook moved into the algorithm
            self.state = {"adam": state["optimizer"]}
        if state.get("privacy") is not None:
            self.hook.load_state_dict(state["privacy"])


def run_federation(
    cfg: Config,
    backend: Backend,
    theta0: Params,
    writer: RunWriter,
    resume: bool = False,
    progress: Any | None = None,
    launched_at: float | None = None,
    algorithm: MetaAlgorithm | None = None,
) -> dict[str, Any]:
    """Drive ``cfg.simulation.rounds`` rounds on ``backend``; returns the summary (also written to disk).

    ``algorithm``: the run's algorithm object (the engines pass their components'); None builds ``cfg``'s.

    ``launched_at``: when the command started (``time.time()``), so that the summary's ``startup_s``
    counts what came before the first round (Ray, building the population, discovering nodes).
    """
    train_pop, heldout_pop = backend.populations()
    # validation clients (optional): evaluated beside the test clients under "val_" keys, to choose settings on
    val_pop = list(getattr(backend, "validation_population", list)())
    if not train_pop:
        raise RunError("no training clients are available (every node is held out or failed to describe itself)")
    if cfg.simulation.sampling == "fixed" and cfg.simulation.clients_per_round > len(train_pop):
        # a user's dataset has its own split, and a deployment may have lost nodes: say so, never shrink silently
        log.warning(
            "simulation.clients_per_round=%d exceeds the %d training clients available; each round samples all %d",
            cfg.simulation.clients_per_round, len(train_pop), len(train_pop),
        )
    algorithm = getattr(backend, "algorithm", None) if algorithm is None else algorithm
    algorithm = build_algorithm(cfg) if algorithm is None else algorithm
    extra = algorithm.extra_state(model_params(theta0))  # e.g. Meta-SGD's learning rates, if theta0 lacks them
    theta0 = {k: v.detach().clone() for k, v in extra.items() if k not in theta0} | dict(theta0)
    server = Server(cfg, theta0, len(train_pop), algorithm)
    if hasattr(backend, "client_states"):  # a stateful method's client state: in memory, or memory-mapped in the run directory
        backend.client_states = open_client_states(cfg.simulation.client_state, algorithm, writer.dir, max(train_pop) + 1, theta0, resume)
    start_round, history = 1, []
    started = time.time()
    startup = started - launched_at if launched_at is not None else 0.0
    if resume:  # the rules: fedmeta/results.py::check_resume, docs/design.md "Run directories and resume rules"
        ckpt = writer.load_checkpoint()  # weights_only: plain data, no code runs
        if ckpt is None:
            raise RunError(f"--resume: no checkpoint.pt in {writer.dir}")
        record = check_resume(writer.dir, cfg, checkpoint_round=ckpt["round"])
        theta = ckpt["server"]["theta"]
        if {k: tuple(v.shape) for k, v in theta.items()} != {k: tuple(v.shape) for k, v in server.theta.items()}:
            raise RunError(f"{writer.dir / CHECKPOINT}: its parameters do not match the model of {writer.dir / CONFIG}")
        server.load_state_dict(ckpt["server"])
        if hasattr(backend, "client_states"):  # a stateful method's client state, as it was after that round
            backend.client_states.load_state_dict(ckpt.get("clients"))
        start_round = ckpt["round"] + 1
        history = writer.truncate_metrics(ckpt["round"])
        started -= float(ckpt.get("elapsed_s", 0.0))
        if record != read_run_config(writer.dir):  # e.g. simulation.rounds raised: config.json says so
            writer.write_config(record)
        (writer.dir / SUMMARY).unlink(missing_ok=True)  # extending a finished run: it is unfinished until the new end
    else:
        writer.write_config(cfg.to_dict())
        if (writer.dir / "metrics.jsonl").exists():
            (writer.dir / "metrics.jsonl").unlink()
        writer.clear_releases()
    # a private run's releases after the checkpoint (server-side only): a re-run round must not re-use their noise
    released: dict[tuple[int, int], list[str]] = {}
    if cfg.privacy.enabled:
        for rel in writer.read_releases():
            if rel["round"] >= start_round:
                released.setdefault((rel["round"], rel["attempt"]), []).append(rel["digest"])

    private = server.secret_noise  # nothing computed from training clients' data leaves the server un-noised
    ignored = cfg.ignored_privacy_keys()
    if ignored:
        log.warning("privacy.enabled = false: %s set but ignored (this run is not private)", ", ".join(ignored))
    last_eval: dict[str, float] = next((r for r in reversed(history) if "heldout_acc_after" in r or "heldout_loss_after" in r), {})
    R = cfg.simulation.rounds
    for rnd in range(start_round, R + 1):
        t0 = time.time()
        record: dict[str, Any] = {"round": rnd}
        applied = False
        failures = rejected = 0
        attempts = 1 + (cfg.simulation.max_retries if cfg.simulation.on_too_few == "retry" else 0)
        for attempt in range(attempts):
            stop = server.hook.budget_exhausted()
            if stop:
                record["stopped"] = stop
                break
            cohort = server.cohort(train_pop, rnd, attempt)
            replies = backend.train(server.theta, cohort, rnd) if cohort else Replies()
            ratio = 0.0 if cfg.privacy.enabled else cfg.simulation.max_norm_ratio  # DP: clipping bounds every update
            replies.results, screened = screen_updates(replies.results, server.theta, cfg.simulation.max_update_norm, ratio)
            replies.rejected += screened
            for reason in replies.rejected:
                log.warning("round %s: rejected update: %s", rnd, reason)
            failures += replies.failures
            rejected += len(replies.rejected)
            server.hook.account_round()  # DP: every attempt releases (or could release) an output
            if not private:
                record.update({"clients": len(cohort), "replies": len(replies.results)})
            # a private run releases every attempt (an empty cohort releases noise alone): whether a round is
            # skipped would depend on the secret cohort's replies, which no noise covers
            if private or len(replies.results) >= cfg.simulation.min_clients:
                if cfg.privacy.enabled:  # record the release before theta goes out in the next round
                    info, digest = server.release(replies.results, rnd, attempt, released.pop((rnd, attempt), []))
                    if digest is not None:
                        writer.append_release({"round": rnd, "attempt": attempt, "digest": digest})
                    record.update(info)
                else:
                    record.update(server.step(replies.results, rnd, attempt))
                if not private:  # un-noised statistics of the training cohort: never written in a private run
                    dropped: list[str] = []
                    record.update(client_metrics(replies.results, reserved=record, dropped=dropped))
                    for reason in dropped:
                        log.warning("round %s: %s", rnd, reason)
                    rejected += len(dropped)
                applied = True
                break
        if "stopped" in record:
            history.append(record)  # written after the loop, with the final evaluation
            break
        if private and (failures or rejected):  # the server's own log only: the counts are not released
            log.warning("round %s: %d training clients failed, %d rejected (not written: private run)", rnd, failures, rejected)
        # private: failures and rejected count held-out/validation evaluation only (the cohort's would reveal its size)
        record.update({"failures": 0 if private else failures, "rejected": 0 if private else rejected, "skipped": not applied})
        record.update(server.hook.report())

        if rnd % cfg.simulation.eval_every == 0 or rnd == R:
            if applied and not private:  # the training cohort's own loss/accuracy: un-noised, so not in a private run
                cohort_replies = backend.evaluate(server.theta, cohort, rnd)
                record.update(_counted(record, rnd, cohort_replies, summarise_eval(cohort_replies)))
            evaluate_groups(cfg, backend, server.theta, rnd, heldout_pop, val_pop, record)
            last_eval = record
        record["time_s"] = time.time() - t0
        writer.append_metrics(record)
        history.append(record)
        if progress is not None:
            progress(record)
        if rnd % cfg.output.checkpoint_every == 0 or rnd == R:
            ckpt = {"round": rnd, "server": server.state_dict(), "elapsed_s": time.time() - started, "config": cfg.to_dict()}
            if hasattr(backend, "client_states"):
                ckpt["clients"] = backend.client_states.state_dict()
            writer.save_checkpoint(ckpt)

    if released:  # recorded releases of rounds this resume did not reach (a budget stop): they went out, count them
        server.hook.account_round(sum(len(v) for v in released.values()))
    stop = history[-1] if history and history[-1].get("stopped") else None
    if stop is not None:  # stopped early: evaluate the model that model.pt will hold, not an older round's
        stop["stopped_at_round"] = stop["round"] - 1  # the last round whose step was applied
        if last_eval.get("round") != stop["stopped_at_round"]:
            stop["evaluated_round"] = stop["stopped_at_round"]
            evaluate_groups(cfg, backend, server.theta, stop["stopped_at_round"], heldout_pop, val_pop, stop)
            last_eval = stop
        writer.append_metrics(stop)
        if progress is not None:
            progress(stop)
        else:
            log.warning("stopped early after round %d/%d: %s", stop["stopped_at_round"], R, stop["stopped"])
    summary = build_summary(cfg, backend, server, history, last_eval, time.time() - started, startup)
    writer.save_model(model_params(server.theta), extra_params(server.theta))
    writer.write_summary(summary)
    return summary


def _counted(record: dict[str, Any], rnd: int, replies: Replies, summary: dict[str, float]) -> dict[str, float]:
    """Count an evaluation's failures and rejected (or left-out) replies in ``record`` and log each; returns ``summary``."""
    for reason in replies.rejected:
        log.warning("round %s: evaluation: %s", rnd, reason)
    record["failures"] = record.get("failures", 0) + replies.failures
    record["rejected"] = record.get("rejected", 0) + len(replies.rejected)
    return summary


def evaluate_groups(cfg: Config, backend: Backend, theta: Params, rnd: int, heldout_pop: list[int], val_pop: list[int], record: dict[str, Any]) -> None:
    """Evaluate ``theta`` on the held-out (``heldout_``) and validation (``val_``) clients into ``record``."""
    for prefix, group, stream in (("heldout_", heldout_pop, HELDOUT_STREAM), ("val_", val_pop, VALIDATION_STREAM)):
        if not group:
            continue
        if cfg.simulation.eval_clients and cfg.simulation.eval_clients < len(group):
            picks = _rng(cfg, stream, rnd).choice(len(group), cfg.simulation.eval_clients, replace=False)
            group = sorted(group[i] for i in picks)
        group_replies = backend.evaluate(theta, group, rnd)
        record.update(_counted(record, rnd, group_replies, summarise_eval(group_replies, prefix)))


def chance_level(backend: Backend, heldout_pop: list[int], limit: int = 2000) -> dict[str, float]:
    """Baselines of a classification task: ``chance_acc`` (1/num_classes) and, where the backend holds the data
    in this process and there are at most ``limit`` held-out clients, ``majority_acc``: the accuracy of always
    predicting the most frequent class of the held-out query sets (pooled, as accuracies are weighted)."""
    spec = getattr(backend, "spec", None)
    if spec is None or spec.task != "classification" or spec.num_classes < 1:
        return {}
    out = {"chance_acc": 1.0 / spec.num_classes}
    dataset = getattr(backend, "dataset", None)
    if dataset is not None and heldout_pop and len(heldout_pop) <= limit:
        try:
            counts = torch.zeros(spec.num_classes, dtype=torch.long)
            for cid in heldout_pop:
                data = dataset.client(cid)
                counts += torch.bincount(data.y[data.n_support:].long().flatten(), minlength=spec.num_classes)[: spec.num_classes]
            if counts.sum() > 0:
                out["majority_acc"] = float(counts.max()) / float(counts.sum())
        except Exception:  # noqa: BLE001 - a baseline is a courtesy; an odd dataset never stops the summary
            log.debug("majority-class rate not computed", exc_info=True)
    return out


def round_floats(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (no float32 noise in summary.json)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def build_summary(cfg: Config, backend: Backend, server: Server, history: list[dict], last_eval: dict, wall: float, startup: float = 0.0) -> dict[str, Any]:
    """The run's summary.json: status (``completed`` or ``stopped_early``), the final evaluation, baselines, totals."""
    final = {k: v for k, v in last_eval.items() if k.startswith(("heldout_", "val_", "loss_", "acc_"))}
    stop = next((r for r in history if r.get("stopped")), None)
    spec = getattr(backend, "spec", None)
    acc = last_eval.get("heldout_acc_after")
    regression = spec.task == "regression" if spec is not None else (acc is None or not math.isfinite(acc))
    summary: dict[str, Any] = {
        "status": "stopped_early" if stop else "completed",
        "engine": backend.name,
        "algorithm": cfg.meta.algorithm,
        "dataset": cfg.data.dataset,
        "task": "regression" if regression else "classification",
        "rounds_completed": max((r["round"] for r in history if not r.get("stopped")), default=0),
        "rounds_planned": cfg.simulation.rounds,
        "evaluated_round": last_eval.get("evaluated_round", last_eval.get("round")),
        "num_parameters": int(sum(v.numel() for v in model_params(server.theta).values())),  # the model's, not extra meta-state
        "failures": int(sum(r.get("failures", 0) for r in history)),
        "rejected": int(sum(r.get("rejected", 0) for r in history)),
        "skipped_rounds": int(sum(1 for r in history if r.get("skipped"))),
        "wall_time_s": wall,  # the rounds only (a resumed run adds the earlier sessions' rounds)
        "startup_s": startup,  # from the command's start to round 1: Ray, the population, node discovery
        **final,
    }
    if regression:  # the adaptation curve as MSE (built-in regression tasks use the MSE loss)
        summary["heldout_mse_after_steps"] = {str(s): last_eval.get(f"heldout_loss_at_{s}") for s in (1, 5, 10)}
    else:
        summary.update(chance_level(backend, backend.populations()[1]))
    if stop:
        summary["stopped_early"] = stop["stopped"]  # the reason, e.g. "privacy budget: ..."
        summary["stopped_at_round"] = stop.get("stopped_at_round", stop["round"] - 1)
    summary.update(server.hook.report())
    summary = round_floats(summary)
    if spec is not None:  # what fedmeta.load_run rebuilds the model from, without the data
        from fedmeta.data.base import spec_to_dict

        summary["data_spec"] = spec_to_dict(spec)
    return summary
