"""Meta-SGD (Li et al. 2017) on the algorithm seam: learned per-parameter inner learning rates alpha.

What is checked: the meta-gradient w.r.t. theta *and* alpha (finite differences, closed form for one
step); alpha is learned by the server step and used at evaluation; the vectorised engine equals the
sequential one on theta and alpha (with DP too); alpha is clipped and noised together with theta;
and the Flower Simulation Engine carries alpha (``model.pt`` holds the model, ``meta_state.pt`` alpha).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from fedmeta.client import evaluate_client, inner_config, model_for, train_client, train_plan
from fedmeta.config import build_config
from fedmeta.data import build_dataset
from fedmeta.data.base import DatasetSpec, ModalitySpec
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.engines.vectorized import VectorizedBackend
from fedmeta.federation import NOISE_STREAM, ClientUpdate, Server, sample_rate
from fedmeta.meta import InnerConfig, batch_schedule, client_seed, loss_fn, params_of
from fedmeta.meta.algorithm import build_algorithm, initial_meta_parameters
from fedmeta.meta.metasgd import PREFIX
from fedmeta.models import build_model
from fedmeta.privacy.mechanism import global_norm, noise_like

from test_vectorized import SMALL, Ragged, _run

LR = "metasgd/lr/"


def _alpha(params):
    return {k: v for k, v in params.items() if k.startswith(LR)}


def _theta(params):
    return {k: v for k, v in params.items() if "/" not in k}


def reference_meta_loss(model, params, support, query, schedule, task):
    """L_query(phi), phi from ``len(schedule)`` steps of phi <- phi - alpha * grad L_batch(phi): written
    here independently of fedmeta.meta.metasgd (plain loop, dict keys by name)."""
    theta = _theta(params)
    alpha = {k: params[LR + k] for k in theta}
    x, y, present = support
    phi = theta
    for t in range(schedule.shape[0]):
        idx = schedule[t]
        grads = torch.func.grad(lambda p: loss_fn(model, p, {k: v[idx] for k, v in x.items()}, y[idx], present[idx], task))(phi)
        phi = {k: phi[k] - alpha[k] * grads[k] for k in phi}
    return loss_fn(model, phi, *query, task)


# -- the meta-gradient ----------------------------------------------------------------------------


def _regression_problem(seed=0):
    spec = DatasetSpec((ModalitySpec("x", "vector", (3,)),), task="regression", num_classes=0, output_dim=1)
    model = build_model(spec, embed_dim=5, hidden_dim=6, seed=0).double()  # float64: the seam takes any float dtype
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: ({"x": torch.randn(n, 3, generator=g, dtype=torch.float64)}, torch.randn(n, 1, generator=g, dtype=torch.float64), torch.ones(n, 1, dtype=torch.bool))
    cfg = build_config(None, ["meta.algorithm=metasgd", "meta.inner_lr=0.05"])
    algo = build_algorithm(cfg)
    theta = params_of(model)
    params = initial_meta_parameters(model, algo)
    assert set(params) == set(theta) | {LR + k for k in theta}
    assert all(torch.equal(params[LR + k], torch.full_like(v, 0.05)) for k, v in theta.items())  # alpha_0 = meta.inner_lr
    # non-uniform rates, so a bug that mixes up coordinates (or ignores alpha) cannot cancel out
    params = params | {LR + k: 0.05 * (0.5 + torch.rand(v.shape, generator=g, dtype=torch.float64)) for k, v in theta.items()}
    return model, algo, params, mk(8), mk(6)


@pytest.mark.parametrize("steps", [1, 2])
def test_meta_gradient_wrt_theta_and_alpha_matches_finite_differences(steps):
    model, algo, params, support, query = _regression_problem()
    schedule = batch_schedule(8, steps, 4, seed=7)  # mini-batches of 4 of the 8 support rows
    icfg = InnerConfig(steps=steps, lr=0.05, batch_size=4, task="regression")
    new, metrics = algo.client_update(model, params, support, query, schedule, icfg)
    assert new.keys() == params.keys()
    g = {k: params[k] - new[k] for k in params}  # the client returns (theta, alpha) - g
    assert float(global_norm(_alpha(g))) > 1e-4 and float(global_norm(_theta(g))) > 1e-4

    meta_loss = lambda p: reference_meta_loss(model, p, support, query, schedule, "regression")
    assert float(metrics["query_loss"]) == pytest.approx(float(meta_loss(params)), rel=1e-12)
    gen = torch.Generator().manual_seed(3)
    for part in ("theta", "alpha", "both"):
        for _ in range(2):
            v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
            if part != "both":
                v = {k: t if (k.startswith(LR)) == (part == "alpha") else torch.zeros_like(t) for k, t in v.items()}
            eps = 1e-6
            fd = (meta_loss({k: params[k] + eps * v[k] for k in params}) - meta_loss({k: params[k] - eps * v[k] for k in params})) / (2 * eps)
            dot = sum((g[k] * v[k]).sum() for k in params)
            assert abs(float(fd)) > 1e-5
            assert float(dot) == pytest.approx(float(fd), rel=1e-5, abs=1e-9), part


def test_one_step_alpha_gradient_is_the_closed_form_not_the_parameter_gradient():
    """phi = theta - alpha * grad_s(theta) => dL_q/dalpha = -grad_s(theta) * grad_q(phi), elementwise.
    (FedMeta's Flower baseline uses the parameter gradient for alpha instead.)"""
    model, algo, params, support, query = _regression_problem(seed=1)
    schedule = batch_schedule(8, 1, 0, seed=0)  # full batch
    icfg = InnerConfig(steps=1, lr=0.05, batch_size=0, task="regression")
    new, _ = algo.client_update(model, params, support, query, schedule, icfg)
    theta = _theta(params)
    grad_s = torch.func.grad(lambda p: loss_fn(model, p, *support, "regression"))(theta)
    phi = {k: theta[k] - params[LR + k] * grad_s[k] for k in theta}
    grad_q = torch.func.grad(lambda p: loss_fn(model, p, *query, "regression"))(phi)
    # d phi/d theta = I - diag(alpha) H_s  =>  dL_q/dtheta = grad_q - H_s (alpha * grad_q)  (H_s symmetric)
    u = {k: params[LR + k] * grad_q[k] for k in theta}
    grad_s_of = torch.func.grad(lambda p: loss_fn(model, p, *support, "regression"))
    hvp = torch.func.grad(lambda p: sum((grad_s_of(p)[k] * u[k]).sum() for k in p))(theta)
    for k in theta:
        torch.testing.assert_close(params[LR + k] - new[LR + k], -grad_s[k] * grad_q[k], atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(params[k] - new[k], grad_q[k] - hvp[k], atol=1e-12, rtol=1e-9)
    assert max(float((params[k] - new[k] - grad_q[k]).abs().max()) for k in theta) > 1e-6  # second order matters
    assert max(float((params[LR + k] - new[LR + k] - grad_q[k]).abs().max()) for k in theta) > 1e-4  # alpha's is not theta's


# -- alpha is learned, and used at evaluation -----------------------------------------------------


def test_server_step_learns_alpha_and_evaluation_adapts_with_it(small_cfg):
    cfg = small_cfg("meta.algorithm=metasgd", "meta.inner_steps=2", "meta.inner_lr=0.05", "meta.inner_batch_size=5",
                    "meta.outer_lr=0.5", "meta.outer_lr_final=0.5", "meta.eval_steps=3")
    ds = build_dataset(cfg.data)
    model = model_for(cfg, ds.spec)
    algo = build_algorithm(cfg)
    params = initial_meta_parameters(model, algo)
    cid = ds.train_clients[0]
    data = ds.client(cid)
    new, metrics = train_client(model, params, data, cfg, ds.spec, 1, cid)
    assert {"train_loss", "query_loss", "num-examples"} <= set(metrics)

    # the meta-gradient, computed independently on the rows train_client uses (the client's query set)
    rows, schedule = train_plan(cfg, algo, data, 1, cid)
    s, q = data.rows(0, rows.n_inner), data.rows(rows.query_start, rows.query_start + rows.n_query)
    g = torch.func.grad(lambda p: reference_meta_loss(model, p, (s.x, s.y, s.present), (q.x, q.y, q.present), schedule, ds.spec.task))(params)

    server = Server(cfg, params, len(ds.train_clients))
    assert server.step([ClientUpdate(cid, new, data.n_support, metrics)], 1)["beta"] == 0.5
    for k in params:  # theta and alpha alike: (theta, alpha) <- (theta, alpha) - beta * g
        torch.testing.assert_close(server.theta[k], params[k] - 0.5 * g[k], atol=1e-6, rtol=1e-5)
    alpha = _alpha(server.theta)
    assert len(alpha) == len(_theta(params)) > 0
    assert max(float((alpha[k] - params[k]).abs().max()) for k in alpha) > 1e-4  # alpha moved ...
    assert sum(len(torch.unique(v)) for v in alpha.values()) > 10 * len(alpha)  # ... per coordinate, not one rate per tensor

    # evaluation: with alpha = inner_lr everywhere Meta-SGD adapts exactly like plain SGD at inner_lr ...
    held = ds.heldout_clients[0]
    hd = ds.client(held)
    sgd = small_cfg("meta.algorithm=reptile", "meta.inner_lr=0.05", "meta.inner_batch_size=5", "meta.eval_steps=3")
    plain = evaluate_client(model, _theta(params), hd, sgd, ds.spec, 2, held)
    uniform = evaluate_client(model, params, hd, cfg, ds.spec, 2, held)
    for key in ("loss_before", "loss_after", "loss_at_1", "acc_after"):
        assert uniform[key] == pytest.approx(plain[key], abs=1e-6), key
    # ... and changing alpha changes the adapted loss, not the loss before adaptation
    learned = evaluate_client(model, server.theta, hd, cfg, ds.spec, 2, held)
    doubled = evaluate_client(model, server.theta | {k: 2 * v for k, v in alpha.items()}, hd, cfg, ds.spec, 2, held)
    zero = evaluate_client(model, server.theta | {k: torch.zeros_like(v) for k, v in alpha.items()}, hd, cfg, ds.spec, 2, held)
    assert doubled["loss_before"] == learned["loss_before"] == zero["loss_before"]
    assert abs(doubled["loss_after"] - learned["loss_after"]) > 1e-4
    assert zero["loss_after"] == pytest.approx(zero["loss_before"], abs=1e-6)  # alpha = 0: no adaptation at all
    assert learned["loss_after"] < learned["loss_before"]


# -- engines --------------------------------------------------------------------------------------


DP_SERVER = ["privacy.enabled=true", "simulation.sampling=poisson", "privacy.mode=server", "privacy.noise_multiplier=0.5",
             "privacy.clip_norm=0.5", "simulation.deterministic=true", "privacy.reproducible_noise=true"]  # same noise in both engines


@pytest.mark.parametrize("extra", [[], DP_SERVER], ids=["plain", "dp-server"])
def test_vectorized_equals_sequential_on_theta_and_alpha(tmp_path, extra):
    cfg = build_config({}, SMALL + ["meta.algorithm=metasgd", "meta.inner_lr=0.1", "meta.outer_lr=0.5", "meta.outer_lr_final=0.1", "simulation.rounds=3"] + extra)
    dataset = Ragged(build_dataset(cfg.data))  # unequal sizes: grouped, padded, meta-query gathered per client
    theta_seq, sum_seq = _run(cfg, dataset, SequentialBackend, tmp_path / "seq")
    theta_vec, sum_vec = _run(cfg, dataset, VectorizedBackend, tmp_path / "vec")
    theta0 = params_of(model_for(cfg, dataset.spec))
    assert theta_seq.keys() == theta_vec.keys() == set(theta0) | {LR + k for k in theta0}
    worst = {part: max(float((theta_seq[k] - theta_vec[k]).abs().max()) for k in theta_seq if k.startswith(LR) == (part == "alpha")) for part in ("theta", "alpha")}
    assert worst["theta"] < 1e-5 and worst["alpha"] < 1e-5, worst
    assert max(float((theta_seq[k] - theta0[k]).abs().max()) for k in theta0) > 1e-3  # theta trained
    assert max(float((theta_seq[LR + k] - 0.1).abs().max()) for k in theta0) > 1e-4  # alpha trained
    for key, value in sum_seq.items():
        if key.startswith("heldout_") and isinstance(value, float) and math.isfinite(value):
            assert sum_vec[key] == pytest.approx(value, abs=1e-4), key
    assert sum_vec["engine"] == "vectorized" and sum_seq["num_parameters"] == sum(v.numel() for v in theta0.values())
    if extra:
        assert sum_vec["epsilon"] == sum_seq["epsilon"] > 0


# -- differential privacy: alpha is part of the clipped, noised update ------------------------------


def _cohort_updates(cfg, n=4):
    ds = build_dataset(cfg.data)
    model = model_for(cfg, ds.spec)
    params = initial_meta_parameters(model, build_algorithm(cfg))
    ups = []
    for cid in ds.train_clients[:n]:
        phi, m = train_client(model, params, ds.client(cid), cfg, ds.spec, 1, cid)
        ups.append(ClientUpdate(cid, phi, int(m["num-examples"]), m))
    return ds, model, params, ups


def test_dp_server_mode_clips_and_noises_alpha_with_theta(small_cfg):
    base = ["meta.algorithm=metasgd", "meta.inner_lr=0.1", "meta.outer_lr=0.7", "meta.outer_lr_final=0.7",
            "privacy.enabled=true", "simulation.sampling=poisson", "privacy.mode=server", "simulation.deterministic=true",
            "privacy.reproducible_noise=true"]  # the test regenerates the noise from the config's stream
    cfg0 = small_cfg(*base, "privacy.noise_multiplier=1e-9", "privacy.clip_norm=0.05")  # 0 is refused with DP on
    ds, model, params, ups = _cohort_updates(cfg0)
    deltas = [{k: u.phi[k] - params[k] for k in params} for u in ups]
    full = [float(global_norm(d)) for d in deltas]
    theta_only = [float(global_norm(_theta(d))) for d in deltas]
    alpha_only = [float(global_norm(_alpha(d))) for d in deltas]
    for f, t, a in zip(full, theta_only, alpha_only):
        assert f == pytest.approx(math.sqrt(t**2 + a**2), rel=1e-9)
        assert a > 0 and t > 0.05  # real clients move alpha; every update is clipped
    denom = sample_rate(cfg0, len(ds.train_clients)) * len(ds.train_clients)

    # no noise: theta and alpha are scaled by one factor C / ||(d_theta, d_alpha)||
    server = Server(cfg0, params, len(ds.train_clients))
    server.step(ups, 1)
    expect = {k: params[k] + 0.7 * sum(d[k] * (0.05 / n) for d, n in zip(deltas, full)) / denom for k in params}
    for k in params:
        torch.testing.assert_close(server.theta[k], expect[k], atol=3e-7, rtol=1e-5)

    # an update with ||d_theta|| = 0.3 and ||d_alpha|| = 0.4 (norm 0.5) is scaled by C / 0.5 as a whole:
    # clipping theta alone (factor C / 0.3, alpha unclipped) would give a different step
    gen = torch.Generator().manual_seed(5)
    raw = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    scale = {"theta": 0.3 / float(global_norm(_theta(raw))), "alpha": 0.4 / float(global_norm(_alpha(raw)))}
    crafted = {k: v * scale["alpha" if k.startswith(LR) else "theta"] for k, v in raw.items()}
    assert float(global_norm(crafted)) == pytest.approx(0.5, rel=1e-6)
    one = Server(cfg0, params, len(ds.train_clients))
    one.step([ClientUpdate(0, {k: params[k] + crafted[k] for k in params}, 10)], 1)
    for k in params:
        torch.testing.assert_close(one.theta[k] - params[k], 0.7 * crafted[k] * (0.05 / 0.5) / denom, atol=3e-7, rtol=1e-4)  # float32 theta
    moved = torch.cat([(one.theta[k] - params[k]).flatten() for k in _alpha(params)]).norm()
    assert float(moved) == pytest.approx(0.7 * 0.05 * 0.8 / denom, rel=1e-3)  # alpha's share of the clipped norm C

    # noise z*C/D on every coordinate of theta and alpha, from the round's noise stream
    cfgz = small_cfg(*base, "privacy.noise_multiplier=2.0", "privacy.clip_norm=0.05")
    noisy = Server(cfgz, params, len(ds.train_clients))
    noisy.step(ups, 1)
    gen = torch.Generator().manual_seed(client_seed(cfgz.simulation.seed, NOISE_STREAM, 1))
    noise = noise_like({k: torch.zeros_like(v) for k, v in params.items()}, 2.0 * 0.05, gen)
    for k in params:
        torch.testing.assert_close(noisy.theta[k] - server.theta[k], 0.7 * noise[k] / denom, atol=3e-7, rtol=1e-4)  # float32 theta
    alpha_noise = torch.cat([(noisy.theta[k] - server.theta[k]).flatten() for k in _alpha(params)])
    assert float(alpha_noise.std()) == pytest.approx(0.7 * 2.0 * 0.05 / denom, rel=0.1)


def test_dp_client_mode_clips_theta_and_alpha_by_one_factor(small_cfg):
    base = ["meta.algorithm=metasgd", "meta.inner_lr=0.1", "privacy.enabled=true", "simulation.sampling=poisson"]
    free = small_cfg(*base, "privacy.mode=server")
    clipped = small_cfg(*base, "privacy.mode=client", "privacy.clip_norm=0.05")
    ds, model, params, ups = _cohort_updates(free, n=1)
    cid = ups[0].cid
    phi, _ = train_client(model, params, ds.client(cid), clipped, ds.spec, 1, cid)
    d_free = {k: ups[0].phi[k] - params[k] for k in params}
    d = {k: phi[k] - params[k] for k in params}
    norm = float(global_norm(d_free))
    assert norm > 0.05 and float(global_norm(_alpha(d_free))) > 0
    assert float(global_norm(d)) == pytest.approx(0.05, rel=1e-5)
    for k in params:
        torch.testing.assert_close(d[k], d_free[k] * (0.05 / norm), atol=3e-7, rtol=1e-4)  # float32 theta


# -- Flower Simulation Engine ---------------------------------------------------------------------


@pytest.mark.slow
def test_metasgd_on_flower_simulation_engine_writes_model_and_meta_state(tmp_path):
    sets = ["meta.algorithm=metasgd", "meta.inner_lr=0.1", "meta.outer_lr=0.5", "meta.outer_lr_final=0.5", "data.num_clients=6",
            "data.examples_per_client=20", "simulation.clients_per_round=3", "simulation.rounds=2", "simulation.eval_every=1"]
    out = tmp_path / "flower"
    r = subprocess.run([sys.executable, "-m", "fedmeta.cli", "simulate", *[a for s in sets for a in ("--set", s)], "--out", str(out)],
                       capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["engine"] == "flower" and summary["rounds_completed"] == 2
    assert summary["failures"] == 0 and summary["rejected"] == 0

    cfg = build_config(None, sets)
    model = model_for(cfg, build_dataset(cfg.data).spec)
    names = dict(model.named_parameters())
    state = torch.load(out / "model.pt")
    meta = torch.load(out / "meta_state.pt")
    assert set(state) == set(names) and not any("/" in k for k in state)
    loaded = model.load_state_dict(state, strict=False)  # the model's own parameters, loadable as they are
    assert not loaded.unexpected_keys
    assert summary["num_parameters"] == sum(v.numel() for v in state.values())
    assert set(meta) == {PREFIX + k for k in names}
    for k, p in names.items():
        assert meta[PREFIX + k].shape == p.shape
    assert max(float((v - 0.1).abs().max()) for v in meta.values()) > 1e-4  # alpha was learned on the clients' replies

    # the same run on the sequential engine (no Ray) ends at the same theta and alpha
    seq = tmp_path / "seq"
    r = subprocess.run([sys.executable, "-m", "fedmeta.cli", "simulate", *[a for s in sets + ["simulation.engine=sequential"] for a in ("--set", s)],
                        "--out", str(seq)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, ref in ((("model.pt"), state), ("meta_state.pt", meta)):
        other = torch.load(seq / name)
        assert other.keys() == ref.keys()
        assert max(float((other[k] - ref[k]).abs().max()) for k in ref) < 1e-5, name


def test_metasgd_refuses_an_inner_optimizer_it_would_ignore(tmp_path, capsys):
    from fedmeta.cli import main

    out = tmp_path / "run"
    code = main(["simulate", "--set", "meta.algorithm=metasgd", "--set", "meta.inner_optimizer=adam", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("fedmeta: config error: meta.inner_optimizer: metasgd adapts with plain SGD"), err
    assert not out.exists()
