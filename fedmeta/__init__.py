"""fedmeta: federated meta-learning on Flower, with client-level differential privacy.

``fedmeta.simulate(config, model=..., dataset=..., algorithm=...)`` runs a
federation from Python (:mod:`fedmeta.api`); ``fedmeta simulate`` from the shell.
"""

__version__ = "0.1.0"


def simulate(*args, **kwargs):
    """See :func:`fedmeta.api.simulate` (imported lazily: ``import fedmeta`` stays light)."""
    from fedmeta.api import simulate as _simulate

    return _simulate(*args, **kwargs)
