"""Images with channels and the CNN image encoder (``model.image_encoder``).

The ``image`` modality may be ``[H, W]`` or ``[C, H, W]``; both built-in image encoders take
either. The CNN masks like every encoder, runs under ``torch.func.vmap`` (vectorised engine =
sequential engine), survives the on-disk format with 3-channel images, and learns.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from fedmeta.config import ConfigError, build_config
from fedmeta.data import build_dataset
from fedmeta.data.base import ClientData, DatasetSpec, ModalitySpec
from fedmeta.data.disk import DiskDataset, load_client_with_id, write_partitions
from fedmeta.data.synthetic import SyntheticMultimodal
from fedmeta.engines.vectorized import VectorizedBackend
from fedmeta.models import build_model
from fedmeta.models.multimodal import ConvImageEncoder, ImageEncoder

from test_vectorized import SMALL, _assert_same


class Colour:
    """A synthetic population whose ``image`` is ``[3, H, W]``: the grey image, mirrored, transposed.

    Absent images stay all-zero (each channel is a rearrangement of the zero image).
    """

    def __init__(self, base) -> None:
        self.base, self.num_clients = base, base.num_clients
        self.train_clients, self.heldout_clients = base.train_clients, base.heldout_clients
        mods = tuple(replace(m, shape=(3, *m.shape)) if m.kind == "image" else m for m in base.spec.modalities)
        self.spec = replace(base.spec, modalities=mods)

    def client(self, cid: int) -> ClientData:
        d = self.base.client(cid)
        img = d.x["image"]
        colour = torch.stack([img, img.flip(-1), img.transpose(-1, -2)], dim=1)
        return ClientData(dict(d.x, image=colour), d.y, d.present, d.n_support)


def _spec(shape, kind="image"):
    return DatasetSpec((ModalitySpec("image", kind, shape), ModalitySpec("audio", "sequence", (12, 8))), num_classes=5)


def _inputs(shape, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, *shape, generator=g), "audio": torch.randn(n, 12, 8, generator=g)}


@pytest.mark.parametrize("encoder,cls", [("mlp", ImageEncoder), ("cnn", ConvImageEncoder)])
@pytest.mark.parametrize("shape", [(8, 8), (3, 8, 8), (2, 7, 5)])
def test_both_encoders_take_hw_and_chw(encoder, cls, shape):
    model = build_model(_spec(shape), embed_dim=6, hidden_dim=10, seed=0, image_encoder=encoder)
    assert type(model.encoders["image"]) is cls
    x = _inputs(shape)
    assert model.encoders["image"](x["image"]).shape == (6, 6)
    out = model(x, torch.ones(6, 2, dtype=torch.bool))
    assert out.shape == (6, 5) and torch.isfinite(out).all()
    # every channel and every pixel position reaches the output
    for c in range(shape[0] if len(shape) == 3 else 1):
        for i, j in ((0, 0), (shape[-2] - 1, shape[-1] - 1)):
            poked = x["image"].clone()
            poked[(slice(None), c, i, j) if len(shape) == 3 else (slice(None), i, j)] += 5.0
            assert not torch.allclose(model(dict(x, image=poked), torch.ones(6, 2, dtype=torch.bool)), out), (c, i, j)


def test_cnn_adds_the_channel_of_hw_images():
    """[H, W] is a one-channel image: same weights, same output as the [1, H, W] spec."""
    grey = build_model(_spec((8, 8)), seed=0, image_encoder="cnn")
    one = build_model(_spec((1, 8, 8)), seed=0, image_encoder="cnn")
    one.load_state_dict(grey.state_dict())
    x = _inputs((8, 8))
    present = torch.ones(6, 2, dtype=torch.bool)
    torch.testing.assert_close(one(dict(x, image=x["image"].unsqueeze(1)), present), grey(x, present))


def test_cnn_rejects_other_ranks_and_unknown_encoders():
    with pytest.raises(ValueError, match=r"shape must be \[H, W\] or \[C, H, W\], got \[64\]"):
        build_model(_spec((64,)), image_encoder="cnn")
    with pytest.raises(ValueError, match="model.image_encoder"):
        build_model(_spec((8, 8)), image_encoder="vit")
    with pytest.raises(ConfigError, match=r"^config error: model\.image_encoder: "):
        build_config(None, ["model.image_encoder='vit'"])


def test_image_encoder_default_is_mlp_and_config_selects_cnn():
    from fedmeta.client import model_for

    ds = SyntheticMultimodal(num_clients=4)
    assert build_config(None, []).model.image_encoder == "mlp"
    assert type(model_for(build_config(None, []), ds.spec).encoders["image"]) is ImageEncoder
    model = model_for(build_config(None, ["model.image_encoder='cnn'"]), ds.spec)
    assert type(model.encoders["image"]) is ConvImageEncoder
    assert type(model.encoders["audio"]).__name__ == "SequenceEncoder"  # other modalities keep their encoders


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
@pytest.mark.parametrize("channels", [False, True])
def test_cnn_masks_out_a_missing_image(fusion, channels):
    ds = SyntheticMultimodal(num_clients=4)
    if channels:
        ds = Colour(ds)
    c = ds.client(0)
    model = build_model(ds.spec, fusion=fusion, seed=0, image_encoder="cnn")
    present = c.present.clone()
    present[:, 0] = False  # image missing
    out = model(c.x, present)
    assert torch.isfinite(out).all()
    x2 = dict(c.x, image=torch.randn_like(c.x["image"]) * 100)
    torch.testing.assert_close(model(x2, present), out)
    model.zero_grad()
    model(x2, present).sum().backward()
    grads = [p.grad for p in model.encoders["image"].parameters()]
    assert all(g is None or g.abs().max() == 0 for g in grads)
    # with the image present the CNN does get a gradient and does change the output
    model.zero_grad()
    model(c.x, c.present.clone().fill_(True)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.encoders["image"].parameters())


@pytest.mark.parametrize("channels", [False, True])
def test_vectorized_equals_sequential_with_cnn(tmp_path, channels):
    cfg = build_config({}, SMALL + ["model.image_encoder='cnn'"])
    dataset = build_dataset(cfg.data)
    if channels:
        dataset = Colour(dataset)
    assert any(not bool(dataset.client(c).present[:, 0].all()) for c in range(cfg.data.num_clients))  # some images missing
    _assert_same(cfg, dataset, tmp_path)


def test_three_channel_images_roundtrip_on_disk_and_train(tmp_path):
    src = Colour(SyntheticMultimodal(num_clients=8, examples_per_client=12, missing_modality_fraction=0.5, missing_modality="image", seed=3))
    root = write_partitions(src, tmp_path / "parts")
    index = json.loads((root / "dataset.json").read_text())
    assert index["spec"]["modalities"][0] == {"name": "image", "kind": "image", "shape": [3, 8, 8], "vocab_size": 0}
    disk = DiskDataset(root)
    assert disk.spec == src.spec
    lacking = 0
    for cid in range(8):
        a, b = src.client(cid), disk.client(cid)
        assert b.x["image"].shape == (a.n, 3, 8, 8) and b.x["image"].dtype == torch.float32
        for k in a.x:
            assert torch.equal(a.x[k], b.x[k]), (cid, k)
        assert torch.equal(a.y, b.y) and torch.equal(a.present, b.present) and a.n_support == b.n_support
        lacking += not bool(b.present[:, 0].any())
    assert lacking > 0  # some clients lack the image: their zeros survived the load checks
    meta = json.loads((root / "client_00000" / "meta.json").read_text())
    assert meta["files"]["image"]["shape"] == [12, 3, 8, 8]
    data, spec, _, _ = load_client_with_id(root / "client_00000")  # what a SuperNode with only its directory reads
    assert spec.modalities[0].shape == (3, 8, 8) and torch.equal(data.x["image"], src.client(0).x["image"])

    # the config path a user takes: data.dataset = "disk" with the CNN, vectorised engine
    from fedmeta.api import run

    cfg = build_config(None, [
        "data.dataset='disk'", f"data.path='{root}'", "data.num_clients=8", "model.image_encoder='cnn'", "model.embed_dim=8", "model.hidden_dim=8",
        "simulation.engine='vectorized'", "simulation.rounds=2", "simulation.clients_per_round=3", "output.progress=false",
    ])
    summary = run(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and math.isfinite(summary["heldout_loss_after"])
    state = torch.load(tmp_path / "run" / "model.pt")
    assert state["encoders.image.conv1.weight"].shape[1] == 3  # the CNN took the 3 channels


def test_cnn_learns_avdigits_images(tmp_path):
    """20 rounds of Reptile on avdigits' 8x8 images alone: training loss falls, held-out clients beat chance (0.1)."""
    from fedmeta.api import run

    cfg = build_config(None, [
        "data.dataset='avdigits'", "data.num_classes=10", "data.num_clients=30", "data.examples_per_client=32",
        "data.missing_modality_fraction=0.0", "model.modalities='image'", "model.image_encoder='cnn'",
        "simulation.engine='vectorized'", "simulation.rounds=20", "simulation.clients_per_round=10",
        "simulation.eval_every=20", "output.progress=false",
    ])
    summary = run(cfg, tmp_path, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last5 = rounds[0]["train_loss"], sum(r["train_loss"] for r in rounds[-5:]) / 5
    assert last5 < first - 0.4, (first, last5)  # measured: 2.18 -> 1.22
    assert summary["heldout_acc_after"] > 0.4  # measured: 0.68; chance is 0.1
    assert summary["heldout_loss_after"] < math.log(10) - 0.5  # measured: 1.18
