"""Server-side aggregation of client updates: bounded weights and robust aggregators.

Pure functions on ``dict[str, Tensor]`` updates, used by
:meth:`fedmeta.federation.Server.step` for every engine (without DP; with DP
the mechanism in :mod:`fedmeta.privacy` weights every clipped update equally).

Weights (the examples a client reports) are bounded before they are used, so
that no single client can take over a weighted mean:

* a reported count must lie in ``[1, MAX_EXAMPLES]`` (else the reply is rejected
  by the message parser);
* the Flower backend caps it at the size the node announced at discovery, or,
  for a node that announced nothing (a stock Flower client), at the cohort's
  lower median reported count (:func:`cohort_cap`);
* ``simulation.max_weight > 0`` caps every weight on every engine
  (:func:`cap_weights`).

``meta.aggregation = "median" | "trimmed_mean"`` are coordinate-wise and
unweighted, as Flower's ``FedMedian`` and ``FedTrimmedAvg``: each client is one
vote whatever it reports. ``"krum"`` is Krum / multi-Krum (Blanchard et al. 2017),
Flower's own ``aggregate_krum``, also unweighted (``meta.krum_malicious`` = f,
``meta.krum_keep`` = m: 0 picks one update, m > 0 averages the m best).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedmeta.meta.inner import Params
from fedmeta.meta.outer import weighted_mean

MAX_EXAMPLES = 2**53  # the largest count a float64 holds exactly; larger "num-examples" are rejected
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


def valid_count(n: object) -> float:
    """A reported example count as a float; ``ValueError`` unless it is a number in [1, MAX_EXAMPLES]."""
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise ValueError(f"must be a number (got {type(n).__name__})")
    if not (isinstance(n, int) or math.isfinite(n)) or not 1 <= n <= MAX_EXAMPLES:
        raise ValueError(f"must be in [1, 2**53] (got {n!r})")
    return float(n)


def cohort_cap(reported: Sequence[float]) -> float:
    """The cap for clients that announced no size: the lower median of the cohort's reported counts.

    A lower median is one of the reported values and, while at least half the
    cohort is honest, no larger than an honest client's count.
    """
    if not reported:
        return math.inf
    return sorted(reported)[(len(reported) - 1) // 2]


def cap_weights(weights: Sequence[float], cap: float | Sequence[float | None] | None) -> list[float]:
    """``min(w_i, cap_i)``; ``cap`` is one number for all (<= 0 or None: no cap) or one per weight (None: no cap)."""
    if cap is None or isinstance(cap, (int, float)):
        caps = [cap if cap is not None and cap > 0 else None] * len(weights)
    else:
        caps = list(cap)
    if len(caps) != len(weights):
        raise ValueError(f"cap_weights: {len(weights)} weights but {len(caps)} caps")
    return [w if c is None else min(w, c) for w, c in zip(weights, caps)]


def _stack(updates: Sequence[Params]) -> Params:
    if not updates:
        raise ValueError("aggregate: needs at least one update")
    return {k: torch.stack([u[k] for u in updates]) for k in updates[0]}


def coordinate_median(updates: Sequence[Params]) -> Params:
    """Coordinate-wise median (the mean of the two middle values for an even count, as ``np.median``)."""
    return _median_of(_stack(updates))


def _median_of(stacked: Params) -> Params:
    out = {}
    for k, s in stacked.items():
        n = s.shape[0]
        srt = s.sort(dim=0).values
        out[k] = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
    return out


def trimmed_mean(updates: Sequence[Params], fraction: float) -> Params:
    """Coordinate-wise mean after dropping ``int(fraction * n)`` lowest and highest values (Flower's FedTrimmedAvg)."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trimmed_mean: fraction must be in [0, 0.5) (got {fraction})")
    return _trimmed_of(_stack(updates), fraction)


def _trimmed_of(stacked: Params, fraction: float) -> Params:
    out = {}
    for k, s in stacked.items():
        n = s.shape[0]
        cut = int(fraction * n)
        out[k] = s.sort(dim=0).values[cut : n - cut].mean(dim=0)
    return out


def krum(updates: Sequence[Params], num_malicious: int = 1, to_keep: int = 0) -> Params:
    """Krum (``to_keep = 0``: the update closest to its n - f - 2 nearest neighbours) or multi-Krum (the mean
    of the ``to_keep`` best), unweighted: Flower's ``aggregate_krum`` on the flattened updates."""
    from flwr.server.strategy.aggregate import aggregate_krum

    if not updates:
        raise ValueError("aggregate: needs at least one update")
    keys = list(updates[0])
    arrays = [[u[k].detach().cpu().double().numpy() for k in keys] for u in updates]
    chosen = aggregate_krum([(a, 1) for a in arrays], num_malicious, min(to_keep, len(updates)))
    ref = updates[0]
    return {k: torch.as_tensor(c, dtype=ref[k].dtype, device=ref[k].device).reshape(ref[k].shape) for k, c in zip(keys, chosen)}


def aggregate(updates: Sequence[Params], weights: Sequence[float], method: str = "mean", trim_fraction: float = 0.2, max_weight: float = 0.0,
              krum_malicious: int = 1, krum_keep: int = 0) -> Params:
    """The server's aggregate of the clients' updates (deltas).

    ``mean``: weighted mean with every weight capped at ``max_weight`` (0 = no cap);
    ``median`` / ``trimmed_mean``: coordinate-wise, unweighted; ``krum``: :func:`krum`, unweighted.
    """
    if method == "mean":
        return weighted_mean(updates, cap_weights(weights, max_weight))
    if method == "median":
        return coordinate_median(updates)
    if method == "trimmed_mean":
        return trimmed_mean(updates, trim_fraction)
    if method == "krum":
        return krum(updates, krum_malicious, krum_keep)
    raise ValueError(f"aggregate: unknown method {method!r} (expected one of {AGGREGATORS})")


def aggregate_stacked(stacked: Params, weights: Sequence[float], method: str = "mean", trim_fraction: float = 0.2, max_weight: float = 0.0,
                      krum_malicious: int = 1, krum_keep: int = 0) -> Params:
    """:func:`aggregate` of updates already stacked per key (``stacked[k][i]``: client i's delta):
    one reduction per key instead of a Python sum over clients (the round on stacked tensors, issue 21)."""
    if not stacked or next(iter(stacked.values())).shape[0] == 0:
        raise ValueError("aggregate: needs at least one update")
    if method == "mean":
        w = cap_weights(weights, max_weight)
        total = float(sum(w))
        if total <= 0:
            raise ValueError("weighted_mean: needs at least one update with positive weight")
        out = {}
        for k, s in stacked.items():
            wk = torch.tensor(w, dtype=s.dtype, device=s.device).view(-1, *([1] * (s.dim() - 1)))
            out[k] = (wk * s).sum(0) / total
        return out
    if method == "median":
        return _median_of(stacked)
    if method == "trimmed_mean":
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trimmed_mean: fraction must be in [0, 0.5) (got {trim_fraction})")
        return _trimmed_of(stacked, trim_fraction)
    if method == "krum":  # pairwise distances between whole updates: unstack (Flower's aggregate_krum)
        n = next(iter(stacked.values())).shape[0]
        return aggregate([{k: v[i] for k, v in stacked.items()} for i in range(n)], weights, method, trim_fraction, max_weight,
                         krum_malicious, krum_keep)
    raise ValueError(f"aggregate: unknown method {method!r} (expected one of {AGGREGATORS})")


def weighted_average(pairs: Sequence[tuple[float, float]], dropped: list[int] | None = None) -> float:
    """Mean of ``(value, weight)`` pairs for reported metrics; pairs with a non-finite value or a weight
    that is not a finite positive number are dropped, and their positions appended to ``dropped``
    (pass a list: the caller counts and logs them, never a silent skip); NaN when nothing is left."""
    keep = [finite_number(v) and finite_number(w) and w > 0 for v, w in pairs]
    if dropped is not None:
        dropped.extend(i for i, ok in enumerate(keep) if not ok)
    good = [(float(v), float(w)) for (v, w), ok in zip(pairs, keep) if ok]
    total = sum(w for _, w in good)  # plain sums: an overflow gives inf, never an exception
    if not good or not 0 < total < math.inf:
        return float("nan")
    return sum(v * w for v, w in good) / total


def finite_number(x: object) -> bool:
    """A real (non-bool) int or float that is finite; False for anything else, never an exception."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float range
        return False
