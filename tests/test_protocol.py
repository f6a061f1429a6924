"""The learning-quality protocol (experiments/protocol.py): statistics by hand, and a tiny study end to end
that tunes on validation clients of the tuning seed and reports test clients of other seeds."""

import json
import math

import optuna
import pytest
from scipy import stats

from experiments import protocol
from experiments.protocol import TUNE_SEED, paired, params_to_overrides, suggest, t_interval


def test_paired_difference_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 2.0]  # d = 1, 1, 2, 2
    c = paired(a, b)
    half = stats.t.ppf(0.975, 3) * math.sqrt(1 / 3) / 2  # sd(d) = sqrt(1/3), n = 4
    assert c["mean"] == pytest.approx(1.5)
    assert c["ci95"] == pytest.approx([1.5 - half, 1.5 + half])
    assert c["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue) and c["verdict"] == "a > b"
    assert paired(b, a)["verdict"] == "a < b"
    noisy = paired([0.5, 0.7, 0.4], [0.6, 0.5, 0.5])  # differences -0.1, +0.2, -0.1: CI contains 0
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1] and noisy["verdict"] == "no difference"


def test_t_interval_contains_the_mean_and_shrinks_with_n():
    m, lo, hi = t_interval([0.4, 0.5, 0.6])
    assert m == pytest.approx(0.5) and lo < 0.5 < hi
    _, lo2, hi2 = t_interval([0.4, 0.5, 0.6] * 4)
    assert hi2 - lo2 < hi - lo


@pytest.mark.parametrize("algorithm", ["reptile", "maml", "local"])
def test_chosen_params_map_back_to_the_suggested_overrides(algorithm):
    params = {"inner_lr": 0.05, "inner_steps": 3, "outer_lr": 0.5, "outer_lr_final_ratio": 0.1}
    trial = optuna.trial.FixedTrial(params)
    assert suggest(trial, algorithm, regression=False) == params_to_overrides(trial.params, algorithm)


def test_a_tiny_study_tunes_on_validation_and_reports_other_seeds(tmp_path):
    argv = ["synthetic-methods", "--arms", "reptile", "local", "--trials", "2", "--seeds", "2", "--rounds", "2",
            "--jobs", "1", "--cache", str(tmp_path / "cache"), "--docs", str(tmp_path / "docs")]
    assert protocol.main(argv) == 0
    out = json.loads((tmp_path / "docs" / "results" / "synthetic-methods.json").read_text())
    assert (tmp_path / "docs" / "results" / "synthetic-methods.md").exists() and (tmp_path / "docs" / "img" / "synthetic-methods.png").exists()
    assert list(out["arms"]) == ["reptile", "local"] and "reptile - local" in out["comparisons"]
    reptile = out["arms"]["reptile"]
    assert len(reptile["trials"]) == 2
    best = max(reptile["trials"], key=lambda t: t["val"])
    assert best["params"] == reptile["chosen"]  # chosen by the validation score, nothing else
    for run in reptile["runs"]:  # reported runs: the chosen setting, on the reported seeds' test clients
        cfg = json.loads((tmp_path / "cache" / run["run_dir"].split("/")[-1] / "config.json").read_text())
        assert cfg["data"]["seed"] == run["seed"] != TUNE_SEED and cfg["meta"]["inner_lr"] == reptile["chosen"]["inner_lr"]
        assert 0 <= run["heldout_acc_after"] <= 1 and "val_acc_after" in run
    trial_seeds = {json.loads((p / "config.json").read_text())["data"]["seed"] for p in (tmp_path / "cache").iterdir()}
    assert trial_seeds == {TUNE_SEED, 0, 1}
    # a second invocation reuses every cached run
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert protocol.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before


# -- the run cache: reused only for exactly this config, one process per entry ---------------------------


def _tiny():
    from dataclasses import replace

    study = replace(protocol.STUDIES["synthetic-methods"], rounds=1)
    return study, protocol.Arm("reptile", "reptile")


def _plant(cache, cfg_dict, acc=0.999):
    """A planted cache entry: config.json as given, a summary.json no real run of 1 round gives."""
    study, arm = _tiny()
    sets = [f"meta.algorithm={arm.algorithm}", "data.seed=0", "simulation.seed=0", "simulation.rounds=1",
            "simulation.eval_every=1", "output.progress=false"]
    cfg = protocol.load_config(protocol.ROOT / study.config, sets)
    out = cache / protocol.cache_key(cfg)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg_dict(cfg.to_dict())))
    (out / "summary.json").write_text(json.dumps({"heldout_acc_after": acc}))
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1, "heldout_acc_after": acc}) + "\n")
    return study, arm, out


def test_a_cached_run_of_exactly_this_config_is_reused(tmp_path):
    study, arm, out = _plant(tmp_path, lambda d: d)
    assert protocol._run(study, arm, [], 0, tmp_path, 1)["heldout_acc_after"] == 0.999


@pytest.mark.parametrize("how", ["other-default", "missing-key", "no-config", "nested"])
def test_a_cached_summary_of_another_config_is_never_reused(tmp_path, how):
    def change(d):
        if how == "other-default":  # a run made when a default was different: the key (no defaults) is the same
            d["simulation"]["max_update_norm"] = 7.0
        elif how == "missing-key":  # a run made before a config key existed
            del d["simulation"]["max_update_norm"]
        return d

    study, arm, out = _plant(tmp_path, change)
    if how == "no-config":
        (out / "config.json").unlink()
    if how == "nested":
        (out / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    got = protocol._run(study, arm, [], 0, tmp_path, 1)
    assert got["heldout_acc_after"] != 0.999  # the planted number is not reported: the run was made again
    assert json.loads((out / "summary.json").read_text())["heldout_acc_after"] == got["heldout_acc_after"]
    assert json.loads((out / "config.json").read_text())["simulation"]["max_update_norm"] == 1e4


def test_a_cache_entry_held_by_another_process_is_waited_for(tmp_path, monkeypatch):
    from fedmeta.results import RunDirError, run_dir_lock

    study, arm, out = _plant(tmp_path, lambda d: d)
    seen = {}
    real = run_dir_lock

    def spy(d, option="--out", create=True, wait=False):
        seen.setdefault("calls", []).append((str(d), option, wait))
        return real(d, option, create, wait)

    monkeypatch.setattr("fedmeta.results.run_dir_lock", spy)
    protocol._run(study, arm, [], 0, tmp_path, 1)
    assert seen["calls"][0] == (str(out), "protocol cache entry", True)
    # and the wait is a real exclusive lock: another process cannot take the entry meanwhile
    import subprocess, sys
    code = "import sys; from fedmeta.results import run_dir_lock\nwith run_dir_lock(sys.argv[1]): pass\n"
    with real(out, "protocol cache entry", wait=True):
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "in use by another fedmeta process" in r.stderr
