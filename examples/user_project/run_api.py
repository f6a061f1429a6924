"""The same experiment from Python: ``fedmeta.simulate`` with the objects themselves.

    python run_api.py [sequential|vectorized|flower] [OUT_DIR]

Objects defined in an importable module (as here) are recorded by their
``module:attr`` reference in ``config.json``, so any engine can use them,
including ``flower``, whose client processes import them. Objects that
exist only in this process (defined in a notebook cell, a lambda) run on
``sequential`` and ``vectorized``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fedmeta
from my_algorithm import ProxReptile
from my_data import make as make_dataset
from my_model import make as make_model


def main(engine: str = "vectorized", out: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    summary = fedmeta.simulate(
        Path(__file__).with_name("experiment.toml"),  # the same config; the objects below replace what it names
        model=make_model,
        dataset=make_dataset,
        algorithm=ProxReptile,
        overrides=[f"simulation.engine={engine}", *extra],
        out=out,
    )
    print(f"held-out accuracy: {summary['heldout_acc_before']:.3f} before adaptation, {summary['heldout_acc_after']:.3f} after")
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:3])
