"""Prototypical Networks, federated (Snell et al. 2017, "Prototypical Networks for Few-shot Learning"),
written against the public seam only.

A shared encoder ``model.embed(x, present) -> [B, E]`` is trained with the prototypical loss: in each of a
client's ``len(schedule)`` SGD steps (``meta.inner_lr``), the class prototypes are the mean embeddings of the
step's support batch, and the client's meta-query rows (``needs_query``, as MAML) are classified by
``softmax(-||e - p_c||^2)``; query rows whose class is absent from the batch are left out of the mean. The
server averages the encoders (beta = 1); the model's head is unused.

Evaluation (the hook this method replaces): prototypes of the support rows the evaluation batch schedule
visits (every row once ``meta.eval_steps * meta.inner_batch_size`` covers the support set), the query
classified by the nearest prototype. There is no adaptation, so ``*_after`` equals ``*_before``.
The model must have ``embed`` (refused otherwise when the model is built).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.meta import MetaAlgorithm, model_params, register
from fedmeta.meta.inner import forward


class _Embedding(nn.Module):
    """``model.embed`` as a module's forward, so ``torch.func.functional_call`` can call it with given parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, present):
        return self.model.embed(x, present)


def embed(model, params, x, present):
    return forward(_Embedding(model), {"model." + k: v for k, v in params.items()}, x, present)


def proto_logits(model, params, support, query, rows, num_classes):
    """Logits ``-||e_q - p_c||^2`` of the query rows against the prototypes of the support rows weighted by ``rows``
    (``[n]``, 0/1), and which classes have a prototype."""
    sx, sy, sp = support
    qx, _, qp = query
    onehot = (sy.unsqueeze(-1) == torch.arange(num_classes, device=sy.device)).to(rows.dtype) * rows.unsqueeze(-1)  # [n, C]
    counts = onehot.sum(0)  # [C]
    protos = onehot.T @ embed(model, params, sx, sp) / counts.clamp(min=1).unsqueeze(-1)  # [C, E]
    eq = embed(model, params, qx, qp)  # [m, E]
    logits = -((eq.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)  # [m, C]
    return logits, counts > 0


def proto_loss(logits, have, y):
    """Cross-entropy over the classes that have a prototype, averaged over the query rows whose class has one."""
    logits = torch.where(have, logits, torch.full_like(logits, -1e4))
    keep = ((y.unsqueeze(-1) == torch.arange(have.shape[-1], device=y.device)) & have).any(-1).to(logits.dtype)
    return (F.cross_entropy(logits, y, reduction="none") * keep).sum() / keep.sum().clamp(min=1)


@register("protonet")
class ProtoNet(MetaAlgorithm):
    needs_query = True

    def check_config(self):
        if self.cfg.meta.inner_optimizer != "sgd":
            raise ValueError(f"meta.inner_optimizer: protonet trains its encoder with plain SGD; must be 'sgd' (got {self.cfg.meta.inner_optimizer!r})")
        if self.cfg.meta.eval_steps < 1:
            raise ValueError("meta.eval_steps: protonet's prototypes come from the support rows the evaluation schedule visits; must be >= 1 (got 0)")

    def check_model(self, model):
        if not callable(getattr(model, "embed", None)):
            raise ValueError(f"model.factory: protonet needs a model with embed(x, present) -> [batch, dim] (got {type(model).__name__})")

    def _classes(self, model, params, support):
        sx, _, sp = support
        return forward(model, model_params(params), {k: v[:1] for k, v in sx.items()}, sp[:1]).shape[-1]

    def client_update(self, model, params, support, query, schedule, icfg):
        sx, sy, sp = support
        theta = model_params(params)
        C = self._classes(model, theta, support)

        def loss(w, idx):
            batch = ({k: v[idx] for k, v in sx.items()}, sy[idx], sp[idx])
            logits, have = proto_logits(model, w, batch, query, torch.ones(idx.shape[0], dtype=next(iter(w.values())).dtype, device=sy.device), C)
            return proto_loss(logits, have, query[1])

        grad = torch.func.grad_and_value(loss)
        w, total = theta, torch.zeros((), dtype=next(iter(theta.values())).dtype, device=sy.device)
        for t in range(schedule.shape[0]):
            g, value = grad(w, schedule[t])
            total = total + value.detach()
            w = {k: w[k] - icfg.lr * g[k] for k in w}
        return {k: v.detach() for k, v in w.items()}, {"train_loss": total / max(1, schedule.shape[0])}

    def step_size(self, server_round):
        return 1.0

    def evaluate(self, model, params, support, query, schedule, icfg, at_steps=()):
        theta = model_params(params)
        dtype = next(iter(theta.values())).dtype
        n = support[1].shape[0]
        rows = (schedule.reshape(-1, 1) == torch.arange(n, device=schedule.device)).any(0).to(dtype)
        with torch.no_grad():
            logits, have = proto_logits(model, theta, support, query, rows, self._classes(model, theta, support))
            logits = torch.where(have, logits, torch.full_like(logits, -1e4))
            y = query[1]
            loss = F.cross_entropy(logits, y)
            acc = (logits.argmax(-1) == y).to(dtype).mean()
        out = {"loss_before": loss, "acc_before": acc}
        for s in at_steps:
            if 0 < s <= schedule.shape[0]:
                out[f"loss_at_{s}"], out[f"acc_at_{s}"] = loss, acc
        return out | {"loss_after": loss, "acc_after": acc}
