"""The five methods written on the public seam, each against a hand computation of its published update rule
on a tiny linear problem (numpy, float64), then on the sequential and vectorised engines (equal theta)."""

import numpy as np
import pytest
import torch
from torch import nn

from fedmeta.config import build_config
from fedmeta.meta import InnerConfig
from fedmeta.meta.algorithm import build_algorithm

RNG = np.random.default_rng(0)
X, Y = RNG.normal(size=(6, 2)), RNG.normal(size=(6, 1))  # support rows
XQ, YQ = RNG.normal(size=(4, 2)), RNG.normal(size=(4, 1))  # meta-query rows
SCHEDULE = np.array([[0, 1, 2], [3, 4, 5], [1, 3, 5]])  # 3 steps of 3 rows
LR = 0.1


class Lin(nn.Module):
    """out = x W^T + b (one layer), or head(body(x)) with ``two`` layers; ``embed`` is the body."""

    def __init__(self, two=False):
        super().__init__()
        self.two = two
        if two:
            self.body = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)

    def forward(self, x, present):
        return self.head(self.embed(x, present))

    def embed(self, x, present):
        return self.body(x["v"]) if self.two else x["v"]


def t(a):
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def rows(x, y):
    return {"v": t(x)}, t(y), torch.ones(len(x), 1, dtype=torch.bool)


def setup(name, *sets, two=False, query=False):
    cfg = build_config(None, [f"meta.algorithm={name}", f"meta.inner_lr={LR}", *sets])
    algo = build_algorithm(cfg)
    model = Lin(two).double()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    icfg = InnerConfig(steps=len(SCHEDULE), lr=LR, batch_size=3, task="regression")
    return algo, model, theta, icfg


def grad_lin(W, b, x, y):
    """MSE of x W^T + b against y: (dW, db)."""
    r = x @ W.T + b - y
    return 2 / r.size * r.T @ x, 2 / r.size * r.sum(0)


def sgd(W, b, correct=lambda W, b: (0, 0)):
    for idx in SCHEDULE:
        gW, gb = grad_lin(W, b, X[idx], Y[idx])
        cW, cb = correct(W, b)
        W, b = W - LR * (gW + cW), b - LR * (gb + cb)
    return W, b


def n(theta, k):
    return theta[k].numpy()


def close(a, b):
    return np.allclose(np.asarray(a), np.asarray(b), atol=1e-10)


def test_scaffold_matches_option_ii_and_its_server_step():
    algo, model, theta, icfg = setup("scaffold", "meta.params.global_lr=0.7")
    params = theta | algo.extra_state(theta)
    c = {"head.weight": RNG.normal(size=(1, 2)), "head.bias": RNG.normal(size=(1,))}
    ci = {"head.weight": RNG.normal(size=(1, 2)), "head.bias": RNG.normal(size=(1,))}
    params |= {f"scaffold/{k}": t(v) for k, v in c.items()}
    out, metrics, state = algo.client_update(model, params, rows(X, Y), None, torch.tensor(SCHEDULE), icfg, {k: t(v) for k, v in ci.items()})
    W0, b0 = n(theta, "head.weight"), n(theta, "head.bias")
    W, b = sgd(W0, b0, lambda W, b: (c["head.weight"] - ci["head.weight"], c["head.bias"] - ci["head.bias"]))
    assert close(out["head.weight"], W) and close(out["head.bias"], b)
    K = len(SCHEDULE)
    new_ci = {"head.weight": ci["head.weight"] - c["head.weight"] + (W0 - W) / (K * LR), "head.bias": ci["head.bias"] - c["head.bias"] + (b0 - b) / (K * LR)}
    for k in c:
        assert close(state[k], new_ci[k])
        assert close(out[f"scaffold/{k}"], c[k] + new_ci[k] - ci[k])  # c + delta c_i
    # server: x += eta_g * mean(dy), c += (|S| / N) * mean(dc); |S| / N = clients_per_round / N = 10 / 48
    server_state = algo.init_server_state(params, 48)
    deltas = {k: torch.stack([out[k] - params[k], torch.zeros_like(params[k])]) for k in params}  # two clients, stacked
    new, _, info = algo.server_update(params, deltas, [1.0, 1.0], 1, server_state)
    assert info["beta"] == 0.7
    assert close(new["head.weight"], W0 + 0.7 * (W - W0) / 2)
    assert close(new["scaffold/head.bias"], c["head.bias"] + 10 / 48 * (new_ci["head.bias"] - ci["head.bias"]) / 2)


def test_ditto_personal_steps_pull_towards_theta_and_phi_is_fedavg():
    algo, model, theta, icfg = setup("ditto", "meta.params.lam=0.5")
    v0 = {"head.weight": RNG.normal(size=(1, 2)), "head.bias": RNG.normal(size=(1,))}
    phi, _, state = algo.client_update(model, theta, rows(X, Y), None, torch.tensor(SCHEDULE), icfg, {k: t(v) for k, v in v0.items()})
    W0, b0 = n(theta, "head.weight"), n(theta, "head.bias")
    W, b = sgd(W0, b0)
    assert close(phi["head.weight"], W) and close(phi["head.bias"], b)
    V, c = sgd(v0["head.weight"], v0["head.bias"], lambda V, c: (0.5 * (V - W0), 0.5 * (c - b0)))
    assert close(state["head.weight"], V) and close(state["head.bias"], c)
    assert algo.params.lam == 0.5 and algo.step_size(3) == 1.0


def test_fedrep_trains_the_clients_head_then_the_shared_body():
    algo, model, theta, icfg = setup("fedrep", two=True)
    h0 = {"head.weight": RNG.normal(size=(1, 2)), "head.bias": RNG.normal(size=(1,))}
    assert set(algo.init_client_state(theta)) == {"head.weight", "head.bias"}
    out, _, state = algo.client_update(model, theta, rows(X, Y), None, torch.tensor(SCHEDULE), icfg, {k: t(v) for k, v in h0.items()})
    W1, b1 = n(theta, "body.weight"), n(theta, "body.bias")
    W2, b2 = h0["head.weight"], h0["head.bias"]
    for idx in SCHEDULE:  # the head, body fixed: linear regression on the body's features
        gW, gb = grad_lin(W2, b2, X[idx] @ W1.T + b1, Y[idx])
        W2, b2 = W2 - LR * gW, b2 - LR * gb
    for idx in SCHEDULE:  # the body, the new head fixed
        x, y = X[idx], Y[idx]
        r = (x @ W1.T + b1) @ W2.T + b2 - y
        gW1, gb1 = 2 / r.size * (r @ W2).T @ x, 2 / r.size * (r @ W2).sum(0)
        W1, b1 = W1 - LR * gW1, b1 - LR * gb1
    assert close(state["head.weight"], W2) and close(state["head.bias"], b2)
    assert close(out["body.weight"], W1) and close(out["body.bias"], b1)
    assert torch.equal(out["head.weight"], theta["head.weight"])  # the head never reaches the server


def test_perfedavg_hessian_free_step():
    algo, model, theta, icfg = setup("perfedavg", "meta.params.beta=0.05", "meta.params.delta=0.001")
    out, _ = algo.client_update(model, theta, rows(X, Y), rows(XQ, YQ), torch.tensor(SCHEDULE), icfg)
    W, b = n(theta, "head.weight"), n(theta, "head.bias")
    A = np.hstack([XQ, np.ones((len(XQ), 1))])
    H = 2 / len(XQ) * A.T @ A  # the query loss's exact Hessian in (W, b): quadratic, so the finite difference is exact
    for idx in SCHEDULE:
        gW, gb = grad_lin(W, b, X[idx], Y[idx])
        Wt, bt = W - LR * gW, b - LR * gb
        qW, qb = grad_lin(Wt, bt, XQ, YQ)
        hv = H @ np.concatenate([qW.ravel(), qb])
        W, b = W - 0.05 * (qW - LR * hv[:2].reshape(1, 2)), b - 0.05 * (qb - LR * hv[2:])
    assert np.allclose(out["head.weight"].numpy(), W, atol=1e-8) and np.allclose(out["head.bias"].numpy(), b, atol=1e-8)


def proto_hand(W, b, sx, sy, qx, qy, classes=2):
    """Prototypical loss and nearest-prototype accuracy written out: embeddings, class means, -squared distances."""
    es, eq = sx @ W.T + b, qx @ W.T + b
    protos = {c: es[sy == c].mean(0) for c in range(classes) if (sy == c).any()}
    loss, hits = 0.0, 0
    for e, y in zip(eq, qy):
        logits = {c: -((e - p) ** 2).sum() for c, p in protos.items()}
        z = np.log(sum(np.exp(v) for v in logits.values()))
        loss += z - logits[int(y)]
        hits += max(logits, key=logits.get) == y
    return loss / len(qy), hits / len(qy)


class Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)

    def forward(self, x, present):
        return self.head(self.embed(x, present))

    def embed(self, x, present):
        return self.body(x["v"])


def test_protonet_loss_step_and_nearest_prototype_evaluation():
    cfg = build_config(None, ["meta.algorithm=protonet", f"meta.inner_lr={LR}"])
    algo, model = build_algorithm(cfg), Enc().double()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    sy, qy = np.array([0, 1, 0, 1, 0, 1]), np.array([1, 0, 0, 1])
    support = ({"v": t(X)}, torch.tensor(sy), torch.ones(6, 1, dtype=torch.bool))
    query = ({"v": t(XQ)}, torch.tensor(qy), torch.ones(4, 1, dtype=torch.bool))
    icfg = InnerConfig(steps=1, lr=LR, batch_size=3, task="classification")
    one = torch.tensor(SCHEDULE[:1])
    out, metrics = algo.client_update(model, theta, support, query, one, icfg)
    W, b = theta["body.weight"].clone().requires_grad_(), theta["body.bias"].clone().requires_grad_()
    idx = SCHEDULE[0]  # rows 0, 1, 2: classes 0, 1, 0
    es, eq = t(X[idx]) @ W.T + b, t(XQ) @ W.T + b
    protos = torch.stack([es[[0, 2]].mean(0), es[[1]].mean(0)])
    loss = torch.nn.functional.cross_entropy(-((eq[:, None] - protos[None]) ** 2).sum(-1), torch.tensor(qy))
    gW, gb = torch.autograd.grad(loss, (W, b))
    assert float(metrics["train_loss"]) == pytest.approx(proto_hand(n(theta, "body.weight"), n(theta, "body.bias"), X[idx], sy[idx], XQ, qy)[0], abs=1e-10)
    assert close(out["body.weight"], (W - LR * gW).detach()) and close(out["body.bias"], (b - LR * gb).detach())
    assert torch.equal(out["head.weight"], theta["head.weight"])  # the head is unused
    # evaluation: prototypes of every support row the schedule visits (all 6 here), no adaptation
    ev = algo.evaluate(model, theta, support, query, torch.tensor(SCHEDULE[:2]), icfg, (1,))
    hand_loss, hand_acc = proto_hand(n(theta, "body.weight"), n(theta, "body.bias"), X, sy, XQ, qy)
    assert float(ev["loss_after"]) == pytest.approx(hand_loss, abs=1e-10) and float(ev["acc_after"]) == pytest.approx(hand_acc)
    assert float(ev["loss_before"]) == float(ev["loss_at_1"]) == float(ev["loss_after"])


def test_protonet_refuses_a_model_without_embed(small_cfg):
    from fedmeta.components import ComponentError

    algo = build_algorithm(small_cfg("meta.algorithm=protonet"))
    with pytest.raises(ValueError, match=r"^model.factory: protonet needs a model with embed"):
        algo.check_model(nn.Linear(2, 2))
    import fedmeta.client as client

    with pytest.raises(ComponentError, match=r"^config error: model.factory: protonet needs a model with embed"):
        import fedmeta.models as models

        orig = models.build_model_for
        try:
            client.build_model_for = lambda cfg, spec, factory=None: nn.Linear(2, 2)
            client.model_for(small_cfg("meta.algorithm=protonet"), None)
        finally:
            client.build_model_for = orig


# -- on the engines ----------------------------------------------------------------------------------------------

METHODS = ["perfedavg", "ditto", "fedrep", "scaffold", "protonet"]


@pytest.mark.parametrize("name", METHODS)
def test_sequential_and_vectorized_agree(small_cfg, tmp_path, name):
    from fedmeta.client import model_for
    from fedmeta.data import build_dataset
    from fedmeta.engines.sequential import SequentialBackend
    from fedmeta.engines.vectorized import VectorizedBackend
    from fedmeta.federation import run_federation
    from fedmeta.meta.algorithm import initial_meta_parameters
    from fedmeta.results import RunWriter

    models, summaries = {}, {}
    for engine, backend in (("sequential", SequentialBackend), ("vectorized", VectorizedBackend)):
        cfg = small_cfg(f"meta.algorithm={name}", f"simulation.engine={engine}", "simulation.rounds=3", "simulation.eval_every=3", "meta.inner_steps=3")
        ds = build_dataset(cfg.data)
        summaries[engine] = run_federation(cfg, backend(cfg, ds), initial_meta_parameters(model_for(cfg, ds.spec), build_algorithm(cfg)), RunWriter(tmp_path / engine))
        models[engine] = torch.load(tmp_path / engine / "model.pt")
    a, b = models["sequential"], models["vectorized"]
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert summaries["sequential"]["heldout_acc_after"] == pytest.approx(summaries["vectorized"]["heldout_acc_after"], abs=1e-6)
    assert 0 <= summaries["sequential"]["heldout_acc_after"] <= 1


@pytest.mark.slow
def test_the_five_methods_on_the_flower_simulation_engine(tmp_path):
    """Two rounds each on Flower's Simulation Engine (client state in the ClientApp's context.state) equal the sequential engine."""
    from fedmeta.cli import run_simulation

    base = ["data.num_clients=6", "data.examples_per_client=20", "simulation.clients_per_round=3", "simulation.rounds=2",
            "simulation.eval_every=100", "simulation.eval_clients=1", "meta.inner_steps=3", "output.progress=false"]
    for name in METHODS:
        models = {}
        for engine in ("flower", "sequential"):
            cfg = build_config({}, base + [f"meta.algorithm={name}", f"simulation.engine={engine}"])
            run_simulation(cfg, tmp_path / name / engine, progress=False)
            models[engine] = torch.load(tmp_path / name / engine / "model.pt")
        a, b = models["flower"], models["sequential"]
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name


def test_the_protocol_searches_a_methods_own_params_and_maps_them_back():
    import optuna

    from experiments.protocol import STUDIES, params_to_overrides, suggest

    chosen = {"inner_lr": 0.1, "inner_steps": 3, "params.lam": 0.5, "eval_steps": 10, "eval_lr": 0.2}
    sets = suggest(optuna.trial.FixedTrial(chosen), "ditto", regression=False)
    assert sets == ["meta.inner_lr=0.1", "meta.inner_steps=3", "meta.params.lam=0.5", "meta.eval_steps=10", "meta.eval_lr=0.2"]
    assert params_to_overrides(chosen, "ditto") == sets
    assert build_config(None, sets + ["meta.algorithm=ditto"]).meta.params == {"lam": 0.5}
    for study in ("avdigits-personal", "synthetic-personal"):  # their own studies: the methods studies' tables stay
        arms = {a.algorithm for a in STUDIES[study].arms}
        studied = [m.replace("scaffold", "scaffold_ft") for m in METHODS]  # SCAFFOLD's arm fine-tunes, as FedAvg+FT does
        assert set(studied) <= arms and all((m, "fedavg_ft") in STUDIES[study].pairs for m in studied)


def test_scaffold_ft_trains_as_scaffold_and_adapts_at_evaluation(tmp_path):
    """scaffold_ft is to scaffold what fedavg_ft is to fedavg: the same training (same theta), plus fine-tuning when scored."""
    import fedmeta

    small = ["data.num_clients=10", "data.examples_per_client=20", "simulation.clients_per_round=3", "simulation.rounds=2",
             "simulation.engine=sequential", "simulation.eval_every=2", "output.progress=false"]
    runs = {}
    for name in ("scaffold", "scaffold_ft"):
        summary = fedmeta.simulate(None, overrides=small + [f"meta.algorithm={name}"], out=tmp_path / name)
        runs[name] = (summary, torch.load(tmp_path / name / "model.pt"))
    (plain, theta), (ft, theta_ft) = runs["scaffold"], runs["scaffold_ft"]
    assert all(torch.equal(theta[k], theta_ft[k]) for k in theta)
    assert plain["heldout_loss_after"] == plain["heldout_loss_before"]  # no adaptation
    assert ft["heldout_loss_before"] == plain["heldout_loss_before"] and ft["heldout_loss_after"] < ft["heldout_loss_before"]
