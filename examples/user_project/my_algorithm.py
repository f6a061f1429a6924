"""A user's own meta-learning method: proximal Reptile with a cosine server schedule.

Clients run plain SGD on their loss plus a proximal term
``mu/2 * ||phi - theta||^2`` that keeps them near the meta-parameters
(FedProx's idea inside Reptile), and return phi; the server applies
``theta <- theta + beta_r * mean(phi - theta)`` with ``beta_r`` following a
half cosine from ``meta.outer_lr`` (round 1) to ``meta.outer_lr_final``
(last round). Evaluation adapts with the default inner loop.

Written against the public seam only: :class:`fedmeta.meta.MetaAlgorithm`,
:func:`fedmeta.meta.loss_fn`, :func:`fedmeta.meta.model_params`,
:func:`fedmeta.meta.extra_params`. ``client_update`` is a pure function of
tensors (no ``.item()``, no Python ``if`` on tensor values) so the
vectorised engine can ``torch.func.vmap`` it over a cohort.
"""

from __future__ import annotations

import math

import torch

from fedmeta.meta import MetaAlgorithm, extra_params, loss_fn, model_params


class ProxReptile(MetaAlgorithm):
    mu = 0.1  # proximal strength; subclass to change it (config sections accept only fedmeta's keys)

    def client_update(self, model, params, support, query, schedule, icfg):
        theta = model_params(params)
        x, y, present = support

        def objective(phi, xb, yb, pb):
            loss = loss_fn(model, phi, xb, yb, pb, icfg.task)
            prox = sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
            return loss + 0.5 * self.mu * prox, loss

        grad = torch.func.grad(objective, has_aux=True)
        phi = dict(theta)
        total = torch.zeros((), dtype=next(iter(theta.values())).dtype, device=y.device)
        for t in range(schedule.shape[0]):  # the schedule's shape is fixed, not data: a Python loop is fine
            idx = schedule[t]
            g, loss = grad(phi, {k: v[idx] for k, v in x.items()}, y[idx], present[idx])
            phi = {k: phi[k] - icfg.lr * g[k] for k in phi}
            total = total + loss.detach()
        return phi | extra_params(params), {"train_loss": total / max(1, schedule.shape[0])}

    def step_size(self, server_round: int) -> float:
        m, rounds = self.cfg.meta, self.cfg.simulation.rounds
        frac = (server_round - 1) / max(1, rounds - 1)
        return m.outer_lr_final + 0.5 * (m.outer_lr - m.outer_lr_final) * (1.0 + math.cos(math.pi * frac))
