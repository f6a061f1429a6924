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


@pytest.mark.parametrize("algorithm,space", [("reptile", "full"), ("maml", "full"), ("local", "full"), ("fedavg_ft", "full"),
                                             ("reptile", "fedadam"), ("reptile", "inner_lr")])
@pytest.mark.parametrize("eval_steps", [0, 50])
def test_chosen_params_map_back_to_the_suggested_overrides(algorithm, space, eval_steps):
    params = {"inner_lr": 0.05, "inner_steps": 3, "outer_lr": 0.2, "outer_lr_final_ratio": 0.1, "eval_steps": eval_steps,
              "eval_lr": 0.02}
    trial = optuna.trial.FixedTrial(params)
    assert suggest(trial, algorithm, regression=False, space=space) == params_to_overrides(trial.params, algorithm)


def test_every_arm_tunes_its_adaptation_and_only_the_dimensions_it_has():
    """Adaptation steps (0 = none) and rate are in every arm's space; FedAvg spends nothing on its inert server step;
    local gets only adaptation, up to 200 steps at rates up to 3 (its old optimum sat on a cap of 1)."""
    def dims(algorithm, space="full", eval_steps=10):
        trial = optuna.trial.FixedTrial({"inner_lr": 0.05, "inner_steps": 3, "outer_lr": 0.2, "outer_lr_final_ratio": 1.0,
                                         "eval_steps": eval_steps, "eval_lr": 0.1})
        suggest(trial, algorithm, regression=False, space=space)
        return set(trial.params)

    adapt = {"eval_steps", "eval_lr"}
    assert dims("reptile") == {"inner_lr", "inner_steps", "outer_lr", "outer_lr_final_ratio"} | adapt
    assert dims("maml") == dims("reptile") == dims("reptile", "fedadam")
    assert dims("fedavg_ft") == {"inner_lr", "inner_steps"} | adapt
    assert dims("local") == adapt
    assert dims("reptile", eval_steps=0) == dims("reptile") - {"eval_lr"}  # no adaptation: its rate is not drawn
    assert 0 in protocol.ADAPT_STEPS and max(protocol.ADAPT_STEPS) >= 200 and protocol.ADAPT_LR[1] >= 3
    study = protocol.STUDIES["avdigits-methods"]
    assert {a.name for a in study.arms} >= {"fedavg_ft", "fedadam_ft", "local"} and study.trials >= 12
    fedadam = next(a for a in study.arms if a.name == "fedadam_ft")
    assert "meta.server_optimizer=adam" in fedadam.overrides and fedadam.space == "fedadam"


def _space(algorithm: str, regression: bool, space: str) -> set[str]:
    """The dimensions an arm's Optuna search draws (with adaptation on, so its rate is drawn too)."""
    trial = optuna.trial.FixedTrial({"inner_lr": 0.05, "inner_steps": 3, "outer_lr": 0.2, "outer_lr_final_ratio": 1.0,
                                     "eval_steps": 10, "eval_lr": 0.01, "params.lam": 0.1, "params.beta": 0.1,
                                     "params.global_lr": 0.5})
    suggest(trial, algorithm, regression=regression, space=space)
    return set(trial.params)


@pytest.mark.parametrize("name", sorted(protocol.STUDIES))
def test_every_study_has_five_seeds_and_enough_trials_for_its_spaces(name):
    """Issue 22's budget rules, so a study definition cannot regress: 5 reported seeds; one trial count for every
    tuned arm of a study (equal budgets), at least 12 where an arm's space has more than 3 dimensions; an arm
    that takes its setting from elsewhere names an arm that exists."""
    study = protocol.STUDIES[name]
    assert study.seeds >= 5 and study.trials >= 1
    for arm in study.arms:
        if arm.fixed_from:
            if arm.fixed_from != "config":
                source, _, source_arm = arm.fixed_from.partition("/")
                assert source_arm in {a.name for a in protocol.STUDIES[source].arms}, arm.fixed_from
            continue
        dims = _space(arm.algorithm, study.regression, arm.space)
        assert len(dims) <= 3 or study.trials >= 12, (arm.name, sorted(dims), study.trials)
    assert len(_space("reptile", True, "full")) == 5 and _space("reptile", False, "inner_lr") == {"inner_lr"}


def test_the_table_says_whether_adaptation_was_tuned():
    tuned = {"a": {"chosen": {"inner_lr": 0.1, "eval_steps": 50, "eval_lr": 0.01}}, "b": {"chosen": {}}}
    assert "steps and rate, chosen there too" in protocol._adaptation_note(tuned)
    assert "rate chosen there too" in protocol._adaptation_note({"a": {"chosen": {"eval_lr": 0.01}}})  # sine: rate only
    note = protocol._adaptation_note({"a": {"chosen": {"inner_lr": 0.4}}, "b": {"chosen": {"inner_lr": 0.2}}})  # privacy-tuned
    assert "not tuned" in note and "chosen there too" not in note


def test_holm_against_a_hand_computation():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone: 0.06)
    assert protocol.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert protocol.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert protocol.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 x 0.8 capped at 1; then max(1, 0.9)
    out = protocol.holm([math.nan, 0.02, 0.01])  # NaN is not a test: m = 2
    assert math.isnan(out[0]) and out[1:] == pytest.approx([0.02, 0.02])


def test_readings_follow_the_holm_adjusted_p():
    """Three comparisons with raw p 0.020 (CI excludes 0), 0.154, 0.266: Holm turns the first into "no difference"."""
    runs = lambda vals: {"runs": [{"heldout_acc_after": v} for v in vals]}
    base = [0.85, 0.80, 0.88, 0.83, 0.86]
    results = {"p0": runs(base), "p1": runs([b - d for b, d in zip(base, [0.010, 0.020, 0.015, 0.030, 0.005])]),
               "p2": runs([b - d for b, d in zip(base, [0.05, -0.01, 0.04, 0.0, 0.02])]),
               "p3": runs([b - d for b, d in zip(base, [0.04, -0.02, 0.03, 0.05, -0.01])])}
    study = protocol.Study("x", "c", [], [("p1", "p0"), ("p2", "p0"), ("p3", "p0")])
    comps = protocol.compare_pairs(study, results, "heldout_acc_after")
    raw = [c["p"] for c in comps.values()]
    assert comps["p1 - p0"]["verdict"] == "a < b" and raw[0] < 0.05  # unadjusted: "p0 higher"
    assert raw == pytest.approx([0.020476, 0.154273, 0.265847], abs=1e-6)  # scipy's ttest_rel
    assert [c["p_holm"] for c in comps.values()] == pytest.approx([3 * raw[0], 2 * raw[1], 2 * raw[1]])  # by hand
    assert all(c["verdict_holm"] == "no difference" for c in comps.values()) and comps["p1 - p0"]["p_holm"] >= 0.05


def test_a_tiny_study_tunes_on_validation_and_reports_other_seeds(tmp_path, capfd):
    argv = ["synthetic-methods", "--arms", "reptile", "local", "--trials", "2", "--seeds", "2", "--rounds", "2",
            "--jobs", "1", "--cache", str(tmp_path / "cache"), "--docs", str(tmp_path / "docs")]
    assert protocol.main(argv) == 0
    err = capfd.readouterr().err  # never silent: the plan first, then a line per finished run from the arms' processes
    assert err.splitlines()[0].startswith("experiments.protocol: synthetic-methods: 2 arm(s) (reptile, local), 2 trial(s)")
    for arm in ("reptile", "local"):
        assert f"experiments.protocol: {arm}: trial 2/2, validation " in err and f"experiments.protocol: {arm}: reported seed 1 (2/2)" in err
    out = json.loads((tmp_path / "docs" / "results" / "synthetic-methods.json").read_text())
    assert (tmp_path / "docs" / "results" / "synthetic-methods.md").exists() and (tmp_path / "docs" / "img" / "synthetic-methods.png").exists()
    assert list(out["arms"]) == ["reptile", "local"] and "reptile - local" in out["comparisons"]
    reptile = out["arms"]["reptile"]
    assert len(reptile["trials"]) == len(out["arms"]["local"]["trials"]) == 2  # the same budget for every arm
    best = max(reptile["trials"], key=lambda t: t["val"])
    assert best["params"] == reptile["chosen"]  # chosen by the validation score, nothing else
    for run in reptile["runs"]:  # reported runs: the chosen setting, on the reported seeds' test clients
        cfg = json.loads((tmp_path / "cache" / run["run_dir"].split("/")[-1] / "config.json").read_text())
        assert cfg["data"]["seed"] == run["seed"] != TUNE_SEED and cfg["meta"]["inner_lr"] == reptile["chosen"]["inner_lr"]
        assert 0 <= run["heldout_acc_after"] <= 1 and "val_acc_after" in run and run["val_curve"]
        assert run["adaptation"] == {"eval_steps": cfg["meta"]["eval_steps"], "eval_lr": cfg["meta"]["eval_lr"] or cfg["meta"]["inner_lr"]}
    assert reptile["adaptation"]["eval_steps"] == reptile["chosen"]["eval_steps"]  # adaptation chosen on validation, recorded
    assert all("eval_steps" in t["params"] for t in reptile["trials"] + out["arms"]["local"]["trials"])
    assert "p_holm" in out["comparisons"]["reptile - local"]
    trial_seeds = {json.loads((p / "config.json").read_text())["data"]["seed"] for p in (tmp_path / "cache").iterdir()}
    assert trial_seeds == {TUNE_SEED, 0, 1}
    # --rereport rewrites the table from the stored JSON alone, with the same numbers and Holm's readings
    (tmp_path / "docs" / "results" / "synthetic-methods.md").unlink()
    assert protocol.main(["synthetic-methods", "--rereport", "--docs", str(tmp_path / "docs")]) == 0
    again = json.loads((tmp_path / "docs" / "results" / "synthetic-methods.json").read_text())
    assert again["comparisons"] == out["comparisons"] and "Holm p" in (tmp_path / "docs" / "results" / "synthetic-methods.md").read_text()
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


@pytest.mark.parametrize("value, reused", [(None, True), ("memory", False)])
def test_a_run_cached_before_the_client_state_key_existed_is_reused_only_at_its_default(tmp_path, value, reused):
    """simulation.client_state picks where state is stored (memory and disk stores give the same run): a run
    recorded before the key existed is this config's run at the default "auto", and nobody else's."""
    def change(d):
        del d["simulation"]["client_state"]
        return d

    study, arm, out = _plant(tmp_path, change)
    got = protocol._run(study, arm, [f"simulation.client_state={value}"] if value else [], 0, tmp_path, 1)
    assert (got["heldout_acc_after"] == 0.999) is reused


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
def test_a_disjoint_content_study_tunes_and_reports_on_disjoint_pools(tmp_path):
    study = protocol.STUDIES["avdigits-methods-disjoint"]
    assert study.disjoint_content and not protocol.STUDIES["avdigits-methods"].disjoint_content
    from dataclasses import replace
    tiny = replace(study, rounds=1)
    arm = next(a for a in study.arms if a.name == "local")
    for seed, pool in ((TUNE_SEED, "tuning"), (0, "report")):
        run = protocol._run(tiny, arm, ["data.num_clients=30", "meta.eval_steps=1"], seed, tmp_path, 1)
        cfg = json.loads((tmp_path / run["run_dir"].split("/")[-1] / "config.json").read_text())
        assert cfg["data"]["content_pool"] == pool and cfg["data"]["seed"] == seed


def test_convergence_reads_validation_curves_never_test_curves():
    """The "still rising?" check (Δ over the last 20 % of rounds) is computed on validation clients."""
    run = {"curve": [(50, 0.5), (120, 0.6), (150, 0.9)], "val_curve": [(50, 0.7), (120, 0.80), (150, 0.81)]}
    assert protocol._flatness({"runs": [run]}) == pytest.approx([0.01])  # validation: flat
    assert protocol._flatness({"runs": [run]}, "curve") == pytest.approx([0.3])  # the test curve would say "rising"
    assert protocol._flatness({"runs": [{"curve": run["curve"]}]}) == []  # no validation curve: no reading, not the test one


def test_every_adaptation_choice_of_every_arm_is_one_its_method_accepts():
    """A study must not draw a setting its arm's method refuses (protonet needs >= 1 evaluation step: its prototypes
    are the support rows the steps visit), or the study dies in its tuning phase."""
    from fedmeta.components import check_components
    from fedmeta.config import load_config

    class Choices(optuna.trial.FixedTrial):
        def suggest_categorical(self, name, choices):
            if name == "eval_steps":
                seen.extend(choices)
            return super().suggest_categorical(name, choices)

    checked = set()
    for study in protocol.STUDIES.values():
        for arm in study.arms:
            if arm.fixed_from or (arm.algorithm, study.config) in checked:
                continue
            checked.add((arm.algorithm, study.config))
            seen: list = []
            params = {"inner_lr": 0.05, "inner_steps": 3, "outer_lr": 0.2, "outer_lr_final_ratio": 1.0, "eval_steps": 10,
                      "eval_lr": 0.01, "params.lam": 0.1, "params.beta": 0.1, "params.global_lr": 0.5}
            suggest(Choices(params), arm.algorithm, regression=study.regression, space=arm.space, adapt_steps=study.adapt_steps)
            assert study.regression or arm.space == "inner_lr" or [k for k in seen if k] == [k for k in study.adapt_steps or protocol.ADAPT_STEPS if k]  # its own choices
            for steps in seen:
                cfg = load_config(protocol.ROOT / study.config, [*arm.overrides, f"meta.algorithm={arm.algorithm}", f"meta.eval_steps={steps}"])
                check_components(cfg)  # raises the method's one-line refusal
    assert ("protonet", "experiments/configs/default_protocol.toml") in checked and len(checked) > 10
    assert ("maml", "experiments/configs/shakespeare_small.toml") in checked
