"""Train / validation / test client groups, and FedMultimodal's per-example missing modalities.

Validation clients never train and are never reported as test clients; the test group is the same
with or without them; every engine and the disk format carry the groups; a user's dataset without
a validation group keeps working and gets one carved from its training clients.
"""

import json

import numpy as np
import pytest
import torch

import fedmeta
from fedmeta.config import ConfigError, build_config
from fedmeta.data import build_dataset
from fedmeta.data.base import DataError, carve_validation, client_group, validation_clients
from fedmeta.data.disk import DiskDataset, write_partitions
from fedmeta.engines.sequential import SequentialBackend

FAST = ["data.num_clients=30", "simulation.clients_per_round=4", "simulation.rounds=2", "simulation.eval_every=2",
        "simulation.engine=sequential", "output.progress=false", "meta.inner_steps=2", "meta.eval_steps=2"]


def cfg_of(*extra):
    return build_config(None, [*FAST, *extra])


def test_groups_are_disjoint_and_the_test_group_does_not_move():
    base = build_dataset(cfg_of().data)
    ds = build_dataset(cfg_of("data.validation_fraction=0.2").data)
    train, val, test = set(ds.train_clients), set(ds.validation_clients), set(ds.heldout_clients)
    assert len(val) == 6 and not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(30))
    assert test == set(base.heldout_clients) and train | val == set(base.train_clients)
    assert {client_group(ds, c) for c in val} == {"validation"} and client_group(ds, min(test)) == "test"
    again = build_dataset(cfg_of("data.validation_fraction=0.2").data)
    assert again.validation_clients == ds.validation_clients  # deterministic in data.seed
    other = build_dataset(cfg_of("data.validation_fraction=0.2", "data.seed=1").data)
    assert other.validation_clients != ds.validation_clients


def test_validation_clients_never_train_and_are_scored_separately(monkeypatch, tmp_path):
    trained, evaluated = set(), []
    train, evaluate = SequentialBackend.train, SequentialBackend.evaluate
    monkeypatch.setattr(SequentialBackend, "train", lambda self, th, cids, r: trained.update(cids) or train(self, th, cids, r))
    monkeypatch.setattr(SequentialBackend, "evaluate", lambda self, th, cids, r: evaluated.append(list(cids)) or evaluate(self, th, cids, r))
    cfg = cfg_of("data.validation_fraction=0.2", "simulation.clients_per_round=18", "simulation.rounds=3", "simulation.eval_every=3")
    summary = fedmeta.simulate(cfg, out=tmp_path / "run", progress=False)
    ds = build_dataset(cfg.data)
    assert trained == set(ds.train_clients)  # all 18 training clients sampled: never a validation client
    assert ds.validation_clients in evaluated and ds.heldout_clients in evaluated
    assert 0 <= summary["val_acc_after"] <= 1 and 0 <= summary["heldout_acc_after"] <= 1
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    # summary.json rounds to 6 significant digits (issue 19); metrics.jsonl keeps the full value
    assert summary["val_acc_after"] == pytest.approx(last["val_acc_after"], rel=1e-5)
    assert summary["heldout_acc_after"] == pytest.approx(last["heldout_acc_after"], rel=1e-5)


def test_no_validation_clients_means_no_val_keys(tmp_path):
    summary = fedmeta.simulate(cfg_of(), out=tmp_path / "run", progress=False)
    assert "heldout_acc_after" in summary and not [k for k in summary if k.startswith("val_")]


def test_too_many_validation_clients_is_one_line():
    with pytest.raises(ConfigError, match=r"data.validation_fraction: leaves no training clients"):
        cfg_of("data.validation_fraction=0.9")
    with pytest.raises(ConfigError, match=r"simulation.clients_per_round: must be <= the 18 training clients"):
        cfg_of("data.validation_fraction=0.2", "simulation.clients_per_round=19")
    with pytest.raises(DataError):
        carve_validation([1, 2], 2, 0)


class _UserData:
    """A user's dataset from before validation groups existed: train and held-out only."""

    def __init__(self, base, validation=None):
        self.base, self.spec, self.num_clients = base, base.spec, base.num_clients
        self.train_clients, self.heldout_clients = list(base.train_clients), list(base.heldout_clients)
        if validation is not None:
            self.validation_clients = validation

    def client(self, cid):
        return self.base.client(cid)


def test_a_users_dataset_without_validation_keeps_working_and_can_get_one(tmp_path):
    base = build_dataset(cfg_of().data)
    plain = fedmeta.simulate(cfg_of(), dataset=_UserData(base), out=tmp_path / "a", progress=False)
    assert "heldout_acc_after" in plain and "val_acc_after" not in plain
    carved = fedmeta.simulate(cfg_of("data.validation_fraction=0.2"), dataset=_UserData(base), out=tmp_path / "b", progress=False)
    assert "val_acc_after" in carved


def test_a_users_own_validation_group_is_kept_and_checked(tmp_path, monkeypatch):
    from fedmeta.components import ComponentError
    from fedmeta.data import _check_dataset

    base = build_dataset(cfg_of().data)
    own = _UserData(base, validation=base.train_clients[:3])
    own.train_clients = base.train_clients[3:]
    assert validation_clients(_check_dataset(own, "mine")) == base.train_clients[:3]
    bad = _UserData(base, validation=base.train_clients[:3])  # overlaps train
    with pytest.raises(ComponentError, match="validation_clients"):
        _check_dataset(bad, "mine")


def test_the_disk_format_carries_validation_clients(tmp_path):
    ds = build_dataset(cfg_of("data.validation_fraction=0.2").data)
    write_partitions(ds, tmp_path / "p")
    disk = DiskDataset(tmp_path / "p")
    assert (disk.train_clients, disk.validation_clients, disk.heldout_clients) == (ds.train_clients, ds.validation_clients, ds.heldout_clients)
    meta = json.loads((tmp_path / "p" / f"client_{ds.validation_clients[0]:05d}" / "meta.json").read_text())
    assert meta["heldout"] is True and meta["group"] == "validation"  # held out from training for any reader
    from fedmeta.client import resolve_client

    assert resolve_client(cfg_of(), {"partition-dir": str(tmp_path / "p" / f"client_{ds.validation_clients[0]:05d}")})[3] == "validation"
    meta["heldout"] = False  # a validation client that would train: refused
    (tmp_path / "p" / f"client_{ds.validation_clients[0]:05d}" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="group"):
        disk.client(ds.validation_clients[0])


def test_simulated_client_app_announces_its_group():
    from fedmeta.client import resolve_client

    cfg = cfg_of("data.validation_fraction=0.2")
    ds = build_dataset(cfg.data)
    assert resolve_client(cfg, {"partition-id": ds.validation_clients[0]})[3] == "validation"
    assert resolve_client(cfg, {"partition-id": ds.heldout_clients[0]})[3] == "test"
    assert resolve_client(cfg, {"partition-id": ds.train_clients[0]})[3] == "train"


# -- per-example missing modalities (FedMultimodal) ------------------------------------------------


def test_per_sample_drop_hits_each_example_with_probability_p_and_zeroes_it():
    cfg = cfg_of("data.num_clients=60", "data.missing_modality_mode=sample", "data.missing_modality_fraction=0.3",
                 "data.missing_modality=audio")
    ds = build_dataset(cfg.data)
    names = ds.spec.modality_names
    a = names.index("audio")
    present = torch.cat([ds.client(c).present for c in range(60)])
    assert abs(1 - present[:, a].float().mean().item() - 0.3) < 0.03  # 2,400 examples
    assert present[:, [j for j in range(len(names)) if j != a]].all()  # only audio drops
    d = ds.client(3)
    assert d.x["audio"][~d.present[:, a]].abs().sum() == 0
    assert torch.equal(d.present, build_dataset(cfg.data).client(3).present)  # deterministic
    clients_without_audio = sum(not bool(ds.client(c).present[:, a].any()) for c in range(60))
    assert clients_without_audio == 0  # per example, not per client


def test_per_sample_drop_of_every_modality_is_independent():
    cfg = cfg_of("data.num_clients=60", "data.missing_modality_mode=sample", "data.missing_modality_fraction=0.5")
    present = torch.cat([build_dataset(cfg.data).client(c).present for c in range(60)]).float()
    assert (abs(present.mean(0) - 0.5) < 0.05).all()
    both = (1 - present[:, 0]) * (1 - present[:, 1])
    assert abs(both.mean().item() - 0.25) < 0.04  # independent drops


def test_per_sample_drop_needs_two_modalities():
    cfg = build_config(None, ["data.dataset=sine", "data.num_clients=20", "simulation.clients_per_round=2",
                              "data.missing_modality_mode=sample", "data.missing_modality_fraction=0.3"])
    with pytest.raises(DataError, match="two modalities"):
        build_dataset(cfg.data)
