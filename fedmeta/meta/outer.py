"""The server side of meta-learning: Reptile / FedAvg outer steps on tensors.

Reptile (Nichol et al. 2018): theta <- theta + beta * mean_i(phi_i - theta), with
beta annealed linearly from beta_0 to beta_final. FedAvg is the special case
beta = 1 with an example-count-weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Params = dict[str, Tensor]


def linear_anneal(server_round: int, total_rounds: int, start: float, final: float) -> float:
    """Meta step size for 1-based ``server_round``, as in the Reptile code.

    ``frac = (round - 1) / total``, so round 1 uses ``start`` and the last round
    still takes a small step when ``final`` is 0.
    """
    frac = (server_round - 1) / total_rounds
    return frac * final + (1.0 - frac) * start


def meta_step_size(algorithm: str, server_round: int, total_rounds: int, start: float, final: float) -> float:
    """beta for a round: 1 for FedAvg (and FedAvg + fine-tuning), 0 for local-only training (theta never
    leaves its initialisation), else the linear anneal (Reptile; MAML/FOMAML, whose clients return
    theta - g so that beta is the meta learning rate)."""
    if algorithm in ("fedavg", "fedavg_ft"):
        return 1.0
    if algorithm == "local":
        return 0.0
    return linear_anneal(server_round, total_rounds, start, final)


def delta(phi: Params, theta: Params) -> Params:
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
    return apply_step(theta, weighted_mean([delta(p, theta) for p in phis], weights), beta)


def stack_params(params: Sequence[Params]) -> Params:
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


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
