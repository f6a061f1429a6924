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
