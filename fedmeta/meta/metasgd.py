"""Meta-SGD (Li et al. 2017), written only against the public algorithm seam, as a user's method would be.

Meta-SGD learns, alongside theta, a learning rate per parameter coordinate
``alpha`` (same shapes as theta). A client adapts with
``phi = theta - alpha * grad L_support`` for each inner step, and its update
is the meta-gradient of the query loss with respect to **both** theta and
alpha, through the inner steps (second order, as in the paper):

    (theta, alpha)  <-  (theta, alpha) - beta * mean_i g_i,   g_i = d L_query(phi_i) / d(theta, alpha)

The client returns ``(theta, alpha) - g`` (the same trick as MAML), so the
server's shared step, clipping and noise act on theta and alpha together:
with DP on, alpha is clipped and noised with theta and counted in the same
update norm. The learned alpha is used for adaptation at evaluation.

alpha starts at ``meta.inner_lr`` everywhere; ``meta.inner_optimizer`` must be
"sgd" (the update rule is plain SGD with learned rates, as in the paper; "adam"
is refused by :meth:`check_config` rather than silently ignored).

FedMeta's Flower baseline sets alpha's gradient to the parameter gradient;
here it is the true derivative (checked against finite differences in tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedmeta.meta import MetaAlgorithm, loss_fn, register

PREFIX = "metasgd/lr/"


def _split(params: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    theta = {k: v for k, v in params.items() if not k.startswith(PREFIX)}
    alpha = {k[len(PREFIX):]: v for k, v in params.items() if k.startswith(PREFIX)}
    return theta, alpha


def sgd_with_rates(model, theta, alpha, support, schedule, task, record_at=()):
    """``len(schedule)`` steps of ``phi <- phi - alpha * grad``; returns (phi, mean loss, recorded)."""
    x, y, present = support
    grad_and_value = torch.func.grad_and_value(lambda p, xb, yb, pb: loss_fn(model, p, xb, yb, pb, task))
    phi, total, recorded = theta, torch.zeros((), dtype=next(iter(theta.values())).dtype, device=y.device), {}
    for t in range(schedule.shape[0]):
        idx = schedule[t]
        grads, loss = grad_and_value(phi, {k: v[idx] for k, v in x.items()}, y[idx], present[idx])
        total = total + loss
        phi = {k: phi[k] - alpha[k] * grads[k] for k in phi}
        if t + 1 in record_at:
            recorded[t + 1] = phi
    return phi, total / max(1, schedule.shape[0]), recorded


@register("metasgd")
class MetaSGD(MetaAlgorithm):
    needs_query = True

    def check_config(self):
        if self.cfg.meta.inner_optimizer != "sgd":
            raise ValueError(f"meta.inner_optimizer: metasgd adapts with plain SGD at its learned rates; must be 'sgd' (got {self.cfg.meta.inner_optimizer!r})")

    def extra_state(self, theta):
        return {PREFIX + k: torch.full_like(v, self.cfg.meta.inner_lr) for k, v in theta.items()}

    def client_update(self, model, params, support, query, schedule, icfg):
        def outer(p):
            theta, alpha = _split(p)
            phi, inner, _ = sgd_with_rates(model, theta, alpha, support, schedule, icfg.task)
            q = loss_fn(model, phi, *query, icfg.task)
            return q, (q.detach(), inner.detach())

        g, (q, inner) = torch.func.grad(outer, has_aux=True)(params)
        return {k: params[k].detach() - g[k].detach() for k in params}, {"train_loss": inner, "query_loss": q}

    def adapt(self, model, params, support, schedule, icfg, record_at=()):
        theta, alpha = _split(params)
        phi, _, recorded = sgd_with_rates(model, theta, alpha, support, schedule, icfg.task, record_at)
        return phi, recorded
