"""MetaStrategy on hand-built Flower messages: malformed replies are rejected and counted, never raised;
no client's weight exceeds what it announced; robust aggregators and weight caps, by hand."""

import io
import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.config import ConfigError, build_config
from fedmeta.data.base import spec_to_dict
from fedmeta.data.synthetic import SyntheticMultimodal
from fedmeta.engines.flower import FlowerBackend
from fedmeta.engines.messages import MetaStrategy
from fedmeta.federation import ClientUpdate, Server, summarise_eval
from fedmeta.meta.aggregate import aggregate, cap_weights, cohort_cap, coordinate_median, trimmed_mean, weighted_average

NODE = 7


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run/node ids from the running task; give this test process one."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def make_cfg(*overrides):
    return build_config(None, ["data.num_clients=10", "simulation.clients_per_round=3", "output.progress=false", *overrides])


THETA = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


def requests(strategy, theta, nodes, kind="train"):
    configure = strategy.configure_train if kind == "train" else strategy.configure_evaluate
    msgs = configure(theta, [(100 + n, n) for n in nodes], 1)
    for i, m in enumerate(msgs):  # what the Grid does when it sends them
        m.metadata.__dict__["_message_id"] = f"msg-{i}"
    return msgs


def train_reply(request, arrays, num_examples=10, **metrics):
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples, **metrics})})
    return Message(content, reply_to=request)


def arrays_of(params):
    return ArrayRecord(torch_state_dict={k: v.clone() for k, v in params.items()})


def parse_one(arrays, num_examples=10, theta=THETA, strategy=None):
    strategy = strategy or MetaStrategy(make_cfg())
    req = requests(strategy, theta, [NODE])
    return strategy.parse_train(theta, {NODE: 100 + NODE}, [train_reply(req[0], arrays, num_examples)], req)


def with_array(name, **fields):
    """The honest reply's arrays with one Array's fields replaced."""
    rec = arrays_of({k: v + 0.5 for k, v in THETA.items()})
    a = rec[name]
    f = {"dtype": a.dtype, "shape": tuple(a.shape), "stype": a.stype, "data": a.data} | fields
    rec[name] = Array(f["dtype"], f["shape"], f["stype"], f["data"])
    return rec


def npy(shape, descr="<f4", payload=b""):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


HONEST_W = arrays_of({k: v + 0.5 for k, v in THETA.items()})["w"]


# -- train replies -------------------------------------------------------------------


def test_an_honest_reply_is_accepted_with_its_values_and_weight():
    out = parse_one(arrays_of({k: v + 0.5 for k, v in THETA.items()}), num_examples=10)
    assert out.rejected == [] and out.failures == 0
    [u] = out.results
    assert u.cid == 100 + NODE and u.num_examples == 10
    assert all(torch.equal(u.phi[k], THETA[k] + 0.5) for k in THETA)


def test_a_float64_model_is_accepted_in_float64():
    theta = {k: v.double() for k, v in THETA.items()}
    out = parse_one(arrays_of({k: v + 0.25 for k, v in theta.items()}), theta=theta)
    assert out.rejected == []
    assert all(u.dtype == torch.float64 and torch.equal(u, theta[k] + 0.25) for k, u in out.results[0].phi.items())
    # and float32 arrays for a float64 model are rejected
    assert len(parse_one(arrays_of(THETA), theta=theta).rejected) == 1


MALFORMED = {
    "num-examples beyond int64": dict(num_examples=10**20),
    "num-examples 1e20 float": dict(num_examples=1e20),
    "num-examples NaN": dict(num_examples=float("nan")),
    "num-examples inf": dict(num_examples=float("inf")),
    "num-examples zero": dict(num_examples=0),
    "num-examples negative": dict(num_examples=-5),
    "num-examples below one": dict(num_examples=1e-300),
    "stype not numpy": dict(arrays=with_array("w", stype="torch.raw")),
    "truncated bytes": dict(arrays=with_array("w", data=HONEST_W.data[:-5])),
    "padded bytes": dict(arrays=with_array("w", data=HONEST_W.data + b"\0" * 4)),
    "garbage bytes": dict(arrays=with_array("w", data=b"\x93NUMPY" + b"\xff" * (len(HONEST_W.data) - 6))),
    "announced dtype": dict(arrays=with_array("w", dtype="float64")),
    "unknown dtype": dict(arrays=with_array("w", dtype="not-a-dtype")),
    "announced shape": dict(arrays=with_array("w", shape=(3, 4))),
    "header shape lies": dict(arrays=with_array("w", data=npy((3, 4), payload=b"\0" * 48))),
    "header dtype lies": dict(arrays=with_array("w", data=npy((4, 3), "<i4", b"\0" * 48))),
    "object dtype header": dict(arrays=with_array("w", data=npy((4, 3), "|O", b"\0" * 48))),
    "wrong names": dict(arrays=ArrayRecord(torch_state_dict={"w": THETA["w"], "c": THETA["b"]})),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_train_reply_is_rejected_and_counted_never_raised(case):
    kw = {"arrays": arrays_of(THETA), "num_examples": 10} | MALFORMED[case]
    out = parse_one(kw["arrays"], kw["num_examples"])
    assert out.results == [] and out.failures == 0
    assert len(out.rejected) == 1 and out.rejected[0].startswith(f"node {NODE}: ")


def test_one_bad_reply_does_not_affect_the_others_in_its_round():
    strategy = MetaStrategy(make_cfg())
    req = requests(strategy, THETA, [1, 2, 3, 4])
    replies = [
        train_reply(req[0], arrays_of(THETA), 10),
        train_reply(req[1], with_array("w", stype="torch.raw"), 10),
        Message(Error(code=0, reason="client crashed"), reply_to=req[2]),
        train_reply(req[0], arrays_of(THETA), 10),  # a second reply for node 1
    ]  # node 4 never answers
    out = strategy.parse_train(THETA, {n: 100 + n for n in (1, 2, 3, 4)}, replies, req)
    assert [u.cid for u in out.results] == [101]
    assert out.failures == 2  # the error reply and the missing one
    assert len(out.rejected) == 2 and out.rejected[0].startswith("node 2:") and "second reply" in out.rejected[1]


class _NoNumpy:
    def __call__(self, *a, **k):
        raise AssertionError("Array.numpy() called on an unvalidated array")


def test_a_billion_element_announcement_is_rejected_without_allocating(monkeypatch):
    monkeypatch.setattr(Array, "numpy", _NoNumpy())
    huge = 10**9
    cases = [
        with_array("w", shape=(huge,)),  # announced shape
        with_array("w", data=npy((huge,), payload=b"\0" * 48)),  # honest-looking announcement, header claims 4 GB
        with_array("w", shape=(huge,), data=npy((huge,), payload=b"\0" * 48)),
    ]
    tracemalloc.start()
    try:
        outs = [parse_one(rec) for rec in cases]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(len(o.rejected) == 1 and o.results == [] for o in outs)
    assert peak < 2**20  # well under the 4 GB a deserialisation would allocate


# -- weights: no takeover ------------------------------------------------------------------


def _cohort(strategy, phis, reported, nodes=(1, 2, 3, 4)):
    req = requests(strategy, THETA, list(nodes))
    replies = [train_reply(r, arrays_of(p), n) for r, p, n in zip(req, phis, reported)]
    return strategy.parse_train(THETA, {n: 100 + n for n in nodes}, replies, req)


HONEST = [{k: v + s for k, v in THETA.items()} for s in (0.01, -0.02, 0.03)]
ATTACK = {k: v + 1.0 for k, v in THETA.items()}  # norm sqrt(15) < max_update_norm


def test_a_huge_reported_weight_cannot_take_over_the_mean():
    cfg = make_cfg("meta.outer_lr=1.0", "meta.outer_lr_final=1.0")
    strategy = MetaStrategy(cfg)
    strategy.announced = {1: 20.0, 2: 20.0, 3: 20.0, 4: 20.0}  # what each node announced at discovery
    out = _cohort(strategy, HONEST + [ATTACK], [10, 10, 10, 10**15])
    assert out.rejected == []
    assert [u.num_examples for u in out.results] == [10, 10, 10, 20]  # the attacker: capped at its announced size
    server = Server(cfg, THETA, 8)
    server.step(out.results, 1)
    expected = (10 * 0.01 + 10 * -0.02 + 10 * 0.03 + 20 * 1.0) / 50  # by hand: beta = 1
    assert all(torch.allclose(server.theta[k], THETA[k] + expected) for k in THETA)
    # an honest client with the same announced size could move theta as far (weight 20, same update)
    assert expected <= 20 * 1.0 / 50 + 0.01


def test_unannounced_nodes_are_capped_at_the_cohorts_lower_median():
    strategy = MetaStrategy(make_cfg())  # stock Flower clients: nothing announced
    out = _cohort(strategy, HONEST + [ATTACK], [10, 12, 14, 10**15])
    assert [u.num_examples for u in out.results] == [10, 12, 12, 12]


def test_an_explicit_max_weight_caps_a_client_that_lied_at_discovery():
    cfg = make_cfg("simulation.max_weight=20", "meta.outer_lr=1.0", "meta.outer_lr_final=1.0")
    strategy = MetaStrategy(cfg)
    strategy.announced = {1: 20.0, 2: 20.0, 3: 20.0, 4: 1e15}  # the attacker announced a huge size too
    out = _cohort(strategy, HONEST + [ATTACK], [10, 10, 10, 10**15])
    server = Server(cfg, THETA, 8)
    server.step(out.results, 1)
    expected = (10 * 0.01 + 10 * -0.02 + 10 * 0.03 + 20 * 1.0) / 50
    assert all(torch.allclose(server.theta[k], THETA[k] + expected) for k in THETA)


def test_the_median_aggregator_ignores_one_outlier():
    cfg = make_cfg("meta.aggregation=median", "meta.outer_lr=1.0", "meta.outer_lr_final=1.0")
    updates = [ClientUpdate(i, p, n) for i, (p, n) in enumerate(zip(HONEST + [ATTACK], [10, 10, 10, 10**15]))]
    server = Server(cfg, THETA, 8)
    server.step(updates, 1)
    assert all(torch.allclose(server.theta[k], THETA[k] + 0.02) for k in THETA)  # median of .01, -.02, .03, 1


# -- evaluation replies ---------------------------------------------------------------------


def eval_reply(request, **metrics):
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)


@pytest.mark.parametrize("n", [0, -3, float("nan"), float("inf"), 10**20])
def test_a_bad_evaluation_count_is_rejected_and_the_summary_survives(n):
    strategy = MetaStrategy(make_cfg())
    strategy.announced = {1: 40.0, 2: 40.0, 3: 40.0}
    req = requests(strategy, THETA, [1, 2, 3], kind="evaluate")
    replies = [eval_reply(req[0], **{"num-examples": n, "loss_after": 100.0}),
               eval_reply(req[1], **{"num-examples": 10, "loss_after": 1.0}),
               eval_reply(req[2], **{"num-examples": 30, "loss_after": 2.0})]
    out = strategy.parse_evaluate({1: 101, 2: 102, 3: 103}, replies, req)
    assert len(out.rejected) == 1 and out.rejected[0].startswith("node 1:")
    assert summarise_eval(out) == {"loss_after": pytest.approx((10 * 1.0 + 30 * 2.0) / 40)}


def test_evaluation_weights_are_capped_and_accuracies_checked():
    strategy = MetaStrategy(make_cfg())
    strategy.announced = {1: 20.0}
    req = requests(strategy, THETA, [1, 2, 3], kind="evaluate")
    replies = [eval_reply(req[0], **{"num-examples": 10**15, "loss_after": 4.0}),  # capped at 20
               eval_reply(req[1], **{"num-examples": 20, "loss_after": 1.0}),  # not announced: lower median 20
               eval_reply(req[2], **{"num-examples": 20, "acc_after": 7.0})]  # accuracy out of [0, 1]
    out = strategy.parse_evaluate({1: 101, 2: 102, 3: 103}, replies, req)
    assert len(out.rejected) == 1 and out.rejected[0].startswith("node 3:")
    assert summarise_eval(out)["loss_after"] == pytest.approx((20 * 4.0 + 20 * 1.0) / 40)


def test_summarise_eval_drops_bad_weights_instead_of_dividing_by_zero():
    from fedmeta.federation import Replies

    replies = Replies(results=[(1, {"num-examples": 0, "loss_after": 3.0}), (2, {"num-examples": -1.0, "loss_after": 5.0})])
    assert math.isnan(summarise_eval(replies)["loss_after"])


# -- discovery ----------------------------------------------------------------------------------

SPEC = json.dumps(spec_to_dict(SyntheticMultimodal(num_clients=10).spec))


def query_reply(request, **fields):
    info = {"partition-id": 1, "heldout": False, "num-examples": 20, "spec": SPEC} | fields
    return Message(RecordDict({"config": ConfigRecord({k: v for k, v in info.items() if v is not None})}), reply_to=request)


BAD_QUERIES = {
    "partition-id not an integer": {"partition-id": "x"},
    "partition-id a float": {"partition-id": 2.5},
    "partition-id a bool": {"partition-id": True},
    "partition-id negative": {"partition-id": -1},
    "partition-id out of range": {"partition-id": 10},
    "partition-id missing": {"partition-id": None},
    "heldout not a bool": {"heldout": "yes"},
    "group unknown": {"group": "admin"},
    "group validation but heldout false (would train)": {"group": "validation"},
    "group train but heldout true": {"group": "train", "heldout": True},
    "num-examples zero": {"num-examples": 0},
    "spec not JSON": {"spec": "{nope"},
    "spec not a spec": {"spec": json.dumps({"modalities": 5})},
}


@pytest.mark.parametrize("case", BAD_QUERIES)
def test_a_malformed_description_is_rejected(case):
    strategy = MetaStrategy(make_cfg())
    [req] = strategy.configure_query([NODE])
    with pytest.raises(ValueError):
        strategy.parse_query(query_reply(req, **BAD_QUERIES[case]))


@pytest.mark.parametrize("fields, group", [
    ({}, "train"), ({"heldout": True}, "test"),  # a client that predates "group": heldout decides
    ({"heldout": True, "group": "validation"}, "validation"), ({"heldout": True, "group": "test"}, "test"),
])
def test_a_description_names_the_clients_group(fields, group):
    strategy = MetaStrategy(make_cfg())
    [req] = strategy.configure_query([NODE])
    assert strategy.parse_query(query_reply(req, **fields))["group"] == group


class FakeGrid:
    """A Grid whose nodes answer with ``answer(node, request)``; sets message ids as Flower's grids do."""

    def __init__(self, answers):
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"q-{i}-{m.metadata.dst_node_id}"
            out.append(self.answers[m.metadata.dst_node_id](m))
        return out


def test_discovery_survives_every_malformed_description_and_counts_them():
    other_spec = json.loads(SPEC)
    other_spec["num_classes"] = 99
    answers = {
        11: lambda m: query_reply(m, **{"partition-id": 1}),
        12: lambda m: query_reply(m, **{"partition-id": 2, "num-examples": 30}),
        13: lambda m: query_reply(m, **{"partition-id": 3, "heldout": True}),
        14: lambda m: query_reply(m, **{"partition-id": "x"}),
        15: lambda m: query_reply(m, **{"partition-id": 4, "spec": json.dumps(other_spec)}),  # minority spec
        16: lambda m: query_reply(m, **{"partition-id": 5}),
        17: lambda m: query_reply(m, **{"partition-id": 5}),  # duplicate: both dropped
        18: lambda m: query_reply(m, **{"spec": "{nope"}),
        19: lambda m: Message(Error(code=0, reason="no query handler"), reply_to=m),  # a stock client
        20: lambda m: query_reply(m, **{"partition-id": 6, "num-examples": 1e300}),
    }
    backend = FlowerBackend(FakeGrid(answers), make_cfg())
    backend.discover(expected=len(answers), wait_s=0)
    assert backend.populations() == ([1, 2, 19], [3])
    assert backend.strategy.announced == {11: 20.0, 12: 30.0, 13: 20.0}
    assert backend.spec.num_classes == json.loads(SPEC)["num_classes"]
    assert len(backend.discovery_rejected) == 6
    # counted once, with the first round's rejections
    backend.grid.answers.update({n: (lambda m: train_reply(m, m.content["arrays"], 10)) for n in answers})
    first = backend.train(THETA, [1, 2], 1)
    second = backend.train(THETA, [1, 2], 2)
    assert len(first.results) == 2 and len(first.rejected) == 6 and all(r.startswith("discovery: node ") for r in first.rejected)
    assert len(second.results) == 2 and second.rejected == []


# -- aggregators and caps, by hand ------------------------------------------------------------------


def _u(*values):
    return {"x": torch.tensor(values, dtype=torch.float32)}


def test_coordinate_median_odd_and_even():
    ups = [_u(1.0, 10.0), _u(2.0, -5.0), _u(100.0, 0.0)]
    assert torch.equal(coordinate_median(ups)["x"], torch.tensor([2.0, 0.0]))
    assert torch.equal(coordinate_median(ups + [_u(3.0, 4.0)])["x"], torch.tensor([2.5, 2.0]))  # mean of the middle two


def test_trimmed_mean_cuts_int_fraction_times_n_from_each_end():
    ups = [_u(v) for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    assert torch.allclose(trimmed_mean(ups, 0.2)["x"], torch.tensor([3.0]))  # drops 1 and 1000
    assert torch.allclose(trimmed_mean(ups, 0.19)["x"], torch.tensor([202.0]))  # int(0.95) = 0: plain mean
    assert torch.allclose(trimmed_mean(ups, 0.4)["x"], torch.tensor([3.0]))  # drops 2 each side


def test_weight_caps():
    assert cap_weights([5, 50, 500], 40) == [5, 40, 40]
    assert cap_weights([5, 50, 500], 0) == [5, 50, 500]  # 0 = no explicit cap
    assert cap_weights([5, 50, 500], [None, 10, 1000]) == [5, 10, 500]
    assert cohort_cap([7, 1e15, 3, 5]) == 5  # lower median
    assert cohort_cap([1e15, 2]) == 2
    got = aggregate([_u(0.0), _u(1.0)], [10, 10**15], "mean", max_weight=30)["x"]
    assert torch.allclose(got, torch.tensor([30 / 40]))


def test_weighted_average_drops_bad_weights_and_values():
    pairs = [(1.0, 10), (3.0, 30), (100.0, 0), (100.0, -1), (100.0, float("nan")), (float("inf"), 5), (100.0, 10**400), (None, 3)]
    assert weighted_average(pairs) == pytest.approx(2.5)
    assert math.isnan(weighted_average([(1.0, 0)]))


def test_robust_aggregation_is_refused_with_dp_in_one_line():
    with pytest.raises(ConfigError) as err:
        make_cfg("privacy.enabled=true", "simulation.sampling=poisson", "meta.aggregation=trimmed_mean")
    assert str(err.value).count("\n") == 0 and str(err.value).startswith("config error: meta.aggregation:")
    with pytest.raises(ConfigError, match=r"meta.trim_fraction: must be < 0.5"):
        make_cfg("meta.trim_fraction=0.5")
    with pytest.raises(ConfigError, match=r"simulation.max_weight: must be >= 0"):
        make_cfg("simulation.max_weight=-1")


def test_one_client_cannot_add_overwrite_or_flood_the_rounds_metrics():
    from fedmeta.federation import MAX_CLIENT_METRICS, ClientUpdate, client_metrics

    theta = {"w": torch.zeros(2)}
    honest = [ClientUpdate(i, theta, 10, {"train_loss": 1.0, "query_loss": 2.0, "num-examples": 10}) for i in range(3)]
    evil = ClientUpdate(9, theta, 10, {"train_loss": 1.0, "query_loss": 2.0, "round": 99.0, "beta": 5.0, "epsilon": 0.0,
                                       "heldout_acc_after": 1.0} | {f"junk{i}": 0.0 for i in range(1000)})
    record = {"round": 3, "beta": 0.5, "clients": 4, "replies": 4}
    out = client_metrics(honest + [evil], reserved=record)
    assert out == {"query_loss": 2.0, "train_loss": 1.0}  # only keys every update carries, none the loop writes
    flood = [ClientUpdate(i, theta, 1, {f"m{j}": 1.0 for j in range(100)} | {"round": 1.0}) for i in range(2)]
    assert len(client_metrics(flood, reserved=record)) == MAX_CLIENT_METRICS and "round" not in client_metrics(flood, reserved=record)
