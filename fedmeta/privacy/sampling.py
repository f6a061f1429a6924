"""Client sampling for training rounds.

The privacy accountant (:mod:`fedmeta.privacy.accountant`) accounts *Poisson*
sampling only: every client joins a round independently with probability q,
so the cohort size is random (and may be 0), and the DP-FedAvg mean divides by
the fixed expected cohort size q*N (:func:`expected_cohort_size`).

Fixed-size sampling (k clients uniformly without replacement) has a different
amplification analysis (replace-one adjacency, different bounds); it is offered
for non-private runs only.  :func:`check_sampling_for_dp` refuses it when DP is
enabled, so the server never reports an epsilon for a scheme it does not use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .accountant import PrivacyError, validate_sample_rate

__all__ = [
    "SAMPLING_SCHEMES",
    "poisson_sample",
    "fixed_size_sample",
    "expected_cohort_size",
    "check_sampling_for_dp",
]

#: Accepted names of sampling schemes (``simulation.sampling`` in the config).
SAMPLING_SCHEMES: tuple[str, ...] = ("poisson", "fixed")

Generator = np.random.Generator | torch.Generator | None


def _population_list(population: Sequence[int] | torch.Tensor | np.ndarray) -> list[int]:
    if isinstance(population, torch.Tensor):
        if population.dim() != 1:
            raise PrivacyError(f"population: must be 1-D, got shape {tuple(population.shape)}")
        return [int(x) for x in population.tolist()]
    return [int(x) for x in population]


def _uniforms(n: int, generator: Generator) -> np.ndarray:
    if isinstance(generator, torch.Generator):
        return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()
    if generator is None:
        generator = np.random.default_rng()
    if not isinstance(generator, np.random.Generator):
        raise PrivacyError(
            f"generator: must be a numpy.random.Generator or torch.Generator, got {type(generator).__name__}"
        )
    return generator.random(n)


def poisson_sample(
    population: Sequence[int] | torch.Tensor | np.ndarray,
    rate: float,
    generator: Generator = None,
) -> list[int]:
    """Each client id independently with probability ``rate``; population order kept.

    The cohort size is Binomial(N, q) and may be 0 (the round must still run the
    mechanism: :func:`fedmeta.privacy.mechanism.private_mean` with ``like=``).
    """
    q = validate_sample_rate(rate, "privacy.sample_rate")
    ids = _population_list(population)
    if not ids:
        return []
    u = _uniforms(len(ids), generator)
    return [cid for cid, x in zip(ids, u) if x < q]


def fixed_size_sample(
    population: Sequence[int] | torch.Tensor | np.ndarray,
    k: int,
    generator: Generator = None,
) -> list[int]:
    """``k`` distinct client ids uniformly without replacement (population order kept).

    Not accounted by this package: do not use with DP (see :func:`check_sampling_for_dp`).
    """
    ids = _population_list(population)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= len(ids):
        raise PrivacyError(f"k: must be an integer in [0, {len(ids)}], got {k!r}")
    if k == 0:
        return []
    if isinstance(generator, torch.Generator):
        idx = torch.randperm(len(ids), generator=generator, device=generator.device)[:k].cpu().tolist()
    else:
        rng = np.random.default_rng() if generator is None else generator
        if not isinstance(rng, np.random.Generator):
            raise PrivacyError(
                f"generator: must be a numpy.random.Generator or torch.Generator, got {type(generator).__name__}"
            )
        idx = rng.choice(len(ids), size=int(k), replace=False).tolist()
    return [ids[i] for i in sorted(idx)]


def expected_cohort_size(population_size: int, rate: float) -> float:
    """q * N: the fixed denominator of the DP-FedAvg mean under Poisson sampling."""
    q = validate_sample_rate(rate, "privacy.sample_rate")
    if isinstance(population_size, bool) or not isinstance(population_size, (int, np.integer)) or population_size < 1:
        raise PrivacyError(f"population_size: must be an integer >= 1, got {population_size!r}")
    return q * int(population_size)


def check_sampling_for_dp(sampling: str, dp_enabled: bool) -> None:
    """Raise :class:`PrivacyError` unless ``sampling`` can be used with this DP setting.

    With DP enabled only ``"poisson"`` is allowed, because the accountant
    accounts Poisson sampling (amplification with rate q) and nothing else.
    """
    if sampling not in SAMPLING_SCHEMES:
        raise PrivacyError(f"simulation.sampling: must be one of {', '.join(SAMPLING_SCHEMES)}, got {sampling!r}")
    if dp_enabled and sampling != "poisson":
        raise PrivacyError(
            f"simulation.sampling: must be 'poisson' when privacy.enabled (the accountant covers Poisson sampling only), got {sampling!r}"
        )
