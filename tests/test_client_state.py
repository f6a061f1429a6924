"""Client-state stores (fedmeta/meta/client_state.py): in memory, and memory-mapped on disk for large populations."""

import os
import stat

import numpy as np
import pytest
import torch

from fedmeta.client import model_for
from fedmeta.data import build_dataset
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.engines.vectorized import VectorizedBackend
from fedmeta.federation import RunError, run_federation
from fedmeta.meta import MetaAlgorithm, params_of
from fedmeta.meta.algorithm import ClientStates as ReExported
from fedmeta.meta.client_state import DIR, ClientStates, DiskClientStates, store_kind
from fedmeta.results import RunWriter

SCAFFOLD = ("meta.algorithm=scaffold", "simulation.rounds=6", "simulation.eval_every=100")


def _run(small_cfg, out, *sets, engine="vectorized", backend_cls=None, resume=False):
    cfg = small_cfg(f"simulation.engine={engine}", *SCAFFOLD, *sets)
    ds = build_dataset(cfg.data)
    backend = (backend_cls or {"vectorized": VectorizedBackend, "sequential": SequentialBackend}[engine])(cfg, ds)
    run_federation(cfg, backend, params_of(model_for(cfg, ds.spec)), RunWriter(out), resume=resume)
    return backend, list(ds.train_clients)


def _model(out):
    return torch.load(out / "model.pt")


def test_the_store_moved_but_its_old_import_path_still_works():
    assert ReExported is ClientStates


@pytest.mark.parametrize("engine", ["vectorized", "sequential"])
def test_disk_and_memory_stores_give_the_same_run(small_cfg, tmp_path, engine):
    mem, cids = _run(small_cfg, tmp_path / "m", "simulation.client_state=memory", engine=engine)
    disk, _ = _run(small_cfg, tmp_path / "d", "simulation.client_state=disk", engine=engine)
    assert mem.client_states.kind == "memory" and disk.client_states.kind == "disk"
    a, b = _model(tmp_path / "m"), _model(tmp_path / "d")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sm, sd = mem.client_states.gather(cids, a), disk.client_states.gather(cids, a)
    assert sm.keys() == sd.keys() and all(torch.equal(sm[k], sd[k]) for k in sm)
    trained = len(mem.client_states.state_dict())
    assert disk.client_states.built_count() == trained and 3 <= trained <= len(cids)
    assert any(float(v.abs().sum()) > 0 for v in sd.values())  # SCAFFOLD's c_i moved off zero
    files = sorted(p.name for p in (tmp_path / "d" / DIR).iterdir())
    assert "built.bin" in files and "layout.json" in files
    for p in (tmp_path / "d" / DIR).iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert not (tmp_path / "m" / DIR).exists()  # the memory store keeps its state inside checkpoint.pt


class CrashAfterTraining(VectorizedBackend):
    """Dies in round ``crash`` after the cohort's new client states were written (the round's step not applied)."""

    crash = 5

    def train(self, theta, cids, server_round):
        out = super().train(theta, cids, server_round)
        if server_round == self.crash:
            raise KeyboardInterrupt
        return out


@pytest.mark.parametrize("store", ["disk", "memory"])
def test_a_crash_between_checkpoints_resumes_bit_identically(small_cfg, tmp_path, store):
    """checkpoint_every = 3, crash in round 5: rounds 4 and 5 wrote client state after the checkpoint; resume undoes it."""
    sets = (f"simulation.client_state={store}", "output.checkpoint_every=3")
    straight, cids = _run(small_cfg, tmp_path / "straight", *sets)
    with pytest.raises(KeyboardInterrupt):
        _run(small_cfg, tmp_path / "crashed", *sets, backend_cls=CrashAfterTraining)
    if store == "disk":
        assert list((tmp_path / "crashed" / DIR).glob("journal-*.bin"))  # rows overwritten since round 3's checkpoint
    resumed, _ = _run(small_cfg, tmp_path / "crashed", *sets, resume=True)
    a, b = _model(tmp_path / "straight"), _model(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = straight.client_states.gather(cids, a), resumed.client_states.gather(cids, a)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert straight.client_states.built_count() == resumed.client_states.built_count()


class Count(MetaAlgorithm):
    def init_client_state(self, theta):
        return {"n": torch.zeros((), dtype=torch.int64), "w": torch.zeros(3)}


def test_the_journal_undoes_rows_and_a_torn_record_is_ignored(tmp_path, small_cfg):
    algo = Count(small_cfg())
    store = DiskClientStates(algo, tmp_path / DIR, population=50)
    theta = {"w": torch.zeros(3)}
    store.gather([1, 2], theta)
    store.scatter([1, 2], {"n": torch.tensor([1, 1]), "w": torch.ones(2, 3)})
    ckpt = store.state_dict()  # rows 1, 2 durable; a new epoch
    store.scatter([2, 7], {"n": torch.tensor([2, 1]), "w": torch.full((2, 3), 5.0)})
    store.scatter([2], {"n": torch.tensor([3]), "w": torch.full((1, 3), 9.0)})  # row 2 journaled once, at its checkpoint value
    with open(store._journal(), "ab") as f:
        f.write(b"\x01\x02\x03")  # a crash mid-append: a torn record
    again = DiskClientStates(algo, tmp_path / DIR, population=50, fresh=False)
    again.load_state_dict(ckpt)
    got = again.gather([1, 2, 7], theta)
    assert got["n"].tolist() == [1, 1, 0] and torch.equal(got["w"], torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3]))
    assert again.built_count() == 2 and not list((tmp_path / DIR).glob("journal-*.bin"))


def test_a_resume_without_the_client_state_directory_is_one_line(tmp_path, small_cfg):
    store = DiskClientStates(Count(small_cfg()), tmp_path / DIR, population=5)
    store.gather([0], {})
    ckpt = store.state_dict()
    import shutil

    shutil.rmtree(tmp_path / DIR)
    with pytest.raises(RunError, match=r"client_state: missing; checkpoint.pt's client state lives there"):
        DiskClientStates(Count(small_cfg()), tmp_path / DIR, population=5, fresh=False).load_state_dict(ckpt)


def test_a_state_that_changes_shape_is_one_line(tmp_path, small_cfg):
    store = DiskClientStates(Count(small_cfg()), tmp_path / DIR, population=5)
    store.gather([0], {})
    with pytest.raises(RunError, match=r"^meta.algorithm: client_update returned client state 'w' as \(\(4,\), 'torch.float32'\)"):
        store.scatter([0], {"n": torch.tensor([1]), "w": torch.ones(1, 4)})


def test_auto_picks_disk_only_for_a_large_population(small_cfg):
    algo = Count(small_cfg())
    assert store_kind("auto", algo, 1000, {}) == "memory"
    assert store_kind("auto", algo, 100_000, {}) == "disk"
    assert store_kind("memory", algo, 1_000_000, {}) == "memory" and store_kind("disk", algo, 10, {}) == "disk"


@pytest.mark.parametrize("sets, message", [
    (["simulation.client_state=tape"], "config error: simulation.client_state: must be one of 'auto', 'memory' or 'disk' (got 'tape')"),
    (["simulation.client_state=disk", "simulation.engine=flower"], "config error: simulation.client_state: a Flower ClientApp keeps its client state in context.state"),
])
def test_a_bad_client_state_setting_is_one_line(sets, message):
    from fedmeta.config import ConfigError, build_config

    with pytest.raises(ConfigError) as err:
        build_config(None, sets)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_resume_with_the_other_store_is_one_line(small_cfg, tmp_path):
    disk = DiskClientStates(Count(small_cfg()), tmp_path / DIR, population=5)
    with pytest.raises(RunError, match="its client state is in memory"):
        disk.load_state_dict({"0": {"n": torch.zeros(())}})
    with pytest.raises(RunError, match="is in a disk store"):
        ClientStates(Count(small_cfg())).load_state_dict({"store": "disk", "epoch": 1, "population": 5, "layout": None})


def test_a_million_client_population_costs_disk_only_for_the_cohort(small_cfg, tmp_path):
    """SCAFFOLD on 1,000,000 clients (the auto rule picks the disk store): 2 rounds of 3 clients touch 6 rows at most."""
    cfg = small_cfg("data.num_clients=1000000", "simulation.engine=vectorized", "meta.algorithm=scaffold", "simulation.rounds=2",
                    "simulation.eval_every=100", "simulation.eval_clients=2")
    ds = build_dataset(cfg.data)
    backend = VectorizedBackend(cfg, ds)
    theta0 = params_of(model_for(cfg, ds.spec))
    run_federation(cfg, backend, theta0, RunWriter(tmp_path / "run"), resume=False)
    store = backend.client_states
    assert store.kind == "disk" and store.population > 990_000
    assert 3 <= store.built_count() <= 6
    row = 4 * sum(v.numel() for v in theta0.values())  # one client's c_i, float32
    files = list((tmp_path / "run" / DIR).glob("[0-9]*.bin"))
    apparent = sum(p.stat().st_size for p in files)
    allocated = sum(p.stat().st_blocks * 512 for p in files)
    assert apparent == store.population * row  # the whole population is addressable...
    assert allocated <= 6 * (row + 2 * 4096 * len(files)) and allocated < apparent / 10_000  # ...but only the trained rows exist
    built = np.fromfile(tmp_path / "run" / DIR / "built.bin", dtype=np.uint8)
    assert int(built.sum()) == store.built_count()


# -- a user's stateful method via `flwr run`: the state lives in each SuperNode's context.state ----------------------

from tests.harness.processes import kill_after_rounds  # noqa: E402
from tests.harness.methods import SOURCE as USER_METHOD  # noqa: E402 - the method's module, as a user's file
USER_SETS = ["data.num_clients=6", "simulation.rounds=3", "simulation.clients_per_round=3", "simulation.eval_every=3", "simulation.round_timeout=120"]


@pytest.mark.slow
def test_a_users_stateful_method_through_flwr_run(tmp_path):
    """examples/user_project plus a user's module with a stateful method, run by `flwr run .`: each SuperNode keeps its
    client's visit count across rounds (round 3's mean count exceeds 1 only if it was carried), and θ equals the
    sequential engine's (the engine's store) to 1e-5."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    from procs import pids_with_cmdline, stop

    root = Path(__file__).resolve().parents[1]
    app = tmp_path / "app"
    shutil.copytree(root / "examples" / "user_project", app, ignore=shutil.ignore_patterns("runs", "__pycache__"))
    (app / "my_visits.py").write_text(USER_METHOD)
    env = {**os.environ, "PYTHONPATH": str(root), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    seq = tmp_path / "sequential"
    sets = [a for s in [*USER_SETS, "meta.algorithm=my_visits:Visits", "simulation.engine=sequential"] for a in ("--set", s)]
    r = subprocess.run([shutil.which("fedmeta"), "simulate", "--config", "experiment.toml", *sets, "--out", str(seq)],
                       cwd=app, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 6\n')
    out = tmp_path / "flower"
    run_config = " ".join(USER_SETS) + f" meta.algorithm='my_visits:Visits' output.dir='{out}'"
    try:
        r = subprocess.run(["flwr", "run", ".", "--stream", "--run-config", run_config], cwd=app, env={**env, "FLWR_HOME": str(home)},
                           capture_output=True, text=True, timeout=500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        # `flwr run` leaves its local SuperLink (and SuperExec) running: stop them by PID.
        superlinks = pids_with_cmdline(str(home))
        children = [q for p in superlinks for q in pids_with_cmdline(f"--parent-pid {p}")]
        stop(superlinks + children)
        assert not pids_with_cmdline(str(home))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (seq / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in records] == pytest.approx([r["train_loss"] for r in reference], abs=1e-9)
    assert records[0]["train_loss"] == 1.0 and records[-1]["train_loss"] > 1.0  # 4 training clients, 3 a round: some came back
    a, b = torch.load(out / "model.pt"), torch.load(seq / "model.pt")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
def test_kill_minus_9_with_the_disk_store_then_resume_is_bit_identical(tmp_path):
    """`fedmeta simulate` with SCAFFOLD on the disk store, checkpoint every 3 rounds, killed (SIGKILL) after round 4 or later:
    `--resume` rolls back the rows written since the checkpoint and ends with the uninterrupted run's θ and client state."""
    import subprocess
    import sys

    sets = ["simulation.engine=vectorized", "data.num_clients=10", "data.examples_per_client=20", "simulation.clients_per_round=3",
            "simulation.rounds=40", "simulation.eval_every=100", "meta.algorithm=scaffold", "simulation.client_state=disk",
            "output.checkpoint_every=3", "output.progress=false"]
    cli = [sys.executable, "-m", "fedmeta.cli", "simulate", *[a for s in sets for a in ("--set", s)]]
    straight = subprocess.run([*cli, "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "b"
    kill_after_rounds([*cli, "--out", str(out)], out, rounds=4)
    assert not (out / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "fedmeta.cli", "simulate", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _model(tmp_path / "a"), _model(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in [p.name for p in (tmp_path / "a" / DIR).glob("*.bin") if not p.name.startswith("journal")]:
        assert (tmp_path / "a" / DIR / name).read_bytes() == (out / DIR / name).read_bytes(), name  # every row, and the built mask
