"""The checks every dataset goes through (fedmeta.data.base.check_population / check_client): a user's
dataset with a bad client gives the same one-line DataError on every engine, and the vectorised
engine's ClientStore never keeps (or reads) a slot it did not fill."""

import pytest
import torch

import fedmeta
from fedmeta.config import build_config
from fedmeta.data import build_dataset
from fedmeta.data.base import ClientData, DataError
from fedmeta.engines.vectorized import ClientStore

FAST = ["data.num_clients=10", "simulation.clients_per_round=8", "simulation.rounds=1", "output.progress=false",
        "meta.inner_steps=2", "meta.eval_steps=2", "model.embed_dim=4", "model.hidden_dim=4"]


def _drop_audio(d):
    return ClientData({"image": d.x["image"]}, d.y, d.present, d.n_support)


FAULTS = {
    "lacks a modality": (_drop_audio, "no data for modality 'audio'"),
    "has an extra modality": (lambda d: ClientData(d.x | {"depth": d.x["image"]}, d.y, d.present, d.n_support), "modality 'depth' is not in the spec"),
    "has another shape": (lambda d: ClientData(d.x | {"audio": d.x["audio"][:, :3]}, d.y, d.present, d.n_support), "x['audio'] has shape"),
    "has another dtype": (lambda d: ClientData(d.x | {"image": d.x["image"].double()}, d.y, d.present, d.n_support), "x['image'] has dtype float64"),
    "has NaN inputs": (lambda d: ClientData(d.x | {"image": d.x["image"] * float("nan")}, d.y, d.present, d.n_support), "x['image'] holds non-finite values"),
    "has a label out of range": (lambda d: ClientData(d.x, d.y + 100, d.present, d.n_support), "labels outside [0, 5)"),
    "has no query set": (lambda d: ClientData(d.x, d.y, d.present, d.n), "n_support must be an integer in [1, n - 1]"),
    "has no support set": (lambda d: ClientData(d.x, d.y, d.present, 0), "n_support must be an integer in [1, n - 1]"),
}


class Broken:
    """The synthetic population with one faulty training client."""

    def __init__(self, base, fault):
        self.base, self.fault = base, fault
        self.spec, self.num_clients = base.spec, base.num_clients
        self.train_clients, self.heldout_clients = base.train_clients, base.heldout_clients
        self.bad = base.train_clients[1]

    def client(self, cid):
        d = self.base.client(cid)
        return self.fault(d) if cid == self.bad else d


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_client_is_the_same_one_line_on_every_engine(tmp_path, fault):
    change, needle = FAULTS[fault]
    base = build_dataset(build_config(None, FAST).data)
    messages = []
    for engine in ("sequential", "vectorized"):
        cfg = build_config(None, [*FAST, f"simulation.engine={engine}"])
        with pytest.raises(DataError) as e:
            fedmeta.simulate(cfg, dataset=Broken(base, change), out=tmp_path / engine)
        messages.append(str(e.value))
        assert not (tmp_path / engine / "metrics.jsonl").exists()  # refused before round 1 was recorded
    assert messages[0] == messages[1], messages
    assert len(messages[0].splitlines()) == 1 and f"client {Broken(base, change).bad}: {needle}" in messages[0]


def test_the_client_store_never_keeps_a_slot_it_did_not_fill():
    """ClientStore on an unchecked dataset (no build_dataset): the bad client is refused, not stored as torch.empty."""
    base = build_dataset(build_config(None, FAST).data)
    broken = Broken(base, _drop_audio)
    store = ClientStore(broken)
    store.ensure([base.train_clients[0]])
    with pytest.raises(DataError, match="no data for modality 'audio'"):
        store.ensure([broken.bad])
    assert not bool(store.built[broken.bad]) and int(store.built.sum()) == 1
    good = store.client(base.train_clients[0])
    assert torch.equal(good.x["audio"], base.client(base.train_clients[0]).x["audio"])


def test_a_wrapped_store_is_not_read_through_its_maps(tmp_path):
    """SampleDropout over a store forwards attributes: the engine must use its clients, not the base's maps."""
    from fedmeta.data.store import write_store

    write_store(build_dataset(build_config(None, FAST).data), tmp_path / "s")
    cfg = build_config(None, [*FAST, "data.dataset=store", f"data.path={tmp_path / 's'}",
                              "data.missing_modality_mode=sample", "data.missing_modality_fraction=0.5"])
    dataset = build_dataset(cfg.data)
    store = ClientStore(dataset)
    assert not store.mapped
    cid = dataset.train_clients[0]
    store.ensure([cid])
    assert torch.equal(store.client(cid).present, dataset.client(cid).present)
    assert not bool(store.client(cid).present.all())  # half the modalities dropped, as the dataset says


def test_a_disk_client_without_a_query_set_is_one_line_from_the_cli(tmp_path, capsys):
    """A partition's meta.json may say n_support == n (the disk format allows it); a run refuses it in one line."""
    from fedmeta.cli import main
    from tests.harness.partitions import disk_without_a_query_set

    _, cid = disk_without_a_query_set(tmp_path, FAST)
    code = main(["simulate", "--set", "data.dataset=disk", "--set", f"data.path={tmp_path / 'p'}", "--set", "data.num_clients=10",
                 "--set", "simulation.clients_per_round=8", "--set", "simulation.rounds=1", "--set", "simulation.engine=sequential",
                 "--set", "meta.inner_steps=2", "--set", "meta.eval_steps=2", "--set", "output.progress=false", "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert f"client {cid}: n_support must be an integer in [1, n - 1]" in lines[0] and "data.path=" in lines[0]


def test_a_store_with_carved_validation_clients_is_still_read_through_its_maps(tmp_path):
    """WithValidation only regroups clients: the engine keeps the maps, and the groups are the wrapper's."""
    from fedmeta.data.store import write_store

    write_store(build_dataset(build_config(None, FAST).data), tmp_path / "s")
    cfg = build_config(None, [*FAST, "data.dataset=store", f"data.path={tmp_path / 's'}", "data.validation_fraction=0.2", "simulation.clients_per_round=4"])
    dataset = build_dataset(cfg.data)
    store = ClientStore(dataset)
    assert store.mapped and dataset.validation_clients and not set(dataset.validation_clients) & set(dataset.train_clients)
    cid = dataset.validation_clients[0]
    assert torch.equal(store.client(cid).x["image"], dataset.client(cid).x["image"])
