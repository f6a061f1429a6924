"""Client-level differential privacy: accounting and the DP-FedAvg mechanism.

Plain functions on tensors, wired into the round loop's server step by :mod:`.server`:

* :mod:`.accountant` -- epsilon for T rounds of the Poisson-sampled Gaussian
  (dp_accounting PLD or RDP), calibration, running :class:`Accountant`.
* :mod:`.mechanism` -- clipping, Gaussian noise, DP-FedAvg mean with a fixed
  denominator, adaptive clipping (Andrew et al. 2021).
* :mod:`.server` -- :class:`~.server.ServerPrivacy`, the two wired into the server step.

Client sampling is :func:`fedmeta.federation.sample_cohort` (the one sampler);
the rule "DP needs Poisson sampling" is checked once, when the config is built.
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
]
