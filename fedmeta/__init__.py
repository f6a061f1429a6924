"""fedmeta: federated meta-learning (Reptile) on Flower, with client-level differential privacy."""

__version__ = "0.1.0"
