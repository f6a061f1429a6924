"""What one client, or k colluding clients, can do to the final accuracy under each server setting.

    python -m experiments.robust_screen                      # the table of docs/design.md, "Threat model"
    python -m experiments.robust_screen --honest-ratios      # max / median update norm of honest cohorts

The attack is the one of issue 18: in every round, the first ``k`` clients of the cohort return
``phi = theta + offset`` on every parameter (offset 1: an update norm of about 100, under the default
``simulation.max_update_norm``) and claim as many examples as they hold (on ``flwr run`` a claim of 10^15
is capped at the size the node announced, which is what the in-process engines see). Settings: the
weighted mean with no cohort screen (``simulation.max_norm_ratio=0``), the default screen, and the
coordinate-wise median, trimmed mean and Krum aggregators (with the screen off, to show each alone).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from fedmeta.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "mean, no screen": ["simulation.max_norm_ratio=0"],
    "mean + default screen": [],
    "median": ["simulation.max_norm_ratio=0", "meta.aggregation=median"],
    "trimmed_mean (0.2)": ["simulation.max_norm_ratio=0", "meta.aggregation=trimmed_mean"],
    "krum": ["simulation.max_norm_ratio=0", "meta.aggregation=krum"],
}


class Attack:
    """Wraps a backend: the first ``k`` replies of every training cohort become ``theta + offset``."""

    def __init__(self, backend, k: int, offset: float = 1.0) -> None:
        self.inner, self.k, self.offset = backend, k, offset
        self.name = backend.name
        self.norms: list[list[float]] = []  # the cohort's update norms per round (before any screen)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train(self, theta, cids, server_round):
        out = self.inner.train(theta, cids, server_round)
        out.results = list(out.results)  # the vectorised engine replies stacked (StackedUpdates): one update per client here
        for u in out.results[: self.k]:
            u.phi = {name: v + self.offset for name, v in theta.items()}
        self.norms.append([math.sqrt(sum(float(((u.phi[n] - theta[n]) ** 2).sum()) for n in theta)) for u in out.results])
        return out

    def evaluate(self, theta, cids, server_round):
        return self.inner.evaluate(theta, cids, server_round)


def run_one(config: str, overrides: list[str], k: int, out: Path) -> tuple[dict, Attack]:
    from fedmeta.client import configure_torch
    from fedmeta.components import resolve_components
    from fedmeta.federation import run_federation
    from fedmeta.meta.algorithm import initial_meta_parameters
    from fedmeta.results import RunWriter, prepare_out_dir

    cfg = load_config(config, overrides)
    components = resolve_components(cfg)  # once: the backend, theta_0 and the round loop get these objects
    dataset = components.dataset()
    backend = Attack(components.engine.backend(cfg, components), k)
    configure_torch(1)
    theta0 = initial_meta_parameters(components.model(dataset.spec), components.algorithm)
    summary = run_federation(cfg, backend, theta0, RunWriter(prepare_out_dir(out, overwrite=True)), algorithm=components.algorithm)
    return summary, backend


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "experiments/configs/default.toml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--attackers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="NAME", help="rows (default: all)")
    p.add_argument("--out", default="runs/robust_screen")
    p.add_argument("--honest-ratios", action="store_true", help="only report max/median norm of honest cohorts")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = ["simulation.engine=vectorized", "output.progress=false", *args.set]
    if args.honest_ratios:
        ratios = []
        for seed in range(args.seeds):
            _, backend = run_one(args.config, [*base, "simulation.max_norm_ratio=0", f"data.seed={seed}", f"simulation.seed={seed}"], 0,
                                 Path(args.out) / f"honest-{seed}")
            ratios += [max(n) / statistics.median_low(n) for n in backend.norms if n and statistics.median_low(n) > 0]
        print(json.dumps({"config": args.config, "set": args.set, "rounds": len(ratios), "max_ratio": max(ratios),
                          "median_ratio": statistics.median(ratios), **{f"rounds_above_{k}": sum(r > k for r in ratios) for k in (10, 20, 30, 50)}}))
        return 0
    rows = {}
    for name in args.settings:
        sets = SETTINGS[name]
        for k in args.attackers:
            accs = []
            for seed in range(args.seeds):
                summary, _ = run_one(args.config, [*base, *sets, f"data.seed={seed}", f"simulation.seed={seed}"], k,
                                     Path(args.out) / f"{name.split()[0]}-{k}-{seed}")
                accs.append(summary.get("heldout_acc_after", float("nan")))
            rows.setdefault(name, {})[k] = accs
            print(name, k, accs, flush=True)
    header = "| setting | " + " | ".join("no attack" if k == 0 else f"{k} attacker{'s' if k > 1 else ''}" for k in args.attackers) + " |"
    print(header)
    print("|---" * (len(args.attackers) + 1) + "|")
    for name, byk in rows.items():
        print(f"| {name} | " + " | ".join(f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "") for v in byk.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
