"""Ctrl-C on the default (Flower Simulation Engine) run: prompt exit, checkpoint kept, no Ray left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from procs import alive, pids_with_cmdline, stop

SETS = [
    "simulation.engine=flower", "data.num_clients=10", "data.examples_per_client=20",
    "simulation.clients_per_round=3", "simulation.rounds=50", "simulation.eval_every=5", "output.progress=false",
]


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the run was started in its own session, so Ray's processes are in it)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry))
    return out


def ray_pids_of(driver_pid: int) -> list[int]:
    """Ray processes of the run whose driver is ``driver_pid``: its session, or its Ray session dir (…_<pid>/)."""
    return sorted(set(session_pids(driver_pid)) | set(pids_with_cmdline(f"_{driver_pid}/")))


@pytest.mark.slow
def test_ctrl_c_on_the_flower_engine_exits_promptly_keeping_the_checkpoint(tmp_path):
    from fedmeta.results import load_checkpoint

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedmeta.cli", "simulate", *[a for s in SETS for a in ("--set", s)], "--out", str(out)]
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[int] = []
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().strip():
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert metrics.read_text().strip(), "no round logged within 300 s"
        seen = ray_pids_of(proc.pid)
        assert any(p != proc.pid for p in seen), "the run should have started Ray processes"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("fedmeta did not exit within 30 s of SIGINT")
        log.close()
        text = (tmp_path / "log.txt").read_text()
        assert rc == 130, text[-3000:]
        assert f"interrupted; the last checkpoint is kept (resume with --resume {out})" in text
        assert "Traceback" not in text, text[-3000:]

        ckpt = load_checkpoint(out / "checkpoint.pt")  # weights-only, validated
        logged = [json.loads(line)["round"] for line in metrics.read_text().splitlines() if line.strip()]
        assert ckpt["round"] >= 1 and logged[: ckpt["round"]] == list(range(1, ckpt["round"] + 1))
        assert max(logged) <= ckpt["round"] + 1  # at most the round in flight is logged beyond the checkpoint
        assert not (out / "summary.json").exists() and not (out / "model.pt").exists()

        deadline = time.time() + 10  # Ray's processes were stopped before exit; allow them a moment to be reaped
        while time.time() < deadline and [p for p in seen if alive(p)]:
            time.sleep(0.2)
        assert not [p for p in seen if alive(p)], "Ray processes left behind"
        assert not ray_pids_of(proc.pid), "Ray processes left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        leftover = [p for p in set(seen) | set(ray_pids_of(proc.pid)) if alive(p)]
        stop(leftover)
        log.close()
