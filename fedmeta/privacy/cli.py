"""``fedmeta privacy epsilon | calibrate``: the accountant from the command line.

Each prints its number as the last line of output.
"""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q in (0, 1]")
    p.add_argument("--rounds", type=int, required=True, help="number of rounds T")
    p.add_argument("--delta", type=float, default=1e-5, help="delta in (0, 1)")
    p.add_argument("--accountant", choices=["pld", "rdp"], default="pld")


def cmd_epsilon(args: argparse.Namespace) -> int:
    from fedmeta.privacy import compute_epsilon

    eps = compute_epsilon(args.noise_multiplier, args.sample_rate, args.rounds, args.delta, args.accountant)
    print(f"accountant={args.accountant} z={args.noise_multiplier} q={args.sample_rate} T={args.rounds} delta={args.delta}")
    print(f"{eps:.6f}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fedmeta.privacy import calibrate_noise

    z = calibrate_noise(args.target_epsilon, args.sample_rate, args.rounds, args.delta, args.accountant)
    print(f"accountant={args.accountant} target_epsilon={args.target_epsilon} q={args.sample_rate} T={args.rounds} delta={args.delta}")
    print(f"{z:.6f}")
    return 0


def register(sub) -> None:
    privacy = sub.add_parser("privacy", help="privacy accounting: epsilon for a setting, or the noise for a target epsilon")
    psub = privacy.add_subparsers(dest="privacy_command", required=True)
    eps = psub.add_parser("epsilon", help="print epsilon(delta) for T rounds of the Poisson-sampled Gaussian mechanism")
    eps.add_argument("--noise-multiplier", type=float, required=True, help="z >= 0")
    _common(eps)
    eps.set_defaults(func=cmd_epsilon)
    cal = psub.add_parser("calibrate", help="print the smallest noise multiplier that meets a target epsilon")
    cal.add_argument("--target-epsilon", type=float, required=True, help="epsilon > 0")
    _common(cal)
    cal.set_defaults(func=cmd_calibrate)
