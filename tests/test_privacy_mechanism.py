"""DP-FedAvg mechanism (clipping, noise, fixed denominator), adaptive clipping.

Client sampling is tested where it runs: tests/test_sampling.py (fedmeta.federation.sample_cohort)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmeta.privacy import (
    AdaptiveClipper,
    NonFiniteUpdateError,
    PrivacyError,
    adjusted_noise_multiplier,
    clip_update,
    global_norm,
    mean_noise_std,
    noise_like,
    noisy_mean_of_clipped,
    private_mean,
    private_sum,
)


def make_update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(7, 5, generator=g) * scale,
        "b": torch.randn(5, generator=g) * scale,
        "conv.weight": torch.randn(2, 3, 3, generator=g) * scale,
    }


def flat(update) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in update.values()])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- clipping


def test_global_norm_is_l2_over_all_tensors():
    u = make_update(0)
    assert float(global_norm(u)) == pytest.approx(float(flat(u).norm()), rel=1e-6)
    assert float(global_norm({})) == 0.0
    huge = {"w": torch.full((1000,), 1e30, dtype=torch.float32)}
    assert float(global_norm(huge)) == pytest.approx(1e30 * math.sqrt(1000), rel=1e-6)  # no float32 overflow


def test_clip_keeps_small_updates_and_scales_large_ones_along_direction():
    u = make_update(1)
    n = float(flat(u).norm())
    same, before = clip_update(u, n * 2)
    assert before == pytest.approx(n, rel=1e-6)
    assert all(torch.equal(same[k], u[k]) for k in u)

    clipped, before = clip_update(u, n / 4)
    assert before == pytest.approx(n, rel=1e-6)
    assert float(global_norm(clipped)) == pytest.approx(n / 4, rel=1e-5)
    cos = torch.nn.functional.cosine_similarity(flat(clipped), flat(u), dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-6)
    for k in u:  # same direction: every coordinate scaled by the same factor
        torch.testing.assert_close(clipped[k], u[k] * 0.25, rtol=1e-5, atol=1e-7)

    zero = {k: torch.zeros_like(t) for k, t in u.items()}
    out, before = clip_update(zero, 1.0)
    assert before == 0.0 and all(torch.count_nonzero(t) == 0 for t in out.values())


@pytest.mark.parametrize("value", [1e30, -3e38])
def test_clip_bounds_adversarially_huge_updates(value):
    u = {"w": torch.full((100, 100), value, dtype=torch.float32), "b": torch.ones(3)}
    clipped, before = clip_update(u, 0.5)
    assert math.isfinite(before) and before > 1e30
    assert all(torch.isfinite(t).all() for t in clipped.values())
    assert float(global_norm(clipped)) <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_rejects_non_finite_update(bad):
    u = make_update(2)
    u["b"][0] = bad
    with pytest.raises(NonFiniteUpdateError):
        clip_update(u, 1.0)


# --------------------------------------------------------------------------- DP-FedAvg mean


def test_noise_on_mean_has_std_zC_over_denominator():
    like = {"w": torch.zeros(200, 100), "b": torch.zeros(10_000)}
    zeros = [{k: torch.zeros_like(t) for k, t in like.items()} for _ in range(7)]
    clip, z, denom = 0.5, 1.3, 40.0
    out = private_mean(zeros, clip, z, denom, gen(0))
    noise = flat(out)
    expected = z * clip / denom
    assert expected == pytest.approx(mean_noise_std(clip, z, denom))
    assert float(noise.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.numel())
    # the denominator is fixed: 7 replies, but divided by 40 (noise std does not depend on the realised count)
    assert float(flat(private_mean(zeros[:2], clip, z, denom, gen(0))).std()) == pytest.approx(expected, rel=0.03)


def test_mean_divides_by_fixed_denominator_not_reply_count():
    ups = [make_update(s, scale=0.01) for s in range(5)]  # all below the clip norm
    out = private_mean(ups, clip_norm=10.0, noise_multiplier=0.0, denominator=20.0, generator=gen())
    expected = sum(flat(u) for u in ups) / 20.0
    torch.testing.assert_close(flat(out), expected, rtol=1e-5, atol=1e-7)


def test_sum_sensitivity_is_bounded_by_clip_norm():
    base = [make_update(s) for s in range(6)]
    adversary = {k: torch.full_like(t, 1e30) for k, t in base[0].items()}
    clip = 0.7
    without = private_sum(base, clip, 0.0, gen())
    with_adv = private_sum(base + [adversary], clip, 0.0, gen())
    diff = flat(with_adv) - flat(without)
    assert float(diff.norm()) <= clip * (1 + 1e-5)
    # each client's contribution is bounded too
    for u in base + [adversary]:
        assert float(flat(private_sum([u], clip, 0.0, gen())).norm()) <= clip * (1 + 1e-5)


def test_empty_cohort_still_releases_noise():
    like = {"w": torch.zeros(100, 100)}
    out = private_mean([], 1.0, 2.0, 10.0, gen(3), like=like)
    assert float(flat(out).std()) == pytest.approx(0.2, rel=0.05)
    with pytest.raises(PrivacyError, match="like"):
        private_mean([], 1.0, 2.0, 10.0, gen(3))


def test_noise_is_reproducible_from_generator():
    ups = [make_update(s) for s in range(3)]
    a = private_mean(ups, 1.0, 1.0, 3.0, gen(42))
    b = private_mean(ups, 1.0, 1.0, 3.0, gen(42))
    c = private_mean(ups, 1.0, 1.0, 3.0, gen(43))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(flat(a), flat(c))
    # draw does not depend on dict insertion order
    u = make_update(0)
    rev = dict(reversed(list(u.items())))
    n1, n2 = noise_like(u, 1.0, gen(5)), noise_like(rev, 1.0, gen(5))
    assert list(n2) == list(rev) and all(torch.equal(n1[k], n2[k]) for k in u)


def test_noise_like_matches_dtype_and_std():
    u = {"a": torch.zeros(50_000, dtype=torch.float64), "h": torch.zeros(10, dtype=torch.float16)}
    n = noise_like(u, 0.3, gen(1))
    assert n["a"].dtype == torch.float64 and n["h"].dtype == torch.float16
    assert float(n["a"].std()) == pytest.approx(0.3, rel=0.03)
    with pytest.raises(PrivacyError, match="std"):
        noise_like(u, -1.0, gen())


def test_non_finite_client_update_is_zeroed_or_rejected():
    ups = [make_update(s, 0.01) for s in range(3)]
    bad = make_update(9)
    bad["w"][0, 0] = float("nan")
    out = private_mean(ups + [bad], 10.0, 0.0, 4.0, gen())
    torch.testing.assert_close(flat(out), flat(private_mean(ups, 10.0, 0.0, 4.0, gen())))
    assert torch.isfinite(flat(private_mean(ups + [bad], 10.0, 1.0, 4.0, gen()))).all()
    with pytest.raises(NonFiniteUpdateError):
        private_mean(ups + [bad], 10.0, 0.0, 4.0, gen(), on_non_finite="raise")


def test_client_clipped_mode_verifies_norms():
    clip = 1.0
    ok = [clip_update(make_update(s), clip)[0] for s in range(4)]
    # slightly over C, within the 1e-5 tolerance: taken as is
    nudged = {k: t * (1 + 5e-6) for k, t in ok[0].items()}
    out = noisy_mean_of_clipped([nudged] + ok[1:], clip, 0.0, 4.0, gen())
    torch.testing.assert_close(flat(out), (flat(nudged) + sum(flat(u) for u in ok[1:])) / 4.0)
    # a client that lied about clipping is clipped by the server ...
    liar = make_update(7, scale=100.0)
    out = noisy_mean_of_clipped([liar], clip, 0.0, 1.0, gen())
    assert float(flat(out).norm()) <= clip * (1 + 1e-5)
    # ... or rejected
    with pytest.raises(PrivacyError, match=r"updates\[0\]"):
        noisy_mean_of_clipped([liar], clip, 0.0, 1.0, gen(), on_violation="raise")


def test_mean_rejects_mismatched_updates_and_bad_parameters():
    a, b = make_update(0), make_update(1)
    b["w"] = torch.zeros(3)
    with pytest.raises(PrivacyError, match="shape"):
        private_mean([a, b], 1.0, 1.0, 2.0, gen())
    with pytest.raises(PrivacyError, match=r"^privacy.clip_norm:"):
        private_mean([a], 0.0, 1.0, 2.0, gen())
    with pytest.raises(PrivacyError, match=r"^privacy.clip_norm:"):
        clip_update(a, -1.0)
    with pytest.raises(PrivacyError, match=r"^privacy.noise_multiplier: must be >= 0, got -1"):
        private_mean([a], 1.0, -1, 2.0, gen())
    with pytest.raises(PrivacyError, match=r"^denominator:"):
        private_mean([a], 1.0, 1.0, 0.0, gen())


# --------------------------------------------------------------------------- adaptive clipping


def test_adjusted_noise_multiplier():
    z, sb = 1.0, 5.0
    zd = adjusted_noise_multiplier(z, sb)
    assert zd > z
    assert zd**-2 + (2 * sb) ** -2 == pytest.approx(z**-2, rel=1e-12)  # combined mechanism keeps z
    assert adjusted_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(PrivacyError, match=r"^privacy.clipped_count_stddev:"):
        adjusted_noise_multiplier(1.0, 0.5)  # needs 2 sigma_b > z
    # same formula as Flower's helper (flwr 1.41: flwr.supercore.differential_privacy)
    import flwr.supercore.differential_privacy as flwr_dp
    _, flwr_zd = flwr_dp.compute_adaptive_noise_params(z, 100, sb)
    assert zd == pytest.approx(flwr_zd, rel=1e-12)


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.9])
def test_adaptive_clipper_tracks_target_quantile(quantile):
    rng = np.random.default_rng(0)
    dist = lambda n: rng.lognormal(mean=0.0, sigma=0.5, size=n)  # noqa: E731
    true_q = float(np.quantile(dist(200_000), quantile))
    clipper = AdaptiveClipper(initial_clip_norm=0.05, target_quantile=quantile, learning_rate=0.2, clipped_count_stddev=2.0)
    g = gen(0)
    history = []
    for _ in range(400):
        history.append(clipper.update(dist(100), expected_count=100, generator=g))
    assert history[0] > 0.05  # all norms above C: it grows
    assert float(np.mean(history[-100:])) == pytest.approx(true_q, rel=0.1)


def test_adaptive_clipper_single_step_and_state():
    clipper = AdaptiveClipper(2.0, target_quantile=0.5, learning_rate=0.2)  # sigma_b = 0: exact step
    new = clipper.update(torch.tensor([0.1, 0.5, 1.0, 1.9]), expected_count=4)
    assert new == pytest.approx(2.0 * math.exp(-0.2 * (1.0 - 0.5)))  # all unclipped -> shrink
    new = clipper.update([5.0, 6.0, float("nan"), 7.0], expected_count=4)
    assert new == pytest.approx(2.0 * math.exp(-0.1) * math.exp(-0.2 * (0.0 - 0.5)))  # all clipped -> grow
    # fraction uses the fixed expected count and the bits centred at 1/2
    c0 = clipper.clip_norm
    clipper.update([0.0, 0.0], expected_count=8)
    assert clipper.last_unclipped_fraction == pytest.approx(0.5 + (2 - 1.0) / 8)
    assert clipper.clip_norm == pytest.approx(c0 * math.exp(-0.2 * (clipper.last_unclipped_fraction - 0.5)))

    restored = AdaptiveClipper(1.0)
    restored.load_state_dict(clipper.state_dict())
    assert restored.state_dict() == clipper.state_dict()
    with pytest.raises(PrivacyError, match=r"^privacy.target_quantile:"):
        AdaptiveClipper(1.0, target_quantile=1.5)
    with pytest.raises(PrivacyError, match=r"^privacy.clip_norm:"):
        AdaptiveClipper(0.0)
