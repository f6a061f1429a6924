"""The command line: bad input fails fast with one line and writes nothing."""

import subprocess
import sys

import pytest


def fedmeta(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedmeta.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "args, field",
    [
        (["--set", "meta.inner_steps=0"], "meta.inner_steps"),
        (["--set", "meta.bogus=1"], "meta.bogus"),
        (["--set", "simulation.clients_per_round=1000"], "simulation.clients_per_round"),
        (["--set", "meta.inner_lr=-1"], "meta.inner_lr"),
    ],
)
def test_bad_config_exits_nonzero_with_one_line_and_no_run_dir(tmp_path, args, field):
    out = tmp_path / "run"
    r = fedmeta("simulate", *args, "--out", str(out))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert field in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_bad_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[meta]\ninner_steps = -3\n")
    r = fedmeta("simulate", "--config", str(f), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "meta.inner_steps: must be >= 1" in r.stderr
    assert not (tmp_path / "run").exists()


def test_resume_of_a_non_run_dir_fails_cleanly(tmp_path):
    r = fedmeta("simulate", "--resume", str(tmp_path))
    assert r.returncode == 2 and "not a fedmeta run directory" in r.stderr
