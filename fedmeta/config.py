"""Experiment configuration: pydantic models, TOML files and ``--set`` overrides.

Every field is validated up front. Any problem becomes a :class:`ConfigError`
whose message is one line naming the field and the allowed range, e.g.::

    config error: meta.inner_steps: must be >= 1 (got 0)

Configs are flat enough to travel as Flower run config (nested keys joined
with dots, scalar values only), which is how ``flwr run .`` hands them to the
ServerApp and ClientApp.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmeta.registry import check_syntax

BUILTIN_MODEL = "fedmeta.models:multimodal_net"


from fedmeta.errors import ConfigError  # noqa: E402,F401 - defined in fedmeta.errors, importable from here


#: Seeds must fit numpy's legacy ``RandomState`` and ``torch.manual_seed`` alike.
SEED_MAX = 2**32 - 1
#: A generous cap for counts that only make a run longer or bigger (rounds, clients, steps ...):
#: far beyond anything a run on one machine finishes, small enough never to overflow or allocate absurdly.
COUNT_MAX = 1_000_000


class _Section(BaseModel):
    # allow_inf_nan=False: every float field must be finite ("must be a finite number (got inf)")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    # a built-in name, or "package.module:callable" with callable(DataConfig) -> FederatedDataset
    dataset: str = "synthetic"
    num_clients: int = Field(60, ge=2, le=1_000_000)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    examples_per_client: int = Field(40, ge=2, le=100_000)
    support_fraction: float = Field(0.5, gt=0, lt=1)
    num_classes: int = Field(5, ge=2, le=10_000)
    missing_modality_fraction: float = Field(0.2, ge=0, le=1)
    missing_modality: str = ""  # "" = a random modality per affected client (per example: each modality)
    # client: that fraction of clients lacks the modality for all its examples; sample: FedMultimodal's
    # protocol, every example drops each modality (or only missing_modality) independently with that probability
    missing_modality_mode: Literal["client", "sample"] = "client"
    # clients carved out of the training clients to choose hyper-parameters on (never train, never reported);
    # the held-out (test) clients are unchanged. 0 = none. A dataset with its own validation group keeps it.
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    dirichlet_alpha: float = Field(0.5, gt=0)
    audio_domain: Literal["espeak", "flite", "both"] = "espeak"
    # avdigits: keep byte-identical TTS clips once (drops 5 duplicate flite speakers); off = the published data
    audio_dedup: bool = False
    # avdigits: "tuning" / "report" = two fixed disjoint halves of the images and speakers (a tuning population
    # sharing no content with the reported ones); "all" = every image and speaker (the published data)
    content_pool: Literal["all", "tuning", "report"] = "all"
    k_shot: int = Field(5, ge=1, le=100_000)
    path: str = ""  # root of on-disk partitions when dataset = "disk", or of a memory-mapped store when "store"
    seed: int = Field(0, ge=0, le=SEED_MAX)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        """A registered name or a reference; *which* names are registered: fedmeta.registry.DATASETS, when the run starts."""
        return check_syntax(v, "dataset", "synthetic", "package.module:callable")


class ModelConfig(_Section):
    # "package.module:callable" with callable(DatasetSpec, Config) -> nn.Module; the default is the built-in MultimodalNet
    factory: str = BUILTIN_MODEL
    embed_dim: int = Field(32, ge=1, le=4096)
    hidden_dim: int = Field(32, ge=1, le=4096)
    fusion: Literal["concat", "gated", "attention"] = "concat"
    image_encoder: Literal["mlp", "cnn"] = "mlp"  # built-in model: encoder of image modalities ([H, W] or [C, H, W])
    modalities: str = ""  # comma-separated subset of modalities to use; "" = all

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        return check_syntax(v, "model factory", "multimodal_net", "package.module:callable")


class MetaConfig(_Section):
    # reptile | fedavg | fedavg_ft (FedAvg training, evaluated after fine-tuning) | fomaml | maml
    # (second order, through the inner loop) | local (no federation: every client adapts from theta_0)
    # | metasgd (learned per-parameter inner learning rates) | "package.module:Name" (a MetaAlgorithm subclass)
    algorithm: str = "reptile"
    inner_steps: int = Field(5, ge=1, le=10_000)
    inner_lr: float = Field(0.3, gt=0)
    inner_optimizer: Literal["sgd", "adam"] = "sgd"
    inner_batch_size: int = Field(10, ge=0, le=100_000)  # 0 = full support set each step
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    outer_lr: float = Field(1.0, gt=0)  # beta_0
    outer_lr_final: float = Field(0.0, ge=0)  # beta at the last round (linear anneal)
    eval_steps: int = Field(10, ge=0, le=10_000)  # adaptation steps at evaluation (0 = no adaptation)
    eval_lr: float = Field(0.0, ge=0)  # adaptation learning rate at evaluation; 0 = meta.inner_lr (metasgd: its learned rates)
    server_optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: theta += beta * mean; adam: FedAdam-style on -mean
    server_beta1: float = Field(0.9, ge=0, lt=1)
    server_beta2: float = Field(0.999, gt=0, lt=1)
    server_eps: float = Field(1e-8, gt=0)
    # maml/fomaml: 0 = the client's query set is the meta-query (standard MAML on training tasks);
    # > 0 = this fraction of the support rows is held back as the meta-query (query set untouched)
    maml_query_fraction: float = Field(0.0, ge=0, lt=1)
    # how the server combines the clients' updates (without DP): weighted mean, or coordinate-wise
    # median / trimmed mean (unweighted, robust to a minority of malicious clients; see docs/design.md)
    aggregation: Literal["mean", "median", "trimmed_mean", "krum"] = "mean"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)  # trimmed_mean: fraction cut from each end per coordinate
    krum_malicious: int = Field(1, ge=0, le=COUNT_MAX)  # krum: f, the attackers a cohort may hold (Blanchard et al. 2017)
    krum_keep: int = Field(0, ge=0, le=COUNT_MAX)  # krum: 0 = the one best update (Krum); m = the mean of the m best (multi-Krum)

    # the method's own hyper-parameters (its Params model validates them when the run starts: meta.params.<key>)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        """A registered name or a reference; *which* names are registered is the registry's (fedmeta.registry.METHODS), not a list here."""
        return check_syntax(v, "method", "reptile", "package.module:Name")

    @model_validator(mode="after")
    def _final_below_start(self) -> "MetaConfig":
        if self.outer_lr_final > self.outer_lr:
            raise ValueError(f"outer_lr_final: must be <= outer_lr ({self.outer_lr}) (got {self.outer_lr_final})")
        return self


class SimulationConfig(_Section):
    # a registered engine (built-in: flower | vectorized | sequential; fedmeta.registry.ENGINES) or "package.module:Engine"
    engine: str = "flower"
    rounds: int = Field(50, ge=1, le=COUNT_MAX)
    clients_per_round: int = Field(10, ge=1, le=COUNT_MAX)
    sampling: Literal["fixed", "poisson"] = "fixed"
    min_clients: int = Field(1, ge=1, le=COUNT_MAX)  # a round needs at least this many good replies
    on_too_few: Literal["skip", "retry"] = "skip"
    max_retries: int = Field(2, ge=0, le=100)
    eval_every: int = Field(10, ge=1, le=COUNT_MAX)
    eval_clients: int = Field(0, ge=0, le=COUNT_MAX)  # held-out clients evaluated; 0 = all
    round_timeout: float = Field(600.0, gt=0, le=1e6)  # seconds to wait for replies
    max_update_norm: float = Field(1e4, gt=0)  # replies with a larger ||phi - theta|| are rejected
    # without DP: replies whose ||phi - theta|| exceeds this many times the cohort's median norm are rejected
    # (norm bounding, Sun et al. 2019; fedmeta/meta/robust.py, docs/design.md "Threat model"); 0 = off
    max_norm_ratio: float = Field(20.0, ge=0, le=1e6)
    max_weight: float = Field(0.0, ge=0)  # cap on any client's weight (examples) in the mean; 0 = no explicit cap
    seed: int = Field(0, ge=0, le=SEED_MAX)
    deterministic: bool = True
    device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto | cpu | cuda[:i]
    num_cpus_per_client: float = Field(1.0, gt=0, le=1024)
    chunk_size: int = Field(256, ge=1, le=COUNT_MAX)  # vectorized engine: clients per vmap chunk
    # vectorized engine: torch.compile (inductor) the vmapped client update; off by default: on the default
    # workload it compiled for ~90 s on one CPU core for ~13 % per round (docs/benchmarks.md, section 2)
    compile: bool = False
    # vectorized engine: 0 = in this process; N = N Ray actors (one per GPU with device cuda, else one CPU slot
    # each), each holding its shard of the population (clients with cid % N == i); the server step stays here
    workers: int = Field(0, ge=0, le=4096)
    # where the simulation engines keep a stateful method's client state (fedmeta/meta/client_state.py): "memory"
    # (inside checkpoint.pt), "disk" (memory-mapped under <run dir>/client_state/), "auto" = disk when the training
    # population has >= 100,000 clients or its state would take >= 1 GiB
    client_state: Literal["auto", "memory", "disk"] = "auto"
    # the Ray cluster of the flower engine and of workers > 0: "" = a private local Ray instance (as before),
    # "auto" = the cluster this host belongs to (`ray start` was run here), or "host:port" / "ray://host:port"
    ray_address: str = ""
    num_gpus_per_client: float = Field(0.0, ge=0, le=1024)  # flower engine: Ray GPU share per ClientApp (e.g. 0.25)

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        return check_syntax(v, "engine", "vectorized", "package.module:Engine")

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v: str) -> str:
        if v in ("", "auto") or re.fullmatch(r"(ray://)?[A-Za-z0-9._\[\]:-]+:\d{1,5}", v):
            return v
        raise ValueError(f"must be '' (a private local Ray instance), 'auto', 'host:port' or 'ray://host:port' (got {_short(v)})")


class PrivacyConfig(_Section):
    enabled: bool = False
    mode: Literal["server", "client"] = "server"
    noise_multiplier: float = Field(1.0, ge=0, le=1e6)  # 1e6 = fedmeta.privacy.NOISE_MULTIPLIER_MAX
    clip_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["pld", "rdp"] = "pld"
    target_epsilon: float = Field(0.0, ge=0)  # 0 = no budget stop
    adaptive_clipping: bool = False
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_lr: float = Field(0.2, gt=0)
    clipped_count_stddev: float = Field(0.0, ge=0)  # 0 = expected cohort / 20, as in Andrew et al.
    # true = noise and cohorts seeded from simulation.seed (repeatable experiments): NOT private against anyone
    # holding config.json; false = from a server-only secret (docs/design.md, "Threat model")
    reproducible_noise: bool = False


class OutputConfig(_Section):
    dir: str = ""  # "" = runs/<timestamp>
    checkpoint_every: int = Field(1, ge=1, le=COUNT_MAX)
    progress: bool = True
    resume: bool = False  # continue the run in ``dir`` from its checkpoint (deployed ServerApp)


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    meta: MetaConfig = MetaConfig()
    simulation: SimulationConfig = SimulationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        from fedmeta.population import heldout_count, validation_count  # no torch: the counts split_clients uses

        n_train = self.data.num_clients - heldout_count(self.data.num_clients, self.data.heldout_fraction)
        n_val = validation_count(self.data.num_clients, self.data.validation_fraction)
        if n_val >= n_train:
            raise ValueError(
                f"data.validation_fraction: leaves no training clients ({n_val} validation of {n_train} "
                f"non-test clients) (got {self.data.validation_fraction})"
            )
        n_train -= n_val
        if self.simulation.clients_per_round > n_train:
            raise ValueError(
                f"simulation.clients_per_round: must be <= the {n_train} training clients "
                f"(data.num_clients={self.data.num_clients}, data.heldout_fraction={self.data.heldout_fraction}, "
                f"data.validation_fraction={self.data.validation_fraction}) "
                f"(got {self.simulation.clients_per_round})"
            )
        if self.simulation.min_clients > self.simulation.clients_per_round:
            raise ValueError(
                f"simulation.min_clients: must be <= simulation.clients_per_round "
                f"({self.simulation.clients_per_round}) (got {self.simulation.min_clients})"
            )
        if self.privacy.enabled and self.simulation.sampling != "poisson":
            raise ValueError(
                "simulation.sampling: must be 'poisson' when privacy.enabled "
                f"(the accountant assumes Poisson sampling; got {self.simulation.sampling!r})"
            )
        if self.privacy.enabled and self.meta.aggregation != "mean":
            raise ValueError(
                "meta.aggregation: must be 'mean' when privacy.enabled "
                f"(the DP sensitivity analysis assumes the clipped sum; got {self.meta.aggregation!r})"
            )
        sim = self.simulation
        if sim.workers and sim.engine != "vectorized":
            raise ValueError(f"simulation.workers: Ray workers run the vectorized engine only; set simulation.engine = 'vectorized' or workers = 0 (got engine {sim.engine!r})")
        if sim.ray_address and sim.engine != "flower" and not sim.workers:
            raise ValueError(f"simulation.ray_address: used by engine 'flower' or by simulation.workers > 0 only (got engine {sim.engine!r} with workers = 0)")
        if sim.num_gpus_per_client and sim.engine != "flower":
            raise ValueError(f"simulation.num_gpus_per_client: Ray client resources of engine 'flower' only (got engine {sim.engine!r}; the vectorized engine's workers take one GPU each with device cuda)")
        if sim.client_state != "auto" and sim.engine == "flower":
            raise ValueError(f"simulation.client_state: a Flower ClientApp keeps its client state in context.state; the store is the sequential and vectorized engines' (got {sim.client_state!r} with engine 'flower'; leave it 'auto')")
        if sim.num_gpus_per_client and sim.device == "cpu":
            raise ValueError("simulation.num_gpus_per_client: the clients would hold a GPU and compute on the CPU; set simulation.device = 'cuda' or 'auto' (got device 'cpu')")
        if self.privacy.enabled and self.privacy.adaptive_clipping and self.privacy.mode == "client":
            raise ValueError("privacy.adaptive_clipping: supported with privacy.mode = 'server' only")
        if self.privacy.enabled and self.privacy.noise_multiplier == 0:
            raise ValueError("privacy.noise_multiplier: must be > 0 when privacy.enabled (0 adds no noise: epsilon would be infinite) (got 0)")
        return self

    def ignored_privacy_keys(self) -> list[str]:
        """``privacy.*`` keys that differ from their defaults although ``privacy.enabled = false`` (they do nothing)."""
        if self.privacy.enabled:
            return []
        default = PrivacyConfig().model_dump()
        return [f"privacy.{k}" for k, v in self.privacy.model_dump().items() if k != "enabled" and v != default[k]]

    # -- conversions ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys with scalar values, the shape of Flower's run config."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                if isinstance(value, dict):  # meta.params: one dotted key per entry
                    out.update({f"{section}.{key}.{k}": v for k, v in value.items()})
                else:
                    out[f"{section}.{key}"] = value
        return out


# -- building configs ------------------------------------------------------------


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _format_error(err: ValidationError, prefix: tuple[str, ...] = ()) -> str:
    """One line naming the first bad field, what is allowed and what was given."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (*prefix, *first["loc"]))
    kind, got, ctx = first["type"], first.get("input"), first.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"config error: {loc}: unknown key"
    if kind == "value_error":  # our validators name the field (relative to their section)
        text = str(ctx.get("error", first["msg"]))
        if not loc or re.match(r"^[\w.]+: ", text):  # a model validator names the field within its section
            return f"config error: {loc + '.' if loc else ''}{text}"
        return f"config error: {loc}: {text}"  # a field validator: loc is the field
    if kind in _BOUNDS:
        name, sym = _BOUNDS[kind]
        return f"config error: {loc}: must be {sym} {ctx[name]} (got {_short(got)})"
    if kind == "literal_error":
        return f"config error: {loc}: must be one of {ctx.get('expected')} (got {_short(got)})"
    if kind == "finite_number":
        return f"config error: {loc}: must be a finite number (got {_short(got)})"
    if kind == "int_parsing_size":
        return f"config error: {loc}: must be an integer{_range_of(loc)} (got {_short(got)})"
    return f"config error: {loc}: {first['msg'].lower()} (got {_short(got)})"


def _range_of(loc: str) -> str:
    """`` in [lo, hi]`` for a bounded ``section.key`` field, else ``""``."""
    section, _, key = loc.partition(".")
    sec = Config.model_fields.get(section)
    field = getattr(sec.annotation, "model_fields", {}).get(key) if sec is not None else None
    if field is None:
        return ""
    lo = next((getattr(m, "ge", None) for m in field.metadata if getattr(m, "ge", None) is not None), None)
    hi = next((getattr(m, "le", None) for m in field.metadata if getattr(m, "le", None) is not None), None)
    return f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of a bad value, on one line and cut to ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: {key}: '{part}' is a value, not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"meta.inner_steps=10"`` -> ``("meta.inner_steps", 10)``; values parse as TOML, else as strings."""
    if "=" not in item:
        raise ConfigError(f"config error: --set {item!r}: expected KEY=VALUE, e.g. meta.inner_steps=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"config error: --set {item!r}: expected KEY=VALUE, e.g. meta.inner_steps=10")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise ConfigError(f"config error: --set {key}: value nested too deeply") from None
    return key, value


def _merged(data: dict[str, Any] | None, overrides: list[str] | None) -> dict[str, Any]:
    merged = dict(data or {})
    for item in overrides or []:
        key, value = parse_override(item)
        merged = _merge(merged, _nest({key: value}))
    return merged


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Validate ``data`` (nested dict) with ``overrides`` (``KEY=VALUE`` strings) applied."""
    merged = _merged(data, overrides)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML config file (or the built-in defaults) and apply ``--set`` overrides."""
    data = read_config_file(path) if path is not None else {}
    return build_config(data, overrides)


#: Largest config file read (a config is a few KiB; this keeps ``--config /dev/zero`` or a huge file bounded).
CONFIG_FILE_MAX_BYTES = 1 << 20


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The parsed TOML of a config file; every problem (missing, a directory, not UTF-8, too big,
    invalid TOML) is a one-line :class:`ConfigError` naming the file."""
    p = Path(path)
    try:
        if not p.exists():
            raise ConfigError(f"config error: {p}: file not found")
        if p.is_dir():
            raise ConfigError(f"config error: {p}: is a directory, not a TOML file")
        if not p.is_file():
            raise ConfigError(f"config error: {p}: not a regular file")
        if p.stat().st_size > CONFIG_FILE_MAX_BYTES:
            raise ConfigError(f"config error: {p}: too large for a config file (more than {CONFIG_FILE_MAX_BYTES} bytes)")
        text = p.read_bytes()[: CONFIG_FILE_MAX_BYTES + 1].decode("utf-8")
        return tomllib.loads(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"config error: {p}: not UTF-8 text (byte {err.start}); a config file is UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config error: {p}: invalid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"config error: {p}: invalid TOML: nested too deeply") from None
    except OSError as err:
        raise ConfigError(f"config error: {p}: cannot read ({err.strerror or type(err).__name__})") from None


def load_sections(
    path: str | Path | None = None, overrides: list[str] | None = None, sections: tuple[str, ...] = ("data", "model")
) -> dict[str, BaseModel]:
    """Validate only ``sections`` of a config (file + ``--set``), for commands that use nothing else
    (``fedmeta partition``): other sections are not checked, but unknown section names still are."""
    merged = _merged(read_config_file(path) if path is not None else {}, overrides)
    for key in merged:
        if key not in Config.model_fields:
            raise ConfigError(f"config error: {key}: unknown key")
    out: dict[str, BaseModel] = {}
    for name in sections:
        model = Config.model_fields[name].annotation
        try:
            out[name] = model.model_validate(merged.get(name, {}))
        except ValidationError as err:
            raise ConfigError(_format_error(err, (name,))) from None
    return out


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """Build a Config from Flower's flat run config (``section.key`` entries; others ignored)."""
    sections = set(Config.model_fields)
    flat = {k: v for k, v in run_config.items() if k.split(".", 1)[0] in sections}
    try:
        return Config.model_validate(_nest(flat))
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def config_from_json(text: str) -> Config:
    try:
        return Config.model_validate(json.loads(text))
    except json.JSONDecodeError as err:
        raise ConfigError(f"config error: invalid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
