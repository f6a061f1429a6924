"""How many clients each group holds: plain arithmetic shared by the config checks and the data split.

No imports (``fedmeta.config`` uses it and stays free of torch and numpy).
"""


def heldout_count(num_clients: int, fraction: float) -> int:
    """Held-out (test) clients of ``data.heldout_fraction``: ``round(fraction * num_clients)``, at least 1, leaving at least 1."""
    return min(max(1, int(round(fraction * num_clients))), num_clients - 1)


def validation_count(num_clients: int, fraction: float) -> int:
    """How many clients ``data.validation_fraction`` names: ``round(fraction * num_clients)``, >= 1 if > 0."""
    return 0 if fraction <= 0 else max(1, int(round(fraction * num_clients)))
