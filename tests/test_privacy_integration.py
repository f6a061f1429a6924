"""DP inside the round loop: noise scale, clipping, budget stop, accounting across resume."""

import json
import math

import pytest
import torch

from fedmeta.config import ConfigError
from fedmeta.data import build_dataset
from fedmeta.client import model_for
from fedmeta.federation import ClientUpdate, Server, run_federation
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.meta import params_of
from fedmeta.privacy import compute_epsilon
from fedmeta.results import RunWriter

DP = ["privacy.enabled=true", "simulation.sampling=poisson"]


def run(cfg, out, resume=False, backend=None):
    ds = build_dataset(cfg.data)
    backend = backend or SequentialBackend(cfg, ds)
    return run_federation(cfg, backend, params_of(model_for(cfg, ds.spec)), RunWriter(out), resume=resume)


def test_noise_on_zero_updates_has_std_zC_over_expected_cohort(small_cfg):
    cfg = small_cfg(*DP, "privacy.noise_multiplier=2.0", "privacy.clip_norm=0.5", "meta.outer_lr=1.0", "meta.outer_lr_final=1.0")
    theta = {"w": torch.zeros(200_000)}
    server = Server(cfg, theta, num_train_clients=8)  # q = 3/8, denominator = 3
    server.step([ClientUpdate(i, {"w": torch.zeros(200_000)}, 5) for i in range(2)], server_round=1)
    std = float(server.theta["w"].std())
    assert std == pytest.approx(2.0 * 0.5 / 3, rel=0.02)
    assert abs(float(server.theta["w"].mean())) < 0.01


def test_clipping_bounds_an_adversarial_update(small_cfg):
    cfg = small_cfg(*DP, "privacy.noise_multiplier=1e-9", "privacy.clip_norm=1.0", "meta.outer_lr=1.0", "meta.outer_lr_final=1.0")
    theta = {"a": torch.zeros(10), "b": torch.zeros(3)}
    huge = ClientUpdate(0, {"a": torch.full((10,), 1e30), "b": torch.full((3,), -1e30)}, 1000)
    small = ClientUpdate(1, {"a": torch.full((10,), 0.01), "b": torch.zeros(3)}, 1)
    server = Server(cfg, theta, num_train_clients=8)
    server.step([huge, small], 1)
    step = torch.cat([server.theta["a"], server.theta["b"]])
    # the huge client contributes at most C / denominator, whatever its size or claimed example count
    assert float(step.norm()) <= (1.0 + math.sqrt(10) * 0.01) / 3 + 1e-6
    assert torch.isfinite(step).all()


def test_dp_off_is_bit_identical_whatever_the_privacy_settings(small_cfg, tmp_path):
    a = run(small_cfg(), tmp_path / "a")
    b = run(small_cfg("privacy.noise_multiplier=9", "privacy.clip_norm=1e-4", "privacy.accountant=rdp"), tmp_path / "b")
    ma, mb = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert "epsilon" not in a and a["heldout_acc_after"] == b["heldout_acc_after"]


def test_epsilon_per_round_matches_the_accountant_and_budget_stops_before_exceeding(small_cfg, tmp_path):
    cfg = small_cfg(*DP, "privacy.noise_multiplier=1.0", "simulation.rounds=10", "privacy.target_epsilon=8")
    summary = run(cfg, tmp_path / "r")
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in records if "epsilon" in r]
    q = 3 / 8
    for r in done:
        assert r["epsilon"] == pytest.approx(compute_epsilon(1.0, q, r["round"], 1e-5, "pld"), rel=1e-6)
    assert done[-1]["epsilon"] <= 8 < compute_epsilon(1.0, q, len(done) + 1, 1e-5, "pld")
    assert summary["stopped_early"].startswith("privacy budget") and summary["epsilon"] <= 8
    assert summary["rounds_completed"] == len(done) < 10


def test_fixed_size_sampling_with_dp_is_refused(small_cfg):
    with pytest.raises(ConfigError, match="simulation.sampling: must be 'poisson' when privacy.enabled"):
        small_cfg("privacy.enabled=true")


class Crash(RuntimeError):
    pass


class CrashingBackend(SequentialBackend):
    def __init__(self, cfg, ds, crash_round):
        super().__init__(cfg, ds)
        self.crash_round = crash_round

    def train(self, theta, cids, server_round):
        if server_round == self.crash_round:
            raise Crash(f"simulated server crash in round {server_round}")
        return super().train(theta, cids, server_round)


@pytest.mark.parametrize("dp", [False, True])
def test_crash_and_resume_equals_uninterrupted(small_cfg, tmp_path, dp, monkeypatch):
    monkeypatch.setattr("fedmeta.privacy.server.new_secret", lambda: 17)  # both runs share the server's secret
    cfg = small_cfg(*(DP + ["privacy.adaptive_clipping=true", "privacy.clipped_count_stddev=1.0"] if dp else ["meta.server_optimizer=adam"]), "simulation.rounds=5", "simulation.eval_every=2")
    straight = run(cfg, tmp_path / "straight")
    ds = build_dataset(cfg.data)
    with pytest.raises(Crash):
        run(cfg, tmp_path / "crashed", backend=CrashingBackend(cfg, ds, crash_round=4))
    assert not (tmp_path / "crashed" / "summary.json").exists()
    resumed = run(cfg, tmp_path / "crashed", resume=True)
    a, b = torch.load(tmp_path / "straight" / "model.pt"), torch.load(tmp_path / "crashed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["round"] for l in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    if dp:  # the accountant continued: epsilon after 5 rounds, not after 2
        assert resumed["epsilon"] == pytest.approx(straight["epsilon"], rel=1e-9)
