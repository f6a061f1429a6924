"""Disk faults mid-run, non-regular and hostile run files, Ctrl-C before any checkpoint, fsync'd atomic writes.

Every case is one line (exit 2, or 130 for Ctrl-C) that says only what is true, and the last checkpoint is kept.
"""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

import fedmeta.cli
import fedmeta.results as results
from fedmeta.results import CHECKPOINT, load_checkpoint
from test_run_dir import SMALL, fedmeta_cli, one_line, sets, snapshot

THREE = [*SMALL, "simulation.rounds=3"]


def fail_fsync_of(monkeypatch, name: str, err: int, after: int = 1):
    """``os.fsync`` raises ``OSError(err)`` for a file called ``name`` (or its temp file) after ``after`` good calls:
    where a full or read-only disk shows itself."""
    real, calls = os.fsync, {"n": 0}

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if Path(target).name in (name, f".{name}.tmp"):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("name,err,what", [
    (CHECKPOINT, errno.ENOSPC, "no space left on device"),
    ("metrics.jsonl", errno.EROFS, "read-only file system"),
])
def test_a_full_or_read_only_disk_mid_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, name, err, what):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fail_fsync_of(m, name, err, after=1)  # round 1 is written; round 2's write fails
        line = one_line(fedmeta_cli("simulate", *sets(*THREE), "--out", str(out)))
    assert line == f"fedmeta: {what} writing {out / name}; the run is resumable from round 1 (fedmeta simulate --resume {out})"
    assert load_checkpoint(out / CHECKPOINT)["round"] == 1  # the last checkpoint is kept
    assert not (out / f".{CHECKPOINT}.tmp").exists() and not (out / "summary.json").exists()
    r = fedmeta_cli("simulate", "--resume", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(l)["round"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_full_disk_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fail_fsync_of(monkeypatch, "config.json", errno.ENOSPC, after=0)
    line = one_line(fedmeta_cli("simulate", *sets(*THREE), "--out", str(out)))
    assert line == f"fedmeta: no space left on device writing {out / 'config.json'}; no checkpoint was written yet, so there is nothing to resume"
    assert not (out / "config.json").exists() and not (out / ".config.json.tmp").exists()


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    target = tmp_path / "summary.json"
    results.atomic_write_text(target, "{}\n")
    assert events == [("fsync", str(tmp_path / ".summary.json.tmp")), ("replace", str(target)), ("fsync", str(tmp_path))]
    assert target.read_text() == "{}\n"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    r = fedmeta_cli("simulate", *sets(*SMALL), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "summary.json").unlink()
    (out / "model.pt").unlink()
    return out


@pytest.fixture
def no_hang():
    """Fail (instead of hanging forever) if the test blocks for 60 s: a FIFO read would."""
    def alarm(signum, frame):
        raise TimeoutError("blocked: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", [CHECKPOINT, "config.json", "metrics.jsonl"])
def test_a_fifo_as_a_run_file_is_refused_on_resume_without_hanging(stopped, tmp_path, no_hang, name):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / name).unlink()
    os.mkfifo(run / name)
    line = one_line(fedmeta_cli("simulate", "--resume", str(run), "--set", "simulation.rounds=3"))
    assert str(run / name) in line and "not a regular file" in line
    assert (run / name).is_fifo()


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl"])
def test_deeply_nested_json_on_resume_is_one_line(stopped, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    nested = "[" * 100_000 + "]" * 100_000
    if name == "metrics.jsonl":
        (run / name).write_text(nested + "\n" + (run / name).read_text())  # not the last line: not a torn append
    else:
        (run / name).write_text(nested)
    before = snapshot(run)
    line = one_line(fedmeta_cli("simulate", "--resume", str(run), "--set", "simulation.rounds=3"))
    assert str(run / name) in line and "RecursionError" not in line
    assert snapshot(run) == before


def test_ctrl_c_before_the_first_checkpoint_does_not_promise_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    wrote = []

    def interrupted(cfg, out_dir, resume=False, progress=True, components=None):  # Ctrl-C while Ray starts, before any checkpoint
        for name in wrote:
            (out_dir / name).write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(fedmeta.cli, "run_simulation", interrupted)
    assert fedmeta.cli.main(["simulate", *sets(*SMALL), "--out", str(out)]) == 130
    assert capsys.readouterr().err == f"fedmeta: interrupted before the first round; nothing to resume in {out}\n"
    wrote.append("config.json")  # interrupted after config.json was written, before the first checkpoint
    assert fedmeta.cli.main(["simulate", *sets(*SMALL), "--out", str(out), "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert err == f"fedmeta: interrupted before the first checkpoint; nothing to resume in {out} (start again with --out {out} --overwrite)\n"
    assert "checkpoint is kept" not in err


def test_ctrl_c_after_a_checkpoint_says_it_is_kept(stopped, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    monkeypatch.setattr(fedmeta.cli, "run_simulation", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert fedmeta.cli.main(["simulate", "--resume", str(run), "--set", "simulation.rounds=3"]) == 130
    assert capsys.readouterr().err == f"fedmeta: interrupted; the last checkpoint is kept (resume with --resume {run})\n"


def test_a_run_dir_error_in_the_flower_server_app_reaches_the_caller_as_itself(monkeypatch, small_cfg):
    """On the Flower engine the round loop runs in Flower's ServerApp thread; a full disk there is handed back
    to simulate_flower (then the CLI's one line), not lost in Flower's log as "ended without a result"."""
    import fedmeta.engines.flower as flower

    def full(*args, **kwargs):
        raise results.RunDirError("no space left on device writing R/checkpoint.pt; the run is resumable from round 3")

    monkeypatch.setattr(flower, "serve", full)
    result: dict = {}
    app = flower.make_server_app(small_cfg(), "R", result=result)
    app._main(None, None)  # what Flower's ServerApp thread calls
    assert isinstance(result["__error__"], results.RunDirError) and "round 3" in str(result["__error__"])
    with pytest.raises(results.RunDirError):  # the deployed ServerApp (no result dict) raises it to Flower
        flower.make_server_app(small_cfg(), "R")._main(None, None)
