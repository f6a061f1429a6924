"""pfl-research 0.6 Reptile on ``fedmeta bench``'s workload: the bench's pfl row (``fedmeta bench --pfl-python PY``).

Run by *pfl's* interpreter, not fedmeta's: pfl 0.6 pins ``dp-accounting<0.6`` and fedmeta needs ``>=0.6``,
so pfl lives in its own venv (``python -m venv /work/pflvenv && /work/pflvenv/bin/pip install torch==2.13.0
pfl==0.6 pydantic``; pydantic because fedmeta's model module is imported from this checkout through
``PYTHONPATH``, which the bench sets)::

    PYTHONPATH=. /work/pflvenv/bin/python experiments/pfl_reptile.py WORKLOAD.pt OUT.json

``WORKLOAD.pt`` (written by :func:`fedmeta.bench.pfl_workload`, read with ``weights_only=True``): the dataset
spec and model settings, theta0, the inner learning rate and batch size, the outer step size per round, and per
round the cohort with each client's support rows in the order fedmeta's batch schedule visits them. So pfl
trains the same clients on the same batches from the same theta0, with its own machinery: a
``FederatedDataset`` whose user sampler yields the cohorts, ``Reptile`` (FedAvg's local SGD + model
difference, averaged over the cohort), ``PyTorchModel`` with ``torch.optim.SGD`` locally and centrally (the
step size per round through a ``LambdaLR``). Round 1 is warm-up; rounds 2.. are timed by a callback
(``perf_counter`` and ``process_time`` after each central iteration). Writes ``OUT.json`` (the same fields as
the other bench rows) and ``OUT.json.theta.pt`` (the final theta, for fedmeta to compare).
"""

from __future__ import annotations

import importlib.metadata
import json
import resource
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm.base import PersonalizedNNAlgorithmParams  # noqa: E402
from pfl.algorithm.reptile import Reptile  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.hyperparam.base import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402

from fedmeta.data.base import DatasetSpec, ModalitySpec  # noqa: E402
from fedmeta.models.multimodal import MultimodalNet  # noqa: E402


class PflNet(torch.nn.Module):
    """fedmeta's model with the ``loss``/``metrics`` methods pfl's PyTorchModel calls on a batch's tensors."""

    def __init__(self, net: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.net, self.names = net, names

    def forward(self, *data):
        *xs, present, _ = data
        return self.net(dict(zip(self.names, xs)), present)

    def loss(self, *data, eval=False):  # noqa: A002 - pfl's keyword
        return F.cross_entropy(self(*data), data[-1])

    def metrics(self, *data, eval=False):  # noqa: A002
        return {"loss": Weighted(float(self.loss(*data)) * len(data[-1]), len(data[-1]))}


class Timer(TrainingProcessCallback):
    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return False, Metrics()


def main(workload_path: str, out_path: str) -> None:
    w = torch.load(workload_path, weights_only=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = DatasetSpec(tuple(ModalitySpec(m["name"], m["kind"], tuple(m["shape"]), m["vocab_size"]) for m in w["modalities"]),
                       w["task"], w["num_classes"], w["output_dim"])
    names = [m["name"] for m in w["modalities"]]
    net = PflNet(MultimodalNet(spec, **w["model"]), names)
    net.net.load_state_dict(w["theta0"])
    clients, rows = w["clients"], w["rows"]

    steps_rows = len(next(iter(rows.values())))

    def make_dataset(key: str) -> Dataset:
        """The user's scheduled support rows in visiting order, then its query rows (Reptile's split puts them in its val part)."""
        cid = key.split(":")[1]
        c = clients[cid]
        idx = torch.cat([rows[key], torch.arange(c["n_support"], len(c["y"]))])
        return Dataset(raw_data=[*(c["x"][n][idx] for n in names), c["present"][idx], c["y"][idx]], user_id=key)

    order = iter([f"{r}:{cid}" for r, cohort in enumerate(w["cohorts"]) for cid in cohort])
    data = FederatedDataset(make_dataset, lambda: next(order))
    betas = list(w["betas"])
    central = torch.optim.SGD(net.parameters(), lr=1.0)
    model = PyTorchModel(net, local_optimizer_create=torch.optim.SGD, central_optimizer=central,
                         central_learning_rate_scheduler=torch.optim.lr_scheduler.LambdaLR(central, lambda i: betas[min(i, len(betas) - 1)]))
    rounds, n = len(w["cohorts"]), len(w["cohorts"][0])
    timer = Timer()
    Reptile().run(
        # the split keeps exactly the scheduled rows for training (min_train_size) and the query rows apart
        algorithm_params=PersonalizedNNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1, train_cohort_size=n,
                                                       val_cohort_size=None, val_split_fraction=0.0, min_train_size=steps_rows, min_val_size=0),
        backend=SimulatedBackend(training_data=data, val_data=data),
        model=model,
        model_train_params=NNTrainHyperParams(local_num_epochs=1, local_learning_rate=w["inner_lr"], local_batch_size=w["batch_size"]),
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[timer],
    )
    times = [b - a for a, b in zip(timer.wall, timer.wall[1:])]
    timed = rounds - 1
    report = {
        "updates_per_s": n * timed / sum(times),
        "round_times_s": times,
        "updates_per_cpu_s": n * timed / (timer.cpu[-1] - timer.cpu[0]),
        "startup_s": timer.wall[0] - T0,
        "round_s": sum(times) / timed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_pss_mb": 0.0,
        "peak_anon_mb": 0.0,
        "torch_threads": torch.get_num_threads(),
        "clients_per_round": n,
        "timed_rounds": timed,
        "pfl_version": importlib.metadata.version("pfl"),
    }
    torch.save({k: v.detach().clone() for k, v in net.net.state_dict().items()}, out_path + ".theta.pt")
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
