"""Per-FedAvg, Hessian-free variant (Fallah, Mokhtari, Ozdaglar 2020, "Personalized Federated Learning with
Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach"), written against the public seam only.

Each of a client's ``len(schedule)`` local steps, from ``w = theta``, with ``D`` the step's support batch and
``D' = D''`` the client's meta-query rows (as for MAML: ``meta.maml_query_fraction``):

    w~ = w - alpha * grad f(w; D)
    g  = grad f(w~; D')
    h  = (grad f(w + delta g; D'') - grad f(w - delta g; D'')) / (2 delta)     (Hessian-vector product, HF)
    w <- w - beta * (g - alpha * h)

``alpha`` is ``meta.inner_lr``, ``beta`` is ``meta.params.beta`` and ``delta`` ``meta.params.delta``. The server
averages the clients' ``w`` (beta_server = 1). Evaluation: the default (``meta.eval_steps`` SGD steps on the support).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmeta.meta import MetaAlgorithm, loss_fn, model_params, register


@register("perfedavg")
class PerFedAvg(MetaAlgorithm):
    needs_query = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        beta: float = Field(0.1, gt=0, le=100)  # the client's meta step
        delta: float = Field(1e-3, gt=0, le=1)  # finite-difference radius of the Hessian-vector product

    def check_config(self):
        if self.cfg.meta.inner_optimizer != "sgd":
            raise ValueError(f"meta.inner_optimizer: perfedavg's inner step is plain SGD; must be 'sgd' (got {self.cfg.meta.inner_optimizer!r})")

    def client_update(self, model, params, support, query, schedule, icfg):
        alpha, beta, delta = icfg.lr, self.params.beta, self.params.delta
        x, y, p = support
        grad = torch.func.grad_and_value(lambda w, xb, yb, pb: loss_fn(model, w, xb, yb, pb, icfg.task))
        w = model_params(params)
        total = torch.zeros((), dtype=next(iter(w.values())).dtype, device=y.device)
        q_loss = total
        for t in range(schedule.shape[0]):
            idx = schedule[t]
            g0, loss = grad(w, {k: v[idx] for k, v in x.items()}, y[idx], p[idx])
            total = total + loss.detach()
            w_tilde = {k: w[k] - alpha * g0[k] for k in w}
            g, q_loss = grad(w_tilde, *query)
            plus, _ = grad({k: w[k] + delta * g[k] for k in w}, *query)
            minus, _ = grad({k: w[k] - delta * g[k] for k in w}, *query)
            w = {k: w[k] - beta * (g[k] - alpha * (plus[k] - minus[k]) / (2 * delta)) for k in w}
        return {k: v.detach() for k, v in w.items()}, {"train_loss": total / max(1, schedule.shape[0]), "query_loss": q_loss.detach()}

    def step_size(self, server_round):
        return 1.0
