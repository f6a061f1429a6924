"""The Flower ClientApp: Flower messages in, fedmeta functions, Flower messages out.

The server sends the experiment config with every message (``fedmeta-config``),
so a client needs only its own data: ``partition-id`` (simulation) or
``partition-dir`` (a deployed SuperNode's ``--node-config``), and optionally
``device`` (``auto | cpu | cuda[:i]``).

A node decides what code it runs: the component references of the server's
config (``model.factory``, ``data.dataset``, ``meta.algorithm``) are checked
against the node's own configuration before anything is imported
(:func:`check_components`): a key the node sets in ``--node-config`` must be
matched exactly; a key it leaves out allows fedmeta's built-ins only. A
message naming anything else is refused (an error reply, which the server
counts as a failure) with one log line on the node. Only Flower's simulation
runtime (a Ray actor with Flower's own ``partition-id``/``num-partitions``
node config, started by the same user as the server) takes the run's
references as they come. See docs/design.md, "Threat model".

Imports stay light: a deployed SuperNode starts a fresh process per message.
"""

from __future__ import annotations

import functools
import json
import logging
import sys

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta.config import BUILTIN_MODEL, Config, config_from_json
from fedmeta.data.base import DataError, spec_to_dict
from fedmeta import client as work
from fedmeta.registry import DATASETS, METHODS, MODELS

app = ClientApp()
log = logging.getLogger("fedmeta.node")

#: config key -> the registry whose built-ins a node that does not name the key in its node config accepts (fedmeta's own code)
COMPONENTS = {"model.factory": MODELS, "data.dataset": DATASETS, "meta.algorithm": METHODS}
SIMULATED_NODE = {"partition-id", "num-partitions"}  # the node config Flower's simulation runtime gives every node


class RefusedComponent(RuntimeError):
    """The server's message names a component this node did not agree to run."""


def _simulated(node_config: dict) -> bool:
    return set(node_config) == SIMULATED_NODE and "ray" in sys.modules


def check_components(cfg: Config, node_config: dict) -> None:
    """Refuse (one log line, :class:`RefusedComponent`) a reference the node's own configuration does not allow."""
    if _simulated(node_config):
        return
    for key, registry in COMPONENTS.items():
        section, name = key.split(".")
        wanted = getattr(getattr(cfg, section), name)
        mine = node_config.get(key)
        if wanted == mine:
            continue
        builtins = registry.builtin_names() + ((BUILTIN_MODEL,) if key == "model.factory" else ())
        if mine is None and wanted in builtins:
            continue
        allowed = repr(mine) if mine is not None else "fedmeta's built-ins (" + ", ".join(builtins) + ")"
        why = (f"refused: the server's {key}={wanted!r} is not this node's ({allowed}); "
               f"a node runs only what its --node-config names")
        log.warning("%s", why)
        raise RefusedComponent(why)


def _config(msg: Message, context: Context) -> Config:
    cfg = config_from_json(str(msg.content["config"]["fedmeta-config"]))
    check_components(cfg, dict(context.node_config))
    return cfg
def _data_errors_replied(handler):
    """A client whose data fail the checks replies ``data-error`` with the error's line (the server stops a
    simulation with it, as the other engines do) instead of raising; one log line on the node."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except DataError as err:
            from fedmeta.engines.messages import data_error_reply  # only then: the node's imports stay light

            log.warning("%s", err)
            return data_error_reply(msg, err)
    return wrapped


CLIENT_STATE = "fedmeta-client-state"  # context.state key of a stateful method's client state (never sent)


def _setup(msg: Message, context: Context):
    cfg = _config(msg, context)
    work.configure_torch(1)
    cid, data, spec, group = work.resolve_client(cfg, dict(context.node_config))
    device = work.resolve_device(str(context.node_config.get("device", cfg.simulation.device)))
    components = work.components_for(cfg)  # resolved once per process and config: the objects below get them
    model = work.model_for(cfg, spec, components).to(device)
    return cfg, cid, data.to(device), spec, group, model, device, components.algorithm


def _theta(msg: Message, device):
    return {k: v.to(device) for k, v in msg.content["arrays"].to_torch_state_dict().items()}


@app.query()
@_data_errors_replied
def query(msg: Message, context: Context) -> Message:
    """Describe this node's client: id, group (``heldout`` for any reader; ``group`` names validation), size, spec."""
    cfg = _config(msg, context)
    cid, data, spec, group = work.resolve_client(cfg, dict(context.node_config))
    info = ConfigRecord({"partition-id": cid, "heldout": group != "train", "group": group, "num-examples": data.n,
                         "spec": json.dumps(spec_to_dict(spec))})
    return Message(RecordDict({"config": info}), reply_to=msg)


@app.train()
@_data_errors_replied
def train(msg: Message, context: Context) -> Message:
    """Inner loop from theta on the support set; reply phi and ``num-examples``."""
    cfg, cid, data, spec, _, model, device, algorithm = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    held = context.state.array_records.get(CLIENT_STATE)  # a stateful method's state, kept on this node
    state = None if held is None else {k: v.to(device) for k, v in held.to_torch_state_dict().items()}
    phi, metrics, state = work.train_client_state(model, _theta(msg, device), data, cfg, spec, rnd, cid, state, algorithm)
    if state:
        context.state[CLIENT_STATE] = ArrayRecord(torch_state_dict={k: v.cpu() for k, v in state.items()})
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict={k: v.cpu() for k, v in phi.items()}), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
@_data_errors_replied
def evaluate(msg: Message, context: Context) -> Message:
    """Query loss and accuracy before and after adaptation."""
    cfg, cid, data, spec, _, model, device, algorithm = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    metrics = work.evaluate_client(model, _theta(msg, device), data, cfg, spec, rnd, cid, algorithm)
    clean = {k: float(v) for k, v in metrics.items() if v == v}  # MetricRecord cannot hold NaN meaningfully
    return Message(RecordDict({"metrics": MetricRecord(clean)}), reply_to=msg)
