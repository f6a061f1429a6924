"""Baselines in one harness: same data, splits and budget for every method, over several seeds.

    python -m experiments.compare --config experiments/configs/avdigits.toml \\
        --methods local fedavg fedavg_ft reptile fomaml maml metasgd --seeds 0 1 2 --out runs/compare-av \\
        [--engine sequential|vectorized] [--set KEY=VALUE ...] [--method-set maml:meta.outer_lr=0.05 ...] \\
        [--variant fused] [--variant image model.modalities=image] [--variant missing30 data.missing_modality_fraction=0.3]

Every run is :func:`fedmeta.cli.run_simulation` on the sequential engine (no Ray; the same maths as
the Flower engine; ``--engine vectorized`` runs the same maths batched with ``torch.func.vmap``, equal to
float tolerance and much faster) with ``data.seed`` and ``simulation.seed`` set to the seed, written to
``OUT/<variant>/<method>-seed<s>``; a run that already finished (``summary.json``) is reused, so an
interrupted comparison continues where it stopped. ``--method-set METHOD:KEY=VALUE`` overrides a
key for one method only (e.g. MAML's meta learning rate); ``--variant NAME KEY=VALUE...`` repeats
the whole comparison with extra overrides (modality ablations, missing audio, ...).

Writes ``OUT/results.json`` (every run's final held-out metrics), ``OUT/table.md`` (mean ± std over
seeds: held-out accuracy, or MSE for regression, before and after adaptation and after 1/5/10 steps)
and ``OUT/curves.png`` (held-out metric after adaptation vs round, mean ± std band per method).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fedmeta.config import load_config

METHODS = ("local", "fedavg", "fedavg_ft", "reptile", "fomaml", "maml", "metasgd")
FINAL_KEYS = ("acc_before", "acc_after", "acc_at_1", "acc_at_5", "acc_at_10",
              "loss_before", "loss_after", "loss_at_1", "loss_at_5", "loss_at_10")
# Finn et al. 2017, Fig. 2 / section 5.1: sinusoid, 5-shot, MSE after 1 / 5 / 10 gradient steps
SINE_PAPER = {"MAML (paper)": (0.67, 0.38, 0.35), "pretrained (paper)": (2.41, 2.23, 2.19)}


# -- running --------------------------------------------------------------------------------------


def same_config(run_dir: str | Path, cfg) -> bool:
    """Whether ``run_dir/config.json`` records exactly ``cfg``: every key, defaults included (so a run made
    under another default never passes for this one); False when it is missing or unreadable."""
    from fedmeta.results import RunDirError, read_run_config

    try:
        done = read_run_config(run_dir)
    except RunDirError:
        return False
    want = json.loads(json.dumps(cfg.to_dict()))
    for (section, key), default in STORAGE_ONLY.items():  # a key added later that picks storage, not results
        if key not in done.get(section, {}) and want.get(section, {}).get(key) == default:
            want[section].pop(key)
    return done == want


#: config keys added after runs were cached that choose where state is kept, never what is computed (the memory
#: and disk client-state stores give bit-identical runs: tests/test_client_state.py): a run recorded before the
#: key existed equals one made with the key at its default; any other value, or any other missing key, differs
STORAGE_ONLY = {("simulation", "client_state"): "auto"}


def _run_one(job: tuple[str, list[str], str]) -> dict:
    config, overrides, out = job
    import torch

    torch.set_num_threads(1)
    from fedmeta.cli import run_simulation
    from fedmeta.results import CONFIG, SUMMARY

    cfg = load_config(config, overrides)
    path = Path(out)
    if (path / SUMMARY).exists():  # reuse a finished run, but only of exactly this config
        if not same_config(path, cfg):
            raise SystemExit(f"{path}: holds a finished run of a different config; use another --out or delete it")
        summary = json.loads((path / SUMMARY).read_text())
    else:
            summary = run_simulation(cfg, path, progress=False)
    row = {k: summary.get(f"heldout_{k}") for k in FINAL_KEYS} | {"wall_time_s": summary.get("wall_time_s")}
    # a diverged run: a loss that summary.json holds as null (NaN) or not finite; a key it does not hold at all
    # does not apply (FedAvg's adaptation curve, accuracy on regression), so it is "–", never "diverged"
    non_finite = [k for k, v in row.items() if k.startswith("loss_") and f"heldout_{k}" in summary
                  and not (isinstance(v, (int, float)) and math.isfinite(v))]
    row = {k: v if isinstance(v, (int, float)) and math.isfinite(v) else None for k, v in row.items()}  # NaN -> None
    row["non_finite"] = non_finite
    return row


def _fmt(values: list, digits: int = 3) -> str:
    """mean ± std of the finite values; seeds whose value is missing or non-finite (a diverged run) are
    named, never silently averaged away: ``1.234 (2 of 3 seeds finite)``."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    dropped = sum(1 for v in values if v is not None and not math.isfinite(v))
    if not vals:
        return f"diverged ({dropped} of {len(values)} seeds)" if dropped else "–"
    num = lambda v: f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.2e}"  # a blown-up loss stays readable
    text = num(vals[0]) if len(vals) < 2 else f"{num(statistics.mean(vals))} ± {num(statistics.stdev(vals))}"
    return text if not dropped else f"{text} ({len(vals)} of {len(values)} seeds finite)"


def _value(row: dict, key: str) -> float | None:
    """A run's metric: None when it does not apply (accuracy on regression), NaN when the run diverged."""
    v = row.get(key)
    return math.nan if v is None and key in row.get("non_finite", ()) else v


def _table(variant: str, rows: dict[str, list[dict]], regression: bool, dataset: str) -> list[str]:
    metric = "loss" if regression else "acc"
    name = "MSE" if regression else "accuracy"
    lines = [f"### {variant}: held-out clients, {name} (mean ± std over seeds)", "",
             f"| method | seeds | before | after (eval_steps) | 1 step | 5 steps | 10 steps | wall s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rs in rows.items():
        cells = [_fmt([_value(r, f"{metric}_{k}") for r in rs]) for k in ("before", "after", "at_1", "at_5", "at_10")]
        lines.append(f"| {method} | {len(rs)} | " + " | ".join(cells) + f" | {_fmt([r['wall_time_s'] for r in rs], 0)} |")
    if regression and dataset == "sine":
        for ref, (a1, a5, a10) in SINE_PAPER.items():
            lines.append(f"| {ref} | – | – | – | {a1:.2f} | {a5:.2f} | {a10:.2f} | – |")
    return lines + [""]


def plot_band(ax, series: list[dict[int, float]], label: str, alpha: float = 0.15) -> None:
    """Mean ± std over seeds (one ``{round: value}`` per seed) on the rounds every seed has."""
    import numpy as np

    rounds = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not rounds:
        return
    vals = np.array([[s[r] for r in rounds] for s in series])
    mean, std = vals.mean(0), vals.std(0, ddof=1) if len(series) > 1 else np.zeros(len(rounds))
    ax.plot(rounds, mean, marker=".", label=label)
    ax.fill_between(rounds, mean - std, mean + std, alpha=alpha)


def _curves(out: Path, variants: dict[str, list[str]], methods: list[str], seeds: list[int], regression: bool, dataset: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "heldout_loss_after" if regression else "heldout_acc_after"
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for method in methods:
            series = []
            for seed in seeds:
                f = out / variant / f"{method}-seed{seed}" / "metrics.jsonl"
                if not f.exists():
                    continue
                recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                series.append({r["round"]: r[key] for r in recs if r.get(key) is not None})
            plot_band(ax, series, method, alpha=0.2)
        extra = " ".join(variants[variant])
        ax.set_title(f"{dataset}: {'methods compared' if variant == 'main' else variant}" + (f"\n({extra})" if extra else ""), fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out MSE after adaptation" if regression else "held-out accuracy after adaptation")
        if regression:
            from matplotlib import ticker

            ax.set_yscale("log")  # plain numbers at 1, 2, 5 x 10^k: readable without decoding exponents
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"held-out clients after adaptation: mean ± std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def known_divergence(cfg) -> str | None:
    """A reason the method's setting is known to diverge, or None (said before anything runs)."""
    if cfg.meta.algorithm in ("fedavg", "fedavg_ft") and cfg.meta.server_optimizer == "adam":
        return (f"FedAvg takes its server step at beta = 1, so meta.server_optimizer=adam makes Adam steps of size 1, which diverge; "
                f"add --method-set {cfg.meta.algorithm}:meta.server_optimizer=sgd")
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE", help="override for one method")
    p.add_argument("--variant", action="append", nargs="+", default=[], metavar="NAME [KEY=VALUE ...]",
                   help="repeat the comparison with extra overrides (default: one variant 'main')")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--engine", choices=("sequential", "vectorized"), default="sequential",
                   help="simulation.engine of every run (the Flower engine is not used here: Ray per run)")
    args = p.parse_args(argv)

    per_method: dict[str, list[str]] = {m: [] for m in args.methods}
    for item in args.method_set:
        method, _, kv = item.partition(":")
        if method not in METHODS or not kv:
            p.error(f"--method-set {item!r}: expected METHOD:KEY=VALUE with METHOD in {list(METHODS)}")
        per_method.setdefault(method, []).append(kv)  # methods not being run: ignored
    variants = {v[0]: v[1:] for v in args.variant} or {"main": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    jobs, keys = [], []
    for variant, vsets in variants.items():
        for method in args.methods:
            for seed in args.seeds:
                overrides = args.set + vsets + per_method[method] + [
                    f"meta.algorithm={method}", f"data.seed={seed}", f"simulation.seed={seed}",
                    f"simulation.engine='{args.engine}'", "output.progress=false"]
                run_cfg = load_config(args.config, overrides)  # validate everything before running anything
                if seed == args.seeds[0]:
                    warning = known_divergence(run_cfg)
                    if warning:
                        print(f"compare: warning: {method}{f' ({variant})' if len(variants) > 1 else ''}: {warning}", file=sys.stderr, flush=True)
                jobs.append((args.config, overrides, str(out / variant / f"{method}-seed{seed}")))
                keys.append((variant, method, seed))

    print(f"compare: {len(jobs)} runs ({len(args.methods)} methods x {len(args.seeds)} seeds x {len(variants)} variants), "
          f"{max(1, args.jobs)} at a time, into {out}; one line per finished run", file=sys.stderr, flush=True)
    start = time.time()
    results: dict[str, dict[str, list[dict]]] = {v: {m: [] for m in args.methods} for v in variants}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (variant, method, seed), row in zip(keys, pool.map(_run_one, jobs)):
            results[variant][method].append({"seed": seed, **row})
            print(variant, method, seed, {k: v for k, v in row.items() if v is not None}, flush=True)

    cfg = load_config(args.config, args.set)
    regression = all(r["acc_after"] is None for v in results.values() for rs in v.values() for r in rs)
    lines = [f"# Comparison: {cfg.data.dataset}, seeds {args.seeds}", "",
             "Command: `python -m experiments.compare " + " ".join(_quote(a) for a in (argv if argv is not None else __import__("sys").argv[1:])) + "`", ""]
    for variant, rows in results.items():
        lines += _table(variant + (f" ({' '.join(variants[variant])})" if variants[variant] else ""), rows, regression, cfg.data.dataset)
    lines.append(f"Total wall time: {time.time() - start:.0f} s (runs reused from earlier invocations count as 0).")
    (out / "results.json").write_text(json.dumps({"command": argv, "results": results}, indent=2))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _curves(out, variants, args.methods, args.seeds, regression, cfg.data.dataset)
    print("\n".join(lines))


def _quote(a: str) -> str:
    return a if all(c.isalnum() or c in "-_./=:," for c in a) else f"'{a}'"


if __name__ == "__main__":
    main()
