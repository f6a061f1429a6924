"""Privacy accounting: independent cross-checks, anchors, calibration, running accountant."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import optimize, special, stats

import dp_accounting
from fedmeta.privacy import (
    Accountant,
    PrivacyError,
    calibrate_noise,
    compute_epsilon,
    rounds_within_budget,
)

DELTA = 1e-5

# ANCHORS.md, "Differential privacy": (q, z, T, RDP, PLD)
ANCHORS = [
    (0.01, 1.0, 1000, 2.1014, 1.8282),
    (0.1, 1.0, 100, 7.9039, 7.0466),
    (1.0, 1.0, 10, 19.0536, 17.8566),
    (0.05, 0.8, 500, 13.4062, 12.0352),
    (1.0, 5.0, 100, 10.7255, 9.9973),
]


# --------------------------------------------------------------------------- independent references


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon(delta) of the Gaussian mechanism with mu = sensitivity / std (Balle & Wang 2018):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), inverted by root finding."""

    def delta_of(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12)


TEST_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def numerical_sampled_gaussian_rdp(q: float, sigma: float, order: float) -> float:
    """RDP of the Poisson-sampled Gaussian (Mironov, Talwar & Zhang 2019) by direct numerical integration:
    eps(a) = log E_{x~N(0,s^2)}[((1-q) + q exp((2x-1)/(2 s^2)))^a] / (a-1).
    The integrand is concentrated near x in [-40s, a + 40s]; a Riemann sum on a fine grid is
    essentially exact for these smooth, Gaussian-tailed integrands."""
    dx = sigma / 50.0
    x = np.arange(-40.0 * sigma, order + 40.0 * sigma, dx)
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2.0 * x - 1.0) / (2.0 * sigma**2))
    log_integrand = stats.norm.logpdf(x, scale=sigma) + order * log_ratio
    log_a = special.logsumexp(log_integrand) + math.log(dx)
    return float(log_a / (order - 1.0))


def rdp_to_epsilon(orders, rdp, delta: float) -> float:
    """RDP -> (eps, delta), Prop. 12 of Canonne, Kamath & Steinke 2020 (the conversion dp_accounting uses)."""
    best = math.inf
    for a, r in zip(orders, rdp):
        if a <= 1.01:
            continue
        best = min(best, r + math.log1p(-1.0 / a) - math.log(delta * a) / (a - 1.0))
    return max(best, 0.0)


def independent_rdp_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    rdp = [rounds * numerical_sampled_gaussian_rdp(q, z, a) for a in TEST_ORDERS]
    return rdp_to_epsilon(TEST_ORDERS, rdp, delta)


# --------------------------------------------------------------------------- one-shot epsilon


@pytest.mark.parametrize("z,rounds", [(1.0, 10), (5.0, 100), (2.0, 50), (0.7, 3)])
def test_full_participation_matches_exact_gaussian(z, rounds):
    """q = 1: T Gaussians with multiplier z == one Gaussian with z / sqrt(T), exact epsilon."""
    expected = exact_gaussian_epsilon(math.sqrt(rounds) / z, DELTA)
    got = compute_epsilon(z, 1.0, rounds, DELTA, "pld")
    assert got == pytest.approx(expected, rel=1e-3)
    assert got >= expected * (1 - 1e-6)  # pessimistic PLD: an upper bound
    # the running accountant composes round by round and must agree too
    acc = Accountant("pld")
    for _ in range(rounds):
        acc.step(z, 1.0)
    assert acc.epsilon(DELTA) == pytest.approx(expected, rel=2e-3)


def test_full_participation_rdp_matches_closed_form():
    # Gaussian RDP is a / (2 z^2) per round; convert with the same conversion.
    z, rounds = 1.0, 10
    rdp = [rounds * a / (2 * z * z) for a in TEST_ORDERS]
    assert compute_epsilon(z, 1.0, rounds, DELTA, "rdp") == pytest.approx(rdp_to_epsilon(TEST_ORDERS, rdp, DELTA), rel=1e-9)


@pytest.mark.parametrize("q,z,rounds", [(0.01, 1.0, 1000), (0.1, 1.0, 100), (0.05, 0.8, 500), (0.02, 2.0, 300)])
def test_sampled_rdp_matches_numerical_integration(q, z, rounds):
    """RDP vs an independent numerical integration of A_alpha.

    Integer orders agree to ~1e-9.  For fractional orders dp_accounting 0.6.0
    sums the *absolute values* of the alternating binomial series
    (``_compute_log_a_frac``), i.e. an upper bound on A_alpha, so its epsilon
    may be slightly larger than the exact-RDP one (0.5 % at q=0.05, z=0.8,
    T=500): conservative, and within 1 %.
    """
    expected = independent_rdp_epsilon(q, z, rounds, DELTA)
    got = compute_epsilon(z, q, rounds, DELTA, "rdp")
    assert expected * (1 - 1e-6) <= got <= expected * 1.01

    int_orders = [a for a in TEST_ORDERS if float(a).is_integer()]
    lib = dp_accounting.rdp.RdpAccountant(orders=int_orders)
    lib.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    ours = np.array([rounds * numerical_sampled_gaussian_rdp(q, z, a) for a in int_orders])
    np.testing.assert_allclose(lib.rdp, ours, rtol=1e-8)


@pytest.mark.parametrize("q,z,rounds", [(0.01, 1.0, 1000), (0.1, 1.0, 100)])
def test_sampled_pld_matches_prv_accountant(q, z, rounds):
    """Independent implementation: Microsoft's prv-accountant (Gopi, Lee & Wutschitz 2021)."""
    import prv_accountant  # test-only dependency (the dev extra); an independent PLD implementation
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    prv = prv_accountant.PRVAccountant(
        prvs=PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=z),
        max_self_compositions=rounds,
        eps_error=0.01,
        delta_error=1e-10,
    )
    lo, est, hi = prv.compute_epsilon(delta=DELTA, num_self_compositions=rounds)
    got = compute_epsilon(z, q, rounds, DELTA, "pld")
    assert got == pytest.approx(est, rel=1e-2)
    assert lo - 1e-3 <= got <= hi + 1e-3


@pytest.mark.parametrize("q,z,rounds,rdp_ref,pld_ref", ANCHORS)
def test_anchor_table(q, z, rounds, rdp_ref, pld_ref):
    assert compute_epsilon(z, q, rounds, DELTA, "pld") == pytest.approx(pld_ref, rel=2e-3)
    assert compute_epsilon(z, q, rounds, DELTA, "rdp") == pytest.approx(rdp_ref, rel=2e-3)


def test_abadi_anchor_with_fine_grid():
    # q = 0.01, sigma = 4, T = 10000: RDP 1.035, PLD 0.947 (the default 1e-3 grid gives ~0.960, conservative)
    assert compute_epsilon(4.0, 0.01, 10_000, DELTA, "rdp") == pytest.approx(1.035, abs=2e-3)
    fine = compute_epsilon(4.0, 0.01, 10_000, DELTA, "pld", value_discretization_interval=1e-4)
    assert fine == pytest.approx(0.947, abs=2e-3)
    assert fine <= compute_epsilon(4.0, 0.01, 10_000, DELTA, "pld") <= fine * 1.02


def test_zero_noise_is_infinite_and_monotone():
    assert compute_epsilon(0.0, 0.1, 10, DELTA) == math.inf
    assert compute_epsilon(0.0, 0.1, 10, DELTA, "rdp") == math.inf
    for kind in ("pld", "rdp"):
        e = [compute_epsilon(2.0, 0.1, t, DELTA, kind) for t in (10, 20, 40)]
        assert e[0] < e[1] < e[2]
        assert compute_epsilon(2.0, 0.05, 20, DELTA, kind) < compute_epsilon(2.0, 0.1, 20, DELTA, kind)
        assert compute_epsilon(3.0, 0.1, 20, DELTA, kind) < compute_epsilon(2.0, 0.1, 20, DELTA, kind)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("kind,anchor", [("pld", 0.8136), ("rdp", 0.8646)])
def test_calibrate_noise_anchor(kind, anchor):
    z = calibrate_noise(3.0, 0.01, 1000, DELTA, kind, tol=1e-4)
    assert z == pytest.approx(anchor, abs=3e-4)
    assert compute_epsilon(z, 0.01, 1000, DELTA, kind) <= 3.0  # never over budget
    assert compute_epsilon(z - 2e-3, 0.01, 1000, DELTA, kind) > 3.0  # and (nearly) the smallest


def test_rounds_within_budget():
    for kind in ("pld", "rdp"):
        t = rounds_within_budget(2.0, 10.0, 1.0, DELTA, kind)
        assert t > 10
        assert compute_epsilon(10.0, 1.0, t, DELTA, kind) <= 2.0 < compute_epsilon(10.0, 1.0, t + 1, DELTA, kind)
    assert rounds_within_budget(0.01, 0.5, 1.0, DELTA) == 0


# --------------------------------------------------------------------------- running accountant


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_accountant_matches_one_shot(kind):
    acc = Accountant(kind)
    assert acc.epsilon(DELTA) == 0.0
    for _ in range(50):
        acc.step(1.0, 0.1)
    assert acc.rounds == 50
    assert acc.epsilon(DELTA) == pytest.approx(compute_epsilon(1.0, 0.1, 50, DELTA, kind), rel=1e-4)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_accountant_heterogeneous_history(kind):
    """Mixed (z, q) rounds compose like dp_accounting's own accountant on the composed event."""
    plan = [(1.0, 0.1, 5), (1.5, 0.05, 7), (1.0, 0.1, 3), (0.9, 1.0, 2)]
    acc = Accountant(kind)
    for z, q, n in plan:
        for _ in range(n):
            acc.step(z, q)
    events = []
    for z, q, n in plan:
        g = dp_accounting.GaussianDpEvent(z)
        events.append(dp_accounting.SelfComposedDpEvent(g if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, g), n))
    ref = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3) if kind == "pld" else dp_accounting.rdp.RdpAccountant()
    ref.compose(dp_accounting.ComposedDpEvent(events))
    assert acc.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-3)
    # and it is not what a single (z, q) would give
    assert acc.epsilon(DELTA) != pytest.approx(compute_epsilon(1.0, 0.1, 17, DELTA, kind), rel=1e-2)
    assert acc.history == [(1.0, 0.1, 5), (1.5, 0.05, 7), (1.0, 0.1, 3), (0.9, 1.0, 2)]


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_accountant_state_round_trip(kind):
    straight = Accountant(kind)
    for _ in range(20):
        straight.step(1.1, 0.05)

    first = Accountant(kind)
    for _ in range(10):
        first.step(1.1, 0.05)
    eps10 = first.epsilon(DELTA)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
    assert state["kind"] == kind and state["history"] == [[1.1, 0.05, 10]]

    resumed = Accountant.from_state(state)
    assert resumed.epsilon(DELTA) == pytest.approx(eps10, rel=1e-9)  # continues, never restarts at 0
    for _ in range(10):
        resumed.step(1.1, 0.05)
    assert resumed.rounds == 20
    assert resumed.epsilon(DELTA) == pytest.approx(straight.epsilon(DELTA), rel=1e-6)

    other = Accountant("rdp" if kind == "pld" else "pld")
    other.load_state_dict(state)  # the state is authoritative, kind included
    assert other.kind == kind and other.epsilon(DELTA) == pytest.approx(eps10, rel=1e-9)


def test_accountant_zero_noise_round_is_infinite():
    acc = Accountant()
    acc.step(1.0, 0.1)
    acc.step(0.0, 0.1)
    acc.step(1.0, 0.1)
    assert acc.epsilon(DELTA) == math.inf
    assert Accountant.from_state(acc.state_dict()).epsilon(DELTA) == math.inf


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_would_exceed_stops_before_budget(kind):
    z, q = 1.0, 0.1
    target = (compute_epsilon(z, q, 30, DELTA, kind) + compute_epsilon(z, q, 31, DELTA, kind)) / 2
    acc = Accountant(kind)
    taken = 0
    while not acc.would_exceed(target, DELTA, z, q):
        acc.step(z, q)
        taken += 1
        assert taken <= 40
    assert taken == 30
    assert acc.epsilon(DELTA) <= target < acc.epsilon_after(DELTA, z, q)


def test_accountant_epsilon_per_round_is_cheap():
    acc = Accountant("pld")
    acc.step(0.8, 0.05, count=400)
    start = time.process_time()  # CPU time: robust to a loaded machine
    for _ in range(20):
        acc.step(0.8, 0.05)
        acc.epsilon(DELTA)
    per_round = (time.process_time() - start) / 20
    assert per_round < 0.2, per_round
    assert acc.epsilon(DELTA) == pytest.approx(compute_epsilon(0.8, 0.05, 420, DELTA), rel=1e-4)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(noise_multiplier=-1.0), "privacy.noise_multiplier"),
        (dict(noise_multiplier=float("nan")), "privacy.noise_multiplier"),
        (dict(delta=0.0), "privacy.delta"),
        (dict(delta=1.0), "privacy.delta"),
        (dict(delta=-1e-5), "privacy.delta"),
        (dict(sample_rate=0.0), "privacy.sample_rate"),
        (dict(sample_rate=1.5), "privacy.sample_rate"),
        (dict(rounds=0), "privacy.rounds"),
        (dict(accountant="moments"), "privacy.accountant"),
    ],
)
def test_bad_inputs_raise_one_line_privacy_error(kwargs, param):
    args = dict(noise_multiplier=1.0, sample_rate=0.1, rounds=10, delta=DELTA, accountant="pld")
    args.update(kwargs)
    with pytest.raises(PrivacyError) as info:
        compute_epsilon(**args)
    msg = str(info.value)
    assert msg.startswith(param + ":") and "\n" not in msg
    assert isinstance(info.value, ValueError)


def test_bad_inputs_elsewhere():
    with pytest.raises(PrivacyError, match=r"^privacy.noise_multiplier: must be >= 0, got -1"):
        Accountant().step(-1, 0.1)
    with pytest.raises(PrivacyError, match=r"^privacy.sample_rate:"):
        Accountant().step(1.0, 0.0)
    with pytest.raises(PrivacyError, match=r"^privacy.target_epsilon:"):
        calibrate_noise(0.0, 0.01, 100, DELTA)
    with pytest.raises(PrivacyError, match=r"^privacy.delta:"):
        Accountant().epsilon(2.0)
    with pytest.raises(PrivacyError, match=r"^accountant state"):
        Accountant.from_state({"kind": "pld", "history": [[1.0, 2.0, 3]]})


# --------------------------------------------------------------------------- bounded cost (issue 9)

from fedmeta.privacy import accountant as acc_mod  # noqa: E402
from fedmeta.privacy.accountant import PLDTooLargeError, pld_grid_points  # noqa: E402


@pytest.mark.parametrize("z,q,rounds", [(1.0, 0.01, 1000), (0.8, 0.05, 500), (1.0, 1.0, 10), (0.3, 0.01, 200), (2.0, 0.1, 1)])
def test_pld_size_estimate_matches_the_grid_built(z, q, rounds):
    """The up-front estimate is what dp_accounting then builds (within a couple of points)."""
    built = acc_mod._rounds_pld(z, q, rounds, acc_mod.PLD_VALUE_DISCRETIZATION)
    actual = max(built._pmf_remove.size, built._pmf_add.size)
    assert abs(pld_grid_points(z, q, rounds) - actual) <= 3


@pytest.mark.parametrize("z,q,rounds", [(1e-6, 0.01, 1000), (1e-2, 0.01, 1000), (1.0, 0.01, 10**9), (1e-3, 1.0, 10)])
def test_pld_refuses_grids_that_would_not_fit_before_building_them(z, q, rounds):
    with pytest.raises(PLDTooLargeError) as info:
        compute_epsilon(z, q, rounds, DELTA, "pld")
    msg = str(info.value)
    assert msg.startswith("privacy.accountant: PLD for") and "grid points" in msg and "\n" not in msg
    assert info.value.points > acc_mod.PLD_MAX_ROUND_POINTS
    assert isinstance(info.value, PrivacyError)
    assert math.isfinite(compute_epsilon(z, q, rounds, DELTA, "rdp"))  # the fallback has an answer


def test_rdp_is_closed_form_in_rounds_and_rounds_are_bounded():
    one = compute_epsilon(1.0, 0.01, 10**9, DELTA, "rdp")
    assert math.isfinite(one) and compute_epsilon(1.0, 0.01, 10**12, DELTA, "rdp") > one
    for bad in (10**12 + 1, 1e20, 10**20):
        with pytest.raises(PrivacyError, match=r"^privacy.rounds: must be <= 1e\+12"):
            compute_epsilon(1.0, 0.01, bad, DELTA, "rdp")


def test_noise_below_the_floor_is_no_privacy_not_zero_epsilon():
    # dp_accounting's RDP underflows to epsilon = 0 near z = 1e-160 and divides by zero below
    for z in (1e-160, 1e-200, 5e-324, 1e-7):
        for kind in ("pld", "rdp"):
            assert compute_epsilon(z, 0.5, 10, DELTA, kind) == math.inf
    acc = Accountant("rdp")
    acc.step(1e-200, 0.5)
    assert acc.epsilon(DELTA) == math.inf
    with pytest.raises(PrivacyError, match=r"^privacy.noise_multiplier: must be <= 1e\+06"):
        compute_epsilon(1e300, 0.01, 10, DELTA)


def test_calibration_of_a_huge_target_is_bounded():
    with pytest.raises(PLDTooLargeError):
        calibrate_noise(1e6, 0.01, 1000, DELTA, "pld")
    z = calibrate_noise(1e6, 0.01, 1000, DELTA, "rdp")
    assert 1e-3 <= z < 0.1 and compute_epsilon(z, 0.01, 1000, DELTA, "rdp") <= 1e6
    z = calibrate_noise(3.0, 0.01, 10**9, DELTA, "rdp")
    assert compute_epsilon(z, 0.01, 10**9, DELTA, "rdp") <= 3.0 < compute_epsilon(z * 0.99, 0.01, 10**9, DELTA, "rdp")


def test_running_pld_accountant_falls_back_to_rdp_and_resumes_the_same(caplog):
    acc = Accountant("pld")
    acc.step(1.0, 0.1, count=3)
    assert acc.effective_kind == "pld" and acc.fallback_reason is None
    with caplog.at_level("WARNING", logger="fedmeta.privacy"):
        assert acc.would_exceed(1e9, DELTA, 0.01, 0.1) is False  # z = 0.01: a 6M-point one-round grid
        acc.step(0.01, 0.1)
    assert acc.effective_kind == "rdp" and "grid points" in acc.fallback_reason
    assert [r.name for r in caplog.records] == ["fedmeta.privacy"]
    rdp = Accountant("rdp")
    rdp.step(1.0, 0.1, count=3)
    rdp.step(0.01, 0.1)
    assert acc.epsilon(DELTA) == pytest.approx(rdp.epsilon(DELTA), rel=1e-12)  # the whole history, in RDP
    acc.step(1.0, 0.1)
    again = Accountant.from_state(json.loads(json.dumps(acc.state_dict())))
    assert again.kind == "pld" and again.effective_kind == "rdp"
    assert again.epsilon(DELTA) == pytest.approx(acc.epsilon(DELTA), rel=1e-12)
