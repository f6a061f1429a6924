"""Meta-learning maths: client inner loops and server outer steps, as plain functions."""

from fedmeta.meta.inner import (
    InnerConfig,
    Params,
    adapt_and_evaluate,
    batch_schedule,
    client_seed,
    evaluate,
    inner_loop,
    loss_fn,
    params_of,
)
from fedmeta.meta.algorithm import (
    REGISTRY,
    ClientStates,
    MetaAlgorithm,
    build_algorithm,
    client_step,
    extra_params,
    model_params,
    register,
)
from fedmeta.meta.outer import apply_step, difference, linear_anneal, reptile_update, weighted_mean

__all__ = [
    "REGISTRY", "ClientStates", "MetaAlgorithm", "build_algorithm", "client_step", "extra_params", "model_params", "register",
    "InnerConfig", "Params", "adapt_and_evaluate", "apply_step", "batch_schedule", "client_seed", "difference", "evaluate",
    "inner_loop", "linear_anneal", "loss_fn", "params_of", "reptile_update", "weighted_mean",
]
