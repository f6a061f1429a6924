"""Privacy versus accuracy: ``fedmeta sweep``.

Runs the non-private baseline and every (noise multiplier, clip norm) pair for
several seeds, then writes into ``--out``:

* ``results.json`` and ``results.csv``: one row per run (z, C, seed, ε, held-out accuracy before/after);
* ``table.md``: mean ± std over seeds per setting, with ε;
* ``privacy_accuracy.png``: held-out accuracy after adaptation against ε, with error bars.

    fedmeta sweep --config experiments/configs/privacy.toml --noise 0.6 0.8 1.0 --clip 1.0 --seeds 0 1 2 --out runs/sweep
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import time
from pathlib import Path


def _ms(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float]) -> str:
    """``mean ± std`` over seeds; one seed has no interval and says so (never ``± 0.000``)."""
    m, sd = _ms(values)
    n = sum(1 for v in values if v is not None and math.isfinite(v))
    return f"{m:.3f} ± {sd:.3f}" if n > 1 else f"{m:.3f} (1 seed, no interval)"


def _setting_name(z: float | None, c: float | None) -> str:
    return "nonprivate" if z is None else f"z{z:g}-C{c:g}"


def _overrides(z: float | None, c: float | None, seed: int) -> list[str]:
    extra = [f"data.seed={seed}", f"simulation.seed={seed}", "output.progress=false"]
    if z is not None:
        extra += ["privacy.enabled=true", "simulation.sampling=poisson", f"privacy.noise_multiplier={z!r}", f"privacy.clip_norm={c!r}"]
    return extra


def validate_sweep(config: str | None, sets: list[str], noise: list[float], clips: list[float], seeds: list[int]) -> list:
    """Check every argument and build every run's config before anything runs; returns
    ``[(name, z, C, seed, cfg), ...]`` in run order. Problems are one-line ConfigErrors naming the option."""
    import math

    from fedmeta.config import SEED_MAX, ConfigError, load_config

    load_config(config, sets)  # the base config on its own: its errors name its own fields
    for opt, values in (("--noise", noise), ("--clip", clips), ("--seeds", seeds)):
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep {opt}: each value at most once (got {' '.join(map(str, values))})")
    for z in noise:
        if not (math.isfinite(z) and 0 < z <= 1e6):  # 0 with DP on is refused by the config (infinite epsilon)
            raise ConfigError(f"sweep --noise: each noise multiplier must be in (0, 1e6] (got {z})")
    for c in clips:
        if not (math.isfinite(c) and 0 < c <= 1e6):
            raise ConfigError(f"sweep --clip: each clip norm must be in (0, 1e6] (got {c})")
    for seed in seeds:
        if not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"sweep --seeds: each seed must be in [0, {SEED_MAX}] (got {seed})")
    settings: list[tuple[float | None, float | None]] = [(None, None)] + [(z, c) for z in noise for c in clips]
    names = [_setting_name(z, c) for z, c in settings]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"sweep --noise/--clip: two settings would both be named {dup!r} (values equal to 6 digits)")
    plan = []
    for (z, c), name in zip(settings, names):
        for seed in seeds:
            plan.append((name, z, c, seed, load_config(config, sets + _overrides(z, c, seed))))
    return plan


def sweep(config: str | None, sets: list[str], noise: list[float], clips: list[float], seeds: list[int], out: Path) -> list[dict]:
    from fedmeta.cli import run_simulation

    plan = validate_sweep(config, sets, noise, clips, seeds)
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    from fedmeta.progress import status

    for i, (name, z, c, seed, cfg) in enumerate(plan, 1):
        status(f"sweep run {i}/{len(plan)}: {name}, seed {seed} ({cfg.simulation.rounds} rounds, {cfg.simulation.engine} engine)")
        t0 = time.time()
        s = run_simulation(cfg, out / "runs" / f"{name}-seed{seed}", progress=False)
        row = {
            "setting": name, "noise_multiplier": z, "clip_norm": c, "seed": seed,
            "epsilon": s.get("epsilon"), "delta": cfg.privacy.delta if z is not None else None,
            "clients": cfg.data.num_clients, "clients_per_round": cfg.simulation.clients_per_round,
            "rounds": s.get("rounds_completed"), "heldout_acc_before": s.get("heldout_acc_before"),
            "heldout_acc_after": s.get("heldout_acc_after"), "chance_acc": s.get("chance_acc"), "wall_s": round(time.time() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write_outputs(rows: list[dict], out: Path, total_s: float) -> str:
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["setting"], []).append(r)
    base = _ms([r["heldout_acc_after"] for r in groups.get("nonprivate", [])])[0]
    lines = [
        "| setting | z | C | ε (δ) | held-out acc before | held-out acc after | Δ vs non-private (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    points = []
    for name, rs in groups.items():
        after_m, after_s = _ms([r["heldout_acc_after"] for r in rs])
        n_seeds = sum(1 for r in rs if r["heldout_acc_after"] is not None and math.isfinite(r["heldout_acc_after"]))
        eps = rs[0]["epsilon"]
        eps_txt = "∞" if eps is None else f"{eps:.2f} ({rs[0]['delta']:g})"
        z = "–" if rs[0]["noise_multiplier"] is None else f"{rs[0]['noise_multiplier']:g}"
        c = "–" if rs[0]["clip_norm"] is None else f"{rs[0]['clip_norm']:g}"
        lines.append(
            f"| {name} | {z} | {c} | {eps_txt} | {_pm([r['heldout_acc_before'] for r in rs])} | {_pm([r['heldout_acc_after'] for r in rs])} | {100 * (after_m - base):+.1f} |"
        )
        if eps is not None and math.isfinite(eps):
            points.append((eps, after_m, after_s if n_seeds > 1 else None, name))
    r0 = rows[0]
    lines.append("")
    lines.append(f"{r0['clients']} clients, {r0['clients_per_round']} expected per round, {len({r['seed'] for r in rows})} seeds; sweep took {total_s:.0f} s.")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_clip: dict[float, list] = {}
    for eps, acc, std, name in sorted(points):
        by_clip.setdefault(groups[name][0]["clip_norm"], []).append((eps, acc, std))
    n_seeds = len({r["seed"] for r in rows})
    spread = f"± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed, no interval"
    for clip, series in sorted(by_clip.items()):
        yerr = None if any(p[2] is None for p in series) else [p[2] for p in series]
        ax.errorbar([p[0] for p in series], [p[1] for p in series], yerr=yerr, fmt="o-", capsize=4, label=f"DP, C = {clip:g} ({spread})")
    if math.isfinite(base):
        ax.axhline(base, color="gray", linestyle="--", label="non-private")
    # an honest axis: from chance level (or below it, if a setting is) to 1, never autoscaled to the points' spread
    chance = next((r["chance_acc"] for r in rows if isinstance(r.get("chance_acc"), (int, float))), 0.0)
    if chance:
        ax.axhline(chance, color="gray", linestyle=":", label=f"chance {chance:.3f}")
    lowest = min([p[1] for p in points] + ([base] if math.isfinite(base) else []) + [chance], default=chance)
    ax.set_ylim(max(0.0, min(chance, lowest) - 0.05), 1.0)
    ax.set_xlabel("ε (δ = %g)" % (rows[-1]["delta"] or 1e-5))
    ax.set_ylabel("held-out accuracy after adaptation")
    ax.set_title(f"Privacy versus accuracy ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "privacy_accuracy.png", dpi=120)
    plt.close(fig)
    return table


def cmd_sweep(args: argparse.Namespace) -> int:
    validate_sweep(args.config, args.set, args.noise, args.clip, args.seeds)  # every run's config, before any runs
    start = time.time()
    out = Path(args.out)
    rows = sweep(args.config, args.set, args.noise, args.clip, args.seeds, out)
    print(write_outputs(rows, out, time.time() - start))
    return 0


def register(sub) -> None:
    from fedmeta.cli import one_line_errors

    p = one_line_errors(sub.add_parser(
        "sweep", help="privacy versus accuracy: sweep noise multipliers and clip norms over seeds",
        description="Runs the non-private baseline and every (noise multiplier, clip norm) pair for every seed; "
                    "all arguments and every run's config are validated before the first run.",
    ))
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every run, e.g. simulation.rounds=20 (repeatable)")
    p.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 2.0], metavar="Z",
                   help="noise multipliers to sweep, each in [0, 1e6] (default: 0.5 1.0 2.0)")
    p.add_argument("--clip", type=float, nargs="+", default=[1.0], metavar="C",
                   help="clip norms to sweep, each in (0, 1e6] (default: 1.0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                   help="seeds (data.seed and simulation.seed) per setting, each in [0, 2^32-1] (default: 0 1 2)")
    p.add_argument("--out", default="runs/sweep", metavar="DIR",
                   help="output directory: results.json/.csv, table.md, privacy_accuracy.png, runs/ (default: runs/sweep)")
    p.set_defaults(func=cmd_sweep)
