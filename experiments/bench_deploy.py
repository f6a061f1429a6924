"""ClientApp start-up and per-round overhead: Deployment Engine versus Simulation Engine.

    python -m experiments.bench_deploy --json runs/bench_deploy.json

Measures (medians over --repeats fresh processes) the import time of the
ClientApp module against the floor of ``import torch`` + Flower's ClientApp,
then the per-round wall time of the same 3-client, 3-round fedmeta run on a
local TLS + node-auth deployment and on the Simulation Engine. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N = 3
DATA = {"data.num_clients": N, "data.heldout_fraction": 0.34, "data.examples_per_client": 20, "simulation.clients_per_round": 2}


def import_time(code: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def round_times(out: Path) -> list[float]:
    return [json.loads(l)["time_s"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default="runs/bench_deploy.json")
    args = p.parse_args(argv)
    res: dict = {
        "python_bare_s": import_time("pass", args.repeats),
        "floor_torch_flwr_clientapp_s": import_time("import torch; from flwr.clientapp import ClientApp", args.repeats),
        "clientapp_import_s": import_time("import clients.app", args.repeats),
    }
    run_cfg = {**DATA, "simulation.rounds": args.rounds, "simulation.eval_every": args.rounds, "output.progress": False}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from fedmeta.config import build_config
        from fedmeta.engines.flower import simulate_flower

        t = time.perf_counter()
        simulate_flower(build_config(None, [f"{k}={v}" for k, v in run_cfg.items()]), tmp / "sim", progress=False)
        res["simulation_total_s"] = time.perf_counter() - t
        res["simulation_round_s"] = round_times(tmp / "sim")

        from tests.harness.processes import FlowerDeployment

        sets = [a for k, v in DATA.items() for a in ("--set", f"{k}={v}")]
        subprocess.run([sys.executable, "-m", "fedmeta.cli", "partition", *sets, "--out", str(tmp / "parts")], check=True)
        with FlowerDeployment(tmp / "dep", n_nodes=N) as dep:
            dep.start_superlink()
            dep.write_flwr_config()
            dep.register_nodes(range(N))
            for i in range(N):
                dep.start_supernode(i, node_config={"partition-dir": str(tmp / "parts" / f"client_{i:05d}"), "device": "auto"})
            dep.wait_nodes_online(N, timeout=90)
            t = time.perf_counter()
            r = dep.run_app(ROOT, run_config={**run_cfg, "data.dataset": "disk", "output.dir": str(tmp / "dep-run")}, timeout=600)
            res["deployment_total_s"] = time.perf_counter() - t
            res["deployment_status"] = r.status
            res["deployment_round_s"] = round_times(tmp / "dep-run")
    res["round_overhead_ratio"] = statistics.median(res["deployment_round_s"]) / statistics.median(res["simulation_round_s"])
    print(f"{'measure':45s} {'seconds':>10s}")
    for k, v in res.items():
        if isinstance(v, list):
            v = "/".join(f"{x:.2f}" for x in v)
            print(f"{k:45s} {v:>10s}")
        elif isinstance(v, float):
            print(f"{k:45s} {v:10.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
