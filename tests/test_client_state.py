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
