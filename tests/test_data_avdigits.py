import numpy as np
import pytest
import torch

from fedmeta.data.avdigits import AVDigits, _audio, _images
from fedmeta.data.base import DataError


@pytest.fixture(scope="module")
def ds():
    return AVDigits(num_clients=30, heldout_fraction=0.2, examples_per_client=40, dirichlet_alpha=0.5, seed=0)


def test_spec_shapes_dtypes_labels(ds):
    assert ds.spec.task == "classification" and ds.spec.num_classes == 10
    assert ds.spec.modality_names == ("image", "audio")
    assert [m.kind for m in ds.spec.modalities] == ["image", "sequence"]
    assert [m.shape for m in ds.spec.modalities] == [(8, 8), (24, 20)]
    assert sorted(ds.train_clients + ds.heldout_clients) == list(range(30))
    for cid in (0, 7, 29):
        c = ds.client(cid)
        n = c.n
        assert 2 <= n <= 40
        assert c.x["image"].shape == (n, 8, 8) and c.x["image"].dtype == torch.float32
        assert c.x["audio"].shape == (n, 24, 20) and c.x["audio"].dtype == torch.float32
        assert c.y.shape == (n,) and c.y.dtype == torch.int64
        assert int(c.y.min()) >= 0 and int(c.y.max()) <= 9
        assert c.present.shape == (n, 2) and c.present.dtype == torch.bool and bool(c.present.all())
        assert 1 <= c.n_support <= n - 1 and c.n_support == max(1, min(n - 1, round(0.5 * n)))
        for v in c.x.values():
            assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0


def test_modalities_agree_on_labels(ds):
    images, labels = _images()
    a = _audio(ds.audio_path)
    for cid in range(0, 30, 5):
        c = ds.client(cid)
        rows = ds._image_indices(cid)
        # every image is the sklearn digit of that label
        assert torch.equal(c.x["image"], torch.from_numpy(images[rows]))
        assert np.array_equal(labels[rows], c.y.numpy())
        # every audio example is (up to the added noise) a clip of the same digit by the client's speaker
        spk = ds.client_info(cid)["speaker"]
        mine = np.nonzero(a["speaker"] == spk)[0]
        clips = a["features"][mine].reshape(len(mine), -1) / 255.0
        audio = c.x["audio"].reshape(c.n, -1).numpy()
        nearest = ((audio[:, None, :] - clips[None]) ** 2).sum(-1).argmin(1)
        assert np.array_equal(a["label"][mine][nearest], c.y.numpy())


def test_image_partitions_disjoint_and_label_skewed(ds):
    seen = {}
    hist = []
    for cid in range(30):
        rows = ds._image_indices(cid)
        assert len(rows) == ds.client(cid).n
        for r in rows.tolist():
            assert r not in seen, f"image {r} in clients {seen[r]} and {cid}"
            seen[r] = cid
        hist.append(np.bincount(_images()[1][rows], minlength=10) / len(rows))
    # Dirichlet(0.5) label skew: clients' label histograms differ a lot from uniform
    assert np.mean(np.abs(np.array(hist) - 0.1).sum(1)) > 0.5


def test_deterministic(ds):
    same = AVDigits(num_clients=30, heldout_fraction=0.2, examples_per_client=40, dirichlet_alpha=0.5, seed=0)
    other = AVDigits(num_clients=30, heldout_fraction=0.2, examples_per_client=40, dirichlet_alpha=0.5, seed=1)
    a, b, c = ds.client(4), same.client(4), other.client(4)
    for k in ("image", "audio"):
        assert torch.equal(a.x[k], b.x[k])
    assert torch.equal(a.y, b.y) and torch.equal(a.present, b.present) and a.n_support == b.n_support
    assert a.n != c.n or not torch.equal(a.x["audio"], c.x["audio"])


def test_missing_audio_fraction():
    ds = AVDigits(num_clients=40, missing_modality_fraction=0.3, missing_modality="audio", seed=2)
    lacking = []
    for cid in range(40):
        c = ds.client(cid)
        assert bool(c.present[:, 0].all())  # image always there
        if not bool(c.present[:, 1].any()):
            lacking.append(cid)
            assert float(c.x["audio"].abs().sum()) == 0.0
            assert float(c.x["image"].abs().sum()) > 0.0
        else:
            assert bool(c.present[:, 1].all()) and float(c.x["audio"].abs().sum()) > 0.0
    assert len(lacking) == 12  # exactly 30% of 40
    assert all(ds.client_info(c)["missing"] == "audio" for c in lacking)


def test_random_missing_modality_and_signal():
    ds = AVDigits(num_clients=20, modalities=("signal", "image", "audio"), missing_modality_fraction=0.5, seed=3)
    assert ds.spec.modality_names == ("image", "audio", "signal")
    assert ds.spec.modalities[2].shape == (40, 1)
    missing = [ds.client_info(c)["missing"] for c in range(20)]
    assert sum(m is not None for m in missing) == 10
    assert len({m for m in missing if m}) >= 2  # a random modality per client
    c = ds.client(0)
    assert c.x["signal"].shape == (c.n, 40, 1)


def test_audio_domains():
    esp = AVDigits(num_clients=20, audio_domain="espeak", seed=0)
    fl = AVDigits(num_clients=20, audio_domain="flite", seed=0)
    assert {esp.client_info(c)["domain"] for c in range(20)} == {"espeak"}
    assert {fl.client_info(c)["domain"] for c in range(20)} == {"flite"}
    shift = AVDigits(num_clients=20, audio_domain="both", heldout_audio_domain="flite", seed=0)
    assert {shift.client_info(c)["domain"] for c in shift.heldout_clients} == {"flite"}
    assert {shift.client_info(c)["domain"] for c in shift.train_clients} == {"espeak"}
    # distinct speakers while there are enough of them
    assert len({esp.client_info(c)["voice"] for c in range(20)}) == 20


def test_errors(tmp_path):
    with pytest.raises(DataError):
        AVDigits(num_clients=10, audio_domain="festival")
    with pytest.raises(DataError):
        AVDigits(num_clients=10, missing_modality="text")
    with pytest.raises(DataError, match="bad.npz"):
        bad = tmp_path / "bad.npz"
        bad.write_bytes(b"not a zip")
        AVDigits(num_clients=10, path=str(bad))
    with pytest.raises(DataError, match="dirichlet_alpha"):
        AVDigits(num_clients=300, dirichlet_alpha=0.02).client(0)
