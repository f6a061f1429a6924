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


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "meta.outer_lr=inf"], "fedmeta: config error: meta.outer_lr: must be a finite number (got inf)"),
        (["--set", "meta.inner_lr=nan"], "fedmeta: config error: meta.inner_lr: must be a finite number (got nan)"),
        (["--set", "simulation.seed=99999999999999999999"], "fedmeta: config error: simulation.seed: must be <= 4294967295"),
        (["--set", "data.seed=-1"], "fedmeta: config error: data.seed: must be >= 0 (got -1)"),
        (["--set", "simulation.rounds=1e20"], "fedmeta: config error: simulation.rounds: must be an integer in [1, 1000000]"),
    ],
)
def test_values_that_used_to_run_or_crash_later_are_one_line(tmp_path, capsys, args, expected):
    from fedmeta.cli import main  # in-process: the same path as the console script, without a new interpreter

    out = tmp_path / "run"
    assert main(["simulate", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(expected), err
    assert not out.exists()


def test_config_file_that_is_not_utf8_or_is_a_directory(tmp_path, capsys):
    from fedmeta.cli import main

    f = tmp_path / "c.toml"
    f.write_bytes(b"\xff\xfe[meta]\n")
    for config, expected in [(f, "not UTF-8 text"), (tmp_path, "is a directory")]:
        assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"fedmeta: config error: {config}: {expected}"), err
        assert not (tmp_path / "run").exists()
    # and through the console entry point, traceback-free
    r = fedmeta("simulate", "--config", str(f), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


@pytest.mark.parametrize("argv,expected", [
    (["simulate", "--bogus"], "fedmeta: unrecognized arguments: --bogus"),
    (["nope"], "fedmeta: argument command: invalid choice: 'nope'"),
    ([], "fedmeta: the following arguments are required: command"),
    (["simulate", "--set"], "fedmeta: simulate: argument --set: expected one argument"),
])
def test_bad_arguments_are_one_line_without_usage(argv, expected, capsys):
    from fedmeta.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "usage:" not in err, err
