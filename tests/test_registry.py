"""Registries the config trusts (fedmeta/registry.py) and components passed down as objects (fedmeta/components.py).

A user's module registers a method, a dataset, an engine and a model factory by name; a TOML config names them and
``fedmeta simulate --config`` runs them, as does the Python API. An unknown name is one line listing the
registered names (exit 2). Objects given to ``fedmeta.simulate`` are used as themselves, resolved once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedmeta import cli
from fedmeta.config import ConfigError, build_config
from fedmeta.errors import ComponentError
from fedmeta.registry import DATASETS, ENGINES, METHODS, MODELS, Registry

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_clients=8", "data.examples_per_client=12", "simulation.clients_per_round=3", "simulation.rounds=2",
         "simulation.eval_every=1", "output.progress=false"]

USER_MODULE = textwrap.dedent('''
    """A user's module: a method, a dataset, an engine and a model factory, each registered by name."""
    from pathlib import Path

    import torch
    from torch import nn

    from fedmeta.data.synthetic import SyntheticMultimodal
    from fedmeta.engines.base import InProcessEngine
    from fedmeta.engines.sequential import SequentialBackend
    from fedmeta.meta import MetaAlgorithm, register
    from fedmeta.models import multimodal_net
    from fedmeta.registry import DATASETS, ENGINES, MODELS

    BUILT = []  # every HalfReptile instance: the run resolves its algorithm once


    @register("half_reptile")
    class HalfReptile(MetaAlgorithm):
        def __init__(self, cfg):
            super().__init__(cfg)
            BUILT.append(self)

        def step_size(self, server_round):
            return 0.5


    @DATASETS.register("three_classes")
    def three_classes(cfg):
        return SyntheticMultimodal(num_clients=cfg.num_clients, examples_per_client=cfg.examples_per_client, num_classes=3,
                                   support_fraction=0.5, heldout_fraction=cfg.heldout_fraction, missing_modality_fraction=0.0,
                                   seed=cfg.seed)


    @MODELS.register("marked_net")
    class MarkedNet(nn.Module):
        """The built-in net plus a parameter that shows in model.pt."""

        def __init__(self, spec, cfg):
            super().__init__()
            self.net = multimodal_net(spec, cfg)
            self.marker = nn.Parameter(torch.zeros(()))

        def forward(self, x, present):
            return self.net(x, present) + self.marker


    @ENGINES.register("marked_loop")
    class MarkedLoop(InProcessEngine):
        """The sequential backend, leaving a mark in the run directory (and which algorithm object it got)."""

        def backend(self, cfg, components):
            self.algorithm = components.algorithm
            return SequentialBackend(cfg, components)

        def run(self, cfg, components, out_dir, **kw):
            summary = super().run(cfg, components, out_dir, **kw)
            (Path(out_dir) / "marked_loop.txt").write_text(type(self.algorithm).__name__)
            return summary
''')

TOML = textwrap.dedent('''
    [data]
    dataset = "user_reg:three_classes"
    num_clients = 8
    examples_per_client = 12

    [model]
    factory = "user_reg:marked_net"

    [meta]
    algorithm = "user_reg:half_reptile"

    [simulation]
    engine = "user_reg:marked_loop"
    rounds = 2
    clients_per_round = 3
    eval_every = 1

    [output]
    progress = false
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``user_reg.py`` in a fresh directory (the cwd); its registrations are removed afterwards."""
    (tmp_path / "user_reg.py").write_text(USER_MODULE)
    (tmp_path / "experiment.toml").write_text(TOML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", sys.path[:])
    yield tmp_path
    sys.modules.pop("user_reg", None)
    for registry, name in ((METHODS, "half_reptile"), (DATASETS, "three_classes"), (ENGINES, "marked_loop"), (MODELS, "marked_net")):
        registry.entries.pop(name, None)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def _check(out: Path, method: str, dataset: str, engine: str, model: str | None = None) -> dict:
    import torch

    config = json.loads((out / "config.json").read_text())
    assert (config["meta"]["algorithm"], config["data"]["dataset"], config["simulation"]["engine"]) == (method, dataset, engine)
    if model is not None:  # the user's model factory built the model: its extra parameter is in model.pt
        assert config["model"]["factory"] == model and "marker" in torch.load(out / "model.pt")
    assert (out / "marked_loop.txt").read_text() == "HalfReptile"  # the user's engine ran, with the user's method object
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and all(r["beta"] == 0.5 for r in records)  # HalfReptile's step size
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["chance_acc"] == pytest.approx(1 / 3)  # the user's 3-class data
    return summary


def test_registered_names_from_a_users_module_run_on_the_cli(user_module):
    r = subprocess.run([sys.executable, "-m", "fedmeta.cli", "simulate", "--config", "experiment.toml", "--out", "run"],
                       cwd=user_module, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _check(user_module / "run", "user_reg:half_reptile", "user_reg:three_classes", "user_reg:marked_loop", "user_reg:marked_net")


def test_registered_names_run_through_the_python_api_and_the_algorithm_is_built_once(user_module, monkeypatch):
    import fedmeta

    monkeypatch.syspath_prepend(str(user_module))
    import user_reg  # registers its names: bare names are valid now

    data = {"data": {"dataset": "three_classes"}, "meta": {"algorithm": "half_reptile"}, "simulation": {"engine": "marked_loop"},
            "model": {"factory": "marked_net"}}
    fedmeta.simulate(data, overrides=SMALL, out=user_module / "api")
    _check(user_module / "api", "half_reptile", "three_classes", "marked_loop", "marked_net")
    assert len(user_reg.BUILT) == 1  # resolved once at the top, then passed down as an object


def test_an_engine_object_given_to_simulate_runs_and_is_recorded_by_its_reference(user_module, monkeypatch):
    import fedmeta

    monkeypatch.syspath_prepend(str(user_module))
    import user_reg

    fedmeta.simulate({"data": {"dataset": "three_classes"}}, algorithm=user_reg.HalfReptile, engine=user_reg.MarkedLoop,
                     overrides=SMALL, out=user_module / "obj")
    _check(user_module / "obj", "user_reg:HalfReptile", "three_classes", "user_reg:MarkedLoop")  # importable: by reference


@pytest.mark.parametrize("key, value, listed", [
    ("meta.algorithm", "reptil", "'reptile', 'fedavg'"),
    ("data.dataset", "synthetc", "'synthetic', 'avdigits', 'sine', 'disk', 'store'"),
    ("simulation.engine", "vectorised", "'sequential', 'vectorized', 'flower'"),
    ("model.factory", "multimodal", "'multimodal_net'"),
])
def test_an_unknown_name_is_one_line_listing_the_registered_names(key, value, listed, tmp_path, capsys):
    code = cli.main(["simulate", "--set", f"{key}={value}", "--out", str(tmp_path / "run"), *[a for s in SMALL for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"fedmeta: config error: {key}: must be one of {listed}") and err.rstrip().endswith(f"reference (got {value!r})")
    assert not (tmp_path / "run").exists()  # nothing created


def test_the_built_in_lists_are_the_registries_contents():
    import fedmeta.data

    assert fedmeta.data.BUILTIN == DATASETS.builtin_names() == ("synthetic", "avdigits", "sine", "disk", "store")
    assert ENGINES.builtin_names() == ("sequential", "vectorized", "flower")
    assert {"reptile", "maml", "metasgd", "scaffold", "protonet"} <= set(METHODS.builtin_names())
    assert MODELS.builtin_names() == ("multimodal_net",)


def test_config_checks_only_the_syntax_and_stays_torch_free():
    with pytest.raises(ConfigError, match=r"^config error: simulation.engine: must be a registered engine name \(e.g. 'vectorized'\) "
                                          r"or a 'package.module:Engine' reference \(got 'no such'\)$"):
        build_config(None, ["simulation.engine='no such'"])
    assert build_config(None, ["simulation.engine=someone_elses"]).simulation.engine == "someone_elses"  # existence: at resolve time
    code = "import sys, fedmeta.config, fedmeta.registry; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'flwr'}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_a_registry_resolves_names_references_and_names_a_module_registers(tmp_path, monkeypatch):
    reg = Registry("widget", "x.widget", (), hint="package.module:Widget")

    @reg.register("square")
    def square(v):
        return v * v

    assert reg.get("square") is square and reg.resolve("square") is square and reg.names() == ("square",)
    assert reg.builtin_names() == ()  # registered here, not by a built-in module
    (tmp_path / "widgets_mod.py").write_text(f"from {__name__} import REG\n\n@REG.register('cube')\ndef cube(v):\n    return v ** 3\n")
    monkeypatch.setattr(sys.modules[__name__], "REG", reg, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert reg.resolve("widgets_mod:cube")(2) == 8  # the attribute
        del sys.modules["widgets_mod"].cube
        assert reg.resolve("widgets_mod:cube")(3) == 27  # no such attribute, but a name that module registered
    finally:
        sys.modules.pop("widgets_mod", None)
    with pytest.raises(ComponentError, match=r"^config error: x.widget: must be one of 'square', 'cube' or a 'package.module:Widget' reference \(got 'cirle'\)$"):
        reg.resolve("cirle")
    with pytest.raises(ComponentError, match=r"^config error: x.widget: '<local>:f' was an object given to fedmeta.simulate\(\)"):
        reg.resolve("<local>:f")
    with pytest.raises(ValueError, match="a registered name must match"):
        reg.register("two words")
    with pytest.raises(ValueError, match=r"^x.widget: 'cube' is already registered by widgets_mod; choose another name$"):
        reg.register("cube")(square)  # a name is never silently taken over (a user's "reptile" would replace the built-in)


def test_a_built_in_name_is_taken_whatever_the_import_order():
    """A user's module registering ``synthetic`` before fedmeta.data.synthetic was imported is refused (the built-ins
    load first), not silently preferred, and fedmeta's own import never fails on it."""
    code = ("from fedmeta.registry import DATASETS\n"
            "try:\n    DATASETS.register('synthetic')(lambda cfg: None)\nexcept ValueError as err:\n    print(err)\n"
            "import fedmeta.data.synthetic as s; print(DATASETS.get('synthetic') is s.make_synthetic)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["data.dataset: 'synthetic' is already registered by fedmeta.data.synthetic; choose another name", "True"]


class _Unimportable:
    """A method whose module cannot be imported again (as a class defined in a notebook cell)."""


def _unimportable_method():
    from fedmeta.meta import MetaAlgorithm

    built = []

    class Halved(MetaAlgorithm):
        def __init__(self, cfg):
            super().__init__(cfg)
            built.append(self)

        def step_size(self, server_round):
            return 0.5

    Halved.__module__ = "no_such_module_anywhere"
    Halved.__qualname__ = "Halved"
    return Halved, built


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_objects_given_to_simulate_never_go_through_a_string(engine, tmp_path):
    import fedmeta

    Halved, built = _unimportable_method()
    summary = fedmeta.simulate(None, algorithm=Halved, overrides=[f"simulation.engine={engine}", *SMALL], out=tmp_path / "run")
    assert summary["status"] == "completed" and summary["algorithm"] == "<local>:Halved"
    assert len(built) == 1  # this very class, built once for the run
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in records] == [0.5, 0.5]


def test_a_local_object_is_refused_by_resume_and_by_other_processes_with_one_line(tmp_path, capsys):
    import fedmeta

    Halved, _ = _unimportable_method()
    fedmeta.simulate(None, algorithm=Halved, overrides=["simulation.engine=sequential", *SMALL], out=tmp_path / "run")
    code = cli.main(["simulate", "--resume", str(tmp_path / "run"), "--set", "simulation.rounds=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("fedmeta: config error: meta.algorithm: '<local>:Halved' was an object given to fedmeta.simulate()")
    for sets, key in ((["simulation.engine=flower"], "simulation.engine: 'flower' runs clients in other processes"),
                      (["simulation.engine=vectorized", "simulation.workers=1"], "simulation.workers: Ray workers run in other processes")):
        with pytest.raises(ConfigError, match=f"^config error: {key}, which cannot use meta.algorithm = '<local>:Halved'"):
            fedmeta.simulate(None, algorithm=Halved, overrides=[*SMALL, *sets], out=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_load_run_of_a_run_with_local_objects_takes_them_again(tmp_path):
    import torch
    from torch import nn

    import fedmeta

    class Tiny(nn.Module):  # a notebook cell's model factory (a class: (spec, cfg) -> nn.Module)
        def __init__(self, spec, cfg):
            super().__init__()
            self.head = nn.Linear(sum(int(torch.tensor(m.shape).prod()) for m in spec.modalities), spec.num_classes)

        def forward(self, x, present):
            return self.head(torch.cat([v.flatten(1).float() for v in x.values()], 1))

    fedmeta.simulate(None, model=Tiny, overrides=["simulation.engine=sequential", *SMALL], out=tmp_path / "run")
    with pytest.raises(ComponentError, match=r"^config error: model.factory: '<local>:.*Tiny' was an object given to fedmeta.simulate\(\)"):
        fedmeta.load_run(tmp_path / "run")
    cfg, spec, model = fedmeta.load_run(tmp_path / "run", model=Tiny)
    saved = torch.load(tmp_path / "run" / "model.pt")
    assert isinstance(model, Tiny) and all(torch.equal(p, saved[k]) for k, p in model.named_parameters())


def test_a_zero_dim_parameter_has_an_update_norm():
    """A user's model may hold a 0-d parameter (a learnt temperature, MarkedNet's marker above): the round loop's
    norm screen reads it (it crashed with IndexError on ``flatten(1)`` of the stacked ``[N]`` tensor)."""
    import torch

    from fedmeta.federation import ClientUpdate, update_norms

    theta = {"w": torch.zeros(2), "t": torch.tensor(1.0)}
    updates = [ClientUpdate(0, {"w": torch.tensor([3.0, 0.0]), "t": torch.tensor(5.0)}, 4),
               ClientUpdate(1, {"w": torch.zeros(2), "t": torch.tensor(1.0)}, 4)]
    assert update_norms(updates, theta) == pytest.approx([5.0, 0.0])  # sqrt(3^2 + (5 - 1)^2)


def test_resolving_the_default_engine_loads_no_flower():
    """fedmeta simulate resolves its components before its first status line: naming 'flower' must not import Flower/Ray."""
    import subprocess
    import sys

    code = ("import sys\nfrom fedmeta.components import check_components\nfrom fedmeta.config import build_config\n"
            "c = check_components(build_config(None, []))\n"
            "print(type(c.engine).__name__, sorted(m for m in ('flwr', 'ray', 'dp_accounting', 'matplotlib') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "FlowerEngine []", r.stdout + r.stderr[-2000:]
