import math

import numpy as np
import pytest
import torch

from fedmeta.data.base import DataError
from fedmeta.data.sine import SineDataset


def test_shapes_and_spec():
    ds = SineDataset(num_clients=20, heldout_fraction=0.25, k_shot=5, examples_per_client=15, seed=1)
    assert ds.spec.task == "regression" and ds.spec.output_dim == 1 and ds.spec.num_classes == 0
    assert ds.spec.modality_names == ("x",) and ds.spec.modalities[0].kind == "vector"
    assert ds.spec.modalities[0].shape == (1,)
    assert sorted(ds.train_clients + ds.heldout_clients) == list(range(20))
    assert len(ds.heldout_clients) == 5
    c = ds.client(3)
    assert c.x["x"].shape == (15, 1) and c.x["x"].dtype == torch.float32
    assert c.y.shape == (15, 1) and c.y.dtype == torch.float32
    assert c.present.shape == (15, 1) and c.present.dtype == torch.bool and bool(c.present.all())
    assert c.n_support == 5 and c.n_query == 10
    assert c.support().y.shape == (5, 1) and c.query().y.shape == (10, 1)


def test_sine_consistency_and_ranges():
    ds = SineDataset(num_clients=50, seed=7)
    amps, phases = [], []
    for cid in range(50):
        a, phi = ds.task_params(cid)
        c = ds.client(cid)
        x = c.x["x"].double()
        assert torch.allclose(c.y.double(), a * torch.sin(x - phi), atol=1e-5)
        assert float(x.min()) >= -5 and float(x.max()) <= 5
        amps.append(a)
        phases.append(phi)
    assert 0.1 <= min(amps) and max(amps) <= 5.0 and 0.0 <= min(phases) and max(phases) <= math.pi
    assert np.std(amps) > 0.5 and len(set(np.round(phases, 6))) == 50  # tasks really differ


def test_deterministic():
    a = SineDataset(num_clients=10, seed=3).client(4)
    b = SineDataset(num_clients=10, seed=3).client(4)
    c = SineDataset(num_clients=10, seed=4).client(4)
    assert torch.equal(a.x["x"], b.x["x"]) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y, c.y)
    # a task does not depend on the population size
    assert torch.equal(SineDataset(num_clients=30, seed=3).client(4).y, a.y)


def test_noise_and_errors():
    ds = SineDataset(num_clients=4, noise_std=0.5, seed=0)
    a, phi = ds.task_params(0)
    c = ds.client(0)
    resid = c.y.double() - a * torch.sin(c.x["x"].double() - phi)
    assert 0.1 < float(resid.std()) < 1.5
    with pytest.raises(DataError):
        SineDataset(num_clients=4, k_shot=5, examples_per_client=5)
    with pytest.raises(DataError):
        SineDataset(num_clients=4).client(4)
