"""MAML (second order), first-order MAML, local-only and FedAvg + fine-tuning baselines."""

import json

import pytest
import torch
from torch import nn

from fedmeta.data import build_dataset
from fedmeta.client import evaluate_client, model_for, train_client
from fedmeta.federation import ClientUpdate, Server
from fedmeta.meta import InnerConfig, batch_schedule, inner_loop, loss_fn, params_of
from fedmeta.meta.maml import maml_client_update, meta_gradient


class Linear(nn.Module):
    """y = x @ w + b, called like the project's models: ``model(x_dict, present)``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 1)

    def forward(self, x, present):
        return self.lin(x["x"])


def _sets(n_s=6, n_q=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: ({"x": torch.randn(n, d, generator=g, dtype=torch.float64)}, torch.randn(n, 1, generator=g, dtype=torch.float64), torch.ones(n, 1, dtype=torch.bool))
    return mk(n_s), mk(n_q)


def test_second_order_maml_equals_hand_computed_gradient_on_linear_regression():
    """One full-batch SGD step on MSE: phi = theta - a*grad L_s(theta), so d phi/d theta = I - a*H_s and
    g_MAML = (I - a*H_s) grad L_q(phi); g_FOMAML = grad L_q(phi). Computed by hand in closed form."""
    torch.manual_seed(0)
    d, a = 3, 0.1
    model = Linear(d).double()
    theta = params_of(model)
    support, query = _sets(d=d)
    cfg = InnerConfig(steps=1, lr=a, batch_size=0, task="regression")
    sched = batch_schedule(6, 1, 0, seed=0)

    # closed form with augmented inputs [x, 1] and weights w = [W, b]
    aug = lambda x: torch.cat([x["x"], torch.ones(x["x"].shape[0], 1, dtype=torch.float64)], 1)
    Xs, ys, Xq, yq = aug(support[0]), support[1], aug(query[0]), query[1]
    w = torch.cat([theta["lin.weight"].reshape(-1), theta["lin.bias"]]).unsqueeze(1)
    grad_s = 2 / len(ys) * Xs.T @ (Xs @ w - ys)
    H_s = 2 / len(ys) * Xs.T @ Xs
    phi = w - a * grad_s
    grad_q = 2 / len(yq) * Xq.T @ (Xq @ phi - yq)
    expected_maml = (torch.eye(d + 1, dtype=torch.float64) - a * H_s) @ grad_q

    g2, _, q = meta_gradient(model, theta, support, query, sched, cfg, second_order=True)
    g1, _, _ = meta_gradient(model, theta, support, query, sched, cfg, second_order=False)
    flat = lambda g: torch.cat([g["lin.weight"].reshape(-1), g["lin.bias"]]).unsqueeze(1)
    torch.testing.assert_close(flat(g2), expected_maml, atol=1e-10, rtol=0)
    torch.testing.assert_close(flat(g1), grad_q, atol=1e-10, rtol=0)
    assert (flat(g2) - flat(g1)).abs().max() > 1e-3  # second order really differs
    torch.testing.assert_close(q, torch.mean((Xq @ phi - yq) ** 2))


def test_second_order_maml_matches_finite_differences_on_an_mlp():
    """Several mini-batch steps through a ReLU MLP (the project's model): <g, v> == central difference."""
    from fedmeta.data.base import DatasetSpec, ModalitySpec
    from fedmeta.models import build_model

    spec = DatasetSpec((ModalitySpec("x", "vector", (3,)),), task="regression", num_classes=0, output_dim=1)
    model = build_model(spec, embed_dim=5, hidden_dim=6, seed=0).double()
    theta = params_of(model)
    support, query = _sets(n_s=8, n_q=6, d=3, seed=1)
    cfg = InnerConfig(steps=3, lr=0.05, batch_size=4, task="regression")
    sched = batch_schedule(8, 3, 4, seed=7)

    def meta_loss(th):
        phi, _, _ = inner_loop(model, th, *support, sched, cfg)
        return loss_fn(model, phi, *query, "regression")

    g2, _, _ = meta_gradient(model, theta, support, query, sched, cfg, second_order=True)
    g1, _, _ = meta_gradient(model, theta, support, query, sched, cfg, second_order=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in theta.items()}
        eps = 1e-6
        plus = meta_loss({k: theta[k] + eps * v[k] for k in theta})
        minus = meta_loss({k: theta[k] - eps * v[k] for k in theta})
        fd = (plus - minus) / (2 * eps)
        dot2 = sum((g2[k] * v[k]).sum() for k in theta)
        dot1 = sum((g1[k] * v[k]).sum() for k in theta)
        assert float(dot2) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)
        assert abs(float(dot1) - float(fd)) > 1e-6  # first order is only an approximation

    # FOMAML is exactly grad_phi L_query(phi) at phi = inner_loop(theta)
    phi, _, _ = inner_loop(model, theta, *support, sched, cfg)
    expect = torch.func.grad(lambda p: loss_fn(model, p, *query, "regression"))(phi)
    for k in theta:
        torch.testing.assert_close(g1[k], expect[k])

    # the client update is theta - g
    phi2, _, _ = maml_client_update(model, theta, support, query, sched, cfg, second_order=True)
    for k in theta:
        torch.testing.assert_close(phi2[k], theta[k] - g2[k])


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_train_client_maml_server_step_is_meta_gradient_descent(small_cfg, algorithm):
    cfg = small_cfg(f"meta.algorithm={algorithm}", "meta.inner_steps=2", "meta.outer_lr=0.5", "meta.outer_lr_final=0.5")
    ds = build_dataset(cfg.data)
    model = model_for(cfg, ds.spec)
    theta = params_of(model)
    cid = ds.train_clients[0]
    data = ds.client(cid)
    phi, metrics = train_client(model, theta, data, cfg, ds.spec, 1, cid)
    assert {"train_loss", "query_loss", "num-examples"} <= set(metrics)
    s, q = data.support(), data.query()
    from fedmeta.client import inner_config, train_schedule

    g, _, _ = meta_gradient(model, theta, (s.x, s.y, s.present), (q.x, q.y, q.present), train_schedule(cfg, data, 1, cid), inner_config(cfg, ds.spec), algorithm == "maml")
    server = Server(cfg, theta, len(ds.train_clients))
    server.step([ClientUpdate(cid, phi, data.n_support, metrics)], 1)
    for k in theta:
        torch.testing.assert_close(server.theta[k], theta[k] - 0.5 * g[k], atol=1e-6, rtol=0)

    # the split-support variant leaves the query set alone: changing query rows changes nothing
    cfg2 = small_cfg(f"meta.algorithm={algorithm}", "meta.maml_query_fraction=0.3")
    a, _ = train_client(model, theta, data, cfg2, ds.spec, 1, cid)
    data.y[data.n_support:] = (data.y[data.n_support:] + 1) % ds.spec.num_classes
    b, _ = train_client(model, theta, data, cfg2, ds.spec, 1, cid)
    for k in theta:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_local_never_moves_theta(small_cfg, tmp_path):
    from fedmeta.cli import run_simulation

    cfg = small_cfg("meta.algorithm=local", "simulation.engine=sequential", "simulation.rounds=2")
    theta0 = params_of(model_for(cfg, build_dataset(cfg.data).spec))
    summary = run_simulation(cfg, tmp_path / "run", progress=False)
    final = torch.load(tmp_path / "run" / "model.pt")
    for k in theta0:
        assert torch.equal(final[k], theta0[k])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["beta"] == 0.0 for r in rows)
    assert summary["heldout_acc_after"] != summary["heldout_acc_before"] or summary["heldout_loss_after"] < summary["heldout_loss_before"]


def test_fedavg_ft_trains_like_fedavg_but_evaluates_with_adaptation(small_cfg):
    base = small_cfg("meta.algorithm=fedavg")
    ft = small_cfg("meta.algorithm=fedavg_ft")
    ds = build_dataset(base.data)
    model = model_for(base, ds.spec)
    theta = params_of(model)
    thetas = []
    for cfg in (base, ft):
        ups = []
        for cid in ds.train_clients[:3]:
            phi, m = train_client(model, theta, ds.client(cid), cfg, ds.spec, 1, cid)
            ups.append(ClientUpdate(cid, phi, int(m["num-examples"]), m))
        server = Server(cfg, theta, len(ds.train_clients))
        assert server.step(ups, 1)["beta"] == 1.0
        thetas.append(server.theta)
    for k in theta:
        assert torch.equal(thetas[0][k], thetas[1][k])
    cid = ds.heldout_clients[0]
    plain = evaluate_client(model, theta, ds.client(cid), base, ds.spec, 1, cid)
    tuned = evaluate_client(model, theta, ds.client(cid), ft, ds.spec, 1, cid)
    assert plain["loss_after"] == plain["loss_before"]
    assert tuned["loss_before"] == plain["loss_before"] and tuned["loss_after"] < tuned["loss_before"]
