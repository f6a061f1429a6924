"""``fedmeta privacy epsilon | calibrate``: the accountant from the command line.

Each prints its number as the last line of output and answers within seconds:
when the PLD accountant would need too large a grid (a tiny noise multiplier, a
huge epsilon, very many rounds) it says so in one line on stderr and uses RDP,
which is also an upper bound on epsilon and costs the same for any T.
"""

from __future__ import annotations

import argparse
import sys

from fedmeta.cli import one_line_errors


def integer(text: str) -> float | int:
    """A count: ``1000`` or ``1e3`` (an integral float becomes an int); a fractional value is
    returned as is for the validator to reject with the allowed range."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        return int(value) if value.is_integer() else value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q in (0, 1]")
    p.add_argument("--rounds", type=integer, required=True, help="number of rounds T, an integer in [1, 1e12]")
    p.add_argument("--delta", type=float, default=1e-5, help="delta in (0, 1) (default: 1e-5)")
    p.add_argument("--accountant", choices=["pld", "rdp"], default="pld",
                   help="pld (default; falls back to rdp, saying so, when its grid would be too large) or rdp")


def _fmt(value: float) -> str:
    return f"{value:.6f}" if value < 1e9 else f"{value:.6e}"  # 'inf' stays 'inf'


def _note(err: Exception) -> None:
    print(f"fedmeta: note: {err}; using --accountant rdp instead (also an upper bound on epsilon)", file=sys.stderr)


def cmd_epsilon(args: argparse.Namespace) -> int:
    from fedmeta.privacy.accountant import NOISE_MULTIPLIER_FLOOR, compute_epsilon

    if 0 < args.noise_multiplier < NOISE_MULTIPLIER_FLOOR:
        print(f"fedmeta: note: a noise multiplier below {NOISE_MULTIPLIER_FLOOR:g} gives no meaningful privacy: epsilon = inf",
              file=sys.stderr)
    kind, eps = _pld_or_rdp(args.accountant, lambda k: compute_epsilon(args.noise_multiplier, args.sample_rate, args.rounds, args.delta, k))
    print(f"accountant={kind} z={args.noise_multiplier} q={args.sample_rate} T={args.rounds} delta={args.delta}")
    print(_fmt(eps))
    return 0


def _pld_or_rdp(kind: str, compute):
    """``(kind used, compute(kind))``; a PLD too large to build falls back to RDP, said on stderr."""
    from fedmeta.privacy.accountant import PLDTooLargeError

    try:
        return kind, compute(kind)
    except PLDTooLargeError as err:
        _note(err)
        return "rdp", compute("rdp")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fedmeta.privacy.accountant import calibrate_noise

    kind, z = _pld_or_rdp(args.accountant, lambda k: calibrate_noise(args.target_epsilon, args.sample_rate, args.rounds, args.delta, k))
    print(f"accountant={kind} target_epsilon={args.target_epsilon} q={args.sample_rate} T={args.rounds} delta={args.delta}")
    print(_fmt(z))
    return 0


def register(sub) -> None:
    privacy = one_line_errors(
        sub.add_parser("privacy", help="privacy accounting: epsilon for a setting, or the noise for a target epsilon")
    )
    psub = privacy.add_subparsers(dest="privacy_command", required=True)
    eps = one_line_errors(
        psub.add_parser("epsilon", help="print epsilon(delta) for T rounds of the Poisson-sampled Gaussian mechanism")
    )
    eps.add_argument("--noise-multiplier", type=float, required=True, help="noise multiplier z in [0, 1e6] (0: no privacy)")
    _common(eps)
    eps.set_defaults(func=cmd_epsilon)
    cal = one_line_errors(psub.add_parser("calibrate", help="print the smallest noise multiplier that meets a target epsilon"))
    cal.add_argument("--target-epsilon", type=float, required=True, help="target epsilon > 0")
    _common(cal)
    cal.set_defaults(func=cmd_calibrate)
