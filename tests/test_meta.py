"""The maths: Reptile step, annealing, inner loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fedmeta.data import build_dataset
from fedmeta.client import model_for
from fedmeta.federation import ClientUpdate, Server
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.meta import InnerConfig, batch_schedule, inner_loop, linear_anneal, params_of, reptile_update, weighted_mean


def test_one_reptile_round_equals_hand_computation(small_cfg):
    """Full-batch SGD inner steps through the real backend + server == theta + beta * weighted mean(phi - theta)."""
    cfg = small_cfg("meta.inner_batch_size=0", "meta.inner_steps=3", "meta.outer_lr=0.7", "meta.outer_lr_final=0.1", "simulation.rounds=4")
    ds = build_dataset(cfg.data)
    backend = SequentialBackend(cfg, ds)
    model = model_for(cfg, ds.spec)
    theta = params_of(model)
    cohort = ds.train_clients[:3]
    replies = backend.train(theta, cohort, server_round=2)

    # independent computation: nn.Module + torch.optim.SGD, full batch
    phis, weights = [], []
    for cid in cohort:
        data = ds.client(cid)
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=cfg.meta.inner_lr)
        s = data.support()
        for _ in range(cfg.meta.inner_steps):
            opt.zero_grad()
            F.cross_entropy(m(s.x, s.present), s.y).backward()
            opt.step()
        phis.append({k: v.detach() for k, v in m.named_parameters()})
        weights.append(data.n_support)
    beta = 0.7 + (0.1 - 0.7) * (2 - 1) / 4  # linear anneal at round 2 of 4
    expected = {k: theta[k] + beta * sum(w * (p[k] - theta[k]) for p, w in zip(phis, weights)) / sum(weights) for k in theta}

    server = Server(cfg, theta, len(ds.train_clients))
    info = server.step(replies.results, server_round=2)
    assert info["beta"] == pytest.approx(beta)
    for k in theta:
        torch.testing.assert_close(server.theta[k], expected[k], atol=1e-6, rtol=0)
    assert any((server.theta[k] - theta[k]).abs().max() > 1e-4 for k in theta)  # it moved


def test_weighted_mean_uses_example_counts():
    theta = {"w": torch.zeros(2)}
    phis = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 4.0])}]
    new = reptile_update(theta, phis, weights=[3, 1], beta=0.5)
    torch.testing.assert_close(new["w"], torch.tensor([0.5 * 3 / 4, 0.5 * 4 / 4]))
    with pytest.raises(ValueError):
        weighted_mean([], [])


def test_fedavg_is_beta_one_average(small_cfg):
    cfg = small_cfg("meta.algorithm=fedavg")
    theta = {"w": torch.zeros(3)}
    ups = [ClientUpdate(0, {"w": torch.ones(3)}, 1), ClientUpdate(1, {"w": 3 * torch.ones(3)}, 3)]
    server = Server(cfg, theta, 8)
    assert server.step(ups, 1)["beta"] == 1.0
    torch.testing.assert_close(server.theta["w"], torch.full((3,), 2.5))


def test_linear_anneal_matches_reptile_schedule():
    assert linear_anneal(1, 10, 1.0, 0.0) == 1.0
    assert linear_anneal(6, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert linear_anneal(10, 10, 1.0, 0.0) == pytest.approx(0.1)  # last round still steps
    assert linear_anneal(3, 5, 0.8, 0.3) == pytest.approx(0.8 + (0.3 - 0.8) * 2 / 5)
    values = [linear_anneal(r, 20, 1.0, 0.2) for r in range(1, 21)]
    assert all(a > b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.3), ("adam", 0.01)])
def test_inner_loop_lowers_support_loss(small_cfg, optimizer, lr):
    cfg = small_cfg()
    ds = build_dataset(cfg.data)
    model = model_for(cfg, ds.spec)
    data = ds.client(ds.train_clients[0])
    s = data.support()
    icfg = InnerConfig(steps=20, lr=lr, optimizer=optimizer, batch_size=5)
    theta = params_of(model)
    phi, _, _ = inner_loop(model, theta, s.x, s.y, s.present, batch_schedule(data.n_support, 20, 5, seed=1), icfg)
    before = F.cross_entropy(torch.func.functional_call(model, theta, (s.x, s.present)), s.y)
    after = F.cross_entropy(torch.func.functional_call(model, phi, (s.x, s.present)), s.y)
    assert after < 0.8 * before


def test_batch_schedule_is_seeded_and_covers_support():
    a = batch_schedule(20, 4, 10, seed=5)
    assert torch.equal(a, batch_schedule(20, 4, 10, seed=5))
    assert not torch.equal(a, batch_schedule(20, 4, 10, seed=6))
    assert sorted(a[:2].flatten().tolist()) == list(range(20))  # one epoch visits every row once
    assert batch_schedule(20, 3, 0, seed=1).shape == (3, 20)
    assert batch_schedule(20, 0, 10, seed=1).shape[0] == 0


def test_cohort_sampling_keeps_64_bit_node_ids(small_cfg):
    from fedmeta.federation import sample_cohort

    population = [2**63 + 12345, 2**64 - 1, 17, 2**62 + 3, 5]
    cohort = sample_cohort(small_cfg(), population, server_round=1)
    assert len(cohort) == 3 and set(cohort) <= set(population)
    assert all(type(c) is int for c in cohort)


def test_server_adam_matches_torch_adam_on_the_pseudo_gradient(small_cfg):
    cfg = small_cfg("meta.server_optimizer=adam", "meta.outer_lr=0.05", "meta.outer_lr_final=0.05", "meta.server_beta1=0.8")
    theta = {"w": torch.tensor([1.0, -2.0, 0.5])}
    server = Server(cfg, theta, 8)
    ref = torch.nn.Parameter(theta["w"].clone())
    opt = torch.optim.Adam([ref], lr=0.05, betas=(0.8, 0.999), eps=1e-8)
    for rnd, target in enumerate([torch.tensor([0.0, 0.0, 0.0]), torch.tensor([3.0, 1.0, -1.0]), torch.tensor([0.5, 0.5, 0.5])], 1):
        server.step([ClientUpdate(0, {"w": target}, 1)], rnd)
        opt.zero_grad()
        ref.grad = -(target - ref.detach())  # pseudo-gradient: -(phi - theta)
        opt.step()
        torch.testing.assert_close(server.theta["w"], ref.detach(), atol=1e-6, rtol=0)
