"""fedmeta: federated meta-learning on Flower, with client-level differential privacy.

``fedmeta.simulate(config, model=..., dataset=..., algorithm=...)`` runs a
federation from Python (:mod:`fedmeta.api`); ``fedmeta simulate`` from the shell.
``fedmeta.load_run(DIR)`` gives a finished run's ``(config, spec, model)`` (:mod:`fedmeta.loading`).
"""

__version__ = "0.1.0"


def simulate(*args, **kwargs):
    """See :func:`fedmeta.api.simulate` (imported lazily: ``import fedmeta`` stays light)."""
    from fedmeta.api import simulate as _simulate

    return _simulate(*args, **kwargs)


def load_run(run_dir, **objects):
    """See :func:`fedmeta.loading.load_run`: ``(config, spec, model)`` of a finished run, θ loaded."""
    from fedmeta.loading import load_run as _load_run

    return _load_run(run_dir, **objects)
