"""The Flower ServerApp: ``flwr run .`` runs :func:`fedmeta.engines.flower.serve` over the Grid.

The config comes from Flower's run config; the round loop is
:mod:`fedmeta.federation`, the backend :mod:`fedmeta.engines.flower` and the
message strategy (building and validating messages) :mod:`fedmeta.engines.messages`,
so ``fedmeta simulate`` and ``flwr run`` run the same code.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import config_from_run_config
from fedmeta.engines.flower import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(dict(context.run_config))
    serve(grid, cfg)
    if cfg.output.dir:  # the run's picture beside its files (fedmeta simulate draws it the same way)
        from fedmeta.plot import write_curves

        write_curves(cfg.output.dir)
