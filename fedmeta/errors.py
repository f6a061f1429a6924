"""Every fedmeta error, under one base (this module imports nothing).

A :class:`FedmetaError`'s message is one line, shown as it is by the CLI (exit 2). Each class also keeps
the builtin base it always had (``ValueError`` or ``RuntimeError``), and stays importable from the module
that raises it (``fedmeta.config.ConfigError``, ``fedmeta.federation.RunError`` ...).
"""


class FedmetaError(Exception):
    """Base of every fedmeta error; ``str(err)`` is a single line."""


class ConfigError(FedmetaError, ValueError):
    """An invalid configuration; ``str(err)`` is a single line."""


class ComponentError(ConfigError):
    """A component reference that cannot be imported or does not fit its contract (one line)."""


class DataError(FedmetaError, ValueError):
    """A data file or dataset definition is unusable; the message is one line."""


class RunDirError(FedmetaError, ValueError):
    """A run directory or checkpoint is unusable; the message is one line naming the file."""


class RunError(FedmetaError, RuntimeError):
    """A run cannot continue; the message is one line."""


class ReplyError(FedmetaError, ValueError):
    """A malformed client reply; the message says why in one line."""


class PrivacyError(FedmetaError, ValueError):
    """Invalid privacy parameter or an operation that would break the DP guarantee.

    Messages are one line and name the parameter, e.g.
    ``privacy.noise_multiplier: must be >= 0, got -1``.
    """


class PLDTooLargeError(PrivacyError):
    """The PLD accountant would need a grid over the size limits; use RDP (``str(err)`` says how big)."""

    def __init__(self, message: str, points: int) -> None:
        super().__init__(message)
        self.points = points


class NonFiniteUpdateError(PrivacyError):
    """An update contains NaN or +-inf, so it has no finite norm and cannot be clipped."""
