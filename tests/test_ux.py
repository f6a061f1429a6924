"""A researcher's first day (issue 19): honest summaries, early stop, node counts, console output."""

import io
import json
import os
import logging
import re

import pytest
import torch
from rich.console import Console

from fedmeta.client import model_for
from fedmeta.data import build_dataset
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.federation import RunError, run_federation, summarise_eval
from fedmeta.meta import params_of
from fedmeta.results import RunWriter

DP = ["privacy.enabled=true", "simulation.sampling=poisson", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.05", "meta.inner_lr=0.05"]


def run(cfg, out, progress=None):
    ds = build_dataset(cfg.data)
    backend = SequentialBackend(cfg, ds)
    return run_federation(cfg, backend, params_of(model_for(cfg, ds.spec)), RunWriter(out), progress=progress), backend


def test_an_early_stop_evaluates_the_model_it_writes_and_says_why(small_cfg, tmp_path):
    # eval_every=4: the budget stops the run after a round that was not evaluated
    cfg = small_cfg(*DP, "simulation.rounds=20", "simulation.eval_every=4", "privacy.target_epsilon=8")
    lines = []
    summary, backend = run(cfg, tmp_path, progress=lines.append)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if not r.get("stopped")]
    last = trained[-1]["round"]
    assert last % 4 != 0, "the test needs a stop after an unevaluated round"
    assert summary["status"] == "stopped_early" and summary["stopped_early"].startswith("privacy budget")
    assert summary["stopped_at_round"] == summary["rounds_completed"] == last == summary["evaluated_round"]
    # the reported held-out accuracy is model.pt's, evaluated now, not round (last // 4) * 4's
    theta = torch.load(tmp_path / "model.pt")
    fresh = summarise_eval(backend.evaluate(theta, backend.populations()[1], last), "heldout_")
    assert summary["heldout_acc_after"] == pytest.approx(fresh["heldout_acc_after"], abs=1e-5)
    assert summary["heldout_loss_after"] == pytest.approx(fresh["heldout_loss_after"], rel=1e-5)
    # the console is told, with the round and the reason
    assert lines[-1]["stopped"] == summary["stopped_early"] and lines[-1]["stopped_at_round"] == last
    from fedmeta.progress import format_round

    assert f"stopped early after round {last}/20" in format_round(lines[-1], 20)


def test_a_completed_run_says_completed_and_states_chance(small_cfg, tmp_path):
    summary, _ = run(small_cfg("data.num_classes=5"), tmp_path)
    assert summary["status"] == "completed" and summary["task"] == "classification"
    assert "heldout_mse_after_steps" not in summary  # never MSE on a classification task
    assert summary["chance_acc"] == 0.2 and 0.2 <= summary["majority_acc"] <= 1
    assert summary["evaluated_round"] == 3 and "startup_s" in summary
    # no float32 noise on disk: at most 6 significant digits
    text = (tmp_path / "summary.json").read_text()
    for number in re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", text):
        assert len(number.split("e")[0].lstrip("-").replace(".", "").lstrip("0")) <= 6, number


def test_a_regression_run_reports_mse_and_no_chance(small_cfg, tmp_path):
    summary, _ = run(small_cfg("data.dataset=sine"), tmp_path)
    assert summary["task"] == "regression" and "chance_acc" not in summary
    assert set(summary["heldout_mse_after_steps"]) == {"1", "5", "10"}
    assert all(isinstance(v, float) for v in summary["heldout_mse_after_steps"].values())


def test_the_cli_final_line_states_status_and_chance(tmp_path, capsys):
    from fedmeta.cli import main

    sets = ["simulation.engine=sequential", "data.num_clients=10", "data.examples_per_client=20", "simulation.clients_per_round=3",
            "simulation.rounds=2", "simulation.eval_every=2"]
    assert main(["simulate", *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1]
    assert last.startswith("summary: status=completed") and "chance_acc=0.2000" in last
    assert "building the population: 10 clients" in err  # said before anything slow starts
    assert re.search(r"^round +2/2 \|.*held-out acc .* \| chance 0\.200$", err, re.M)


class FakeGrid:
    """Two SuperNodes, which never answer (enough for discovery to count them)."""

    def get_node_ids(self):
        return [11, 12]

    def send_and_receive(self, messages, timeout=None):
        return []


def test_a_flower_run_with_fewer_supernodes_than_clients_is_refused(small_cfg, tmp_path):
    from fedmeta.engines.flower import serve

    cfg = small_cfg("simulation.round_timeout=0.5")  # data.num_clients=10
    with pytest.raises(RunError) as err:
        serve(FakeGrid(), cfg, tmp_path / "r")
    msg = str(err.value)
    assert "\n" not in msg and "data.num_clients: is 10, but 2 SuperNode(s) connected" in msg
    assert 'num-supernodes=10' in msg and not (tmp_path / "r" / "summary.json").exists()


def test_fedmeta_hides_flowers_run_simulation_deprecation_but_not_others():
    from flwr.supercore.logger import warn_deprecated_feature

    from fedmeta.engines.flower import _NotForTheUser

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    flwr_log = logging.getLogger("flwr")
    flwr_log.addHandler(handler)
    f = _NotForTheUser()
    flwr_log.addFilter(f)
    try:
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
        warn_deprecated_feature("something the user did")
    finally:
        flwr_log.removeFilter(f)
        flwr_log.removeHandler(handler)
    assert len(seen) == 1 and "something the user did" in seen[0]


def test_piped_round_lines_never_wrap_and_carry_an_eta():
    from fedmeta.progress import RoundProgress

    buf = io.StringIO()
    show = RoundProgress(3, Console(file=buf, width=40, highlight=False, soft_wrap=True))
    record = {"round": 1, "clients": 3, "replies": 3, "train_loss": 1.0, "heldout_acc_before": 0.2, "heldout_acc_after": 0.5,
              "heldout_loss_before": 2.0, "heldout_loss_after": 1.0, "epsilon": 1.5, "delta": 1e-5}
    show(record)
    show(record | {"round": 2})
    show(record | {"round": 3})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3 and all(len(line) > 40 for line in lines)  # one record per line, wider than the console
    assert "held-out acc 0.200 -> 0.500" in lines[0] and " eta " in lines[0] and " eta " not in lines[2]


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test (still drawn, also written)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figures = []
    real = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def test_fedmeta_simulate_draws_curves_and_fedmeta_plot_draws_several_runs(small_cfg, tmp_path, capsys, saved_figures):
    from fedmeta.cli import main

    a, _ = run(small_cfg(), tmp_path / "a")
    b, _ = run(small_cfg(*DP, "simulation.rounds=4"), tmp_path / "b")
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 10_000
    fig = saved_figures[-1]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("test clients (held-out): accuracy") and any("ε" in t for t in titles)
    assert fig.axes[0].get_ylim() == (0.0, 1.0)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "a: after adaptation" in labels and "b: before adaptation" in labels and "chance 0.200" in labels
    # one line, exit 2, for what is not a run
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"fedmeta: plot {tmp_path / 'missing'}: not a directory"
    # the CLI writes RUN/curves.png at the end of every simulate
    sets = ["simulation.engine=sequential", "data.num_clients=10", "data.examples_per_client=20", "simulation.clients_per_round=3",
            "simulation.rounds=2", "output.progress=false"]
    assert main(["simulate", *[x for s in sets for x in ("--set", s)], "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "curves.png").is_file()
    assert main(["simulate", *[x for s in sets for x in ("--set", s)], "--out", str(tmp_path / "c"), "--overwrite"]) == 0


def test_the_sweep_plot_has_an_honest_axis_and_one_seed_has_no_interval(tmp_path, saved_figures):
    from fedmeta.sweep import write_outputs

    common = {"clients": 10, "clients_per_round": 3, "rounds": 2, "heldout_acc_before": 0.2, "chance_acc": 0.2, "wall_s": 1.0, "seed": 0}
    rows = [
        {"setting": "nonprivate", "noise_multiplier": None, "clip_norm": None, "epsilon": None, "delta": None, "heldout_acc_after": 0.589, **common},
        {"setting": "z1-C1", "noise_multiplier": 1.0, "clip_norm": 1.0, "epsilon": 3.0, "delta": 1e-5, "heldout_acc_after": 0.586, **common},
        {"setting": "z2-C1", "noise_multiplier": 2.0, "clip_norm": 1.0, "epsilon": 1.0, "delta": 1e-5, "heldout_acc_after": 0.5895, **common},
    ]
    table = write_outputs(rows, tmp_path, 1.0)
    assert "± 0.000" not in table and "0.586 (1 seed, no interval)" in table
    ax = saved_figures[-1].axes[0]
    low, high = ax.get_ylim()
    assert high == 1.0 and low <= 0.2  # chance to 1, not 0.586..0.5895
    assert any("1 seed, no interval" in label for label in ax.get_legend_handles_labels()[1])


def test_compare_warns_about_fedavg_with_an_adam_server_and_titles_its_figure(tmp_path, saved_figures):
    from experiments.compare import _curves, known_divergence
    from fedmeta.config import build_config

    assert "diverge" in known_divergence(build_config(None, ["meta.algorithm=fedavg", "meta.server_optimizer=adam"]))
    assert known_divergence(build_config(None, ["meta.algorithm=reptile", "meta.server_optimizer=adam"])) is None
    run_dir = tmp_path / "main" / "reptile-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "heldout_loss_after": 2.0 / r}) + "\n" for r in (1, 2, 3)))
    _curves(tmp_path, {"main": []}, ["reptile"], [0], regression=True, dataset="sine")
    ax = saved_figures[-1].axes[0]
    assert ax.get_title() == "sine: methods compared" and ax.get_yscale() == "log"
    saved_figures[-1].canvas.draw()
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert ticks and all("$" not in t and "^" not in t for t in ticks)  # plain numbers, not 10^k mathtext


def test_a_finished_run_is_extended_by_raising_rounds_keeping_epsilon(tmp_path, capsys):
    from fedmeta.cli import main
    from fedmeta.privacy import compute_epsilon

    sets = ["simulation.engine=sequential", "data.num_clients=10", "data.examples_per_client=20", "simulation.clients_per_round=3",
            "simulation.rounds=3", "output.progress=false", *DP]
    out = tmp_path / "k10"
    assert main(["simulate", *[x for s in sets for x in ("--set", s)], "--out", str(out)]) == 0
    capsys.readouterr()
    # the README command, as given: a finished run, more rounds
    assert main(["simulate", "--resume", str(out), "--set", "simulation.rounds=5"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 5 and summary["status"] == "completed"
    # the accountant continued from round 3's state: epsilon is that of 5 rounds, not 2
    assert records[-1]["epsilon"] == pytest.approx(compute_epsilon(1.0, 3 / 8, 5, 1e-5, "pld"), rel=1e-6)
    assert json.loads((out / "config.json").read_text())["simulation"]["rounds"] == 5
    # not raising the rounds is refused in one line, and says how to extend
    assert main(["simulate", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fedmeta: --resume {out}: the run already finished (summary.json exists); to extend it, raise simulation.rounds above 5"


def test_the_protocol_without_optuna_names_the_extra_in_one_line(monkeypatch, capsys):
    import importlib.util

    from experiments import protocol

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    assert protocol.main(["avdigits-methods"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'needs optuna (not installed)' in err and 'pip install -e ".[experiments]"' in err


def test_load_run_gives_config_spec_and_the_trained_model(small_cfg, tmp_path):
    import fedmeta
    from fedmeta.client import evaluate_client
    from fedmeta.results import RunDirError

    summary, backend = run(small_cfg(), tmp_path / "r")
    cfg, spec, model = fedmeta.load_run(tmp_path / "r")
    assert cfg == small_cfg() and spec == backend.spec
    saved = torch.load(tmp_path / "r" / "model.pt")
    assert all(torch.equal(p, saved[k]) for k, p in model.named_parameters())
    # the loaded model reproduces the summary's held-out accuracy
    ds = backend.dataset
    theta = dict(model.named_parameters())
    fresh = summarise_eval(type("R", (), {"results": [(c, evaluate_client(model, theta, ds.client(c), cfg, spec, 3, c)) for c in ds.heldout_clients]})(), "heldout_")
    assert fresh["heldout_acc_after"] == pytest.approx(summary["heldout_acc_after"], abs=1e-5)
    with pytest.raises(RunDirError, match=r"load_run .*: no model.pt there \(the run has not finished"):
        (tmp_path / "r" / "model.pt").unlink()
        fedmeta.load_run(tmp_path / "r")


def test_compare_marks_only_diverged_losses_never_the_ones_a_method_does_not_have(tmp_path):
    from experiments.compare import _fmt, _run_one, _value
    from fedmeta.config import load_config

    overrides = ["meta.algorithm=fedavg", "output.progress=false"]
    cfg = load_config(None, overrides)
    fedavg, diverged = tmp_path / "fedavg", tmp_path / "diverged"
    for d, summary in ((fedavg, {"heldout_loss_before": 1.5, "heldout_loss_after": 1.5, "heldout_acc_before": 0.3, "heldout_acc_after": 0.3}),
                       (diverged, {"heldout_loss_before": 1.5, "heldout_loss_after": None, "heldout_acc_after": 0.2})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg.to_dict()))
        (d / "summary.json").write_text(json.dumps(summary))
    row = _run_one((None, overrides, str(fedavg)))  # reused: a finished run of this config
    assert row["non_finite"] == [] and _fmt([_value(row, "loss_at_5")]) == "–"
    row = _run_one((None, overrides, str(diverged)))
    assert row["non_finite"] == ["loss_after"] and _fmt([_value(row, "loss_after")]) == "diverged (1 of 1 seeds)"


@pytest.mark.slow  # the default engine: Flower's Simulation Engine on Ray
def test_simulate_says_what_it_does_before_the_slow_imports(tmp_path):
    """The first status line comes before Flower, Ray, dp-accounting and matplotlib are loaded (seconds of import
    each); only torch (for the config's own checks, which must stay one line on bad input) may come first."""
    import subprocess
    import sys

    code = (
        "import sys, fedmeta.cli as cli, fedmeta.progress as p\n"
        "seen = []\n"
        "orig = p.status\n"
        "def status(msg, out=None):\n"
        "    seen.append(sorted(m for m in ('flwr', 'ray', 'dp_accounting', 'matplotlib') if m in sys.modules))\n"
        "    orig(msg, out)\n"
        "p.status = status\n"
        f"rc = cli.main(['simulate', '--set', 'simulation.rounds=1', '--out', {str(tmp_path / 'r')!r}])\n"
        "print('loaded-at-first-line', seen[0], 'rc', rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env={**os.environ, "RAY_ADDRESS": "local"})
    assert "loaded-at-first-line [] rc 0" in r.stdout, r.stdout + r.stderr[-2000:]
