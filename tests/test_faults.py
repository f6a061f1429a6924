"""Faults: crashing and malformed clients on Flower's Simulation Engine; too few replies."""

import json
import math
import os
import warnings

import pytest
import torch

from fedmeta.config import build_config
from fedmeta.data import build_dataset, split_clients
from fedmeta.client import model_for
from fedmeta.federation import run_federation
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.meta import params_of
from fedmeta.results import RunWriter

KINDS = ["raise", "names", "shape", "dtype", "nan", "inf", "norm", "stype", "truncated", "takeover"]
REJECTED_IN_TRAINING = ["names", "shape", "dtype", "nan", "inf", "norm", "stype", "truncated"]


def simulate_with(client_app, cfg, out) -> dict:
    """fedmeta's ServerApp against ``client_app`` on Flower's Simulation Engine; returns the summary."""
    from flwr.simulation import run_simulation

    from fedmeta.engines.flower import make_server_app

    result: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(cfg, out, result=result, progress=False),
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False}},
        )
    return result


@pytest.mark.slow
def test_malformed_and_crashing_clients_are_counted_never_aggregated(tmp_path):
    """Every fault kind of tests/faulty_client.py at once, on the real Simulation Engine: the run completes,
    each bad reply is counted, and the client claiming 10^15 examples does not take the model over."""
    import faulty_client

    n = faulty_client.NUM_CLIENTS
    split = split_clients(n, 0.2, 0)  # 13 training clients (10 faulty), 3 held out (2 faulty)
    assert faulty_client.KINDS == KINDS and faulty_client.HELDOUT_KINDS == ["pid", "eval0"]
    cfg = build_config(None, [
        f"data.num_clients={n}", "data.examples_per_client=20", f"simulation.clients_per_round={len(split.train)}",
        "simulation.rounds=2", "simulation.eval_every=2", "simulation.min_clients=2", "simulation.round_timeout=120",
        # the weight cap alone: the cohort norm screen (tests/test_robust.py) would reject the takeover (norm ~10
        # against honest ~0.5) in some rounds and not others, around its default 20 x the median
        "simulation.max_norm_ratio=0", "output.progress=false",
    ])
    result = simulate_with(faulty_client.app, cfg, tmp_path)
    assert result["status"] == "completed" and (tmp_path / "model.pt").exists()
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["replies"] == len(split.train) - len(KINDS) + 1  # the 3 good clients and the takeover, capped
        assert r["failures"] >= 1  # the crashing client (error reply)
        assert not r["skipped"]
    # round 1: the training faults + the node whose partition-id is not a number (discovery);
    # round 2: the training faults + the held-out client reporting num-examples = 0 at evaluation
    assert [r["rejected"] for r in records] == [len(REJECTED_IN_TRAINING) + 1] * 2
    assert result["rejected"] == 2 * (len(REJECTED_IN_TRAINING) + 1)
    assert math.isfinite(result["heldout_acc_after"]) and math.isfinite(result["acc_after"])
    model = torch.load(tmp_path / "model.pt")
    theta0 = params_of(model_for(cfg, build_dataset(cfg.data).spec))
    shift = torch.cat([(model[k] - theta0[k]).flatten() for k in theta0])
    assert torch.isfinite(shift).all()
    # phi = theta + a at 10^15 examples would move theta by a * (beta_1 + beta_2) = 1.5 a everywhere (the run
    # would be the attacker's); capped at the 20 examples it announced (the honest clients report 10), it
    # weighs 20 / (20 + 3 * 10) = 0.4 of each round's mean
    hijacked = faulty_client.TAKEOVER_OFFSET * 1.5
    assert 0.2 < float(shift.mean()) / hijacked < 0.6, float(shift.mean()) / hijacked


class FlakyBackend(SequentialBackend):
    """Only ``good`` clients per round reply; the rest fail."""

    def __init__(self, cfg, ds, good):
        super().__init__(cfg, ds)
        self.good = good
        self.calls = 0

    def train(self, theta, cids, server_round):
        self.calls += 1
        out = super().train(theta, cids[: self.good], server_round)
        out.failures = len(cids) - self.good
        return out


def _run(cfg, tmp_path, good):
    ds = build_dataset(cfg.data)
    backend = FlakyBackend(cfg, ds, good)
    theta0 = params_of(model_for(cfg, ds.spec))
    run_federation(cfg, backend, theta0, RunWriter(tmp_path))
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return backend, theta0, records, torch.load(tmp_path / "model.pt")


def test_too_few_replies_skips_the_round_and_never_averages_nothing(small_cfg, tmp_path):
    cfg = small_cfg("simulation.min_clients=2", "simulation.on_too_few=skip")
    backend, theta0, records, model = _run(cfg, tmp_path, good=1)
    assert all(r["skipped"] and r["failures"] == 2 and r["replies"] == 1 for r in records)
    assert all(torch.equal(model[k], theta0[k]) for k in theta0)  # theta never moved


def test_too_few_replies_retries_with_a_fresh_cohort(small_cfg, tmp_path):
    cfg = small_cfg("simulation.min_clients=2", "simulation.on_too_few=retry", "simulation.max_retries=2", "simulation.rounds=2")
    backend, _, records, _ = _run(cfg, tmp_path, good=1)
    assert backend.calls == 2 * 3  # 1 try + 2 retries per round
    assert all(r["skipped"] and r["failures"] == 3 * 2 for r in records)


def test_enough_replies_proceed_and_failures_are_counted(small_cfg, tmp_path):
    cfg = small_cfg("simulation.min_clients=2")
    _, theta0, records, model = _run(cfg, tmp_path, good=2)
    assert all(not r["skipped"] and r["failures"] == 1 and r["replies"] == 2 for r in records)
    assert any(not torch.equal(model[k], theta0[k]) for k in theta0)


def test_diverged_inner_loops_are_rejected_on_every_engine(small_cfg, tmp_path):
    """A learning rate that blows up gives NaN/huge updates: they are rejected, theta stays finite."""
    cfg = small_cfg("meta.inner_lr=1e6", "simulation.engine=sequential")
    ds = build_dataset(cfg.data)
    theta0 = params_of(model_for(cfg, ds.spec))
    run_federation(cfg, SequentialBackend(cfg, ds), theta0, RunWriter(tmp_path))
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rejected"] >= 1 for r in records)
    model = torch.load(tmp_path / "model.pt")
    assert all(torch.isfinite(v).all() for v in model.values())


@pytest.mark.slow
def test_a_stock_flower_client_works_with_the_reptile_server(tmp_path):
    """Nodes without fedmeta's `query` handler train under their node id and are aggregated."""
    import stock_client

    cfg = build_config(None, [
        "data.num_clients=8", "simulation.clients_per_round=3", "simulation.rounds=2",
        "simulation.eval_every=2", "simulation.round_timeout=120", "output.progress=false",
    ])
    result = simulate_with(stock_client.app, cfg, tmp_path)
    assert result["status"] == "completed"
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["replies"] == 3 and r["rejected"] == 0 and not r["skipped"] for r in records)
    theta0 = params_of(model_for(cfg, build_dataset(cfg.data).spec))
    model = torch.load(tmp_path / "model.pt")
    assert any(not torch.equal(model[k], theta0[k]) for k in theta0)  # the stock updates moved theta
