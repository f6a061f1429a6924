"""The public contract of the three seams, from the user's side (quick).

``model.factory``, ``data.dataset`` and ``meta.algorithm`` name a user's
``module:attr``, resolved from installed packages or the current directory.
A bad reference is bad input: ``fedmeta simulate`` exits 2 with one line that
names the config key, never a traceback, and writes nothing. A good one runs
any float dtype, uses the model's own loss everywhere, and on the vectorised
engine a model ``torch.func.vmap`` cannot trace is named in one line together
with the way out (``simulation.engine = 'sequential'``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedmeta.cli import main

ROOT = Path(__file__).resolve().parents[1]

# A user's module: a tiny dataset, models, algorithms, good and bad (written into the test's cwd).
USER = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from torch import nn
    from fedmeta.data import ClientData, DatasetSpec, ModalitySpec, split_clients
    from fedmeta.meta import MetaAlgorithm

    class Tiny:
        def __init__(self, n):
            self.spec = DatasetSpec((ModalitySpec("v", "vector", (4,)),), "classification", 3)
            self.num_clients = n
            split = split_clients(n, 0.25, 0)
            self.train_clients, self.heldout_clients = split.train, split.heldout

        def client(self, cid):
            g = torch.Generator().manual_seed(cid)
            y = torch.arange(12) % 3
            x = torch.randn(12, 4, generator=g) + y[:, None].float()
            return ClientData({"v": x}, y, torch.ones(12, 1, dtype=torch.bool), 6)

    def tiny(cfg):
        return Tiny(cfg.num_clients)

    class Lin(nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.fc = nn.Linear(4, spec.num_classes)

        def forward(self, x, present):
            return self.fc(x["v"])

    class TwiceCE(Lin):
        def loss(self, outputs, y):
            return 2.0 * F.cross_entropy(outputs, y)

    class Branchy(Lin):
        def forward(self, x, present):
            out = self.fc(x["v"])
            if out.sum() > 0:
                return out
            return -out

    class Itemy(Lin):
        def forward(self, x, present):
            return self.fc(x["v"]) * (1.0 + 0.0 * x["v"].sum().item())

    def lin(spec, cfg):
        return Lin(spec)

    def lin64(spec, cfg):
        return Lin(spec).to(torch.float64)

    def twice(spec, cfg):
        return TwiceCE(spec)

    def branchy(spec, cfg):
        return Branchy(spec)

    def itemy(spec, cfg):
        return Itemy(spec)

    def raising(*args):
        raise ValueError("boom\\nsecond line")

    def not_a_module(spec, cfg):
        return {"fc": 1}

    def no_protocol(cfg):
        return object()

    NOT_CALLABLE = 3

    class NotAnAlgorithm:
        pass

    class BadInit(MetaAlgorithm):
        def __init__(self, cfg):
            raise RuntimeError("cannot start")

    class BadExtra(MetaAlgorithm):
        def extra_state(self, theta):
            return {"lr": torch.zeros(())}
    '''
)

BASE = {
    "data.dataset": "user_mod:tiny",
    "data.num_clients": 8,
    "model.factory": "user_mod:lin",
    "simulation.engine": "sequential",
    "simulation.rounds": 2,
    "simulation.clients_per_round": 3,
    "simulation.eval_every": 1,
    "meta.inner_batch_size": 3,
    "meta.eval_steps": 2,
    "output.progress": "false",
}


@pytest.fixture
def user_cwd(tmp_path, monkeypatch):
    """A user's project directory as cwd, with ``user_mod.py`` and a module that fails on import."""
    (tmp_path / "user_mod.py").write_text(USER)
    (tmp_path / "broken_mod.py").write_text("x = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", sys.path[:])  # resolution puts the cwd on sys.path: undo it afterwards
    for name in ("user_mod", "broken_mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def _args(out: Path, **sets) -> list[str]:
    values = {**BASE, **{k.replace("__", "."): v for k, v in sets.items()}}
    return ["simulate", "--out", str(out), *[a for k, v in values.items() for a in ("--set", f"{k}={v!r}" if isinstance(v, str) and ":" in v else f"{k}={v}")]]


BAD = [
    ("model.factory", "no_such_module:make", "cannot import 'no_such_module' (ModuleNotFoundError"),
    ("model.factory", "broken_mod:make", "cannot import 'broken_mod' (ZeroDivisionError: division by zero)"),
    ("model.factory", "user_mod:missing", "module 'user_mod' has no attribute 'missing'"),
    ("model.factory", "user_mod:NOT_CALLABLE", "'user_mod:NOT_CALLABLE' is not callable"),
    ("model.factory", "user_mod:raising", "'user_mod:raising' raised ValueError: boom"),
    ("model.factory", "user_mod:not_a_module", "returned dict, expected a torch.nn.Module"),
    ("data.dataset", "no_such_module:make", "cannot import 'no_such_module' (ModuleNotFoundError"),
    ("data.dataset", "user_mod:missing", "module 'user_mod' has no attribute 'missing'"),
    ("data.dataset", "user_mod:NOT_CALLABLE", "'user_mod:NOT_CALLABLE' is not callable"),
    ("data.dataset", "user_mod:raising", "'user_mod:raising' raised ValueError: boom"),
    ("data.dataset", "user_mod:no_protocol", "returned object without ['spec', 'num_clients', 'train_clients', 'heldout_clients', 'client']"),
    ("meta.algorithm", "no_such_module:Algo", "cannot import 'no_such_module' (ModuleNotFoundError"),
    ("meta.algorithm", "user_mod:Missing", "module 'user_mod' has no attribute 'Missing'"),
    ("meta.algorithm", "user_mod:NotAnAlgorithm", "is not a subclass of fedmeta.meta.MetaAlgorithm"),
    ("meta.algorithm", "user_mod:raising", "is not a subclass of fedmeta.meta.MetaAlgorithm"),
    ("meta.algorithm", "user_mod:BadInit", "'user_mod:BadInit' raised RuntimeError: cannot start"),
    ("meta.algorithm", "user_mod:BadExtra", "extra_state keys must contain '/' (got ['lr'])"),
]


@pytest.mark.parametrize("key,value,problem", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_a_bad_reference_is_one_line_naming_the_key(user_cwd, capsys, key, value, problem):
    out = user_cwd / "run"
    code = main(_args(out, **{key.replace(".", "__"): value}))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"fedmeta: config error: {key}: "), err
    assert problem in err, err
    assert "second line" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing written for bad input (main creates --out empty up front)


def test_the_installed_cli_prints_one_line_for_a_bad_reference(user_cwd):
    """The same through the `fedmeta` console script in a subprocess: exit 2, one line on stderr, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's fedmeta; the user's module comes from the cwd
    r = subprocess.run([sys.executable, "-m", "fedmeta.cli", *_args(user_cwd / "run", model__factory="user_mod:missing")],
                       cwd=user_cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == "fedmeta: config error: model.factory: module 'user_mod' has no attribute 'missing'\n"


def test_a_float64_model_trains_on_both_engines(user_cwd, capsys):
    theta = {}
    for engine in ("sequential", "vectorized"):
        assert main(_args(user_cwd / engine, model__factory="user_mod:lin64", simulation__engine=engine)) == 0, capsys.readouterr().err
        theta[engine] = torch.load(user_cwd / engine / "model.pt")
        summary = json.loads((user_cwd / engine / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["failures"] == 0
    assert {v.dtype for v in theta["sequential"].values()} == {torch.float64}
    assert max(float((theta["sequential"][k] - theta["vectorized"][k]).abs().max()) for k in theta["sequential"]) < 1e-10


@pytest.mark.parametrize("factory,line", [("user_mod:branchy", "if out.sum() > 0:"), ("user_mod:itemy", '.sum().item()')])
def test_a_model_vmap_cannot_trace_is_one_line_with_the_way_out(user_cwd, capsys, factory, line):
    code = main(_args(user_cwd / "vec", model__factory=factory, simulation__engine="vectorized"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("fedmeta: simulation.engine = 'vectorized': torch.func.vmap cannot run this model/algorithm"), err
    assert "user_mod.py:" in err and line in err  # the user's failing line
    assert ".item() or data-dependent control flow" in err
    assert err.rstrip().endswith("use simulation.engine = 'sequential' (or 'flower')")
    assert main(_args(user_cwd / "seq", model__factory=factory, simulation__engine="sequential")) == 0  # the way out works


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_the_models_own_loss_drives_the_inner_loop_and_the_reported_losses(user_cwd, engine):
    """loss = 2 x CE with inner_lr 0.1 takes the steps CE takes with inner_lr 0.2: same theta, every reported loss doubled."""
    runs = {}
    for name, factory, lr in (("twice", "user_mod:twice", 0.1), ("plain", "user_mod:lin", 0.2)):
        assert main(_args(user_cwd / name, model__factory=factory, simulation__engine=engine, meta__inner_lr=lr)) == 0
        runs[name] = (
            torch.load(user_cwd / name / "model.pt"),
            [json.loads(line) for line in (user_cwd / name / "metrics.jsonl").read_text().splitlines()],
        )
    (theta2, rec2), (theta1, rec1) = runs["twice"], runs["plain"]
    assert max(float((theta2[k] - theta1[k]).abs().max()) for k in theta1) < 1e-6
    for a, b in zip(rec2, rec1):
        for key in ("train_loss", "loss_before", "loss_after", "heldout_loss_before", "heldout_loss_after"):
            assert a[key] == pytest.approx(2 * b[key], rel=1e-5), key
        assert a["acc_after"] == pytest.approx(b["acc_after"])


def test_a_cohort_larger_than_the_datasets_training_clients_is_said_not_silently_shrunk(tmp_path, caplog):
    """A user's dataset has its own train split, which the config's cross-check cannot see."""
    import logging

    from fedmeta.api import simulate
    from fedmeta.data.synthetic import SyntheticMultimodal

    ds = SyntheticMultimodal(num_clients=10, examples_per_client=20, num_classes=5, support_fraction=0.5,
                             heldout_fraction=0.5, missing_modality_fraction=0.0, missing_modality="", seed=0)
    assert len(ds.train_clients) == 5
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        summary = simulate({"data": {"num_clients": 10}, "simulation": {"engine": "sequential", "rounds": 1, "clients_per_round": 8},
                            "output": {"progress": False}}, dataset=ds, out=tmp_path / "run")
    assert summary["status"] == "completed"
    assert "simulation.clients_per_round=8 exceeds the 5 training clients available" in caplog.text
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["clients"] == 5
