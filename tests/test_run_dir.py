"""Run directories: weights-only checkpoints, no silent overwrite, resume rules, --version.

Bad input (a hostile or corrupt checkpoint, a run directory in the way, a
config change on resume) exits with status 2 and one line naming the file or
key; nothing runs and nothing is lost.
"""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedmeta
from fedmeta.cli import main
from fedmeta.results import CHECKPOINT, RunDirError, RunWriter, check_resume, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "simulation.engine=sequential", "data.num_clients=10", "data.examples_per_client=20",
    "simulation.clients_per_round=3", "simulation.rounds=2", "simulation.eval_every=1", "output.progress=false",
]


def fedmeta_cli(*args, env=None, subprocess_=False):
    """``fedmeta ARGS`` in this process (fast), or as a real process when ``env`` or ``subprocess_`` is given."""
    if env is not None or subprocess_:
        return subprocess.run([sys.executable, "-m", "fedmeta.cli", *args], capture_output=True, text=True, timeout=300, env=env)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:  # argparse: --version, usage errors
            rc = exc.code
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def sets(*items):
    return [a for s in items for a in ("--set", s)]


def one_line(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("fedmeta: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-round sequential run (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    r = fedmeta_cli("simulate", *sets(*SMALL), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def crashed(finished, tmp_path) -> Path:
    """The same run as if the server died after its last checkpoint: no summary.json, no model.pt."""
    out = tmp_path / "crashed"
    shutil.copytree(finished, out)
    (out / "summary.json").unlink()
    (out / "model.pt").unlink()
    return out


# -- checkpoints load with weights_only=True ------------------------------------------------


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_hostile_checkpoint_runs_no_code_and_fails_with_one_line(crashed, tmp_path, fmt):
    marker = tmp_path / "pwned"
    ckpt = crashed / CHECKPOINT
    payload = {"round": 1, "server": {"theta": _Hostile(marker)}}
    if fmt == "torch.save":
        torch.save(payload, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(payload))
    r = fedmeta_cli("simulate", "--resume", str(crashed), subprocess_=True)  # a real process: all of stderr is seen
    line = one_line(r)
    assert str(ckpt) in line and "checkpoint" in line
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-checkpoint"])
def test_corrupt_checkpoint_fails_with_one_line_naming_the_file(crashed, damage):
    ckpt = crashed / CHECKPOINT
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint at all" * 10)
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    before = snapshot(crashed)
    line = one_line(fedmeta_cli("simulate", "--resume", str(crashed)))
    assert str(ckpt) in line
    assert snapshot(crashed) == before  # nothing rewritten, nothing lost


def test_numpy_state_is_stored_plain_and_restored_bit_for_bit(tmp_path):
    state = {
        "round": 3,
        "elapsed_s": 1.5,
        "server": {
            "theta": {"w": torch.randn(4, dtype=torch.float64)},
            "extra": {"rdp": np.linspace(0.1, 3.0, 7), "count": np.int64(5), "frac": np.float32(0.1), "pair": (1, "a")},
        },
    }
    writer = RunWriter(tmp_path)
    writer.save_checkpoint(state)
    torch.load(tmp_path / CHECKPOINT, weights_only=True)  # plain data only
    back = writer.load_checkpoint()
    extra = back["server"]["extra"]
    assert isinstance(extra["rdp"], np.ndarray) and extra["rdp"].dtype == np.float64
    assert np.array_equal(extra["rdp"], state["server"]["extra"]["rdp"])
    assert type(extra["count"]) is np.int64 and extra["count"] == 5
    assert type(extra["frac"]) is np.float32 and extra["frac"] == np.float32(0.1)
    assert extra["pair"] == (1, "a")
    assert torch.equal(back["server"]["theta"]["w"], state["server"]["theta"]["w"])


def test_server_state_with_dp_adaptive_clipping_and_server_adam_is_plain(small_cfg, tmp_path):
    """Everything Server.state_dict() holds survives a weights-only save/load and restores the same state."""
    from fedmeta.federation import ClientUpdate, Server

    cfg = small_cfg("privacy.enabled=true", "simulation.sampling=poisson", "privacy.adaptive_clipping=true",
                    "privacy.clipped_count_stddev=1.0", "meta.server_optimizer=adam")
    theta = {"w": torch.zeros(5)}
    server = Server(cfg, theta, num_train_clients=8)
    server.privacy.account_round()
    server.step([ClientUpdate(i, {"w": torch.full((5,), 0.1 * (i + 1))}, 5) for i in range(3)], server_round=1)
    writer = RunWriter(tmp_path)
    writer.save_checkpoint({"round": 1, "server": server.state_dict(), "elapsed_s": 0.0, "config": cfg.to_dict()})
    loaded = load_checkpoint(tmp_path / CHECKPOINT)
    other = Server(cfg, theta, num_train_clients=8)
    other.load_state_dict(loaded["server"])
    assert torch.equal(other.theta["w"], server.theta["w"])
    assert other.privacy.clip_norm == server.privacy.clip_norm and other.privacy.epsilon() == server.privacy.epsilon()
    assert other.optimizer.t == server.optimizer.t and torch.equal(other.optimizer.v["w"], server.optimizer.v["w"])


# -- never overwrite a run silently ---------------------------------------------------------


@pytest.mark.parametrize("how", ["--out", "output.dir"])
def test_out_at_an_existing_run_is_refused_and_leaves_it_alone(finished, how):
    before = snapshot(finished)
    target = ["--out", str(finished)] if how == "--out" else ["--set", f"output.dir='{finished}'"]
    line = one_line(fedmeta_cli("simulate", *sets(*SMALL), *target))
    assert str(finished) in line and "--resume" in line and "--overwrite" in line
    assert snapshot(finished) == before


def test_overwrite_replaces_the_old_run_and_leaves_nothing_stale(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "meta_state.pt").write_bytes(b"stale")  # written by another algorithm's run
    (out / ".checkpoint.pt.tmp").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    old_summary = (out / "summary.json").read_text()
    r = fedmeta_cli("simulate", *sets(*SMALL, "simulation.rounds=1", "meta.inner_steps=2"), "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "meta_state.pt").exists() and not (out / ".checkpoint.pt.tmp").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert [json.loads(l)["round"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "config.json").read_text())["meta"]["inner_steps"] == 2
    assert (out / "summary.json").read_text() != old_summary and load_checkpoint(out / CHECKPOINT)["round"] == 1


def _fake_ray(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose ``import ray`` leaves a marker: proves a check ran before Ray could start."""
    pkg = tmp_path / "fake" / "ray"
    pkg.mkdir(parents=True)
    marker = tmp_path / "ray-imported"
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('fake ray')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env, marker


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_out_at_a_file_or_unwritable_path_fails_before_the_flower_engine_starts(tmp_path, where):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    out = f if where == "file" else f / "run"
    env, marker = _fake_ray(tmp_path)
    line = one_line(fedmeta_cli("simulate", *sets(*SMALL, "simulation.engine=flower"), "--out", str(out), env=env))
    assert str(out) in line
    assert f.read_text() == "keep me"
    assert not marker.exists()


# -- resume rules ---------------------------------------------------------------------------


def test_resume_refuses_a_changed_key_naming_it(crashed):
    before = snapshot(crashed)
    line = one_line(fedmeta_cli("simulate", "--resume", str(crashed), *sets("meta.inner_lr=0.5", "simulation.seed=7")))
    assert "meta.inner_lr" in line and "simulation.seed" in line
    assert snapshot(crashed) == before


def test_resume_refuses_fewer_rounds(crashed):
    line = one_line(fedmeta_cli("simulate", "--resume", str(crashed), "--set", "simulation.rounds=1"))
    assert "simulation.rounds" in line


def test_resume_refuses_rounds_below_the_checkpoint(crashed):
    config = json.loads((crashed / "config.json").read_text())
    config["simulation"]["rounds"] = 1  # hand-edited below the checkpointed round 2
    (crashed / "config.json").write_text(json.dumps(config))
    line = one_line(fedmeta_cli("simulate", "--resume", str(crashed)))
    assert "simulation.rounds" in line and "checkpointed round 2" in line


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--config", "experiments/configs/default.toml"], "--config"),
        (["--out", "{other}"], "--out"),
        (["--overwrite"], "--overwrite"),
        (["--set", "output.dir='{other}'"], "output.dir"),
    ],
)
def test_resume_refuses_options_it_would_ignore(crashed, tmp_path, extra, named):
    before = snapshot(crashed)
    line = one_line(fedmeta_cli("simulate", "--resume", str(crashed), *[a.format(other=tmp_path / "other") for a in extra]))
    assert named in line
    assert snapshot(crashed) == before and not (tmp_path / "other").exists()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"meta": {"inner_steps": 0}}'])
def test_resume_with_a_corrupt_config_json_fails_with_one_line(crashed, content):
    (crashed / "config.json").write_text(content)
    line = one_line(fedmeta_cli("simulate", "--resume", str(crashed)))
    assert str(crashed / "config.json") in line


def test_resume_may_raise_rounds_and_change_the_allowed_keys(crashed):
    """More rounds, progress/checkpoint cadence/timeout changed, --out naming the same dir, a torn metrics line."""
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "clients": 3, "repl')  # the process died while appending round 3
    r = fedmeta_cli(
        "simulate", "--resume", str(crashed), "--out", str(crashed),
        *sets("simulation.rounds=3", "output.progress=false", "output.checkpoint_every=2", "simulation.round_timeout=30"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((crashed / "config.json").read_text())
    assert config["simulation"]["rounds"] == 3 and config["output"]["checkpoint_every"] == 2
    assert [json.loads(l)["round"] for l in (crashed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((crashed / "summary.json").read_text())["rounds_completed"] == 3
    assert load_checkpoint(crashed / CHECKPOINT)["round"] == 3


def test_check_resume_is_the_rule_for_the_deployed_server_app_too(crashed):
    """serve() with output.resume=true applies check_resume before it touches the Grid; without it, refuses a run dir."""
    from fedmeta.config import build_config
    from fedmeta.engines.flower import serve

    saved = json.loads((crashed / "config.json").read_text())
    same = build_config(saved, [f"output.dir='{crashed}'", "output.resume=true", "simulation.round_timeout=5"])
    assert check_resume(crashed, same)["output"]["resume"] is False  # config.json keeps its own output.* location keys
    changed = build_config(saved, [f"output.dir='{crashed}'", "output.resume=true", "meta.outer_lr=0.5"])
    with pytest.raises(RunDirError, match=r"^output.dir .*meta.outer_lr \(1.0 -> 0.5\)"):
        serve(None, changed)
    fresh = build_config(saved, [f"output.dir='{crashed}'"])
    with pytest.raises(RunDirError, match="already holds a fedmeta run"):
        serve(None, fresh)


def test_version():
    r = fedmeta_cli("--version")
    assert r.returncode == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert r.stdout.strip() == f"fedmeta {version}" == f"fedmeta {fedmeta.__version__}"
