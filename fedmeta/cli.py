"""``fedmeta``: simulate | privacy | partition | sweep | bench.

Every command validates its input first and reports problems as one line on
stderr with a non-zero exit code; nothing is written for an invalid config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedmeta.config import Config, ConfigError, build_config, load_config
from fedmeta.results import CONFIG, RunWriter, default_out_dir


def _fail(message: str, code: int = 2) -> int:
    print(f"fedmeta: {message}", file=sys.stderr)
    return code


def run_simulation(cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Run ``cfg`` on its configured engine, writing into ``out_dir`` (:func:`fedmeta.api.run`)."""
    from fedmeta.api import run

    return run(cfg, out_dir, resume=resume, progress=progress)


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.resume:
        out = Path(args.resume)
        if not (out / CONFIG).exists():
            return _fail(f"--resume {out}: no {CONFIG} there (not a fedmeta run directory)")
        if RunWriter(out).is_finished():
            return _fail(f"--resume {out}: the run already finished (summary.json exists)")
        cfg = build_config(json.loads((out / CONFIG).read_text()), args.set)
    else:
        cfg = load_config(args.config, args.set)
        out = Path(args.out or cfg.output.dir or default_out_dir())
    summary = run_simulation(cfg, out, resume=bool(args.resume), progress=cfg.output.progress)
    keys = [k for k in ("heldout_acc_before", "heldout_acc_after", "heldout_loss_before", "heldout_loss_after", "epsilon") if summary.get(k) is not None]
    print(f"run written to {out}")
    print("summary: " + ", ".join(f"{k}={summary[k]:.4f}" for k in keys))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeta", description="Federated meta-learning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federation (Flower Simulation Engine by default)")
    sim.add_argument("--config", help="TOML config file (default: built-in defaults)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. meta.inner_steps=10")
    sim.add_argument("--out", help="output directory (default: output.dir or runs/<timestamp>)")
    sim.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    sim.set_defaults(func=cmd_simulate)

    from fedmeta.commands import register_all

    register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted; the last checkpoint is kept (resume with --resume DIR)", 130)
    except Exception as err:  # noqa: BLE001 - a one-line message for known error kinds, traceback otherwise
        from fedmeta.data.base import DataError
        from fedmeta.federation import RunError

        from fedmeta.privacy import PrivacyError

        if isinstance(err, (DataError, RunError, PrivacyError)):
            return _fail(str(err))
        raise


if __name__ == "__main__":
    sys.exit(main())
