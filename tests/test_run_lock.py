"""One process per run directory: an exclusive flock on RUN/.fedmeta.lock, taken before anything is written.

A second process (fresh ``--out``, ``--resume``, the API, a protocol cache entry) gets one line naming the
holder's PID and exit 2, and changes nothing; the kernel releases the lock when the holder dies, even by SIGKILL.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import fedmeta
from fedmeta.results import LOCK, RunDirError, run_dir_lock
from test_run_dir import SMALL, fedmeta_cli, one_line, sets, snapshot

HOLD = "import sys, time; from fedmeta.results import run_dir_lock\nwith run_dir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"


@pytest.fixture
def holder():
    """Start a process that holds a run directory's lock; yields (start(dir) -> Popen)."""
    procs = []

    def start(d):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lock") / "run"
    r = fedmeta_cli("simulate", *sets(*SMALL), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "summary.json").unlink()
    (out / "model.pt").unlink()
    return out


def test_a_second_fresh_run_in_a_held_directory_is_refused_naming_the_pid(tmp_path, holder):
    out = tmp_path / "run"
    p = holder(out)
    line = one_line(fedmeta_cli("simulate", *sets(*SMALL), "--out", str(out)))
    assert f"pid {p.pid}" in line and str(out) in line and "--out" in line
    assert sorted(x.name for x in out.iterdir()) == [LOCK]  # nothing written by the refused run
    with pytest.raises(RunDirError, match=f"pid {p.pid}"):  # the API too
        fedmeta.simulate(None, overrides=SMALL, out=out)


def test_a_second_resume_of_a_held_run_is_refused_and_changes_nothing(crashed_run, tmp_path, holder):
    run = tmp_path / "run"
    shutil.copytree(crashed_run, run)
    before = snapshot(run)
    p = holder(run)
    line = one_line(fedmeta_cli("simulate", "--resume", str(run), "--set", "simulation.rounds=4"))
    assert f"pid {p.pid}" in line and "--resume" in line
    assert {k: v for k, v in snapshot(run).items() if k != LOCK} == before


def test_a_sigkilled_holder_does_not_block_a_later_resume(crashed_run, tmp_path, holder):
    run = tmp_path / "run"
    shutil.copytree(crashed_run, run)
    p = holder(run)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (run / LOCK).exists()  # left behind by the dead holder, with its PID: the kernel released the lock
    r = fedmeta_cli("simulate", "--resume", str(run), "--set", "simulation.rounds=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (run / LOCK).exists()  # removed by its last holder on exit


def test_the_lock_is_reentrant_in_a_process_and_released_at_the_end(tmp_path):
    out = tmp_path / "run"
    with run_dir_lock(out):
        with run_dir_lock(out):  # the CLI holds it while the Flower engine's ServerApp thread takes it again
            assert (out / LOCK).read_text().strip() == str(os.getpid())
        r = subprocess.run([sys.executable, "-c", HOLD, str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"pid {os.getpid()}" in r.stderr  # still held after the inner release
    assert not (out / LOCK).exists()
    with run_dir_lock(out):  # free again
        pass


def test_resume_of_a_missing_directory_creates_nothing(tmp_path):
    line = one_line(fedmeta_cli("simulate", "--resume", str(tmp_path / "nope")))
    assert "not a directory" in line and not (tmp_path / "nope").exists()
