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
        ("meta.algorithm='maml 2'", "config error: meta.algorithm: must be a registered method name (e.g. 'reptile') or a 'package.module:Name' reference (got 'maml 2')"),
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


def test_an_unregistered_method_name_is_one_line_listing_the_registry():
    from fedmeta.components import check_components

    with pytest.raises(ConfigError) as err:
        check_components(build_config(None, ["meta.algorithm='maml2'"]))
    assert str(err.value).startswith("config error: meta.algorithm: must be one of 'reptile', 'fedavg', 'fedavg_ft', 'local', 'maml', 'fomaml', 'metasgd'")
    assert str(err.value).endswith("or a 'package.module:Name' reference (got 'maml2')") and "\n" not in str(err.value)


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
SHIPPED = {"default": ("synthetic", "reptile"), "avdigits": ("avdigits", "reptile"), "privacy": ("synthetic", "reptile"), "sine": ("sine", "maml"),
           "shakespeare": ("fedmeta.data.shakespeare:load", "maml"), "shakespeare_small": ("fedmeta.data.shakespeare:load", "maml"),
           "avdigits_protocol": ("avdigits", "reptile"), "default_protocol": ("synthetic", "reptile")}


def test_shipped_experiment_configs_are_valid():
    from fedmeta.components import check_components

    paths = {p.stem: p for p in (ROOT / "experiments" / "configs").glob("*.toml")}
    assert set(SHIPPED) <= set(paths), set(SHIPPED) - set(paths)
    for name, path in sorted(paths.items()):
        cfg = load_config(path)  # raises ConfigError on a bad value
        check_components(cfg)  # model factory, dataset and algorithm all resolve
        if name in SHIPPED:
            assert (cfg.data.dataset, cfg.meta.algorithm) == SHIPPED[name], name
    # docs/benchmarks.md 5.5 quotes `fedmeta simulate --config experiments/configs/sine.toml` by itself: these are its settings
    sine = load_config(paths["sine"])
    assert (sine.simulation.engine, sine.meta.server_optimizer, sine.simulation.rounds, sine.simulation.clients_per_round) == (
        "vectorized", "adam", 20000, 25)
    assert (sine.meta.outer_lr, sine.meta.outer_lr_final, sine.data.validation_fraction) == (0.001, 0.0001, 0.025)
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


# --------------------------------------------------------------------------- issue 9: bad input that gave garbage


@pytest.mark.parametrize("field", [
    "meta.outer_lr", "meta.inner_lr", "meta.outer_lr_final", "meta.server_eps", "data.heldout_fraction",
    "simulation.round_timeout", "simulation.max_update_norm", "privacy.noise_multiplier", "privacy.clip_norm",
])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "'inf'"])
def test_every_float_must_be_finite(field, value):
    with pytest.raises(ConfigError) as err:
        build_config(None, [f"{field}={value}"])
    assert str(err.value).startswith(f"config error: {field}: must be a finite number (got "), str(err.value)


def test_no_float_field_accepts_infinity():
    """Every float field of every section, not only the ones listed above."""
    for section, sec_field in Config.model_fields.items():
        for key, field in sec_field.annotation.model_fields.items():
            if field.annotation is float:
                with pytest.raises(ConfigError, match=f"^config error: {section}.{key}: must be a finite number"):
                    build_config(None, [f"{section}.{key}=inf"])


@pytest.mark.parametrize("override, expected", [
    ("simulation.seed=99999999999999999999", "config error: simulation.seed: must be <= 4294967295 (got 99999999999999999999)"),
    ("simulation.seed=-1", "config error: simulation.seed: must be >= 0 (got -1)"),
    ("data.seed=-1", "config error: data.seed: must be >= 0 (got -1)"),
    ("data.seed=4294967296", "config error: data.seed: must be <= 4294967295"),
    ("simulation.rounds=1e30", "config error: simulation.rounds: must be an integer in [1, 1000000] (got 1e+30)"),
    ("simulation.rounds=10000000", "config error: simulation.rounds: must be <= 1000000"),
    ("data.examples_per_client=100000000", "config error: data.examples_per_client: must be <= 100000"),
    ("meta.inner_batch_size=99999999999", "config error: meta.inner_batch_size: must be <= 100000"),
    ("meta.eval_steps=99999999999", "config error: meta.eval_steps: must be <= 10000"),
    ("simulation.chunk_size=99999999999", "config error: simulation.chunk_size: must be <= 1000000"),
    ("model.hidden_dim=1000000", "config error: model.hidden_dim: must be <= 4096"),
    ("data.num_classes=100000000", "config error: data.num_classes: must be <= 10000"),
    ("simulation.max_retries=1000000000", "config error: simulation.max_retries: must be <= 100"),
    ("privacy.noise_multiplier=1e300", "config error: privacy.noise_multiplier: must be <= 1000000.0"),
    ("data.seed=" + "[" * 5000, "config error: --set data.seed: value nested too deeply"),
])
def test_unbounded_values_are_refused_naming_field_and_range(override, expected):
    with pytest.raises(ConfigError) as err:
        build_config(None, [override])
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_every_int_field_has_an_upper_bound():
    for section, sec_field in Config.model_fields.items():
        for key, field in sec_field.annotation.model_fields.items():
            if field.annotation is int:
                with pytest.raises(ConfigError, match=f"^config error: {section}.{key}: must be"):
                    build_config(None, [f"{section}.{key}={10**30}"])


def test_seed_bounds_accept_the_extremes():
    cfg = build_config(None, ["simulation.seed=4294967295", "data.seed=4294967295"])
    assert cfg.simulation.seed == cfg.data.seed == 2**32 - 1


def test_unreadable_config_files_are_one_line(tmp_path):
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b"[meta]\n# caf\xe9\ninner_steps = 3\n")
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r"is a directory, not a TOML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"/dev/zero: not a regular file"):
        load_config("/dev/zero")
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big.toml: too large for a config file"):
        load_config(big)
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000)
    with pytest.raises(ConfigError, match=r"deep.toml: invalid TOML"):
        load_config(deep)


def test_load_sections_validates_only_what_it_is_asked_for():
    from fedmeta.config import load_sections

    got = load_sections(None, ["simulation.clients_per_round=1000", "data.num_clients=5"])
    assert got["data"].num_clients == 5 and set(got) == {"data", "model"}
    with pytest.raises(ConfigError, match=r"^config error: data.seed: must be >= 0 \(got -1\)$"):
        load_sections(None, ["data.seed=-1"])
    with pytest.raises(ConfigError, match=r"^config error: dat: unknown key$"):
        load_sections(None, ["dat.seed=1"])
