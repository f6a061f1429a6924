"""The client side of meta-learning, as pure functions on tensors.

Parameters are ``dict[str, Tensor]``; the model is called with
``torch.func.functional_call``. Nothing here branches on data or keeps state,
so the same functions run one client at a time (Flower ClientApp, sequential
engine) or a whole cohort at once under ``torch.func.vmap`` (vectorised engine).

The order in which support examples are visited is fixed up front by
:func:`batch_schedule` from a per-client seed, which is what makes the engines
agree to float tolerance in deterministic mode.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]  # parameters by name (θ, φ, updates); defined here only


@dataclass(frozen=True)
class InnerConfig:
    """What the inner loop needs, independent of the full experiment config."""

    steps: int
    lr: float
    optimizer: str = "sgd"  # "sgd" | "adam" (beta1 = 0, as in the Reptile paper)
    batch_size: int = 10  # 0 = full support set
    beta2: float = 0.999
    eps: float = 1e-8
    task: str = "classification"

    @classmethod
    def from_meta(cls, meta, task: str, steps: int | None = None) -> "InnerConfig":
        return cls(
            steps=meta.inner_steps if steps is None else steps,
            lr=meta.inner_lr,
            optimizer=meta.inner_optimizer,
            batch_size=meta.inner_batch_size,
            beta2=meta.adam_beta2,
            task=task,
        )


def client_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (e.g. run seed, round, client id)."""
    # two 32-bit words as one little-endian 64-bit int, shifted on a Python int: numpy 1.26 has no
    # right_shift for (uint64, int) and numpy 2 does, so shifting the numpy scalar breaks on 1.26
    lo, hi = (int(w) for w in np.random.SeedSequence([int(k) % (2**63) for k in keys]).generate_state(2, np.uint32))
    return (lo | (hi << 32)) >> 1


def batch_schedule(n_support: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """``[steps, b]`` support-row indices: epochs of shuffled rows, cut into batches.

    ``batch_size`` 0 (or >= n_support) means full batch, every row each step.
    """
    if steps <= 0:
        return torch.zeros((0, max(1, min(batch_size, n_support) if batch_size > 0 else n_support)), dtype=torch.long)
    if batch_size <= 0 or batch_size >= n_support:
        return torch.arange(n_support).expand(steps, n_support).clone()
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    epochs = -(-need // n_support)
    order = torch.cat([torch.randperm(n_support, generator=g) for _ in range(epochs)])
    return order[:need].view(steps, batch_size)


def params_of(model: nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


_UNTIED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _has_no_tied_tensors(model: nn.Module) -> bool:
    """True when no parameter or buffer is shared between two names: then ``functional_call`` need not
    look for ties on every call (that walk over the modules was ~13 % of a sequential inner step)."""
    untied = _UNTIED.get(model)
    if untied is None:
        tensors = [t for _, t in model.named_parameters(remove_duplicate=False)] + [t for _, t in model.named_buffers(remove_duplicate=False)]
        untied = _UNTIED[model] = len({id(t) for t in tensors}) == len(tensors)
    return untied


def forward(model: nn.Module, params: Params, x: dict[str, Tensor], present: Tensor) -> Tensor:
    """``model(x, present)`` with ``params``; floating inputs are cast to the parameters' dtype (any floating dtype works)."""
    dtype = next(iter(params.values())).dtype
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    return functional_call(model, params, (x, present), tie_weights=not _has_no_tied_tensors(model))


def task_loss(model: nn.Module, out: Tensor, y: Tensor, task: str) -> Tensor:
    """The model's own ``loss(outputs, y)`` if it defines one, else the task's default (cross-entropy or MSE)."""
    custom = getattr(model, "loss", None)
    if callable(custom):
        return custom(out, y)
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y.to(out.dtype))


def loss_fn(model: nn.Module, params: Params, x: dict[str, Tensor], y: Tensor, present: Tensor, task: str) -> Tensor:
    return task_loss(model, forward(model, params, x, present), y, task)


def _plain_eager(params: Params) -> bool:
    """True outside every ``torch.func`` transform (no vmap, no grad level) with no parameter requiring grad:
    then ``torch.autograd.grad`` gives the same gradients as ``torch.func.grad_and_value`` at half the
    per-step overhead (the sequential engine, the Flower ClientApp)."""
    return torch._C._functorch.maybe_current_level() is None and not any(v.requires_grad for v in params.values())


def _autograd_value_and_grad(model: nn.Module, task: str) -> Callable[..., tuple[Params, Tensor]]:
    def value_and_grad(params: Params, xb: dict[str, Tensor], yb: Tensor, pb: Tensor) -> tuple[Params, Tensor]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = loss_fn(model, leaves, xb, yb, pb, task)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return dict(zip(leaves, grads)), loss.detach()

    return value_and_grad


class _EagerSGD(nn.Module):
    """The eager SGD inner loop as one module call, so ``functional_call`` swaps the parameters in once per
    client (not twice per step) and each step updates them in place, as ``torch.optim.SGD`` would."""

    def __init__(self, model: nn.Module, params: Params) -> None:
        super().__init__()
        self.model = model
        # the tensors functional_call swaps into the model, held as a plain list (never a forward argument: module
        # hooks such as FlopCounterMode's would watch them and then refuse the autograd.grad inside)
        self.leaves = [(k, v) for k, v in params.items()]

    def forward(self, x, y, present, schedule, cfg, record_at):
        names, leaves = [k for k, _ in self.leaves], [v for _, v in self.leaves]
        total = torch.zeros((), dtype=leaves[0].dtype, device=y.device)
        recorded: dict[int, Params] = {}
        for t in range(schedule.shape[0]):
            idx = schedule[t]
            loss = task_loss(self.model, self.model({k: xv[idx] for k, xv in x.items()}, present[idx]), y[idx], cfg.task)
            grads = torch.autograd.grad(loss, leaves)
            with torch.no_grad():  # p += -lr * g in one fused call, as torch.optim.SGD (foreach) does
                torch._foreach_add_(leaves, grads, alpha=-cfg.lr)
            total = total + loss.detach()
            if t + 1 in record_at:
                recorded[t + 1] = {k: v.detach().clone() for k, v in zip(names, leaves)}
        return total / max(1, schedule.shape[0]), recorded


def _eager_sgd(
    model: nn.Module, params: Params, x: dict[str, Tensor], y: Tensor, present: Tensor, schedule: Tensor, cfg: InnerConfig, record_at: tuple[int, ...]
) -> tuple[Params, Tensor, dict[int, Params]]:
    """:func:`inner_loop` with SGD outside every ``torch.func`` transform (the sequential engine, the Flower ClientApp),
    at the cost of a plain ``nn.Module`` + autograd + ``torch.optim.SGD`` loop and bit for bit its result (the step is
    its fused ``p += -lr * g``); the transformed path's ``p - lr * g`` rounds twice, so the two agree to float rounding."""
    dtype = next(iter(params.values())).dtype
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}  # updated in place; theta is not
    loss, recorded = functional_call(
        _EagerSGD(model, leaves), {f"model.{k}": v for k, v in leaves.items()}, (x, y, present, schedule, cfg, record_at),
        tie_weights=not _has_no_tied_tensors(model),
    )
    if 0 in record_at:
        recorded[0] = params
    return {k: v.detach() for k, v in leaves.items()}, loss, recorded


def inner_loop(
    model: nn.Module,
    params: Params,
    x: dict[str, Tensor],
    y: Tensor,
    present: Tensor,
    schedule: Tensor,
    cfg: InnerConfig,
    record_at: tuple[int, ...] = (),
) -> tuple[Params, Tensor, dict[int, Params]]:
    """Run ``len(schedule)`` optimiser steps from ``params`` on the support rows.

    Returns the adapted parameters phi, the mean training loss over the steps,
    and the parameters after each step count in ``record_at``.
    """
    eager = _plain_eager(params)
    if eager and cfg.optimizer == "sgd":  # one client, nothing differentiates through us: the plain-PyTorch loop
        return _eager_sgd(model, params, x, y, present, schedule, cfg, record_at)
    value_and_grad = torch.func.grad_and_value(lambda p, xb, yb, pb: loss_fn(model, p, xb, yb, pb, cfg.task))
    if eager:  # plain autograd, half the overhead of grad_and_value
        value_and_grad = _autograd_value_and_grad(model, cfg.task)
    v = {k: torch.zeros_like(p) for k, p in params.items()} if cfg.optimizer == "adam" else None
    total = torch.zeros((), dtype=next(iter(params.values())).dtype, device=y.device)
    recorded: dict[int, Params] = {0: params} if 0 in record_at else {}
    for t in range(schedule.shape[0]):
        idx = schedule[t]
        grads, loss = value_and_grad(params, {k: xv[idx] for k, xv in x.items()}, y[idx], present[idx])
        total = total + loss.detach()
        if cfg.optimizer == "adam":
            corr = 1.0 - cfg.beta2 ** (t + 1)
            v = {k: cfg.beta2 * v[k] + (1 - cfg.beta2) * grads[k] ** 2 for k in params}
            params = {k: p - cfg.lr * grads[k] / ((v[k] / corr).sqrt() + cfg.eps) for k, p in params.items()}
        else:
            params = {k: p - cfg.lr * grads[k] for k, p in params.items()}
        if t + 1 in record_at:
            recorded[t + 1] = params
    return params, total / max(1, schedule.shape[0]), recorded


def evaluate(model: nn.Module, params: Params, x: dict[str, Tensor], y: Tensor, present: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """(loss, accuracy) on a set of examples; accuracy is NaN for regression."""
    with torch.no_grad():
        out = forward(model, params, x, present)
        loss = task_loss(model, out, y, task)
        if task == "classification":
            return loss, (out.argmax(-1) == y).to(loss.dtype).mean()
        return loss, torch.full((), float("nan"), dtype=loss.dtype, device=loss.device)


def adaptation_metrics(
    model: nn.Module,
    theta: Params,
    support: tuple[dict[str, Tensor], Tensor, Tensor],
    query: tuple[dict[str, Tensor], Tensor, Tensor],
    schedule: Tensor,
    cfg: InnerConfig,
    at_steps: tuple[int, ...] = (),
    adapt: Callable[..., tuple[Params, dict[int, Params]]] | None = None,
) -> dict[str, Tensor]:
    """Query loss/accuracy before and after ``len(schedule)`` adaptation steps, as tensors.

    ``at_steps`` adds ``loss_at_<s>`` and ``acc_at_<s>`` after ``s`` steps, for
    adaptation curves (e.g. the sine task's 1, 5 and 10 steps). Pure, so it can
    be vmapped over clients. ``adapt(model, theta, support, schedule, cfg, record_at)`` replaces the
    plain inner loop (an algorithm's :meth:`~fedmeta.meta.algorithm.MetaAlgorithm.adapt`).
    """
    qx, qy, qp = query
    out: dict[str, Tensor] = {}
    marks = tuple(s for s in at_steps if 0 < s <= schedule.shape[0])
    if adapt is None:
        start = theta
        phi, _, recorded = inner_loop(model, theta, *support, schedule, cfg, record_at=marks)
    else:  # the algorithm's own adaptation (its meta-state, e.g. learned learning rates, stays out of the model)
        start = {k: v for k, v in theta.items() if "/" not in k}
        phi, recorded = adapt(model, theta, support, schedule, cfg, marks)
    out["loss_before"], out["acc_before"] = evaluate(model, start, qx, qy, qp, cfg.task)
    for s in marks:
        out[f"loss_at_{s}"], out[f"acc_at_{s}"] = evaluate(model, recorded[s], qx, qy, qp, cfg.task)
    out["loss_after"], out["acc_after"] = evaluate(model, phi, qx, qy, qp, cfg.task)
    return out


def adapt_and_evaluate(
    model: nn.Module,
    theta: Params,
    support: tuple[dict[str, Tensor], Tensor, Tensor],
    query: tuple[dict[str, Tensor], Tensor, Tensor],
    schedule: Tensor,
    cfg: InnerConfig,
    at_steps: tuple[int, ...] = (),
    adapt: Callable[..., tuple[Params, dict[int, Params]]] | None = None,
) -> dict[str, float]:
    """:func:`adaptation_metrics` for one client, as floats."""
    return {k: float(v) for k, v in adaptation_metrics(model, theta, support, query, schedule, cfg, at_steps, adapt).items()}
