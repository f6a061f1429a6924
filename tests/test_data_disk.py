import json
import shutil

import numpy as np
import pytest
import torch

from fedmeta.data.avdigits import AVDigits
from fedmeta.data.base import ClientData, DataError, DatasetSpec, ModalitySpec
from fedmeta.data.disk import DiskDataset, load_client_with_id, write_client_dir, write_partitions
from fedmeta.data.sine import SineDataset


def assert_same(a, b):
    assert a.n_support == b.n_support
    assert set(a.x) == set(b.x)
    for k in a.x:
        assert a.x[k].dtype == b.x[k].dtype and torch.equal(a.x[k], b.x[k]), k
    assert a.y.dtype == b.y.dtype and torch.equal(a.y, b.y)
    assert a.present.dtype == b.present.dtype and torch.equal(a.present, b.present)


@pytest.fixture(scope="module")
def av():
    return AVDigits(num_clients=12, missing_modality_fraction=0.25, missing_modality="audio", seed=5)


@pytest.fixture(scope="module")
def av_root(av, tmp_path_factory):
    return write_partitions(av, tmp_path_factory.mktemp("av") / "parts")


def test_roundtrip_avdigits_with_missing_modality(av, av_root):
    disk = DiskDataset(av_root)
    assert disk.spec == av.spec and disk.num_clients == av.num_clients
    assert disk.train_clients == av.train_clients and disk.heldout_clients == av.heldout_clients
    missing = [c for c in range(12) if av.client_info(c)["missing"] == "audio"]
    assert len(missing) == 3
    for cid in [0, 5, 11, *missing]:
        assert_same(disk.client(cid), av.client(cid))
    # a SuperNode with only its own directory
    cid = missing[0]
    data, spec, group, file_cid = load_client_with_id(av_root / f"client_{cid:05d}")
    assert_same(data, av.client(cid))
    assert spec == av.spec and group == ("test" if cid in av.heldout_clients else "train") and file_cid == cid
    assert not bool(data.present[:, 1].any()) and float(data.x["audio"].abs().sum()) == 0.0


def test_roundtrip_sine_subset(tmp_path):
    sine = SineDataset(num_clients=10, seed=2)
    root = write_partitions(sine, tmp_path, clients=[1, 4, sine.heldout_clients[0]])
    index = json.loads((root / "dataset.json").read_text())
    assert [c["id"] for c in index["clients"]] == [1, 4, sine.heldout_clients[0]]
    disk = DiskDataset(root)
    assert disk.spec == sine.spec and disk.heldout_clients == [sine.heldout_clients[0]]
    for cid in (1, 4, sine.heldout_clients[0]):
        assert_same(disk.client(cid), sine.client(cid))
    with pytest.raises(DataError, match="no client with id 2"):
        disk.client(2)


def test_tokens_roundtrip_and_files(tmp_path):
    spec = DatasetSpec(modalities=(ModalitySpec("text", "tokens", (6,), vocab_size=50),
                                   ModalitySpec("feat", "vector", (3,))), num_classes=4)
    g = torch.Generator().manual_seed(0)
    cd = ClientData(x={"text": torch.randint(0, 50, (5, 6), generator=g), "feat": torch.randn(5, 3, generator=g)},
                    y=torch.tensor([0, 1, 2, 3, 0]), present=torch.ones(5, 2, dtype=torch.bool), n_support=2)
    cd.present[4, 1] = False
    cd.x["feat"][4] = 0
    d = write_client_dir(cd, spec, tmp_path / "c", client_id=3)
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "present.npy", "x_feat.npy", "x_text.npy", "y.npy"]
    meta = json.loads((d / "meta.json").read_text())
    assert meta["client_id"] == 3 and meta["n"] == 5 and meta["n_support"] == 2 and meta["heldout"] is False
    assert meta["files"]["text"] == {**meta["files"]["text"], "dtype": "int64", "shape": [5, 6]}
    data, spec2, heldout, file_cid = load_client_with_id(d)
    assert spec2 == spec and heldout == "train" and file_cid == 3
    assert_same(data, cd)


def test_lazy_loading(av, tmp_path):
    root = write_partitions(av, tmp_path / "p", clients=[0, 1, 2])
    shutil.rmtree(root / "client_00001")
    (root / "client_00002" / "x_image.npy").write_bytes(b"garbage")
    disk = DiskDataset(root)  # opening the dataset touches no client
    assert_same(disk.client(0), av.client(0))  # only client 0's files are read
    with pytest.raises(DataError, match="client_00001"):
        disk.client(1)
    with pytest.raises(DataError, match="client_00002/x_image.npy"):
        disk.client(2)


def _copy(av_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(av_root, root)
    return root


def test_truncated_npy_names_file(av_root, tmp_path):
    root = _copy(av_root, tmp_path)
    f = root / "client_00003" / "x_audio.npy"
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(DataError) as e:
        DiskDataset(root).client(3)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    # without checksums, the .npy parser itself detects the truncation
    with pytest.raises(DataError, match="unreadable .npy") as e:
        DiskDataset(root, verify=False).client(3)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_corrupted_meta_names_file(av_root, tmp_path):
    root = _copy(av_root, tmp_path)
    meta = root / "client_00004" / "meta.json"
    meta.write_text(meta.read_text()[:-40])
    with pytest.raises(DataError, match="invalid JSON") as e:
        DiskDataset(root).client(4)
    assert str(meta) in str(e.value)
    doc = json.loads((av_root / "client_00005" / "meta.json").read_text())
    del doc["n_support"]
    meta5 = root / "client_00005" / "meta.json"
    meta5.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="missing key 'n_support'") as e:
        DiskDataset(root).client(5)
    assert str(meta5) in str(e.value)
    (root / "dataset.json").write_text("{")
    with pytest.raises(DataError, match="dataset.json"):
        DiskDataset(root)


@pytest.mark.parametrize("name", ["dataset.json", "client_00004/meta.json"])
def test_deeply_nested_json_is_one_line(av_root, tmp_path, name):
    """[[[[...]]]] 100,000 deep: the JSON parser's RecursionError becomes a DataError naming the file."""
    root = _copy(av_root, tmp_path)
    (root / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply") as e:
        DiskDataset(root).client(4)
    assert str(root / name) in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(DataError, match="nested too deeply"):
        load_client_with_id(root / "client_00004") if "meta" in name else DiskDataset(root)


def test_shape_and_dtype_mismatch(av_root, tmp_path):
    root = _copy(av_root, tmp_path)
    f = root / "client_00006" / "y.npy"
    y = np.load(f)
    np.save(f, y[:-1])
    with pytest.raises(DataError, match="shape") as e:
        DiskDataset(root, verify=False).client(6)
    assert str(f) in str(e.value)
    np.save(f, y.astype(np.int32))
    with pytest.raises(DataError, match="dtype") as e:
        DiskDataset(root, verify=False).client(6)
    assert str(f) in str(e.value)
    with pytest.raises(DataError, match="sha256") as e:  # with checksums the change is caught first
        DiskDataset(root).client(6)
    assert str(f) in str(e.value)
    np.save(f, np.full_like(y, 10))
    with pytest.raises(DataError, match="labels outside"):
        DiskDataset(root, verify=False).client(6)


def test_missing_file_names_it(av_root, tmp_path):
    root = _copy(av_root, tmp_path)
    f = root / "client_00007" / "present.npy"
    f.unlink()
    with pytest.raises(DataError, match="file not found") as e:
        DiskDataset(root).client(7)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("change", ["delete", "empty", "not-hex"])
def test_missing_checksum_is_an_error_naming_the_file(av_root, tmp_path, change):
    root = _copy(av_root, tmp_path)
    meta = root / "client_00002" / "meta.json"
    doc = json.loads(meta.read_text())
    if change == "delete":
        del doc["files"]["y"]["sha256"]
    else:
        doc["files"]["y"]["sha256"] = "" if change == "empty" else "z" * 64
    meta.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="no valid sha256") as e:
        DiskDataset(root).client(2)
    assert str(root / "client_00002" / "y.npy") in str(e.value) and "\n" not in str(e.value)
    DiskDataset(root, verify=False).client(2)  # explicitly unverified: loads
    with pytest.raises(DataError, match="no valid sha256"):
        load_client_with_id(root / "client_00002")  # what a deployed SuperNode loads


def test_num_clients_must_match_the_disk(av, av_root):
    assert len(DiskDataset(av_root, num_clients=12).train_clients) == len(av.train_clients)
    for wrong in (20, 5):
        with pytest.raises(DataError) as e:
            DiskDataset(av_root, num_clients=wrong)
        msg = str(e.value)
        assert msg.startswith(f"data.num_clients: is {wrong}, but ") and "lists 12 clients" in msg and "data.num_clients=12" in msg


def test_disk_dataset_from_config_checks_num_clients(av_root):
    from fedmeta.config import build_config
    from fedmeta.data import build_dataset

    cfg = build_config(None, ["data.dataset='disk'", f"data.path='{av_root}'", "data.num_clients=60"])
    with pytest.raises(DataError, match="data.num_clients: is 60, but .* lists 12 clients"):
        build_dataset(cfg.data)
    ok = build_config(None, ["data.dataset='disk'", f"data.path='{av_root}'", "data.num_clients=12", "simulation.clients_per_round=4"])
    assert len(build_dataset(ok.data).train_clients) + len(build_dataset(ok.data).heldout_clients) == 12
