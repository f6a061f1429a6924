"""Issue 17: a private run's noise and cohorts come from a server-only secret; nothing un-noised is written.

The attacks here use only what a client or a reader of the run directory holds
(config.json, the broadcast theta) and the project's own functions.
"""

import json
import logging

import pytest
import torch

from fedmeta.client import model_for
from fedmeta.config import ConfigError
from fedmeta.data import build_dataset
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.federation import EVAL_KEYS, NOISE_STREAM, run_federation, sample_cohort
from fedmeta.meta import params_of
from fedmeta.meta.inner import client_seed
from fedmeta.privacy import compute_epsilon
from fedmeta.privacy.mechanism import noise_like
from fedmeta.privacy.server import secret_seed
from fedmeta.results import RunWriter, load_checkpoint

DP = ["privacy.enabled=true", "simulation.sampling=poisson", "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0",
      "meta.outer_lr=1.0", "meta.outer_lr_final=1.0"]


class Recording(SequentialBackend):
    """Records the theta and cohort of every training call (what the clients see); can crash in one round."""

    def __init__(self, cfg, ds, crash_round=None):
        super().__init__(cfg, ds)
        self.sent: dict[int, dict] = {}
        self.cohorts: dict[int, list[int]] = {}
        self.crash_round = crash_round

    def train(self, theta, cids, server_round):
        if server_round == self.crash_round:
            raise RuntimeError(f"simulated crash in round {server_round}")
        self.sent[server_round] = {k: v.clone() for k, v in theta.items()}
        self.cohorts[server_round] = list(cids)
        return super().train(theta, cids, server_round)


def run(cfg, out, resume=False, crash_round=None):
    ds = build_dataset(cfg.data)
    backend = Recording(cfg, ds, crash_round)
    theta0 = params_of(model_for(cfg, ds.spec))
    summary = run_federation(cfg, backend, theta0, RunWriter(out), resume=resume)
    return summary, backend, theta0


def regenerate_and_subtract(cfg, theta0, theta1, num_train):
    """The attack of issue 17 item 1: D * (theta1 - theta0) / beta minus the noise regenerated from config.json."""
    q = min(1.0, cfg.simulation.clients_per_round / num_train)
    released = {k: (theta1[k] - theta0[k]) * (q * num_train) / cfg.meta.outer_lr for k in theta0}
    gen = torch.Generator().manual_seed(client_seed(cfg.simulation.seed, NOISE_STREAM, 1))
    noise = noise_like({k: torch.zeros_like(v) for k, v in theta0.items()}, cfg.privacy.noise_multiplier * cfg.privacy.clip_norm, gen)
    return float(torch.cat([(released[k] - noise[k]).flatten() for k in theta0]).norm())


@pytest.mark.parametrize("reproducible", [True, False], ids=["reproducible_noise", "default"])
def test_regenerating_the_noise_from_the_config_no_longer_recovers_the_clipped_sum(small_cfg, tmp_path, reproducible):
    cfg = small_cfg(*DP, "simulation.rounds=1", f"privacy.reproducible_noise={str(reproducible).lower()}")
    _, backend, theta0 = run(cfg, tmp_path / "r")
    theta1 = torch.load(tmp_path / "r" / "model.pt")
    cohort = backend.cohorts[1]
    residual = regenerate_and_subtract(cfg, theta0, theta1, len(backend.dataset.train_clients))
    if reproducible:  # the opt-in: the residual is the exact sum of <= |cohort| clipped updates
        assert residual <= len(cohort) * cfg.privacy.clip_norm + 1e-3
    else:  # the noise (the difference of two independent draws: norm ~ sqrt(2 d) * z * C, d in the thousands) is still there
        d = sum(v.numel() for v in theta0.values())
        assert residual > 0.5 * (d ** 0.5) * cfg.privacy.noise_multiplier * cfg.privacy.clip_norm
        # and far above anything the attack recovers (<= |cohort| * C); the secret cohort's size varies from run to run
        assert residual > 2 * cfg.privacy.clip_norm * max(1, len(cohort))


def test_two_private_runs_with_the_same_config_draw_different_noise_and_the_secret_stays_in_the_checkpoint(small_cfg, tmp_path):
    cfg = small_cfg(*DP, "simulation.rounds=2")
    run(cfg, tmp_path / "a")
    run(cfg, tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    a, b = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert not all(torch.equal(a[k], b[k]) for k in a)
    secrets_ = [load_checkpoint(tmp_path / r / "checkpoint.pt")["server"]["privacy"]["secret"] for r in "ab"]
    assert secrets_[0] != secrets_[1] and all(len(s) == 32 for s in secrets_)
    for r, s in zip("ab", secrets_):
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            assert s not in (tmp_path / r / name).read_text()
        # only the owner may read the file that holds it (0600, whatever the umask)
        assert (tmp_path / r / "checkpoint.pt").stat().st_mode & 0o777 == 0o600


def test_private_cohorts_cannot_be_recomputed_from_the_config(small_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr("fedmeta.privacy.server.new_secret", lambda: 0x1234_5678_9ABC_DEF0_1122_3344_5566_7788)
    cfg = small_cfg(*DP, "simulation.rounds=8", "simulation.eval_every=8")
    _, backend, _ = run(cfg, tmp_path / "r")
    pop = list(backend.dataset.train_clients)
    from_config = {r: sample_cohort(cfg, pop, r) for r in backend.cohorts}
    assert backend.cohorts != from_config
    # they are the secret's draws: the server can redo them, nobody without the secret can
    secret = 0x1234_5678_9ABC_DEF0_1122_3344_5566_7788
    from fedmeta.federation import SAMPLE_STREAM
    assert backend.cohorts == {r: sample_cohort(cfg, pop, r, seed=secret_seed(secret, SAMPLE_STREAM, r, 0, bits=128)) for r in backend.cohorts}


def test_crash_and_resume_reruns_rounds_with_the_same_noise_bit_identical_and_epsilon_counts_each_release(small_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr("fedmeta.privacy.server.new_secret", lambda: 0xFEED_FACE_CAFE_BEEF_0000_1111_2222_3333)
    cfg = small_cfg(*DP, "simulation.rounds=7", "simulation.eval_every=2", "output.checkpoint_every=3",
                    "privacy.noise_multiplier=3.0", "privacy.clip_norm=0.1")
    straight, _, _ = run(cfg, tmp_path / "straight")
    ds = build_dataset(cfg.data)
    first = Recording(cfg, ds, crash_round=6)  # rounds 4 and 5 are released after the checkpoint of round 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_federation(cfg, first, params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / "crashed"))
    assert load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")["round"] == 3
    resumed, again, _ = run(cfg, tmp_path / "crashed", resume=True)
    assert sorted(again.sent) == [4, 5, 6, 7]
    for rnd in (4, 5):  # the re-run rounds: the same cohort and the same theta went out (no new release)
        assert again.cohorts[rnd] == first.cohorts[rnd]
        assert all(torch.equal(again.sent[rnd][k], first.sent[rnd][k]) for k in first.sent[rnd])
    a, b = torch.load(tmp_path / "straight" / "model.pt"), torch.load(tmp_path / "crashed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rounds = [json.loads(line)["round"] for line in (tmp_path / "crashed" / "releases.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5, 6, 7]  # the re-run rounds matched their recorded releases: nothing new
    q = 3 / 8  # 7 distinct releases, each counted once
    eps7 = compute_epsilon(3.0, q, 7, 1e-5, "pld")
    assert resumed["epsilon"] == pytest.approx(eps7, rel=5e-6) and straight["epsilon"] == pytest.approx(eps7, rel=5e-6)  # summary.json: 6 significant digits


#: what a private run may write per round: config-derived numbers, noised outputs, held-out/validation evaluation
RELEASABLE = {"round", "beta", "clip_norm", "epsilon", "delta", "noise_multiplier", "sample_rate", "accountant",
              "failures", "rejected", "skipped", "time_s", "stopped"}


def test_a_private_run_writes_no_un_noised_training_client_statistic(small_cfg, tmp_path, capsys):
    from fedmeta.progress import round_printer

    cfg = small_cfg(*DP, "meta.algorithm=maml", "simulation.rounds=3", "simulation.eval_every=1", "data.validation_fraction=0.2")
    ds = build_dataset(cfg.data)
    lines = []
    run_federation(cfg, SequentialBackend(cfg, ds), params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / "r"),
                   progress=lambda r: lines.append(r) or round_printer(3)(r))
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    for rec in records:
        leaked = {k for k in rec if k not in RELEASABLE and not k.startswith(("heldout_", "val_"))}
        assert not leaked, leaked  # no train_loss, query_loss, clients, replies, loss_before/after ...
        assert any(k.startswith("heldout_") for k in rec) and any(k.startswith("val_") for k in rec)
    assert not {"train_loss", "query_loss", "clients", "replies", *EVAL_KEYS} & set(summary)
    assert summary["epsilon"] > 0 and "heldout_loss_after" in summary
    err = capsys.readouterr().err
    assert "replies" not in err and "loss -" not in err and "ε" in err
    # the same run without DP does write them (the test would notice if they were renamed)
    plain = small_cfg("meta.algorithm=maml", "simulation.rounds=1", "data.validation_fraction=0.2")
    run_federation(plain, SequentialBackend(plain, ds), params_of(model_for(plain, ds.spec)), RunWriter(tmp_path / "p"))
    rec = json.loads((tmp_path / "p" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_loss", "query_loss", "clients", "replies", "loss_after"} <= set(rec)


def test_reproducible_noise_says_it_is_not_private_in_summary_and_progress(small_cfg, tmp_path, capsys):
    from fedmeta.progress import round_printer

    cfg = small_cfg(*DP, "simulation.rounds=1", "privacy.reproducible_noise=true")
    ds = build_dataset(cfg.data)
    summary = run_federation(cfg, SequentialBackend(cfg, ds), params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / "r"),
                             progress=round_printer(1))
    assert "NOT private against anyone holding config.json" in summary["noise"]
    assert "NOT private against anyone holding config.json" in json.loads((tmp_path / "r" / "summary.json").read_text())["noise"]
    assert "NOT private against anyone holding config.json" in " ".join(capsys.readouterr().err.split())  # rich may wrap
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["server"]["privacy"]["secret"] is None


def test_dp_with_zero_noise_is_refused_and_ignored_privacy_keys_are_named(small_cfg, tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"^config error: privacy.noise_multiplier: must be > 0 when privacy.enabled"):
        small_cfg(*DP, "privacy.noise_multiplier=0")
    cfg = small_cfg("privacy.noise_multiplier=3", "privacy.target_epsilon=1", "simulation.rounds=1")
    assert cfg.ignored_privacy_keys() == ["privacy.noise_multiplier", "privacy.target_epsilon"]
    assert small_cfg().ignored_privacy_keys() == [] and small_cfg(*DP).ignored_privacy_keys() == []
    ds = build_dataset(cfg.data)
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        run_federation(cfg, SequentialBackend(cfg, ds), params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / "r"))
    warned = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert warned == ["privacy.enabled = false: privacy.noise_multiplier, privacy.target_epsilon set but ignored (this run is not private)"]


def test_a_private_round_with_no_replies_still_releases_noise_and_is_not_skipped(small_cfg, tmp_path):
    from fedmeta.federation import Replies, Server

    cfg = small_cfg(*DP, "simulation.rounds=2", "simulation.min_clients=2")
    server = Server(cfg, {"w": torch.zeros(1000)}, num_train_clients=8)
    server.step([], server_round=1)  # empty cohort: noise / (q N) alone
    assert float(server.theta["w"].std()) == pytest.approx(1.0 * 1.0 / 3, rel=0.15)

    class Silent(SequentialBackend):  # every client fails: a public skip would reveal it
        def train(self, theta, cids, server_round):
            return Replies(failures=len(cids))

    ds = build_dataset(cfg.data)
    run_federation(cfg, Silent(cfg, ds), params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / "r"))
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, False] and all(r["failures"] == 0 for r in records)


class Perturbing(Recording):
    """A re-run where one client of ``round_`` replies differently (a different client, a non-deterministic one)."""

    def __init__(self, cfg, ds, round_):
        super().__init__(cfg, ds)
        self.round_ = round_

    def train(self, theta, cids, server_round):
        replies = super().train(theta, cids, server_round)
        if server_round == self.round_:
            u = replies.results[0]
            u.phi = {k: v + 0.05 for k, v in u.phi.items()}
        return replies


def test_a_resumed_round_whose_replies_differ_draws_fresh_noise_and_epsilon_counts_the_extra_releases(small_cfg, tmp_path, monkeypatch):
    from fedmeta import federation
    from fedmeta.privacy.server import release_digest

    monkeypatch.setattr("fedmeta.privacy.server.new_secret", lambda: 0xFEED_FACE_CAFE_BEEF_0000_1111_2222_3333)
    seeds: list[tuple[int, int]] = []  # (round, generator seed) of every noise draw the server made
    real = federation.noise_generator

    def spy(cfg, privacy, server_round, attempt=0, release=0):
        gen = real(cfg, privacy, server_round, attempt, release)
        seeds.append((server_round, gen.initial_seed()))
        return gen

    monkeypatch.setattr(federation, "noise_generator", spy)
    cfg = small_cfg(*DP, "simulation.rounds=7", "simulation.eval_every=2", "output.checkpoint_every=3",
                    "privacy.noise_multiplier=3.0", "privacy.clip_norm=0.1")
    ds = build_dataset(cfg.data)
    first = Recording(cfg, ds, crash_round=6)  # rounds 4 and 5 are released after the checkpoint of round 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_federation(cfg, first, params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / "r"))
    log_path = tmp_path / "r" / "releases.jsonl"
    assert log_path.stat().st_mode & 0o777 == 0o600
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["round"], r["attempt"]) for r in logged] == [(r, 0) for r in range(1, 6)]
    assert first.cohorts[4], "round 4's cohort must have a client to perturb"
    first_seed = dict(seeds)
    seeds.clear()

    again = Perturbing(cfg, ds, round_=4)
    resumed = run_federation(cfg, again, params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / "r"), resume=True)
    assert sorted(again.sent) == [4, 5, 6, 7] and again.cohorts[4] == first.cohorts[4]
    # round 5 went out with a different theta: the re-run releases of rounds 4 and 5 both differ from the first ones
    assert not all(torch.equal(again.sent[5][k], first.sent[5][k]) for k in first.sent[5])
    fresh = {r: [s for rr, s in seeds if rr == r] for r in (4, 5)}
    for r in (4, 5):  # tried with the recorded release's noise (same output? no), then released with fresh noise
        assert fresh[r][0] == first_seed[r] and fresh[r][-1] != first_seed[r] and len(fresh[r]) == 2
        assert not torch.equal(torch.randn(100, generator=torch.Generator().manual_seed(fresh[r][-1])),
                               torch.randn(100, generator=torch.Generator().manual_seed(first_seed[r])))
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["round"] for r in logged] == [1, 2, 3, 4, 5, 4, 5, 6, 7]
    final = torch.load(tmp_path / "r" / "model.pt")
    assert logged[-1]["digest"] == release_digest(final)  # the log holds what went out
    q = 3 / 8  # 7 rounds + 2 extra distinct releases (the first rounds 4 and 5, which clients already saw)
    assert resumed["epsilon"] == pytest.approx(compute_epsilon(3.0, q, 9, 1e-5, "pld"), rel=5e-6)
    assert resumed["epsilon"] > compute_epsilon(3.0, q, 7, 1e-5, "pld") * (1 + 1e-4)
    for name in ("config.json", "metrics.jsonl", "summary.json"):  # the digests stay server-side
        assert logged[3]["digest"] not in (tmp_path / "r" / name).read_text()


def test_recorded_releases_a_resume_does_not_reach_are_still_charged_and_a_torn_log_line_is_dropped(small_cfg, tmp_path, monkeypatch):
    from fedmeta.privacy.server import PrivateServer
    from fedmeta.results import RunDirError

    cfg = small_cfg(*DP, "simulation.rounds=7", "simulation.eval_every=7", "output.checkpoint_every=3", "privacy.noise_multiplier=3.0")
    ds = build_dataset(cfg.data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_federation(cfg, Recording(cfg, ds, crash_round=6), params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / "r"))
    log_path = tmp_path / "r" / "releases.jsonl"
    with open(log_path, "a") as f:
        f.write('{"round": 6, "att')  # a crash while writing round 6's record: that theta never went out
    assert [r["round"] for r in RunWriter(tmp_path / "r").read_releases()] == [1, 2, 3, 4, 5]
    # the resume stops on its budget before round 5: the round-5 theta that clients already hold still counts
    monkeypatch.setattr(PrivateServer, "budget_exhausted", lambda self: "budget" if self.privacy.accountant.rounds >= 4 else None)
    resumed, _, _ = run(cfg, tmp_path / "r", resume=True)
    assert resumed["epsilon"] == pytest.approx(compute_epsilon(3.0, 3 / 8, 5, 1e-5, "pld"), rel=5e-6)
    RunWriter(tmp_path / "r").append_release({"round": 8, "attempt": 0, "digest": "ab"})  # cuts the torn line first
    assert [r["round"] for r in RunWriter(tmp_path / "r").read_releases()] == [1, 2, 3, 4, 5, 8]
    assert log_path.read_text().endswith('"digest": "ab"}\n') and log_path.stat().st_mode & 0o777 == 0o600
    lines = log_path.read_text().splitlines()
    lines.insert(1, "not a record")
    log_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunDirError, match=r"releases.jsonl: line 2 is not a release record"):
        RunWriter(tmp_path / "r").read_releases()
