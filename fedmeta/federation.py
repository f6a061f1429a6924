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
from fedmeta.meta.aggregate import aggregate_stacked, weighted_average
from fedmeta.meta.inner import Params, client_seed
from fedmeta.meta.algorithm import algorithm_for, extra_params, model_params
from fedmeta.meta.outer import ServerAdam, apply_step, difference
from fedmeta.results import CHECKPOINT, CONFIG, RunWriter, check_resume, read_run_config

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
    per_key = [(phi[k] - theta[k]).to(torch.float64).pow(2).flatten(1).sum(1) for k in theta]
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


class RunError(RuntimeError):
    """A run cannot continue; the message is one line."""


def _rng(cfg: Config, stream: int, server_round: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng(client_seed(cfg.simulation.seed, stream, server_round, attempt))


def sample_rate(cfg: Config, population_size: int) -> float:
    """q = clients_per_round / N (at most 1): Poisson sampling's inclusion probability, and the accountant's q."""
    return min(1.0, cfg.simulation.clients_per_round / population_size)


def sample_cohort(cfg: Config, population: list[int], server_round: int, attempt: int = 0) -> list[int]:
    """The cohort of one round's attempt: the only client sampler (every engine, private or not).

    ``simulation.sampling = "poisson"``: every client joins independently with
    probability :func:`sample_rate` (the cohort may be empty); this is what the
    privacy accountant assumes, and the config refuses DP with anything else.
    ``"fixed"``: ``clients_per_round`` distinct clients uniformly without
    replacement. Population order is kept. The draws depend only on
    (simulation.seed, round, attempt), so a resumed run samples what an
    uninterrupted one would have.
    """
    rng = _rng(cfg, SAMPLE_STREAM, server_round, attempt)
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


def summarise_eval(replies: Replies, prefix: str = "") -> dict[str, float]:
    metrics = [m for _, m in replies.results]
    return {f"{prefix}{k}": _mean(metrics, k) for k in EVAL_KEYS if any(k in m for m in metrics)}


def screen_updates(updates: "list[ClientUpdate] | StackedUpdates", theta: Params, max_norm: float) -> tuple["list[ClientUpdate] | StackedUpdates", list[str]]:
    """Drop updates that are non-finite or whose ||phi - theta|| exceeds ``max_norm`` (every engine).

    Takes and returns a list of :class:`ClientUpdate` or a :class:`StackedUpdates`; the norms come
    from :func:`update_norms` (stacked, one host sync per round).
    """
    stacked = isinstance(updates, StackedUpdates)
    cids = updates.cids if stacked else [u.cid for u in updates]
    keep, rejected = [], []
    for i, (cid, norm) in enumerate(zip(cids, update_norms(updates, theta))):
        if not math.isfinite(norm):
            rejected.append(f"client {cid}: update contains NaN or Inf")
        elif norm > max_norm:
            rejected.append(f"client {cid}: update norm {norm:.3g} exceeds simulation.max_update_norm={max_norm:g}")
        else:
            keep.append(i)
    return (updates.select(keep) if stacked else [updates[i] for i in keep]), rejected


MAX_CLIENT_METRICS = 32


def client_metrics(updates: list[ClientUpdate], reserved: dict[str, Any]) -> dict[str, float]:
    """The cohort's weighted mean of each metric the algorithm reports (``train_loss``, MAML's ``query_loss``...).

    Only keys that *every* update carries are kept, never one the round loop writes itself
    (``reserved``, ``epsilon``, evaluation keys...), and at most :data:`MAX_CLIENT_METRICS`:
    one client cannot add, overwrite or flood the round's record.
    """
    if not updates:
        return {}
    common = set.intersection(*(set(u.metrics) for u in updates)) - {"num-examples"} - set(reserved)
    loop_keys = {"failures", "rejected", "skipped", "time_s", "stopped", "epsilon", "delta", "clip_norm",
                 "noise_multiplier", "sample_rate", "accountant", *EVAL_KEYS}
    keys = sorted(k for k in common - loop_keys if not k.startswith(("heldout_", "val_")))[:MAX_CLIENT_METRICS]
    weighted = [u.metrics | {"num-examples": u.num_examples} for u in updates]
    return {k: _mean(weighted, k) for k in keys}


class Server:
    """Server state and the outer step: theta, the privacy mechanism and the accountant."""

    def __init__(self, cfg: Config, theta: Params, num_train_clients: int) -> None:
        self.cfg = cfg
        self.theta = {k: v.detach().clone() for k, v in theta.items()}
        self.num_train = num_train_clients
        self.algorithm = algorithm_for(cfg)
        self.optimizer = None
        if cfg.meta.server_optimizer == "adam":
            self.optimizer = ServerAdam(cfg.meta.server_beta1, cfg.meta.server_beta2, cfg.meta.server_eps)
        self.privacy = None
        if cfg.privacy.enabled:
            from fedmeta.privacy.server import ServerPrivacy

            self.privacy = ServerPrivacy(cfg, num_train_clients, sample_rate(cfg, num_train_clients))

    def step(self, updates: "list[ClientUpdate] | StackedUpdates", server_round: int) -> dict[str, float]:
        """Apply one outer step from the clients' phi; returns round info (beta, clip, ...).

        Without DP the deltas are stacked per key (``[N, *shape]``) and reduced once per key.
        """
        cfg = self.cfg
        beta = self.algorithm.step_size(server_round)
        info: dict[str, float] = {"beta": beta}
        if self.privacy is None:
            deltas = difference(stacked_phi(updates), self.theta)  # broadcast: theta has no cohort axis
            weights = updates.num_examples if isinstance(updates, StackedUpdates) else [u.num_examples for u in updates]
            mean = aggregate_stacked(deltas, weights, cfg.meta.aggregation, cfg.meta.trim_fraction, cfg.simulation.max_weight)
        else:
            deltas = [difference(u.phi, self.theta) for u in updates]
            generator = torch.Generator().manual_seed(
                client_seed(cfg.simulation.seed, NOISE_STREAM, server_round) if cfg.simulation.deterministic else int.from_bytes(os.urandom(8), "little") >> 1
            )
            mean, dp_info = self.privacy.aggregate(deltas, generator)
            info.update(dp_info)
        if self.optimizer is None:
            self.theta = apply_step(self.theta, mean, beta)
        else:
            self.theta = apply_step(self.theta, self.optimizer.update(mean, beta), 1.0)
        return info

    def state_dict(self) -> dict[str, Any]:
        return {
            "theta": self.theta,
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "privacy": None if self.privacy is None else self.privacy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta = state["theta"]
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.privacy is not None and state.get("privacy") is not None:
            self.privacy.load_state_dict(state["privacy"])


def run_federation(
    cfg: Config,
    backend: Backend,
    theta0: Params,
    writer: RunWriter,
    resume: bool = False,
    progress: Any | None = None,
) -> dict[str, Any]:
    """Drive ``cfg.simulation.rounds`` rounds on ``backend``; returns the summary (also written to disk)."""
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
    algorithm = algorithm_for(cfg)
    extra = algorithm.extra_state(model_params(theta0))  # e.g. Meta-SGD's learning rates, if theta0 lacks them
    theta0 = {k: v.detach().clone() for k, v in extra.items() if k not in theta0} | dict(theta0)
    server = Server(cfg, theta0, len(train_pop))
    start_round, history = 1, []
    started = time.time()
    if resume:  # the rules: fedmeta/results.py::check_resume, docs/design.md "Run directories and resume rules"
        ckpt = writer.load_checkpoint()  # weights_only: plain data, no code runs
        if ckpt is None:
            raise RunError(f"--resume: no checkpoint.pt in {writer.dir}")
        record = check_resume(writer.dir, cfg, checkpoint_round=ckpt["round"])
        theta = ckpt["server"]["theta"]
        if {k: tuple(v.shape) for k, v in theta.items()} != {k: tuple(v.shape) for k, v in server.theta.items()}:
            raise RunError(f"{writer.dir / CHECKPOINT}: its parameters do not match the model of {writer.dir / CONFIG}")
        server.load_state_dict(ckpt["server"])
        start_round = ckpt["round"] + 1
        history = writer.truncate_metrics(ckpt["round"])
        started -= float(ckpt.get("elapsed_s", 0.0))
        if record != read_run_config(writer.dir):  # e.g. simulation.rounds raised: config.json says so
            writer.write_config(record)
    else:
        writer.write_config(cfg.to_dict())
        if (writer.dir / "metrics.jsonl").exists():
            (writer.dir / "metrics.jsonl").unlink()

    last_eval: dict[str, float] = next((r for r in reversed(history) if "heldout_acc_after" in r or "heldout_loss_after" in r), {})
    R = cfg.simulation.rounds
    for rnd in range(start_round, R + 1):
        t0 = time.time()
        record: dict[str, Any] = {"round": rnd}
        applied = False
        failures = rejected = 0
        attempts = 1 + (cfg.simulation.max_retries if cfg.simulation.on_too_few == "retry" else 0)
        for attempt in range(attempts):
            if server.privacy is not None:
                stop = server.privacy.budget_exhausted()
                if stop:
                    record["stopped"] = stop
                    break
            cohort = sample_cohort(cfg, train_pop, rnd, attempt)
            replies = backend.train(server.theta, cohort, rnd) if cohort else Replies()
            replies.results, screened = screen_updates(replies.results, server.theta, cfg.simulation.max_update_norm)
            replies.rejected += screened
            for reason in replies.rejected:
                log.warning("round %s: rejected update: %s", rnd, reason)
            failures += replies.failures
            rejected += len(replies.rejected)
            if server.privacy is not None:
                server.privacy.account_round()  # every attempt releases (or could release) an output
            record.update({"clients": len(cohort), "replies": len(replies.results)})
            if len(replies.results) >= cfg.simulation.min_clients:
                record.update(server.step(replies.results, rnd))
                record.update(client_metrics(replies.results, reserved=record))
                applied = True
                break
        if "stopped" in record:
            writer.append_metrics(record)
            history.append(record)
            break
        record.update({"failures": failures, "rejected": rejected, "skipped": not applied})
        if server.privacy is not None:
            record.update(server.privacy.report())

        if rnd % cfg.simulation.eval_every == 0 or rnd == R:
            if applied:
                record.update(summarise_eval(backend.evaluate(server.theta, cohort, rnd)))
            for prefix, group, stream in (("heldout_", heldout_pop, HELDOUT_STREAM), ("val_", val_pop, VALIDATION_STREAM)):
                if not group:
                    continue
                if cfg.simulation.eval_clients and cfg.simulation.eval_clients < len(group):
                    picks = _rng(cfg, stream, rnd).choice(len(group), cfg.simulation.eval_clients, replace=False)
                    group = sorted(group[i] for i in picks)
                group_replies = backend.evaluate(server.theta, group, rnd)
                record.update(summarise_eval(group_replies, prefix))
                record["failures"] += group_replies.failures
                record["rejected"] += len(group_replies.rejected)
            last_eval = record
        record["time_s"] = time.time() - t0
        writer.append_metrics(record)
        history.append(record)
        if progress is not None:
            progress(record)
        if rnd % cfg.output.checkpoint_every == 0 or rnd == R:
            writer.save_checkpoint({"round": rnd, "server": server.state_dict(), "elapsed_s": time.time() - started, "config": cfg.to_dict()})

    summary = build_summary(cfg, backend, server, history, last_eval, time.time() - started)
    writer.save_model(model_params(server.theta), extra_params(server.theta))
    writer.write_summary(summary)
    return summary


def build_summary(cfg: Config, backend: Backend, server: Server, history: list[dict], last_eval: dict, wall: float) -> dict[str, Any]:
    final = {k: v for k, v in last_eval.items() if k.startswith(("heldout_", "val_", "loss_", "acc_"))}
    summary: dict[str, Any] = {
        "status": "completed",
        "engine": backend.name,
        "algorithm": cfg.meta.algorithm,
        "dataset": cfg.data.dataset,
        "rounds_completed": max((r["round"] for r in history if not r.get("stopped")), default=0),
        "rounds_planned": cfg.simulation.rounds,
        "num_parameters": int(sum(v.numel() for v in model_params(server.theta).values())),  # the model's, not extra meta-state
        "failures": int(sum(r.get("failures", 0) for r in history)),
        "rejected": int(sum(r.get("rejected", 0) for r in history)),
        "skipped_rounds": int(sum(1 for r in history if r.get("skipped"))),
        "wall_time_s": wall,
        **final,
    }
    acc = last_eval.get("heldout_acc_after")
    if acc is None or not math.isfinite(acc):  # regression: report the adaptation curve as MSE
        summary["heldout_mse_after_steps"] = {str(s): last_eval.get(f"heldout_loss_at_{s}") for s in (1, 5, 10)}
    stopped = next((r["stopped"] for r in history if r.get("stopped")), None)
    if stopped:
        summary["stopped_early"] = stopped
    if server.privacy is not None:
        summary.update(server.privacy.report())
    return summary
