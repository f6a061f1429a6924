"""The Flower ClientApp: Flower messages in, fedmeta functions, Flower messages out.

The server sends the experiment config with every message (``fedmeta-config``),
so a client needs only its own data: ``partition-id`` (simulation) or
``partition-dir`` (a deployed SuperNode's ``--node-config``), and optionally
``device`` (``auto | cpu | cuda[:i]``).

Imports stay light: a deployed SuperNode starts a fresh process per message.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta.config import Config, config_from_json
from fedmeta.data.base import spec_to_dict
from fedmeta import client as work

app = ClientApp()
CLIENT_STATE = "fedmeta-client-state"  # context.state key of a stateful method's client state (never sent)


def _setup(msg: Message, context: Context):
    cfg: Config = config_from_json(str(msg.content["config"]["fedmeta-config"]))
    work.configure_torch(1)
    cid, data, spec, group = work.resolve_client(cfg, dict(context.node_config))
    device = work.resolve_device(str(context.node_config.get("device", cfg.simulation.device)))
    model = work.model_for(cfg, spec).to(device)
    return cfg, cid, data.to(device), spec, group, model, device


def _theta(msg: Message, device):
    return {k: v.to(device) for k, v in msg.content["arrays"].to_torch_state_dict().items()}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Describe this node's client: id, group (``heldout`` for any reader; ``group`` names validation), size, spec."""
    cfg = config_from_json(str(msg.content["config"]["fedmeta-config"]))
    cid, data, spec, group = work.resolve_client(cfg, dict(context.node_config))
    info = ConfigRecord({"partition-id": cid, "heldout": group != "train", "group": group, "num-examples": data.n,
                         "spec": json.dumps(spec_to_dict(spec))})
    return Message(RecordDict({"config": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Inner loop from theta on the support set; reply phi and ``num-examples``."""
    cfg, cid, data, spec, _, model, device = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    held = context.state.array_records.get(CLIENT_STATE)  # a stateful method's state, kept on this node
    state = None if held is None else {k: v.to(device) for k, v in held.to_torch_state_dict().items()}
    phi, metrics, state = work.train_client_state(model, _theta(msg, device), data, cfg, spec, rnd, cid, state)
    if state:
        context.state[CLIENT_STATE] = ArrayRecord(torch_state_dict={k: v.cpu() for k, v in state.items()})
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict={k: v.cpu() for k, v in phi.items()}), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Query loss and accuracy before and after adaptation."""
    cfg, cid, data, spec, _, model, device = _setup(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    metrics = work.evaluate_client(model, _theta(msg, device), data, cfg, spec, rnd, cid)
    clean = {k: float(v) for k, v in metrics.items() if v == v}  # MetricRecord cannot hold NaN meaningfully
    return Message(RecordDict({"metrics": MetricRecord(clean)}), reply_to=msg)
