"""A ClientApp that wraps fedmeta's and misbehaves on chosen partitions (for fault tests)."""

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import clients.app as real
from fedmeta.data import split_clients

# partition-id -> fault kind. Defined here, not by the test, because Ray runs
# the ClientApp in other processes: the first 10 of the 16-client population's
# 13 training clients misbehave in training, one way each; two of its 3
# held-out clients misbehave in discovery and in evaluation.
NUM_CLIENTS = 16
KINDS = ["raise", "names", "shape", "dtype", "nan", "inf", "norm", "stype", "truncated", "takeover"]
HELDOUT_KINDS = ["pid", "eval0"]
_split = split_clients(NUM_CLIENTS, 0.2, 0)
FAULTS: dict[int, str] = dict(zip(_split.train, KINDS)) | dict(zip(_split.heldout, HELDOUT_KINDS))
TAKEOVER_EXAMPLES, TAKEOVER_OFFSET = 10**15, 0.1  # phi = theta + 0.1 everywhere (norm ~10, under max_update_norm)

app = ClientApp()


def _kind(context: Context) -> str | None:
    return FAULTS.get(int(context.node_config["partition-id"]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    if _kind(context) == "pid":
        info = ConfigRecord({"partition-id": "not-a-number", "heldout": True, "num-examples": 20})
        return Message(RecordDict({"config": info}), reply_to=msg)
    return real.query(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = real.evaluate(msg, context)
    if _kind(context) == "eval0":
        reply.content["metrics"]["num-examples"] = 0
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    kind = _kind(context)
    if kind == "raise":
        raise RuntimeError("injected client crash")
    reply = real.train(msg, context)
    sd = reply.content["arrays"].to_torch_state_dict()
    first = next(iter(sd))
    if kind == "names":
        sd["not_a_parameter"] = sd.pop(first)
    elif kind == "shape":
        sd[first] = torch.zeros(3, 3)
    elif kind == "dtype":
        sd[first] = sd[first].double()
    elif kind == "nan":
        sd[first] = sd[first].clone().fill_(float("nan"))
    elif kind == "inf":
        sd[first] = sd[first].clone().fill_(float("inf"))
    elif kind == "norm":
        sd[first] = sd[first] + 1e9
    elif kind == "takeover":  # theta + 0.1 everywhere, claiming 10^15 examples
        sd = {k: v + TAKEOVER_OFFSET for k, v in msg.content["arrays"].to_torch_state_dict().items()}
        reply.content["metrics"]["num-examples"] = TAKEOVER_EXAMPLES
    arrays = ArrayRecord(torch_state_dict=sd)
    if kind in ("stype", "truncated"):
        a = arrays[first]
        arrays[first] = Array(a.dtype, tuple(a.shape), "torch.raw" if kind == "stype" else a.stype, a.data if kind == "stype" else a.data[:-7])
    reply.content["arrays"] = arrays
    return reply
