import tomllib
from pathlib import Path

import pytest

from fedmeta.config import Config, ConfigError, build_config, config_from_run_config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("meta.foo=1", "config error: meta.foo: unknown key"),
        ("nosection.x=1", "config error: nosection: unknown key"),
        ("meta.inner_steps='many'", "config error: meta.inner_steps: input should be a valid integer"),
        ("meta.inner_steps=0", "config error: meta.inner_steps: must be >= 1 (got 0)"),
        ("meta.inner_lr=0", "config error: meta.inner_lr: must be > 0"),
        ("meta.outer_lr=-0.5", "config error: meta.outer_lr: must be > 0"),
        ("data.heldout_fraction=0", "config error: data.heldout_fraction: must be > 0"),
        ("data.heldout_fraction=1.0", "config error: data.heldout_fraction: must be < 1"),
        ("data.support_fraction=1.5", "config error: data.support_fraction: must be < 1"),
        ("simulation.clients_per_round=49", "config error: simulation.clients_per_round: must be <= the 48 training clients"),
        ("meta.algorithm='maml2'", "config error: meta.algorithm: must be one of 'reptile', 'fedavg', 'fedavg_ft', 'fomaml', 'maml', 'local', 'metasgd' or a 'package.module:Name' reference (got 'maml2')"),
        ("privacy.delta=1", "config error: privacy.delta: must be < 1"),
        ("privacy.noise_multiplier=-1", "config error: privacy.noise_multiplier: must be >= 0"),
        ("privacy.clip_norm=0", "config error: privacy.clip_norm: must be > 0"),
    ],
)
def test_bad_values_give_one_line_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        build_config(None, [override])
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_set_parses_toml_values_and_nests():
    cfg = build_config(None, ["meta.inner_steps=7", "meta.inner_optimizer=adam", "privacy.enabled=true", "simulation.sampling=poisson", "meta.inner_lr=0.05"])
    assert cfg.meta.inner_steps == 7 and cfg.meta.inner_optimizer == "adam"
    assert cfg.privacy.enabled is True and cfg.meta.inner_lr == 0.05


def test_malformed_set_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        build_config(None, ["meta.inner_steps"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[meta\ninner_steps = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_toml_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[meta]\ninner_steps = 3\nouter_lr = 0.5\n[simulation]\nrounds = 7\n")
    cfg = load_config(f, ["meta.inner_steps=4"])
    assert (cfg.meta.inner_steps, cfg.meta.outer_lr, cfg.simulation.rounds) == (4, 0.5, 7)


def test_flat_round_trip_through_flower_run_config():
    cfg = build_config(None, ["meta.inner_steps=9", "model.fusion=attention"])
    assert config_from_run_config({**cfg.to_flat(), "unrelated-key": 1}) == cfg


def test_pyproject_run_config_matches_builtin_defaults():
    """`flwr run .` must run the same defaults as `fedmeta simulate`, and every key must be overridable."""
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == Config().to_flat()


# the configs docs/benchmarks.md and README.md run, with what each is for
SHIPPED = {"default": ("synthetic", "reptile"), "avdigits": ("avdigits", "reptile"), "privacy": ("synthetic", "reptile"), "sine": ("sine", "maml")}


def test_shipped_experiment_configs_are_valid():
    from fedmeta.components import check_components

    paths = {p.stem: p for p in (ROOT / "experiments" / "configs").glob("*.toml")}
    assert set(SHIPPED) <= set(paths), set(SHIPPED) - set(paths)
    for name, path in sorted(paths.items()):
        cfg = load_config(path)  # raises ConfigError on a bad value
        check_components(cfg)  # model factory, dataset and algorithm all resolve
        if name in SHIPPED:
            assert (cfg.data.dataset, cfg.meta.algorithm) == SHIPPED[name], name
    privacy = load_config(paths["privacy"])
    assert privacy.simulation.sampling == "poisson" and privacy.simulation.engine == "vectorized"


def test_a_component_that_raises_gives_one_line(tmp_path):
    import fedmeta
    from fedmeta.components import ComponentError

    def broken(spec, cfg):
        raise ValueError("no such layer\nsecond line")

    with pytest.raises(ComponentError, match=r"^config error: model.factory: '.*' raised ValueError: no such layer$"):
        fedmeta.simulate({"simulation": {"engine": "sequential", "rounds": 1}}, model=broken, out=tmp_path)


def test_default_experiment_file_is_the_builtin_default():
    assert load_config(ROOT / "experiments" / "configs" / "default.toml") == Config()
