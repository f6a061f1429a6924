"""The algorithm seam's server half, client state, evaluation hook and method parameters (issue 20)."""

import pytest
import torch

from fedmeta.components import ComponentError
from fedmeta.federation import ClientUpdate, Server
from fedmeta.meta import MetaAlgorithm
from fedmeta.meta.algorithm import build_algorithm


class HalfStep(MetaAlgorithm):
    """A server hook of its own: theta moves half-way to the coordinate-wise max of the deltas, and counts its rounds."""

    def init_server_state(self, theta, num_clients):
        return {"rounds": 0, "n": num_clients}

    def server_update(self, theta, deltas, weights, server_round, state):
        top = {k: deltas[k].max(0).values for k in theta}  # deltas[k]: the cohort stacked, [N, *shape]
        return {k: theta[k] + 0.5 * top[k] for k in theta}, state | {"rounds": state["rounds"] + 1}, {"beta": 0.5}


def test_the_algorithm_owns_the_server_step_and_its_state(small_cfg):
    cfg = small_cfg()
    server = Server(cfg, {"w": torch.zeros(2)}, 8, algorithm=HalfStep(cfg))
    info = server.step([ClientUpdate(0, {"w": torch.tensor([1.0, -4.0])}, 5), ClientUpdate(1, {"w": torch.tensor([3.0, -2.0])}, 1)], 1)
    assert info == {"beta": 0.5}
    assert torch.equal(server.theta["w"], torch.tensor([1.5, -1.0]))
    assert server.state_dict()["algorithm"] == {"rounds": 1, "n": 8}
    again = Server(cfg, {"w": torch.zeros(2)}, 8, algorithm=HalfStep(cfg))
    again.load_state_dict(server.state_dict())
    assert again.state == {"rounds": 1, "n": 8} and torch.equal(again.theta["w"], server.theta["w"])


def test_default_server_hook_is_the_weighted_mean_with_beta(small_cfg):
    cfg = small_cfg("meta.outer_lr=0.5", "meta.outer_lr_final=0.5")
    server = Server(cfg, {"w": torch.zeros(1)}, 8)
    server.step([ClientUpdate(0, {"w": torch.tensor([1.0])}, 3), ClientUpdate(1, {"w": torch.tensor([5.0])}, 1)], 1)
    assert float(server.theta["w"]) == pytest.approx(0.5 * (3 * 1 + 1 * 5) / 4)


def test_a_server_update_dp_cannot_wrap_refuses_privacy(small_cfg, monkeypatch):
    import fedmeta.meta.algorithm as alg

    monkeypatch.setitem(alg.REGISTRY, "halfstep", HalfStep)
    monkeypatch.setattr(HalfStep, "name", "halfstep")
    cfg = small_cfg("privacy.enabled=true", "simulation.sampling=poisson")
    with pytest.raises(ComponentError, match=r"^config error: privacy.enabled: .* overrides server_update"):
        build_algorithm(cfg.model_copy(update={"meta": cfg.meta.model_copy(update={"algorithm": "halfstep"})}))


# -- client state ------------------------------------------------------------------------------------------------

from fedmeta.client import model_for  # noqa: E402
from fedmeta.data import build_dataset  # noqa: E402
from fedmeta.engines.sequential import SequentialBackend  # noqa: E402
from fedmeta.engines.vectorized import VectorizedBackend  # noqa: E402
from fedmeta.federation import run_federation  # noqa: E402
from fedmeta.meta import params_of  # noqa: E402
from fedmeta.results import RunWriter  # noqa: E402


from tests.harness.methods import Visits  # noqa: E402 - a stateful method: each client counts its visits


def _visits_run(small_cfg, tmp_path, engine, name, backend_cls=None, resume=False, crash=None, rounds=4):
    from fedmeta.meta.algorithm import REGISTRY

    REGISTRY["visits_test"] = Visits  # a registered name is valid in meta.algorithm
    try:
        cfg = small_cfg(f"simulation.engine={engine}", f"simulation.rounds={rounds}", "simulation.eval_every=100", "meta.algorithm=visits_test")
        ds = build_dataset(cfg.data)
        backend = (backend_cls or {"sequential": SequentialBackend, "vectorized": VectorizedBackend}[engine])(cfg, ds)
        if crash:
            backend.crash = crash
        return cfg, backend, run_federation(cfg, backend, params_of(model_for(cfg, ds.spec)), RunWriter(tmp_path / name), resume=resume)
    finally:
        REGISTRY.pop("visits_test")


def test_client_state_survives_rounds_on_both_simulation_engines(small_cfg, tmp_path):
    _, seq, s = _visits_run(small_cfg, tmp_path, "sequential", "s")
    _, vec, v = _visits_run(small_cfg, tmp_path, "vectorized", "v")
    assert seq.client_states.state_dict().keys() == vec.client_states.state_dict().keys()
    counts = {c: float(st["visits"]) for c, st in seq.client_states.state_dict().items()}
    assert sum(counts.values()) == 4 * 3 and max(counts.values()) >= 2  # 4 rounds of 3 clients; some came back
    assert counts == {c: float(st["visits"]) for c, st in vec.client_states.state_dict().items()}
    a, b = torch.load(tmp_path / "s" / "model.pt"), torch.load(tmp_path / "v" / "model.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


class CrashAt(SequentialBackend):
    crash = 0

    def train(self, theta, cids, server_round):
        if server_round == self.crash:
            raise KeyboardInterrupt
        return super().train(theta, cids, server_round)


def test_client_state_is_checkpointed_and_resume_is_bit_identical(small_cfg, tmp_path):
    _, straight, _ = _visits_run(small_cfg, tmp_path, "sequential", "straight")
    with pytest.raises(KeyboardInterrupt):
        _visits_run(small_cfg, tmp_path, "sequential", "crashed", backend_cls=CrashAt, crash=3)
    _, resumed, _ = _visits_run(small_cfg, tmp_path, "sequential", "crashed", resume=True)
    a, b = torch.load(tmp_path / "straight" / "model.pt"), torch.load(tmp_path / "crashed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {c: float(s["visits"]) for c, s in straight.client_states.state_dict().items()} == {
        c: float(s["visits"]) for c, s in resumed.client_states.state_dict().items()}


# -- method hyper-parameters and the registry ---------------------------------------------------------------------

from pydantic import BaseModel, Field  # noqa: E402

from fedmeta.config import ConfigError, build_config  # noqa: E402
from fedmeta.components import check_components  # noqa: E402
from fedmeta.meta.algorithm import REGISTRY, register  # noqa: E402


class Damped(MetaAlgorithm):
    class Params(BaseModel):
        model_config = {"extra": "forbid"}
        lam: float = Field(0.5, ge=0, le=10)

    def step_size(self, server_round):
        return 1.0 / (1.0 + self.params.lam)


@pytest.fixture
def damped(monkeypatch):
    monkeypatch.setitem(REGISTRY, "damped_test", Damped)
    yield Damped


def test_a_registered_name_is_valid_in_the_config_and_params_come_from_meta_params(damped):
    cfg = build_config(None, ["meta.algorithm=damped_test", "meta.params.lam=3.0"])
    check_components(cfg)
    algo = build_algorithm(cfg)
    assert type(algo) is Damped and algo.params.lam == 3.0 and algo.step_size(1) == 0.25
    assert cfg.to_dict()["meta"]["params"] == {"lam": 3.0}  # what config.json records
    assert cfg.to_flat()["meta.params.lam"] == 3.0  # Flower's flat run config
    assert build_algorithm(build_config(None, ["meta.algorithm=damped_test"])).params.lam == 0.5  # the default


@pytest.mark.parametrize("override, expected", [
    ("meta.params.lam=-1", "config error: meta.params.lam: must be >= 0.0 (got -1)"),
    ("meta.params.lamda=1", "config error: meta.params.lamda: unknown key"),
    ("meta.params.lam='big'", "config error: meta.params.lam: input should be a valid number"),
])
def test_bad_method_params_are_one_line_naming_the_key(damped, override, expected):
    with pytest.raises(ConfigError) as err:
        check_components(build_config(None, ["meta.algorithm=damped_test", override]))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_a_method_without_params_refuses_any(small_cfg):
    with pytest.raises(ConfigError, match=r"^config error: meta.params.lam: unknown key"):
        check_components(small_cfg("meta.params.lam=1"))


def test_a_name_registered_by_the_module_a_reference_names(tmp_path, monkeypatch):
    (tmp_path / "my_methods_reg.py").write_text(
        "from fedmeta.meta import MetaAlgorithm, register\n\n@register('my_reg_method')\nclass Mine(MetaAlgorithm):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        algo = build_algorithm(build_config(None, ["meta.algorithm='my_methods_reg:my_reg_method'"]))
        assert type(algo).__name__ == "Mine" and algo.name == "my_reg_method"
        assert type(build_algorithm(build_config(None, ["meta.algorithm=my_reg_method"]))).__name__ == "Mine"  # now registered
    finally:
        REGISTRY.pop("my_reg_method", None)


# -- docs/extending.md: a stateful method on the public seam, as it stands ---------------------------------------

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_extending_md_scaffold_runs_as_it_stands_and_equals_the_builtin(tmp_path, monkeypatch, capsys):
    """The snippet as a script (Python API, vectorised), then by reference on the CLI (sequential) against the built-in."""
    import runpy

    from fedmeta.cli import main

    section = (ROOT / "docs" / "extending.md").read_text().split("### A stateful method: SCAFFOLD on the public seam", 1)[1]
    (tmp_path / "my_scaffold.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_scaffold", raising=False)
    runpy.run_path(str(tmp_path / "my_scaffold.py"), run_name="__main__")
    assert "held-out accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "my_scaffold" / "summary.json").read_text())["rounds_completed"] == 3
    small = ["data.num_clients=10", "data.examples_per_client=20", "simulation.clients_per_round=3", "simulation.rounds=3",
             "simulation.engine=sequential", "simulation.eval_every=3", "output.progress=false", "meta.params.global_lr=0.8"]
    models = {}
    for name in ("my_scaffold:MyScaffold", "scaffold"):
        out = tmp_path / name.replace(":", "_")
        assert main(["simulate", *[a for kv in small + [f"meta.algorithm={name}"] for a in ("--set", kv)], "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text())["meta"]["params"] == {"global_lr": 0.8}
        models[name] = (torch.load(out / "model.pt"), torch.load(out / "meta_state.pt"))
    sys.modules.pop("my_scaffold", None)
    (mine, mine_c), (builtin, builtin_c) = models["my_scaffold:MyScaffold"], models["scaffold"]
    assert all(torch.allclose(mine[k], builtin[k], atol=1e-6) for k in builtin)
    assert all(torch.allclose(mine_c["c/" + k.split("/", 1)[1]], v, atol=1e-6) for k, v in builtin_c.items())


def test_dp_wraps_a_methods_own_server_apply(small_cfg, tmp_path):
    """SCAFFOLD under DP: the private mean (clipped, noised, fixed denominator) goes through scaffold's server_apply."""
    # noise_multiplier 1e-9: zero noise is refused with DP on; this one is far below allclose's tolerance
    from fedmeta.privacy.server import PrivateServer

    cfg = small_cfg("meta.algorithm=scaffold", "privacy.enabled=true", "simulation.sampling=poisson", "privacy.noise_multiplier=1e-9",
                    "privacy.clip_norm=1.0", "meta.params.global_lr=0.5")
    theta = {"w": torch.zeros(3)}
    algo = build_algorithm(cfg)
    theta |= algo.extra_state(theta)
    server = Server(cfg, theta, 8, algo)  # the run's algorithm object, passed down
    assert isinstance(server.hook, PrivateServer) and server.hook.algorithm is algo
    big = {"w": torch.tensor([30.0, 0.0, 40.0]), "scaffold/w": torch.zeros(3)}  # norm 50: clipped to 1
    info = server.step([ClientUpdate(0, big, 5)], 1)
    q_n = 3 / 8 * 8  # the fixed denominator q * N
    assert info["beta"] == 0.5 and info["clip_norm"] == 1.0
    assert torch.allclose(server.theta["w"], 0.5 * torch.tensor([0.6, 0.0, 0.8]) / q_n)
    assert torch.allclose(server.theta["scaffold/w"], torch.zeros(3))


def test_meta_params_travel_through_flowers_flat_run_config():
    from fedmeta.config import config_from_run_config

    cfg = build_config(None, ["meta.algorithm=ditto", "meta.params.lam=0.25"])
    assert config_from_run_config(cfg.to_flat()) == cfg
