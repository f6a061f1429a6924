"""FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated Learning"),
written against the public seam only.

The model splits into a shared body and a head; each client keeps its own head as client state (the initial
head at its first round). In a round, with the client's batch schedule:

    head:  h <- h - eta * grad_h f_i(body, h)      (len(schedule) steps, body fixed)
    body:  b <- b - eta * grad_b f_i(b, h)         (len(schedule) steps, the new head fixed)

and only the body goes to the server (the head keys come back unchanged, so their delta is zero); the
server averages the bodies (beta = 1). ``meta.params.head`` names the head: the parameters whose names start
with it (default ``""``: the module of the model's last parameter, e.g. ``head`` of the built-in model).
Evaluation: a client trains a head from theta's with the body frozen (``meta.eval_steps``), FedRep's
procedure for a new client.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from fedmeta.meta import MetaAlgorithm, loss_fn, model_params, register


def head_keys(theta, prefix: str) -> list[str]:
    if not prefix:
        prefix = next(reversed(theta)).rpartition(".")[0] + "."
    return [k for k in theta if k.startswith(prefix)]


def partial_steps(model, params, keys, support, schedule, icfg, record_at=()):
    """SGD on ``params[keys]`` only (the rest fixed); (params, mean loss, recorded)."""
    x, y, p = support
    fixed = {k: v for k, v in params.items() if k not in keys}
    grad = torch.func.grad_and_value(lambda part, xb, yb, pb: loss_fn(model, fixed | part, xb, yb, pb, icfg.task))
    part = {k: params[k] for k in keys}
    total = torch.zeros((), dtype=next(iter(params.values())).dtype, device=y.device)
    recorded = {}
    for t in range(schedule.shape[0]):
        idx = schedule[t]
        g, loss = grad(part, {k: xv[idx] for k, xv in x.items()}, y[idx], p[idx])
        total = total + loss.detach()
        part = {k: part[k] - icfg.lr * g[k] for k in part}
        if t + 1 in record_at:
            recorded[t + 1] = fixed | part
    return fixed | part, total / max(1, schedule.shape[0]), recorded


@register("fedrep")
class FedRep(MetaAlgorithm):
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        head: str = ""  # prefix of the head's parameter names; "" = the module of the model's last parameter

    def check_config(self):
        if self.cfg.meta.inner_optimizer != "sgd":
            raise ValueError(f"meta.inner_optimizer: fedrep takes plain SGD steps; must be 'sgd' (got {self.cfg.meta.inner_optimizer!r})")

    def check_model(self, model):
        theta = dict(model.named_parameters())
        head = head_keys(theta, self.params.head)
        if not head or len(head) == len(theta):
            raise ValueError(f"meta.params.head: must name some but not all of the model's parameters (got {self.params.head!r}: {len(head)} of {len(theta)})")

    def init_client_state(self, theta):
        return {k: theta[k].clone() for k in head_keys(theta, self.params.head)}

    def client_update(self, model, params, support, query, schedule, icfg, state):
        theta = model_params(params)
        head = list(state)
        body = [k for k in theta if k not in state]
        w, head_loss, _ = partial_steps(model, theta | state, head, support, schedule, icfg)
        w, loss, _ = partial_steps(model, w, body, support, schedule, icfg)
        out = {k: w[k].detach() for k in body} | {k: theta[k].detach() for k in head}
        return out, {"train_loss": loss, "head_loss": head_loss}, {k: w[k].detach() for k in head}

    def step_size(self, server_round):
        return 1.0

    def adapt(self, model, params, support, schedule, icfg, record_at=()):
        theta = model_params(params)
        w, _, recorded = partial_steps(model, theta, head_keys(theta, self.params.head), support, schedule, icfg, record_at)
        return w, recorded
