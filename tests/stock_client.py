"""A stock Flower ClientApp, written the way Flower's quickstarts write one.

It knows nothing about fedmeta: no `query` handler, it reads the standard
"arrays" record, trains a few SGD steps on its own data and replies with its
weights and "num-examples".
"""

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeta.data.synthetic import SyntheticMultimodal
from fedmeta.models import build_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    data = SyntheticMultimodal(num_clients=8).client(int(context.node_config["partition-id"]))
    model = build_model(SyntheticMultimodal(num_clients=8).spec)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(data.x, data.present), data.y).backward()
        opt.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": data.n})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
