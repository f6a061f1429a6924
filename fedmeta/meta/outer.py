"""The server side of meta-learning: the outer step on tensors.

Reptile (Nichol et al. 2018): theta <- theta + beta * mean_i(phi_i - theta), with
beta annealed linearly from beta_0 to beta_final. FedAvg is the special case
beta = 1 with an example-count-weighted mean. Each algorithm chooses its beta
(:meth:`fedmeta.meta.algorithm.MetaAlgorithm.step_size`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmeta.meta.inner import Params


def linear_anneal(server_round: int, total_rounds: int, start: float, final: float) -> float:
    """Meta step size for 1-based ``server_round``, as in the Reptile code.

    ``frac = (round - 1) / total``, so round 1 uses ``start`` and the last round
    still takes a small step when ``final`` is 0.
    """
    frac = (server_round - 1) / total_rounds
    return frac * final + (1.0 - frac) * start


def difference(phi: Params, theta: Params) -> Params:
    """phi - theta, per key (a client's update)."""
    return {k: phi[k] - theta[k] for k in theta}


def weighted_mean(updates: Sequence[Params], weights: Sequence[float]) -> Params:
    """Sum_i w_i * u_i / sum_i w_i."""
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("weighted_mean: needs at least one update with positive weight")
    keys = updates[0].keys()
    return {k: sum(w * u[k] for u, w in zip(updates, weights)) / total for k in keys}


def apply_step(theta: Params, step: Params, beta: float) -> Params:
    """theta + beta * step."""
    return {k: theta[k] + beta * step[k] for k in theta}


def reptile_update(theta: Params, phis: Sequence[Params], weights: Sequence[float], beta: float) -> Params:
    """theta + beta * weighted mean of (phi_i - theta)."""
    return apply_step(theta, weighted_mean([difference(p, theta) for p in phis], weights), beta)


class ServerAdam:
    """Adam on the pseudo-gradient -step (FedAdam, Reddi et al. 2021), with bias correction.

    ``update(step, lr)`` returns the increment to add to theta: the Reptile step
    ``mean(phi - theta)`` (or the MAML client's ``-g``) is treated as a descent
    direction and rescaled per coordinate. ``lr`` is the annealed beta.
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m: Params = {}
        self.v: Params = {}
        self.t = 0

    def update(self, step: Params, lr: float) -> Params:
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        for k, d in step.items():
            self.m[k] = b1 * self.m.get(k, torch.zeros_like(d)) + (1 - b1) * d
            self.v[k] = b2 * self.v.get(k, torch.zeros_like(d)) + (1 - b2) * d * d
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        return {k: lr * (self.m[k] / c1) / ((self.v[k] / c2).sqrt() + self.eps) for k in step}

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v, self.t = state["m"], state["v"], state["t"]
