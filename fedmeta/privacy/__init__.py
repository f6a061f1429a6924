"""Client-level differential privacy: accounting, DP-FedAvg mechanism, sampling.

Plain functions on tensors; the engines / Flower apps wire them together:

* :mod:`.accountant` -- epsilon for T rounds of the Poisson-sampled Gaussian
  (dp_accounting PLD or RDP), calibration, running :class:`Accountant`.
* :mod:`.mechanism` -- clipping, Gaussian noise, DP-FedAvg mean with a fixed
  denominator, adaptive clipping (Andrew et al. 2021).
* :mod:`.sampling` -- Poisson / fixed-size client sampling and the DP check.
"""

from .accountant import (
    ACCOUNTANT_KINDS,
    PLD_VALUE_DISCRETIZATION,
    RDP_ORDERS,
    Accountant,
    PrivacyError,
    calibrate_noise,
    compute_epsilon,
    rounds_within_budget,
    validate_accountant_kind,
    validate_clip_norm,
    validate_delta,
    validate_noise_multiplier,
    validate_rounds,
    validate_sample_rate,
    validate_target_epsilon,
)
from .mechanism import (
    CLIENT_CLIP_TOLERANCE,
    AdaptiveClipper,
    NonFiniteUpdateError,
    adjusted_noise_multiplier,
    clip_update,
    default_clipped_count_stddev,
    global_norm,
    mean_noise_std,
    noise_like,
    noisy_mean_of_clipped,
    private_mean,
    private_sum,
)
from .sampling import (
    SAMPLING_SCHEMES,
    check_sampling_for_dp,
    expected_cohort_size,
    fixed_size_sample,
    poisson_sample,
)

__all__ = [
    "ACCOUNTANT_KINDS",
    "PLD_VALUE_DISCRETIZATION",
    "RDP_ORDERS",
    "Accountant",
    "PrivacyError",
    "calibrate_noise",
    "compute_epsilon",
    "rounds_within_budget",
    "validate_accountant_kind",
    "validate_clip_norm",
    "validate_delta",
    "validate_noise_multiplier",
    "validate_rounds",
    "validate_sample_rate",
    "validate_target_epsilon",
    "CLIENT_CLIP_TOLERANCE",
    "AdaptiveClipper",
    "NonFiniteUpdateError",
    "adjusted_noise_multiplier",
    "clip_update",
    "default_clipped_count_stddev",
    "global_norm",
    "mean_noise_std",
    "noise_like",
    "noisy_mean_of_clipped",
    "private_mean",
    "private_sum",
    "SAMPLING_SCHEMES",
    "check_sampling_for_dp",
    "expected_cohort_size",
    "fixed_size_sample",
    "poisson_sample",
]
