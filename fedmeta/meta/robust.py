"""Screening a round's updates against the cohort itself: norm bounding (Sun et al. 2019, "Can you really
backdoor federated learning?", arXiv:1911.07963).

Each update whose norm ``||phi - theta||`` exceeds ``factor`` times the cohort's median norm is rejected
(``simulation.max_norm_ratio``; 0 = off). The lower median is one of the reported norms and, while at least
half the cohort is honest, no larger than an honest client's norm, so a minority cannot raise the bar for
itself; an honest cohort's norms lie within a small multiple of each other (docs/design.md, "Threat model",
measured there), so at the default the screen leaves honest rounds untouched. It is off under DP, where
clipping already bounds every update and noised norms would say little.

A pure function on the cohort's norms (a list or a 1-D tensor), so a batched screen can call it on a
stacked ``torch.linalg.vector_norm`` of the deltas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def median_norm(norms: Sequence[float] | Tensor) -> float:
    """The lower median of the norms (``torch.median``: one of the values; 0 for an empty cohort)."""
    t = torch.as_tensor(norms, dtype=torch.float64).flatten()
    return float(t.median()) if t.numel() else 0.0


def norm_outliers(norms: Sequence[float] | Tensor, factor: float) -> tuple[list[int], float]:
    """``(indices of norms > factor * median_norm(norms), that bound)``; ``factor <= 0`` or a zero median: none.

    A zero median means at least half the cohort sent no change at all; no ratio is meaningful then, so the
    absolute bound (``simulation.max_update_norm``) is all that applies.
    """
    t = torch.as_tensor(norms, dtype=torch.float64).flatten()
    if factor <= 0 or t.numel() == 0:
        return [], float("inf")
    bound = factor * median_norm(t)
    if not bound > 0:
        return [], float("inf")
    return [int(i) for i in torch.nonzero(t > bound).flatten()], bound
