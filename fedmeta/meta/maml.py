"""MAML and first-order MAML client updates, as pure functions on tensors.

Finn et al. (2017): the meta-gradient of a client (task) is

    g = d/d theta  L_query( phi(theta) ),   phi(theta) = inner_loop(theta, support)

* ``maml``  (second order): ``torch.func.grad`` differentiates *through*
  :func:`fedmeta.meta.inner_loop` (which itself calls ``torch.func.grad_and_value``
  for its steps), so the Hessian-vector products of the inner steps are included.
  This is the real thing, not the first-order variant Flower's baseline calls MAML.
* ``fomaml`` (first order): ``g = grad L_query(phi)`` evaluated at ``phi = inner_loop(theta)``,
  i.e. d phi / d theta is taken to be the identity.

There is one inner loop in the project; these functions only wrap it.

How the meta step rides on the shared server step
-------------------------------------------------
The server always applies ``theta <- theta + beta * weighted_mean_i(phi'_i - theta)``.
A MAML client returns ``phi' = theta - g``, so the server step becomes

    theta <- theta - beta * weighted_mean_i(g_i)

plain meta-gradient descent whose learning rate is ``beta`` = ``meta.outer_lr``
annealed linearly to ``meta.outer_lr_final`` (exactly as for Reptile). Client-level
DP clipping and noise therefore act on the meta-gradient, as they should.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedmeta.meta.inner import InnerConfig, Params, inner_loop, loss_fn

Set = tuple[dict[str, Tensor], Tensor, Tensor]  # (x, y, present)


def meta_gradient(
    model: nn.Module,
    theta: Params,
    support: Set,
    query: Set,
    schedule: Tensor,
    cfg: InnerConfig,
    second_order: bool = True,
) -> tuple[Params, Tensor, Tensor]:
    """``(g, inner_loss, query_loss)``: the (first- or second-order) MAML meta-gradient at ``theta``.

    ``inner_loss`` is the mean inner-loop training loss, ``query_loss`` is
    ``L_query(phi)`` after adaptation (both detached).
    """
    sx, sy, sp = support
    qx, qy, qp = query

    def outer(th: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        phi, inner, _ = inner_loop(model, th, sx, sy, sp, schedule, cfg)
        q = loss_fn(model, phi, qx, qy, qp, cfg.task)
        return q, (q.detach(), inner.detach())

    if second_order:
        g, (q, inner) = torch.func.grad(outer, has_aux=True)(theta)
        return {k: v.detach() for k, v in g.items()}, inner, q
    phi, inner, _ = inner_loop(model, theta, sx, sy, sp, schedule, cfg)
    phi = {k: v.detach() for k, v in phi.items()}
    g, q = torch.func.grad_and_value(lambda p: loss_fn(model, p, qx, qy, qp, cfg.task))(phi)
    return {k: v.detach() for k, v in g.items()}, inner.detach(), q.detach()


def maml_client_update(
    model: nn.Module,
    theta: Params,
    support: Set,
    query: Set,
    schedule: Tensor,
    cfg: InnerConfig,
    second_order: bool = True,
) -> tuple[Params, Tensor, Tensor]:
    """``(phi', inner_loss, query_loss)`` with ``phi' = theta - g`` (see the module docstring)."""
    g, inner, q = meta_gradient(model, theta, support, query, schedule, cfg, second_order)
    return {k: theta[k].detach() - g[k] for k in theta}, inner, q


def split_support(n_support: int, query_fraction: float) -> int:
    """Rows of the support set used for the inner loop when ``query_fraction`` of it is the meta-query.

    Keeps at least one row on each side.
    """
    n_query = min(max(1, int(round(query_fraction * n_support))), n_support - 1)
    return n_support - n_query
