"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"),
written against the public seam only (as a user's method would be).

Server control variate ``c`` travels with theta as extra meta-state (keys ``scaffold/<param>``); each client
keeps its own ``c_i`` as client state. With ``K`` local steps of size ``eta`` (``meta.inner_lr``):

    y <- y - eta * (grad f_i(y; batch) - c_i + c)          (K times, from y = x)
    c_i+ = c_i - c + (x - y) / (K * eta)                    (option II)
    client sends  dy = y - x,  dc = c_i+ - c_i              (as the new value of the scaffold/ keys: c + dc)
    server:       x <- x + eta_g * mean(dy),  c <- c + (|S| / N) * mean(dc)

``eta_g`` is ``meta.params.global_lr``; ``|S| / N`` is the expected cohort fraction
``min(1, clients_per_round / N)`` (exact with fixed-size sampling; its expectation under Poisson sampling,
which keeps the cohort size out of a DP release). The mean is the seam's default aggregate (weighted by
examples), so DP can wrap it. Evaluation scores the global model, as FedAvg.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmeta.meta import MetaAlgorithm, loss_fn, model_params, register

PREFIX = "scaffold/"


@register("scaffold")
class Scaffold(MetaAlgorithm):
    adapts_at_eval = False

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        global_lr: float = Field(1.0, gt=0, le=100)  # eta_g

    def check_config(self):
        if self.cfg.meta.inner_optimizer != "sgd":
            raise ValueError(f"meta.inner_optimizer: scaffold corrects plain SGD steps; must be 'sgd' (got {self.cfg.meta.inner_optimizer!r})")
        if self.cfg.meta.server_optimizer != "sgd":
            raise ValueError(f"meta.server_optimizer: scaffold's server step is its own (x and c); must be 'sgd' (got {self.cfg.meta.server_optimizer!r})")

    def extra_state(self, theta):
        return {PREFIX + k: torch.zeros_like(v) for k, v in theta.items()}

    def init_client_state(self, theta):
        return {k: torch.zeros_like(v) for k, v in theta.items()}

    def client_update(self, model, params, support, query, schedule, icfg, state):
        x = model_params(params)
        c = {k: params[PREFIX + k] for k in x}
        x_b, y_b, p_b = support
        grad = torch.func.grad_and_value(lambda p, xb, yb, pb: loss_fn(model, p, xb, yb, pb, icfg.task))
        y, total = x, torch.zeros((), dtype=next(iter(x.values())).dtype, device=y_b.device)
        for t in range(schedule.shape[0]):
            idx = schedule[t]
            g, loss = grad(y, {k: v[idx] for k, v in x_b.items()}, y_b[idx], p_b[idx])
            total = total + loss.detach()
            y = {k: y[k] - icfg.lr * (g[k] - state[k] + c[k]) for k in y}
        steps = max(1, schedule.shape[0])
        ci = {k: state[k] - c[k] + (x[k] - y[k]) / (steps * icfg.lr) for k in x}
        out = {k: v.detach() for k, v in y.items()} | {PREFIX + k: (c[k] + ci[k] - state[k]).detach() for k in x}
        return out, {"train_loss": total / steps}, {k: v.detach() for k, v in ci.items()}

    def init_server_state(self, theta, num_clients):
        return {"num_clients": int(num_clients)}

    def server_apply(self, theta, mean, server_round, state):
        frac = min(1.0, self.cfg.simulation.clients_per_round / state["num_clients"])
        lr = self.params.global_lr
        new = {k: theta[k] + (frac if k.startswith(PREFIX) else lr) * mean[k] for k in theta}
        return new, state, {"beta": lr}


@register("scaffold_ft")
class ScaffoldFineTune(Scaffold):
    """SCAFFOLD training, evaluated after fine-tuning on the support set (as ``fedavg_ft`` is to ``fedavg``): the
    global model SCAFFOLD trains is not personal, so on client-specific tasks it is compared with fine-tuning."""

    adapts_at_eval = True
