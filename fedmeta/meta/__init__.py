"""Meta-learning maths: client inner loops and server outer steps, as plain functions."""

from fedmeta.meta.inner import (
    InnerConfig,
    adapt_and_evaluate,
    batch_schedule,
    client_seed,
    evaluate,
    inner_loop,
    loss_fn,
    params_of,
)
from fedmeta.meta.outer import apply_step, delta, linear_anneal, meta_step_size, reptile_update, weighted_mean

__all__ = [
    "InnerConfig", "adapt_and_evaluate", "apply_step", "batch_schedule", "client_seed", "delta", "evaluate",
    "inner_loop", "linear_anneal", "loss_fn", "meta_step_size", "params_of", "reptile_update", "weighted_mean",
]
