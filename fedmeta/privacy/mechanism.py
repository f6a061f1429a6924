"""DP-FedAvg mechanism on tensors: clipping, Gaussian noise, adaptive clipping.

Updates are ``dict[str, Tensor]`` of parameter deltas Delta = phi - theta (the
Reptile direction).  The mechanism of one round is DP-FedAvg (McMahan et al.
2018, "Learning Differentially Private Recurrent Language Models"):

    mean = ( sum_i clip(Delta_i, C) + N(0, (z C)^2 I) ) / D

with D the *fixed* denominator q * N (expected cohort size under Poisson
sampling with rate q over N clients), never the number of clients that
replied.  With a fixed D the sum has L2 sensitivity C under add/remove-one-
client adjacency, which is exactly what :mod:`fedmeta.privacy.accountant`
accounts (Poisson-sampled Gaussian with multiplier z).  Dividing by the
realised count would make the output depend on the count itself.

Why not Flower's DP wrappers (checked against the installed flwr 1.41 source,
``flwr/serverapp/strategy/dp_fixed_clipping.py``, ``dp_adaptive_clipping.py``
and the helpers in ``flwr/supercore/differential_privacy.py``, which in 1.41
replaced ``flwr/common/differential_privacy.py``):

* The noise std is ``compute_stdv(z, C, num_sampled_clients) = z*C /
  num_sampled_clients`` and it is added to the *aggregated parameters* returned
  by the wrapped strategy (FedAvg's average of client parameters, which that
  code requires to have uniform weights when accounting).  ``num_sampled_clients``
  is a constructor constant that must equal the realised number of replies
  (a mismatch is only a warning, or aborts aggregation when Flower's accountant
  is on), i.e. it is the realised-count estimator, not the fixed-denominator
  estimator that Poisson-sampling amplification assumes.  Flower's RDP
  accountant (``flwr/supercore/privacy_accounting``) can express Poisson
  events, but the fixed-clipping wrappers refuse any accountant whose
  ``sampling_method`` is not ``"no-amplification"``.
* Noise on the aggregated parameters is noise on theta_new, not on the Reptile
  update: with an outer step size beta (theta += beta * mean) the noise must
  be added to the mean update before scaling.
* The helpers are NumPy, in-place, and draw noise from the global
  ``np.random`` state (no generator argument), so they cannot give
  reproducible per-run noise on torch tensors.  ``compute_adaptive_noise_params``
  is pure arithmetic but has Flower-specific defaults/raising/logging; the same
  formula is implemented once here as :func:`adjusted_noise_multiplier` and
  the tests cross-check it against Flower's.

Noise comes from the ``torch.Generator`` (CPU) the caller passes.  The round
loop seeds it from the run's server-only secret
(:mod:`fedmeta.privacy.server`), or from the config only with
``privacy.reproducible_noise = true``; ``generator=None`` seeds a fresh one
from the OS (``torch.Generator().seed()``).  Either way it is a Mersenne
Twister drawing ``torch.randn`` in floating point: docs/design.md ("What a
private run promises") says what that does and does not protect against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .accountant import (
    PrivacyError,
    validate_clip_norm,
    validate_noise_multiplier,
)

__all__ = [
    "NonFiniteUpdateError",
    "CLIENT_CLIP_TOLERANCE",
    "global_norm",
    "clip_update",
    "noise_like",
    "private_sum",
    "private_mean",
    "noisy_mean_of_clipped",
    "mean_noise_std",
    "adjusted_noise_multiplier",
    "default_clipped_count_stddev",
    "AdaptiveClipper",
]

log = logging.getLogger(__name__)

Update = Mapping[str, Tensor]

#: Relative slack for norms of updates that clients say they already clipped.
CLIENT_CLIP_TOLERANCE = 1e-5


from fedmeta.errors import NonFiniteUpdateError  # noqa: E402,F401 - defined in fedmeta.errors


def _check_update(update: Update, name: str = "update") -> None:
    if not isinstance(update, Mapping):
        raise PrivacyError(f"{name}: must be a dict[str, Tensor], got {type(update).__name__}")
    for key, t in update.items():
        if not isinstance(t, Tensor):
            raise PrivacyError(f"{name}[{key!r}]: must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise PrivacyError(f"{name}[{key!r}]: must be a floating-point tensor, got {t.dtype}")


def global_norm(update: Update) -> Tensor:
    """L2 norm over all tensors of ``update`` (0-dim float64 tensor).

    Accumulated in float64 so float32 updates with huge entries (1e30) give a
    finite norm instead of overflowing; NaN/inf entries give a non-finite norm.
    """
    _check_update(update)
    if not update:
        return torch.zeros((), dtype=torch.float64)
    device = next(iter(update.values())).device
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for t in update.values():
        if t.numel():
            sq = sq + torch.linalg.vector_norm(t.detach(), ord=2, dtype=torch.float64).to(device).square()
    return sq.sqrt()


def clip_update(update: Update, clip_norm: float) -> tuple[dict[str, Tensor], float]:
    """Scale ``update`` by min(1, C / ||update||); return (clipped, norm before).

    A zero update is returned unchanged (no division by zero).  A non-finite
    update (NaN or inf anywhere) raises :class:`NonFiniteUpdateError` — it is
    never silently turned into NaN noise; :func:`private_mean` by default
    replaces such updates by zero instead (see ``on_non_finite``).
    The result is detached from autograd.
    """
    c = validate_clip_norm(clip_norm)
    norm = float(global_norm(update))
    if not math.isfinite(norm):
        raise NonFiniteUpdateError(f"update: must be finite (contains NaN or inf), norm is {norm}")
    factor = 1.0 if norm <= c else c / norm
    if factor == 1.0:
        return {k: t.detach().clone() for k, t in update.items()}, norm
    return {k: (t.detach().to(torch.float64) * factor).to(t.dtype) for k, t in update.items()}, norm


def _check_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        g = torch.Generator(device="cpu")
        g.seed()  # non-deterministic seed
        return g
    if not isinstance(generator, torch.Generator):
        raise PrivacyError(f"generator: must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise PrivacyError(f"generator: must be a CPU torch.Generator, got device {generator.device}")
    return generator


def noise_like(update: Update, std: float, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Independent N(0, std^2) noise for every element of every tensor in ``update``.

    Drawn on CPU from ``generator`` (keys in sorted order, so the draw does not
    depend on dict insertion order), in float32 or float64 (matching the
    tensor's precision), then moved to each tensor's device and dtype.
    """
    _check_update(update)
    s = validate_noise_multiplier(std, "std")
    g = _check_generator(generator)
    out: dict[str, Tensor] = {}
    for key in sorted(update):
        t = update[key]
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        n = torch.randn(t.shape, generator=g, dtype=dtype, device="cpu")
        out[key] = (n * s).to(device=t.device, dtype=t.dtype)
    return {k: out[k] for k in update}  # keep the caller's key order


def mean_noise_std(clip_norm: float, noise_multiplier: float, denominator: float) -> float:
    """Per-coordinate std of the noise in :func:`private_mean`: z * C / D."""
    return validate_noise_multiplier(noise_multiplier) * validate_clip_norm(clip_norm) / _check_denominator(denominator)


def _check_denominator(denominator: Any) -> float:
    try:
        d = float(denominator)
    except (TypeError, ValueError):
        raise PrivacyError(f"denominator: must be a number > 0, got {denominator!r}") from None
    if not (d > 0 and math.isfinite(d)):
        raise PrivacyError(f"denominator: must be > 0 (the expected cohort size q*N), got {denominator!r}")
    return d


def _check_same_structure(updates: Sequence[Update], like: Update | None) -> Update:
    template = like if like is not None else (updates[0] if updates else None)
    if template is None:
        raise PrivacyError("updates: empty cohort needs `like` (a template update) to shape the noise")
    _check_update(template, "like")
    for i, u in enumerate(updates):
        _check_update(u, f"updates[{i}]")
        if u.keys() != template.keys():
            raise PrivacyError(f"updates[{i}]: keys differ from the first update / template")
        for k, t in u.items():
            if t.shape != template[k].shape:
                raise PrivacyError(f"updates[{i}][{k!r}]: shape {tuple(t.shape)} != {tuple(template[k].shape)}")
    return template


def private_sum(
    updates: Sequence[Update],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    *,
    like: Update | None = None,
    client_clipped: bool = False,
    on_non_finite: Literal["zero", "raise"] = "zero",
    on_violation: Literal["clip", "raise"] = "clip",
) -> dict[str, Tensor]:
    """sum_i clip(Delta_i, C) + N(0, (zC)^2): the Gaussian mechanism with L2 sensitivity C.

    ``client_clipped=True``: the updates claim to be clipped already (client-side
    clipping); each norm is still checked against C * (1 + CLIENT_CLIP_TOLERANCE)
    and a violating update is clipped (``on_violation="clip"``) or rejected with
    :class:`PrivacyError` (``"raise"``).  Either way no client contributes more
    than C (up to that tolerance) to the sum.

    ``on_non_finite="zero"`` (default) replaces an update containing NaN/inf by
    zeros — equivalent to that client contributing nothing, which keeps the
    sensitivity bound and stops one broken client from poisoning the round;
    ``"raise"`` raises :class:`NonFiniteUpdateError`.
    """
    c = validate_clip_norm(clip_norm)
    z = validate_noise_multiplier(noise_multiplier)
    if on_non_finite not in ("zero", "raise"):
        raise PrivacyError(f"on_non_finite: must be 'zero' or 'raise', got {on_non_finite!r}")
    if on_violation not in ("clip", "raise"):
        raise PrivacyError(f"on_violation: must be 'clip' or 'raise', got {on_violation!r}")
    template = _check_same_structure(updates, like)
    total = {k: torch.zeros_like(t, dtype=torch.float64) for k, t in template.items()}
    for i, u in enumerate(updates):
        norm = float(global_norm(u))
        if not math.isfinite(norm):
            if on_non_finite == "raise":
                raise NonFiniteUpdateError(f"updates[{i}]: must be finite (contains NaN or inf)")
            log.warning("private_sum: update %d is non-finite; counted as a zero update", i)
            continue
        if client_clipped:
            if norm > c * (1.0 + CLIENT_CLIP_TOLERANCE):
                if on_violation == "raise":
                    raise PrivacyError(
                        f"updates[{i}]: client-clipped update has norm {norm:.6g} > clip_norm {c:.6g}"
                    )
                log.warning("private_sum: client-clipped update %d has norm %.6g > %.6g; clipping", i, norm, c)
            else:
                for k, t in u.items():  # within tolerance: take as is
                    total[k] += t.detach().to(device=total[k].device, dtype=torch.float64)
                continue
        factor = 1.0 if norm <= c else c / norm
        for k, t in u.items():
            total[k] += t.detach().to(device=total[k].device, dtype=torch.float64) * factor
    out = {k: v.to(template[k].dtype) for k, v in total.items()}
    if z > 0:
        noise = noise_like(out, z * c, generator)
        out = {k: out[k] + noise[k] for k in out}
    return out


def private_mean(
    updates: Sequence[Update],
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    generator: torch.Generator | None = None,
    *,
    like: Update | None = None,
    client_clipped: bool = False,
    on_non_finite: Literal["zero", "raise"] = "zero",
    on_violation: Literal["clip", "raise"] = "clip",
) -> dict[str, Tensor]:
    """DP-FedAvg mean: (sum_i clip(Delta_i, C) + N(0, (zC)^2)) / D.

    ``denominator`` D must be the fixed expected cohort size q*N (see module
    docstring), not ``len(updates)``.  An empty cohort (possible under Poisson
    sampling) still releases noise / D; pass ``like`` to give its shapes.
    The per-coordinate noise std of the result is z*C/D (:func:`mean_noise_std`).
    Other keyword arguments: see :func:`private_sum`.
    """
    d = _check_denominator(denominator)
    total = private_sum(
        updates,
        clip_norm,
        noise_multiplier,
        generator,
        like=like,
        client_clipped=client_clipped,
        on_non_finite=on_non_finite,
        on_violation=on_violation,
    )
    return {k: v / d for k, v in total.items()}


def noisy_mean_of_clipped(
    updates: Sequence[Update],
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    generator: torch.Generator | None = None,
    *,
    like: Update | None = None,
    on_violation: Literal["clip", "raise"] = "clip",
    on_non_finite: Literal["zero", "raise"] = "zero",
) -> dict[str, Tensor]:
    """Client-side clipping mode: :func:`private_mean` with ``client_clipped=True``.

    The server verifies every norm <= C * (1 + 1e-5) and clips (default) or
    rejects (``on_violation="raise"``) an update that is not.
    """
    return private_mean(
        updates,
        clip_norm,
        noise_multiplier,
        denominator,
        generator,
        like=like,
        client_clipped=True,
        on_non_finite=on_non_finite,
        on_violation=on_violation,
    )


# --------------------------------------------------------------------------- adaptive clipping


def default_clipped_count_stddev(expected_count: float) -> float:
    """sigma_b = m / 20, the default of Andrew et al. (2021) for m expected clients per round."""
    return _check_denominator(expected_count) / 20.0


def adjusted_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Noise multiplier z_Delta for the update when the clipped count is also released.

    Andrew et al. (2021), "Differentially Private Learning with Adaptive
    Clipping", Thm. 1: releasing the update sum with multiplier z_Delta and the
    count sum of (b_i - 1/2) (sensitivity 1/2) with std sigma_b is, together,
    one Gaussian mechanism with multiplier z where
    z^-2 = z_Delta^-2 + (2 sigma_b)^-2, i.e.

        z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

    So the accountant is given z (the *combined* multiplier, unchanged), and the
    update noise uses the slightly larger z_Delta.  Requires 2 sigma_b > z.
    z == 0 (no DP) returns 0.
    """
    z = validate_noise_multiplier(noise_multiplier)
    sb = validate_noise_multiplier(clipped_count_stddev, "privacy.clipped_count_stddev")
    if z == 0.0:
        return 0.0
    if not 2.0 * sb > z:
        raise PrivacyError(
            f"privacy.clipped_count_stddev: must be > noise_multiplier / 2 = {z / 2:g} for adaptive clipping, got {sb:g}"
        )
    return float((z ** -2 - (2.0 * sb) ** -2) ** -0.5)


class AdaptiveClipper:
    """Quantile-based adaptive clipping norm (Andrew et al. 2021, geometric update).

    Each round, with the current norm C used for clipping that round:

        b_i   = 1[ ||Delta_i|| <= C ]                        (client i's bit)
        b~    = clamp( (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2, 0, 1 )
        C    <- C * exp( -eta_C * (b~ - gamma) )

    with m the fixed expected cohort size.  Centering the bits at 1/2 (as the
    TF-Privacy quantile estimator does) gives the count sensitivity 1/2 under
    add/remove-one-client, which is what :func:`adjusted_noise_multiplier`
    assumes; when the realised cohort is exactly m this equals the paper's
    (sum_i b_i + noise) / m.  C grows while fewer than a gamma fraction of
    clients are unclipped and shrinks otherwise.

    In client-side clipping mode the clients compute b_i with the broadcast C
    and send it; :meth:`update_from_bits` takes those bits.
    """

    def __init__(
        self,
        initial_clip_norm: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        clipped_count_stddev: float = 0.0,
    ) -> None:
        self.clip_norm = validate_clip_norm(initial_clip_norm)
        q = float(target_quantile)
        if not 0.0 < q < 1.0:
            raise PrivacyError(f"privacy.target_quantile: must be in (0, 1), got {target_quantile!r}")
        lr = float(learning_rate)
        if not (lr > 0 and math.isfinite(lr)):
            raise PrivacyError(f"privacy.clip_lr: must be > 0, got {learning_rate!r}")
        self.target_quantile = q
        self.learning_rate = lr
        self.clipped_count_stddev = validate_noise_multiplier(clipped_count_stddev, "privacy.clipped_count_stddev")
        self.last_unclipped_fraction: float | None = None  # b~ of the last update (already noised: safe to log)

    def update(
        self,
        norms: Sequence[float] | Tensor,
        expected_count: float,
        generator: torch.Generator | None = None,
    ) -> float:
        """Update C from this round's (pre-clipping) update norms; return the new C.

        Non-finite norms count as "not below C" (b_i = 0).
        """
        vals = torch.as_tensor(norms, dtype=torch.float64).reshape(-1).cpu()
        bits = (torch.isfinite(vals) & (vals <= self.clip_norm)).to(torch.float64)
        return self.update_from_bits(bits, expected_count, generator)

    def update_from_bits(
        self,
        bits: Sequence[float] | Tensor,
        expected_count: float,
        generator: torch.Generator | None = None,
    ) -> float:
        """Update C from clients' bits b_i = 1[||Delta_i|| <= C] (values in {0, 1})."""
        m = _check_denominator(expected_count)
        b = torch.as_tensor(bits, dtype=torch.float64).reshape(-1).cpu()
        if b.numel() and not bool(((b == 0) | (b == 1)).all()):
            raise PrivacyError("bits: must be 0 or 1")
        centered = float((b - 0.5).sum())
        if self.clipped_count_stddev > 0:
            g = _check_generator(generator)
            centered += self.clipped_count_stddev * float(torch.randn((), generator=g, dtype=torch.float64))
        frac = min(1.0, max(0.0, centered / m + 0.5))
        self.last_unclipped_fraction = frac
        self.clip_norm = float(self.clip_norm * math.exp(-self.learning_rate * (frac - self.target_quantile)))
        return self.clip_norm

    def state_dict(self) -> dict[str, float]:
        return {
            "clip_norm": self.clip_norm,
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "clipped_count_stddev": self.clipped_count_stddev,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fresh = AdaptiveClipper(
            state["clip_norm"], state["target_quantile"], state["learning_rate"], state["clipped_count_stddev"]
        )
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (
            f"AdaptiveClipper(clip_norm={self.clip_norm:.6g}, target_quantile={self.target_quantile}, "
            f"learning_rate={self.learning_rate}, clipped_count_stddev={self.clipped_count_stddev})"
        )
