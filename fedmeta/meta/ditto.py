"""Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization"),
written against the public seam only.

Each client keeps a personal model ``v_i`` as client state (``theta`` at its first round). In a round it
solves the global objective locally (FedAvg: ``phi = inner_loop(theta)``, sent to the server) and, on the
same batches, takes personal steps on the regularised objective

    v <- v - eta * (grad f_i(v; batch) + lam * (v - theta))

``lam`` is ``meta.params.lam``, ``eta`` is ``meta.inner_lr``. The server averages the phi (beta = 1).
Evaluation: a client personalises from theta by the same regularised steps (``meta.eval_steps``), which is
Ditto's procedure for a client without a personal model (the held-out clients).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmeta.meta import MetaAlgorithm, inner_loop, loss_fn, model_params, register


def prox_steps(model, v, anchor, support, schedule, icfg, lam, record_at=()):
    """``len(schedule)`` steps of ``v <- v - lr * (grad f(v) + lam * (v - anchor))``; (v, mean loss, recorded)."""
    x, y, p = support
    grad = torch.func.grad_and_value(lambda w, xb, yb, pb: loss_fn(model, w, xb, yb, pb, icfg.task))
    total = torch.zeros((), dtype=next(iter(v.values())).dtype, device=y.device)
    recorded = {}
    for t in range(schedule.shape[0]):
        idx = schedule[t]
        g, loss = grad(v, {k: xv[idx] for k, xv in x.items()}, y[idx], p[idx])
        total = total + loss.detach()
        v = {k: v[k] - icfg.lr * (g[k] + lam * (v[k] - anchor[k])) for k in v}
        if t + 1 in record_at:
            recorded[t + 1] = v
    return v, total / max(1, schedule.shape[0]), recorded


@register("ditto")
class Ditto(MetaAlgorithm):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        lam: float = Field(0.1, ge=0, le=1e4)  # the pull of the personal model towards the global one

    def check_config(self):
        if self.cfg.meta.inner_optimizer != "sgd":
            raise ValueError(f"meta.inner_optimizer: ditto's personal steps are plain SGD; must be 'sgd' (got {self.cfg.meta.inner_optimizer!r})")

    def init_client_state(self, theta):
        return {k: v.clone() for k, v in theta.items()}

    def client_update(self, model, params, support, query, schedule, icfg, state):
        theta = model_params(params)
        phi, loss, _ = inner_loop(model, theta, *support, schedule, icfg)
        v, personal, _ = prox_steps(model, state, theta, support, schedule, icfg, self.params.lam)
        return phi, {"train_loss": loss, "personal_loss": personal}, {k: w.detach() for k, w in v.items()}

    def step_size(self, server_round):
        return 1.0

    def adapt(self, model, params, support, schedule, icfg, record_at=()):
        theta = model_params(params)
        v, _, recorded = prox_steps(model, theta, theta, support, schedule, icfg, self.params.lam, record_at)
        return v, recorded
