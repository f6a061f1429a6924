"""Synthetic data, client splits, and the multimodal model's missing-modality handling."""

import pytest
import torch

from fedmeta.data import DataError, split_clients
from fedmeta.data.synthetic import SyntheticMultimodal
from fedmeta.models import build_model


def test_client_split_is_disjoint_covering_and_seeded():
    split = split_clients(50, 0.2, seed=3)
    assert set(split.train).isdisjoint(split.heldout)
    assert sorted(split.train + split.heldout) == list(range(50))
    assert len(split.heldout) == 10
    assert split_clients(50, 0.2, seed=3) == split
    assert split_clients(50, 0.2, seed=4) != split
    with pytest.raises(DataError, match="num_clients"):
        split_clients(1, 0.2, 0)


def test_support_and_query_are_disjoint_and_stratified():
    ds = SyntheticMultimodal(num_clients=5, examples_per_client=30, num_classes=5)
    c = ds.client(2)
    assert c.n_support == 15 and c.n_query == 15
    assert set(c.support().y.tolist()) == set(range(5)) == set(c.query().y.tolist())
    # rows are distinct examples: no support row equals a query row
    s, q = c.support().x["image"].flatten(1), c.query().x["image"].flatten(1)
    assert torch.cdist(s, q).min() > 0


def test_clients_reproduce_from_seed_and_differ_between_clients():
    a, b = SyntheticMultimodal(seed=1), SyntheticMultimodal(seed=1)
    for cid in (0, 7):
        ca, cb = a.client(cid), b.client(cid)
        assert all(torch.equal(ca.x[k], cb.x[k]) for k in ca.x) and torch.equal(ca.y, cb.y)
    assert not torch.equal(a.client(0).x["image"], a.client(1).x["image"])
    assert not torch.equal(a.client(0).x["image"], SyntheticMultimodal(seed=2).client(0).x["image"])


def test_missing_modality_fraction_and_zeroed_data():
    ds = SyntheticMultimodal(num_clients=200, missing_modality_fraction=0.3, missing_modality="audio")
    missing = [cid for cid in range(200) if not ds.client(cid).present[:, 1].any()]
    assert 40 <= len(missing) <= 80
    c = ds.client(missing[0])
    assert torch.count_nonzero(c.x["audio"]) == 0 and c.present[:, [0, 2]].all()


@pytest.mark.parametrize("fusion", ["concat", "gated", "attention"])
def test_model_masks_out_a_missing_modality(fusion):
    ds = SyntheticMultimodal(num_clients=4)
    c = ds.client(0)
    model = build_model(ds.spec, fusion=fusion, seed=0)
    present = c.present.clone()
    present[:, 1] = False  # audio missing
    out = model(c.x, present)
    assert torch.isfinite(out).all()
    # whatever sits in the missing slot does not change the output ...
    x2 = dict(c.x, audio=torch.randn_like(c.x["audio"]) * 100)
    torch.testing.assert_close(model(x2, present), out)
    # ... and the missing encoder gets no gradient
    model.zero_grad()
    model(x2, present).sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.encoders["audio"].parameters())
    # while a present modality matters
    assert not torch.allclose(model(dict(c.x, image=torch.randn_like(c.x["image"])), present), out)


def test_bad_missing_modality_name():
    with pytest.raises(DataError, match="data.missing_modality"):
        SyntheticMultimodal(missing_modality="smell")


def test_model_modalities_restricts_the_dataset_everywhere(tmp_path):
    from fedmeta.config import build_config
    from fedmeta.data import build_dataset

    cfg = build_config(None, ["model.modalities=image,text"])
    ds = build_dataset(cfg.data, cfg.model.modalities)
    assert ds.spec.modality_names == ("image", "text")
    c = ds.client(0)
    assert set(c.x) == {"image", "text"} and c.present.shape[1] == 2
    with pytest.raises(DataError, match="model.modalities"):
        build_dataset(cfg.data, "image,smell")
