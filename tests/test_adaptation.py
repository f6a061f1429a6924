"""Test-time adaptation is configured apart from training: ``meta.eval_lr`` (0 = the training rate) and
``meta.eval_steps`` (0 = no adaptation), read by the sequential engine, the vectorised engine and the
Flower ClientApp through the one ``fedmeta.client.inner_config``."""

from __future__ import annotations

import math

import pytest
import torch

from fedmeta.client import configure_torch, evaluate_client, inner_config, model_for
from fedmeta.config import build_config
from fedmeta.data import build_dataset
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.engines.vectorized import VectorizedBackend
from fedmeta.federation import run_federation
from fedmeta.meta import params_of
from fedmeta.results import RunWriter

SMALL = ["data.num_clients=12", "data.examples_per_client=20", "model.embed_dim=8", "model.hidden_dim=8",
         "meta.inner_steps=3", "meta.eval_steps=5", "meta.inner_batch_size=4", "simulation.rounds=2",
         "simulation.clients_per_round=4", "simulation.eval_every=1", "output.progress=false"]


def test_eval_lr_zero_is_the_training_rate_and_training_never_reads_eval_lr():
    cfg = build_config({}, SMALL + ["meta.inner_lr=0.2"])
    spec = build_dataset(cfg.data).spec
    assert cfg.meta.eval_lr == 0.0  # the default: today's behaviour
    assert inner_config(cfg, spec, evaluation=True).lr == 0.2 and inner_config(cfg, spec, evaluation=True).steps == 5
    tuned = build_config({}, SMALL + ["meta.inner_lr=0.2", "meta.eval_lr=0.05", "meta.eval_steps=7"])
    assert inner_config(tuned, spec, evaluation=True).lr == 0.05 and inner_config(tuned, spec, evaluation=True).steps == 7
    assert inner_config(tuned, spec) == inner_config(cfg, spec)  # training: inner_lr and inner_steps only


def test_eval_lr_is_the_adaptation_rate_of_evaluate_client():
    """Adapting at eval_lr a from a model trained at rate b scores exactly what inner_lr = a (eval_lr 0) scores."""
    configure_torch(1)
    a = build_config({}, SMALL + ["meta.inner_lr=0.7", "meta.eval_lr=0.05"])
    b = build_config({}, SMALL + ["meta.inner_lr=0.05"])
    ds = build_dataset(a.data)
    model = model_for(a, ds.spec)
    theta = params_of(model)
    cid = ds.heldout_clients[0]
    got = evaluate_client(model, theta, ds.client(cid), a, ds.spec, 1, cid)
    want = evaluate_client(model, theta, ds.client(cid), b, ds.spec, 1, cid)
    assert got == want
    fast = evaluate_client(model, theta, ds.client(cid), build_config({}, SMALL + ["meta.inner_lr=0.7"]), ds.spec, 1, cid)
    assert fast["loss_after"] != got["loss_after"]  # the rate matters, so the equality above is not vacuous


def test_eval_steps_zero_is_no_adaptation():
    cfg = build_config({}, SMALL + ["meta.eval_steps=0", "meta.algorithm=fedavg_ft"])
    ds = build_dataset(cfg.data)
    model = model_for(cfg, ds.spec)
    cid = ds.heldout_clients[0]
    out = evaluate_client(model, params_of(model), ds.client(cid), cfg, ds.spec, 1, cid)
    assert out["acc_after"] == out["acc_before"] and out["loss_after"] == out["loss_before"]
    assert not any(k.startswith("acc_at_") for k in out)


def _summary(cfg, backend_cls, out):
    configure_torch(1)
    ds = build_dataset(cfg.data)
    return run_federation(cfg, backend_cls(cfg, ds), params_of(model_for(cfg, ds.spec)), RunWriter(out))


@pytest.mark.parametrize("algorithm", ["reptile", "fedavg_ft"])
def test_engines_agree_on_eval_lr(tmp_path, algorithm):
    """Sequential and vectorised runs with eval_lr set score the same held-out numbers, which differ from the
    default (eval_lr = inner_lr) while training (the meta-parameters) is the same."""
    sets = SMALL + [f"meta.algorithm={algorithm}", "meta.inner_lr=0.3"]
    tuned = build_config({}, sets + ["meta.eval_lr=0.03"])
    seq = _summary(tuned, SequentialBackend, tmp_path / "seq")
    vec = _summary(tuned, VectorizedBackend, tmp_path / "vec")
    default = _summary(build_config({}, sets), SequentialBackend, tmp_path / "default")
    for key in ("heldout_acc_after", "heldout_loss_after", "heldout_loss_before"):
        assert vec[key] == pytest.approx(seq[key], abs=1e-4), key
    assert seq["heldout_loss_before"] == pytest.approx(default["heldout_loss_before"], abs=1e-6)  # same training
    assert math.isfinite(seq["heldout_loss_after"]) and seq["heldout_loss_after"] != pytest.approx(default["heldout_loss_after"], abs=1e-6)
    theta = {k: v for k, v in RunWriter(tmp_path / "seq").load_checkpoint()["server"]["theta"].items()}
    theta_default = RunWriter(tmp_path / "default").load_checkpoint()["server"]["theta"]
    assert all(torch.equal(theta[k], theta_default[k]) for k in theta)
