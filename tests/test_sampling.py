"""The one client sampler, ``fedmeta.federation.sample_cohort``: its draws, its statistics, its determinism.

The privacy accountant assumes Poisson sampling at rate q; these tests check the
sampler that actually runs does that (and that the accountant is handed the same q).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmeta.config import build_config
from fedmeta.federation import Server, sample_cohort, sample_rate

ROUNDS = 2000  # rounds drawn for the frequency tests (deterministic: the seeds are fixed)


def cfg_with(*overrides: str):
    return build_config({}, list(overrides))


def inclusion_counts(cfg, population: list[int], rounds: int = ROUNDS) -> tuple[np.ndarray, list[int]]:
    index = {c: i for i, c in enumerate(population)}
    counts, sizes = np.zeros(len(population)), []
    for rnd in range(1, rounds + 1):
        cohort = sample_cohort(cfg, population, rnd)
        assert cohort == sorted(cohort, key=index.__getitem__) and len(set(cohort)) == len(cohort)
        for c in cohort:
            counts[index[c]] += 1
        sizes.append(len(cohort))
    return counts, sizes


def test_draws_are_pinned():
    """The exact cohorts the default config draws: docs/benchmarks.md's numbers depend on them."""
    population = list(range(48))
    fixed, poisson = cfg_with(), cfg_with("simulation.sampling=poisson")
    assert sample_cohort(fixed, population, 1) == [0, 1, 2, 10, 14, 15, 21, 28, 31, 39]
    assert sample_cohort(fixed, population, 2, attempt=1) == [0, 7, 14, 15, 17, 26, 28, 29, 37, 41]
    assert sample_cohort(poisson, population, 1) == [0, 5, 12, 18, 47]
    assert sample_cohort(poisson, population, 3, attempt=2) == [1, 9, 20, 23, 26, 35, 36, 37, 40, 41]


def test_poisson_inclusion_rate():
    cfg = cfg_with("simulation.sampling=poisson")  # 10 per round of 48 training clients
    population = list(range(100, 148))
    q = sample_rate(cfg, len(population))
    assert q == 10 / 48
    counts, sizes = inclusion_counts(cfg, population)
    sd = math.sqrt(q * (1 - q) / ROUNDS)  # of one client's inclusion frequency
    assert np.abs(counts / ROUNDS - q).max() < 5 * sd  # every client joins at rate q
    assert np.mean(sizes) == pytest.approx(q * len(population), abs=5 * math.sqrt(q * (1 - q) * len(population) / ROUNDS))
    assert np.var(sizes) == pytest.approx(len(population) * q * (1 - q), rel=0.15)  # Binomial(N, q): the size varies


def test_poisson_cohort_may_be_empty_and_rate_is_capped():
    cfg = cfg_with("simulation.sampling=poisson", "simulation.clients_per_round=1")
    population = list(range(40))  # q = 1/40: P(empty) = (39/40)^40 ~ 0.36
    sizes = [len(sample_cohort(cfg, population, r)) for r in range(1, 201)]
    assert 0 in sizes and max(sizes) > 0
    few = list(range(5))  # fewer clients than clients_per_round: q = min(1, 10/5)
    assert sample_rate(cfg_with(), len(few)) == 1.0
    assert all(sample_cohort(cfg_with("simulation.sampling=poisson"), few, r) == few for r in range(1, 20))


def test_fixed_size_is_uniform_without_replacement():
    cfg = cfg_with()  # fixed, 10 per round
    population = list(range(48))
    counts, sizes = inclusion_counts(cfg, population)
    assert set(sizes) == {10}
    p = 10 / 48
    sd = math.sqrt(p * (1 - p) / ROUNDS)
    assert np.abs(counts / ROUNDS - p).max() < 5 * sd  # each client equally likely
    chi2 = float(((counts - ROUNDS * p) ** 2 / (ROUNDS * p)).sum())
    assert chi2 < 47 + 5 * math.sqrt(2 * 47)  # counts consistent with uniform (df = 47); lower than that is fine: sizes are fixed
    assert sample_cohort(cfg, list(range(7)), 1) == list(range(7))  # k = min(clients_per_round, N)


def test_deterministic_per_seed_round_attempt():
    population = list(range(48))
    for sampling in ("fixed", "poisson"):
        cfg = cfg_with(f"simulation.sampling={sampling}")
        again = cfg_with(f"simulation.sampling={sampling}", "simulation.rounds=7", "meta.inner_steps=3")  # other keys: same draws
        other_seed = cfg_with(f"simulation.sampling={sampling}", "simulation.seed=1")
        other_data = cfg_with(f"simulation.sampling={sampling}", "data.seed=5")  # the data seed does not drive sampling
        for rnd in (1, 2, 50):
            for attempt in (0, 1):
                cohort = sample_cohort(cfg, population, rnd, attempt)
                assert sample_cohort(again, population, rnd, attempt) == cohort
                assert sample_cohort(other_data, population, rnd, attempt) == cohort
        draws = {(s, r, a): tuple(sample_cohort(c, population, r, a)) for s, c in ((0, cfg), (1, other_seed)) for r in range(1, 11) for a in range(3)}
        assert len(set(draws.values())) == len(draws)  # a new seed, round or attempt gives a new cohort


def test_the_accountant_gets_the_samplers_rate():
    cfg = cfg_with("privacy.enabled=true", "simulation.sampling=poisson", "simulation.clients_per_round=12")
    server = Server(cfg, {"w": torch.zeros(1)}, 48)
    assert server.privacy.sample_rate == sample_rate(cfg, 48) == 12 / 48
    assert server.privacy.denominator == pytest.approx(12.0)  # fixed q*N
