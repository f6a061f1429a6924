"""`fedmeta privacy` and `fedmeta sweep` from the command line."""

import json
import math
import subprocess
import sys

import pytest
from scipy.stats import norm
from scipy.optimize import brentq


def fedmeta(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fedmeta.cli", *args], capture_output=True, text=True, timeout=timeout)


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Balle & Wang 2018: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    f = lambda eps: norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(f, 0.0, 500.0)


def test_epsilon_last_line_is_the_number_and_matches_closed_form_for_q1():
    r = fedmeta("privacy", "epsilon", "--noise-multiplier", "5.0", "--sample-rate", "1.0", "--rounds", "100", "--delta", "1e-5")
    assert r.returncode == 0, r.stderr
    eps = float(r.stdout.strip().splitlines()[-1])
    assert eps == pytest.approx(exact_gaussian_epsilon(math.sqrt(100) / 5.0, 1e-5), abs=1e-3)


def test_calibrate_last_line_is_z_and_round_trips():
    r = fedmeta("privacy", "calibrate", "--target-epsilon", "3", "--sample-rate", "0.01", "--rounds", "1000", "--delta", "1e-5")
    assert r.returncode == 0, r.stderr
    z = float(r.stdout.strip().splitlines()[-1])
    assert z == pytest.approx(0.8136, abs=2e-3)  # ANCHORS: PLD
    back = fedmeta("privacy", "epsilon", "--noise-multiplier", str(z), "--sample-rate", "0.01", "--rounds", "1000")
    assert float(back.stdout.strip().splitlines()[-1]) <= 3.0 + 1e-6


@pytest.mark.parametrize(
    "args, field",
    [
        (["--noise-multiplier", "-1", "--sample-rate", "0.1", "--rounds", "10"], "privacy.noise_multiplier"),
        (["--noise-multiplier", "1", "--sample-rate", "0", "--rounds", "10"], "privacy.sample_rate"),
        (["--noise-multiplier", "1", "--sample-rate", "1.2", "--rounds", "10"], "privacy.sample_rate"),
        (["--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "10", "--delta", "1"], "privacy.delta"),
    ],
)
def test_bad_privacy_input_is_one_line(args, field):
    r = fedmeta("privacy", "epsilon", *args)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and field in lines[0], r.stderr


def test_clip_norm_must_be_positive_in_a_run():
    r = fedmeta("simulate", "--set", "privacy.enabled=true", "--set", "simulation.sampling=poisson", "--set", "privacy.clip_norm=0")
    assert r.returncode == 2 and "privacy.clip_norm: must be > 0" in r.stderr


def test_sweep_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "sweep"
    sets = ["simulation.engine=sequential", "data.num_clients=12", "data.examples_per_client=20", "simulation.clients_per_round=4", "simulation.rounds=2", "simulation.eval_every=2"]
    r = fedmeta("sweep", *[a for s in sets for a in ("--set", s)], "--noise", "1.0", "2.0", "--seeds", "0", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["setting"], r["seed"]) for r in rows] == [(s, k) for s in ("nonprivate", "z1-C1", "z2-C1") for k in (0, 1)]
    assert rows[0]["epsilon"] is None and rows[2]["epsilon"] > rows[4]["epsilon"] > 0  # more noise, less epsilon
    assert (out / "results.csv").read_text().count("\n") == 7
    assert (out / "privacy_accuracy.png").stat().st_size > 5000
    assert "| z2-C1 |" in (out / "table.md").read_text()


# --------------------------------------------------------------------------- bounded answers (issue 9)


def test_tiny_noise_falls_back_to_rdp_and_says_so():
    # on the PLD grid this needed 3.55 PiB (z = 1e-6) or 112 s and 3.4 GB (z = 1e-2)
    for z in ("1e-6", "1e-2"):
        r = fedmeta("privacy", "epsilon", "--noise-multiplier", z, "--sample-rate", "0.01", "--rounds", "1000", timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        notes = [l for l in r.stderr.splitlines() if l.startswith("fedmeta:")]
        assert len(notes) == 1 and "grid points" in notes[0] and "--accountant rdp" in notes[0], r.stderr
        lines = r.stdout.strip().splitlines()
        assert lines[0].startswith("accountant=rdp ")
        from fedmeta.privacy import compute_epsilon

        assert float(lines[-1]) == pytest.approx(compute_epsilon(float(z), 0.01, 1000, 1e-5, "rdp"), rel=1e-6)


def test_calibrate_with_huge_target_or_rounds_returns():
    for target, rounds in (("1e6", "1000"), ("3", "1000000000")):
        r = fedmeta("privacy", "calibrate", "--target-epsilon", target, "--sample-rate", "0.01", "--rounds", rounds, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        z = float(r.stdout.strip().splitlines()[-1])
        from fedmeta.privacy import compute_epsilon

        assert compute_epsilon(z, 0.01, int(rounds), 1e-5, "rdp") <= float(target)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--rounds", "1e20"], "fedmeta: privacy.rounds: must be <= 1e+12, got 1e+20"),
        (["--rounds", "100000000000000000000"], "fedmeta: privacy.rounds: must be <= 1e+12"),
        (["--rounds", "2.5"], "fedmeta: privacy.rounds: must be an integer in [1, 1e+12], got 2.5"),
        (["--rounds", "abc"], "fedmeta: privacy epsilon: argument --rounds: invalid integer value: 'abc'"),
        ([], "fedmeta: privacy epsilon: the following arguments are required: --rounds"),
        (["--rounds", "10", "--noise-multiplier", "1e300"], "fedmeta: privacy.noise_multiplier: must be <= 1e+06"),
        (["--rounds", "10", "--sample-rate", "nan"], "fedmeta: privacy.sample_rate: must not be NaN"),
    ],
)
def test_bad_arguments_are_one_line_without_usage(capsys, args, expected):
    from fedmeta.cli import main

    base = ["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01"]
    try:
        code = main(base + args)
    except SystemExit as exit_:  # argparse's own errors exit from inside parse_args
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(expected), err
