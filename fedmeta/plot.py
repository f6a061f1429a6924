"""``fedmeta plot RUN [RUN ...]``: learning curves of one or several run directories (matplotlib, Agg).

Panels: the test (held-out) clients' accuracy before and after adaptation (loss
for regression), the same for validation clients when the run has them, the
training clients' train loss, and ε over rounds for private runs. Several runs
are drawn in the same panels, one colour each. ``fedmeta simulate`` writes
``curves.png`` into its run directory when it finishes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fedmeta.results import CONFIG, CURVES, METRICS, SUMMARY, RunDirError, RunWriter


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def load_curves(run_dir: str | Path) -> dict[str, Any]:
    """The records of ``run_dir/metrics.jsonl`` and what the plot needs to know (task, chance level)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise RunDirError(f"plot {d}: not a directory")
    if not (d / METRICS).is_file():
        raise RunDirError(f"plot {d}: no {METRICS} there (not a fedmeta run, or it stopped before its first round)")
    rows = [r for r in RunWriter(d).read_metrics() if isinstance(r.get("round"), int)]  # reads only (d exists)
    if not rows:
        raise RunDirError(f"plot {d}: {METRICS} holds no rounds yet")
    summary: dict[str, Any] = {}
    if (d / SUMMARY).is_file():
        try:
            summary = json.loads((d / SUMMARY).read_text())
        except (OSError, json.JSONDecodeError):
            summary = {}
    acc = any(_finite(r.get("heldout_acc_after")) or _finite(r.get("val_acc_after")) or _finite(r.get("acc_after")) for r in rows)
    task = summary.get("task") or ("classification" if acc else "regression")
    return {"dir": d, "rows": rows, "task": task, "chance": summary.get("chance_acc"), "summary": summary,
            "label": d.name or str(d)}


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        if _finite(r.get(key)):
            xs.append(int(r.get("evaluated_round", r["round"])))
            ys.append(float(r[key]))
    return xs, ys


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Draw the runs' curves side by side into ``out`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_curves(d) for d in run_dirs]
    metric = "acc" if all(r["task"] == "classification" for r in runs) else "loss"
    what = "accuracy" if metric == "acc" else "loss (MSE for regression)"
    panels = [("heldout_", f"test clients (held-out): {what}")]
    if any(_series(r["rows"], f"val_{metric}_after")[0] for r in runs):
        panels.append(("val_", f"validation clients: {what}"))
    panels.append(("train", "training clients: train loss (inner loop)"))
    if any(_series(r["rows"], "epsilon")[0] for r in runs):
        panels.append(("epsilon", "privacy: ε over rounds"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes[0], panels):
        for i, run in enumerate(runs):
            c = colours[i % len(colours)]
            label = run["label"] if len(runs) > 1 else None
            if key in ("heldout_", "val_"):
                xs, ys = _series(run["rows"], f"{key}{metric}_before")
                ax.plot(xs, ys, linestyle="--", color=c, alpha=0.7, label=f"{label + ': ' if label else ''}before adaptation")
                xs, ys = _series(run["rows"], f"{key}{metric}_after")
                ax.plot(xs, ys, marker="o", markersize=3, color=c, label=f"{label + ': ' if label else ''}after adaptation")
            elif key == "train":
                ax.plot(*_series(run["rows"], "train_loss"), color=c, label=label)
            else:
                ax.plot(*_series(run["rows"], "epsilon"), color=c, label=label)
                target = run["summary"].get("stopped_early")
                if target:
                    ax.axvline(run["summary"].get("stopped_at_round", 0), color=c, linestyle=":", label="stopped early")
        if key in ("heldout_", "val_") and metric == "acc":
            chances = {r["chance"] for r in runs if _finite(r["chance"])}
            for chance in chances:
                ax.axhline(chance, color="gray", linestyle=":", label=f"chance {chance:.3f}")
            ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(", ".join(f"{r['label']} ({r['summary'].get('algorithm', '?')}, {r['summary'].get('status', 'running')})" for r in runs), fontsize=10)
    fig.tight_layout()
    path = Path(out)
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise RunDirError(f"plot --out {path}: cannot write there ({err.strerror or err})") from None
    finally:
        plt.close(fig)
    return path


def write_curves(run_dir: str | Path) -> Path | None:
    """``RUN/curves.png`` at the end of a run; a figure never fails a finished run (a warning says why instead)."""
    import logging

    try:
        return plot_runs([run_dir], Path(run_dir) / CURVES)
    except Exception as err:  # noqa: BLE001 - the run's results are written; only its picture is missing
        first = str(err).splitlines()[0] if str(err) else ""
        logging.getLogger("fedmeta").warning("curves not drawn (%s: %s); try fedmeta plot %s", type(err).__name__, first, run_dir)
        return None


def cmd_plot(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else (Path(args.runs[0]) / CURVES if len(args.runs) == 1 else Path(CURVES))
    if out.suffix.lower() != ".png":
        raise RunDirError(f"plot --out {out}: must end in .png")
    path = plot_runs(args.runs, out)
    print(f"curves written to {path}")
    return 0


def register(sub) -> None:
    from fedmeta.cli import one_line_errors

    p = one_line_errors(sub.add_parser(
        "plot", help="learning curves of one or several runs (before/after adaptation, train loss, ε)",
        description=f"Draw the curves of the run directories given (each holds {METRICS} and {CONFIG}) into one PNG.",
    ))
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (several: drawn in the same panels)")
    p.add_argument("--out", help=f"PNG file (default: RUN/{CURVES} for one run, ./{CURVES} for several)")
    p.set_defaults(func=cmd_plot)
