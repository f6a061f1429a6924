"""A ClientApp that wraps fedmeta's and misbehaves on chosen partitions (for fault tests)."""

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

import clients.app as real
from fedmeta.data import split_clients

# partition-id -> fault kind. Defined here, not by the test, because Ray runs
# the ClientApp in other processes: the first 7 of the 12-client population's
# training clients misbehave, one way each.
NUM_CLIENTS = 12
KINDS = ["raise", "names", "shape", "dtype", "nan", "inf", "norm"]
FAULTS: dict[int, str] = dict(zip(split_clients(NUM_CLIENTS, 0.2, 0).train, KINDS))

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    kind = FAULTS.get(int(context.node_config["partition-id"]))
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
    reply.content["arrays"] = ArrayRecord(torch_state_dict=sd)
    return reply
