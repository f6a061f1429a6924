"""examples/user_project, a user's own model, dataset and algorithm, run the three ways its README shows.

The example lives outside the package and is run as a user runs it: from its
own directory, its modules resolved from the current directory (the config
names ``my_model:make``, ``my_data:make``, ``my_algorithm:ProxReptile``).
Subprocesses get ``PYTHONPATH`` = the repository root only so that they import
*this checkout's* fedmeta (an editable install of another checkout may be on
the machine); never the example directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from procs import pids_with_cmdline, stop

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "user_project"
ATOL = 1e-5
QUICK = ["simulation.rounds=4", "simulation.eval_every=2"]
FLOWER = ["data.num_clients=6", "simulation.rounds=2", "simulation.clients_per_round=3", "simulation.eval_every=1", "simulation.round_timeout=120"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def _fedmeta() -> str:
    exe = shutil.which("fedmeta")
    assert exe, "the `fedmeta` console script is not installed (pip install -e .)"
    return exe


def _simulate(out: Path, sets: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([_fedmeta(), "simulate", "--config", "experiment.toml", *args, "--out", str(out)],
                          cwd=EXAMPLE, env=_env(), capture_output=True, text=True, timeout=timeout)


def _check_run(out: Path, engine: str, rounds: int) -> dict:
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["factory"] == "my_model:make"
    assert config["data"]["dataset"] == "my_data:make"
    assert config["meta"]["algorithm"] == "my_algorithm:ProxReptile"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert all(r["failures"] == 0 and r["replies"] == r["clients"] for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == engine
    theta = torch.load(out / "model.pt")
    assert set(theta) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}  # parameters, not the buffers
    return summary


def _cosine_betas(rounds: int, start: float = 1.0, final: float = 0.1) -> list[float]:
    import math

    return [final + 0.5 * (start - final) * (1 + math.cos(math.pi * (r - 1) / (rounds - 1))) for r in range(1, rounds + 1)]


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_cli_from_the_example_directory(tmp_path, engine):
    out = tmp_path / engine
    r = _simulate(out, [f"simulation.engine={engine}", *QUICK])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "summary: status=completed, heldout_acc_before=" in r.stdout
    summary = _check_run(out, engine, rounds=4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in records] == pytest.approx(_cosine_betas(4))  # the user's step_size, not the linear anneal
    assert summary["heldout_acc_after"] > summary["heldout_acc_before"]  # adaptation helps on this population


def _theta_after(cfg, backend_cls, out: Path) -> dict[str, torch.Tensor]:
    from fedmeta.client import configure_torch, model_for
    from fedmeta.data import build_dataset
    from fedmeta.federation import run_federation
    from fedmeta.meta.algorithm import build_algorithm, initial_meta_parameters
    from fedmeta.results import RunWriter

    configure_torch(1)
    dataset = build_dataset(cfg.data, cfg.model.modalities)
    theta0 = initial_meta_parameters(model_for(cfg, dataset.spec), build_algorithm(cfg))
    writer = RunWriter(out)
    run_federation(cfg, backend_cls(cfg, dataset), theta0, writer)
    return theta0, writer.load_checkpoint()["server"]["theta"]


def test_vectorized_equals_sequential_on_the_users_components(tmp_path, monkeypatch):
    from fedmeta.config import load_config
    from fedmeta.engines.sequential import SequentialBackend
    from fedmeta.engines.vectorized import VectorizedBackend

    monkeypatch.chdir(EXAMPLE)
    monkeypatch.setattr(sys, "path", sys.path[:])
    cfg = load_config(EXAMPLE / "experiment.toml", [*QUICK, "simulation.chunk_size=4"])  # 6 clients a round: 2 chunks
    theta0, seq = _theta_after(cfg, SequentialBackend, tmp_path / "seq")
    _, vec = _theta_after(cfg, VectorizedBackend, tmp_path / "vec")
    assert seq.keys() == vec.keys() == theta0.keys()
    worst = max(float((seq[k] - vec[k]).abs().max()) for k in seq)
    assert worst < ATOL, f"meta-parameters differ by {worst}"
    assert max(float((seq[k] - theta0[k]).abs().max()) for k in seq) > 1e-2  # it trained


def test_python_api_with_the_objects(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", sys.path[:])
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.chdir(tmp_path)  # run_api.py finds experiment.toml beside itself, from any directory
    import run_api

    summary = run_api.main("sequential", str(tmp_path / "api"), tuple(QUICK))
    assert _check_run(tmp_path / "api", "sequential", rounds=4) == summary
    assert summary["heldout_acc_after"] > summary["heldout_acc_before"]


def test_python_api_with_process_local_objects(tmp_path, monkeypatch):
    """Objects with no importable reference (a notebook cell) run in-process; the flower engine says why it can't."""
    import fedmeta
    from fedmeta.config import ConfigError

    monkeypatch.setattr(sys, "path", sys.path[:])
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import my_algorithm
    import my_data
    import my_model

    dataset = my_data.make(fedmeta.config.DataConfig(num_clients=8, examples_per_client=12, num_classes=3))  # an object
    model = lambda spec, cfg: my_model.SmoothedMLP(spec, 8, smoothing=0.0)  # noqa: E731 - as in a notebook

    class Faster(my_algorithm.ProxReptile):
        mu = 0.0

    sets = ["simulation.rounds=2", "simulation.clients_per_round=3", "simulation.eval_every=1", "output.progress=false"]
    summary = fedmeta.simulate(None, model=model, dataset=dataset, algorithm=Faster, overrides=["simulation.engine=vectorized", *sets], out=tmp_path / "run")
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    # recorded by readable labels (the objects themselves were passed down, never through a string)
    assert config["model"]["factory"] == "<local>:test_python_api_with_process_local_objects.<locals>.<lambda>"
    assert config["data"]["dataset"] == f"<local>:{type(dataset).__qualname__} object"
    assert config["meta"]["algorithm"] == "<local>:test_python_api_with_process_local_objects.<locals>.Faster"
    with pytest.raises(ConfigError, match="simulation.engine: 'flower' runs clients in other processes"):
        fedmeta.simulate(None, model=model, dataset=dataset, algorithm=Faster, overrides=["simulation.engine=flower", *sets], out=tmp_path / "f")


@pytest.mark.slow
def test_flower_simulation_engine_from_the_example_directory(tmp_path):
    """Ray's workers import the user's modules: Ray puts the driver's sys.path (cwd included) on their PYTHONPATH."""
    out = tmp_path / "flower"
    r = _simulate(out, ["simulation.engine=flower", *FLOWER], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_run(out, "flower", rounds=2)


@pytest.mark.slow
def test_flwr_run_on_the_example_as_a_flower_app(tmp_path):
    """`flwr run .` in the example: its pyproject names fedmeta's installed ServerApp/ClientApp; the FAB carries the user's modules."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 6\n')
    out = tmp_path / "run"
    run_config = " ".join(FLOWER) + f" output.dir='{out}'"
    env = {**_env(), "FLWR_HOME": str(home)}
    try:
        r = subprocess.run(["flwr", "run", ".", "--stream", "--run-config", run_config], cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        _check_run(out, "flower", rounds=2)
    finally:
        # `flwr run` leaves its local SuperLink (and SuperExec) running: stop them by PID.
        superlinks = pids_with_cmdline(str(home))
        children = [q for p in superlinks for q in pids_with_cmdline(f"--parent-pid {p}")]
        stop(superlinks + children)
        assert not pids_with_cmdline(str(home))


def test_readme_bring_your_own_snippet_runs(tmp_path):
    """README's "Bring your own" Python block runs as it stands (process-local classes, vectorised engine)."""
    import re

    section = (ROOT / "README.md").read_text().split("## Bring your own model, dataset, algorithm", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert " -> " in r.stdout
    summary = json.loads((tmp_path / "runs" / "byo" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "vectorized" and summary["algorithm"] == "<local>:CosineReptile"


def test_model_pt_reloads_into_the_users_model(tmp_path, monkeypatch):
    """model.pt holds the parameters; the buffers come from the factory (strict=False), as the example's README says."""
    from fedmeta.client import model_for
    from fedmeta.config import load_config
    from fedmeta.data import build_dataset

    monkeypatch.chdir(EXAMPLE)
    monkeypatch.setattr(sys, "path", sys.path[:])
    import fedmeta

    cfg = load_config(EXAMPLE / "experiment.toml", ["simulation.rounds=1", "simulation.engine=sequential"])
    fedmeta.simulate(cfg, out=tmp_path / "run")
    model = model_for(cfg, build_dataset(cfg.data).spec)
    result = model.load_state_dict(torch.load(tmp_path / "run" / "model.pt"), strict=False)
    assert sorted(result.missing_keys) == ["phase", "projection"] and not result.unexpected_keys
