"""End to end on Flower's real Simulation Engine: `fedmeta simulate` and `flwr run .`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from procs import pids_with_cmdline, stop

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data.num_clients": 6,
    "data.examples_per_client": 20,
    "simulation.clients_per_round": 3,
    "simulation.rounds": 2,
    "simulation.eval_every": 1,
}
ROUND_KEYS = {"round", "train_loss", "loss_before", "loss_after", "acc_before", "acc_after", "heldout_acc_before", "heldout_acc_after", "failures"}


def check_run_dir(out: Path, rounds: int = 2) -> dict:
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt", "checkpoint.pt"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["simulation"]["rounds"] == rounds
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    for r in records:
        assert ROUND_KEYS <= set(r), ROUND_KEYS - set(r)
        assert 0.0 <= r["acc_after"] <= 1.0 and 0.0 <= r["heldout_acc_after"] <= 1.0
        assert r["replies"] == 3 and r["failures"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == rounds
    assert summary["engine"] == "flower"
    import torch

    model = torch.load(out / "model.pt")
    assert sum(v.numel() for v in model.values()) == summary["num_parameters"]
    return summary


@pytest.mark.slow
def test_fedmeta_simulate_on_flower_simulation_engine(tmp_path):
    out = tmp_path / "run"
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    r = subprocess.run([sys.executable, "-m", "fedmeta.cli", "simulate", *sets, "--out", str(out)], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "round    2/2" in r.stderr  # live progress
    assert "starting Flower's Simulation Engine: Ray with 6 SuperNodes" in r.stderr  # said before the silent start-up
    assert "DEPRECATED FEATURE" not in r.stderr  # fedmeta's own call of run_simulation is not the user's business
    summary = check_run_dir(out)
    assert summary["chance_acc"] == 0.2 and summary["startup_s"] > 0 and (out / "curves.png").exists()


@pytest.mark.slow
def test_flwr_run_local_simulation(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    out = tmp_path / "run"
    run_config = " ".join(f"{k}={v}" for k, v in SMALL.items()) + f" output.dir='{out}'"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    try:
        # README's spelling (flwr 1.41): the SuperNode count in --federation-config, not the deprecated options.*
        r = subprocess.run(["flwr", "run", ".", "--stream", "--run-config", run_config, "--federation-config", "num-supernodes=6"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "deprecated" not in (r.stdout + r.stderr).lower()
        summary = check_run_dir(out)
        assert summary["heldout_acc_after"] is not None and "heldout_mse_after_steps" not in summary
        assert (out / "curves.png").stat().st_size > 10_000  # the ServerApp draws the run's picture too
        # fewer SuperNodes than data.num_clients: refused before any round, with the one line that says why
        short = tmp_path / "short"
        r = subprocess.run(["flwr", "run", ".", "--stream", "--run-config", run_config.replace(str(out), str(short)) + " simulation.round_timeout=15.0",
                            "--federation-config", "num-supernodes=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        both = r.stdout + r.stderr
        assert "data.num_clients: is 6, but 2 SuperNode(s) connected" in both, both[-3000:]
        assert not (short / "metrics.jsonl").exists() and not (short / "summary.json").exists()
    finally:
        # `flwr run` leaves its local SuperLink (and SuperExec) running: stop them by PID.
        superlinks = pids_with_cmdline(str(home))
        children = [q for p in superlinks for q in pids_with_cmdline(f"--parent-pid {p}")]
        stop(superlinks + children)
        assert not pids_with_cmdline(str(home))
