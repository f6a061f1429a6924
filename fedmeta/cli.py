"""``fedmeta``: simulate | privacy | partition | sweep | bench.

Every command validates its input first and reports problems as one line on
stderr with a non-zero exit code; nothing is written for an invalid config.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from fedmeta import __version__
from fedmeta.config import Config, ConfigError, build_config, load_config, parse_override
from fedmeta.errors import FedmetaError
from fedmeta.components import check_components
from fedmeta.results import (
    CHECKPOINT, CONFIG, RunDirError, check_resume, default_out_dir, prepare_out_dir, read_run_config, run_dir_lock, run_files,
)


def _fail(message: str, code: int = 2) -> int:
    print(f"fedmeta: {message}", file=sys.stderr)
    return code


def run_simulation(cfg: Config, out_dir: Path, resume: bool = False, progress: bool = True, components=None) -> dict:
    """Run ``cfg`` on its configured engine, writing into ``out_dir`` (:func:`fedmeta.api.run`)."""
    from fedmeta.api import run

    return run(cfg, out_dir, resume=resume, progress=progress, components=components)


def _resume_config(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config of ``--resume DIR`` with ``--set`` applied, checked against DIR/config.json (:func:`check_resume`)."""
    out = Path(args.resume)
    if args.config:
        raise RunDirError(f"--config {args.config}: not with --resume (a resumed run keeps {out / CONFIG}; change what may change with --set)")
    if args.overwrite:
        raise RunDirError(f"--overwrite: not with --resume (resuming continues {out}; to start over, drop --resume)")
    if args.out and Path(args.out).resolve() != out.resolve():
        raise RunDirError(f"--out {args.out}: a resumed run stays in its directory {out}; drop --out")
    raw = read_run_config(out)
    try:
        build_config(raw)
    except ConfigError as err:
        raise RunDirError(f"{out / CONFIG}: {err}") from None
    for item in args.set:
        key, value = parse_override(item)
        if key == "output.dir" and Path(str(value)).resolve() != out.resolve():
            raise RunDirError(f"--set output.dir={value}: a resumed run stays in its directory {out}")
    cfg = build_config(raw, args.set)
    check_resume(out, cfg)
    return cfg, out


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.resume:
        with run_dir_lock(args.resume, "--resume", create=False):  # one process per run directory, held to the end
            cfg, out = _resume_config(args)
            args.run_dir = out
            summary = run_simulation(cfg, out, resume=True, progress=cfg.output.progress)
    else:
        cfg = load_config(args.config, args.set)
        components = check_components(cfg)  # a bad model/dataset/algorithm/engine: one line, nothing created
        if args.out:
            out, option = Path(args.out), "--out"
        elif cfg.output.dir:
            out, option = Path(cfg.output.dir), "output.dir"
        else:
            out, option = default_out_dir(), "output directory"
        with run_dir_lock(out, option):  # before anything is written, held to the end
            prepare_out_dir(out, overwrite=args.overwrite, option=option)  # before anything starts (Ray included)
            args.run_dir = out
            summary = run_simulation(cfg, out, resume=False, progress=cfg.output.progress, components=components)
    print(f"run written to {out}")
    from fedmeta.plot import write_curves

    curves = write_curves(out)
    if curves is not None:
        print(f"curves: {curves}")
    print(summary_line(summary))
    return 0


def _interrupted(run_dir: Path | None) -> str:
    """What Ctrl-C left behind, and only what is true: a checkpoint to resume from, or none (yet)."""
    if run_dir is None:
        return "interrupted before the run started; nothing was written"
    if (Path(run_dir) / CHECKPOINT).is_file():
        return f"interrupted; the last checkpoint is kept (resume with --resume {run_dir})"
    if run_files(run_dir):
        return f"interrupted before the first checkpoint; nothing to resume in {run_dir} (start again with --out {run_dir} --overwrite)"
    return f"interrupted before the first round; nothing to resume in {run_dir}"
def summary_line(summary: dict) -> str:
    """The final console line: status (and why a run stopped early), the final evaluation, chance level, ε."""
    keys = [k for k in ("heldout_acc_before", "heldout_acc_after", "heldout_loss_before", "heldout_loss_after", "chance_acc", "majority_acc", "epsilon")
            if isinstance(summary.get(k), (int, float))]
    head = f"summary: status={summary.get('status')}"
    if summary.get("status") == "stopped_early":
        head += f" at round {summary.get('stopped_at_round')}/{summary.get('rounds_planned')} ({summary.get('stopped_early')})"
    return ", ".join([head, *(f"{k}={summary[k]:.4f}" for k in keys)])


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report a bad argument as one line ``fedmeta: <prog>: <message>`` (exit 2), no usage dump."""

    def error(message: str):  # argparse calls parser.error(message) and expects it not to return
        where = parser.prog.removeprefix("fedmeta").strip()  # "privacy epsilon", or "" for the top level
        parser.exit(2, f"fedmeta: {where + ': ' if where else ''}{' '.join(message.split())}\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def build_parser(only_simulate: bool = False) -> argparse.ArgumentParser:
    """The ``fedmeta`` parser; ``only_simulate``: without the other sub-commands, whose modules import
    torch and dp-accounting (seconds), so that ``fedmeta simulate`` says what it does within a second."""
    parser = one_line_errors(argparse.ArgumentParser(prog="fedmeta", description="Federated meta-learning on Flower."))
    parser.add_argument("--version", action="version", version=f"fedmeta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = one_line_errors(sub.add_parser("simulate", help="run a federation (Flower Simulation Engine by default)"))
    sim.add_argument("--config", help="TOML config file (default: built-in defaults)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. meta.inner_steps=10")
    sim.add_argument("--out", help="output directory (default: output.dir or runs/<timestamp>); refused if it already holds a run")
    sim.add_argument("--overwrite", action="store_true", help="remove the run already in the output directory first")
    sim.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint (with --set for the keys that may change)")
    sim.set_defaults(func=cmd_simulate)

    if not only_simulate:
        from fedmeta.commands import register_all

        register_all(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(only_simulate=bool(words) and words[0] == "simulate")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedmetaError as err:  # every fedmeta error (fedmeta.errors): config, run dir, data, run, privacy ...
        return _fail(str(err))
    except KeyboardInterrupt:
        code = _fail(_interrupted(getattr(args, "run_dir", None)), 130)
        if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
            # Flower's ServerApp thread may still wait (up to simulation.round_timeout) for replies that will
            # never come; its run directory is closed (fedmeta.results.close_writers), so exit without joining it.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
