"""Means that never silently skip clients: every evaluation mean is over the same clients for loss and
accuracy, and a client left out (empty query set, non-finite value) is counted in the round's `rejected`
and logged."""

import json
import logging
import math

import pytest

import fedmeta
from fedmeta.config import build_config
from fedmeta.engines.sequential import SequentialBackend
from fedmeta.federation import ClientUpdate, Replies, client_metrics, summarise_eval
from fedmeta.meta.aggregate import weighted_average


def ev(n, loss, acc):
    return {"num-examples": n, "loss_after": loss, "acc_after": acc}


def test_an_empty_query_set_leaves_the_client_out_of_every_mean():
    # the client with an empty query set reports weight 0, loss NaN and (from nothing) accuracy 0
    replies = Replies(results=[(1, ev(10, 1.0, 0.5)), (2, ev(30, 2.0, 0.25)), (3, ev(0, float("nan"), 0.0))])
    out = summarise_eval(replies, "heldout_")
    assert out["heldout_loss_after"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert out["heldout_acc_after"] == pytest.approx((10 * 0.5 + 30 * 0.25) / 40)  # the same two clients
    assert len(replies.rejected) == 1 and replies.rejected[0].startswith("client 3:")


@pytest.mark.parametrize("bad", [ev(20, 3.0, float("nan")), ev(20, float("inf"), 0.9), {"num-examples": 20, "loss_after": 3.0}])
def test_one_bad_value_drops_the_client_from_loss_and_accuracy_alike(bad):
    replies = Replies(results=[(1, ev(10, 1.0, 0.5)), (2, bad), (3, ev(10, 2.0, 1.0))])
    out = summarise_eval(replies)
    assert out == {"loss_after": pytest.approx(1.5), "acc_after": pytest.approx(0.75)}
    assert [r.split(":")[0] for r in replies.rejected] == ["client 2"]


def test_regression_accuracies_are_nan_for_everyone_and_drop_no_one():
    replies = Replies(results=[(1, ev(10, 1.0, float("nan"))), (2, ev(30, 2.0, float("nan")))])
    out = summarise_eval(replies)
    assert out["loss_after"] == pytest.approx(1.75) and math.isnan(out["acc_after"]) and replies.rejected == []


def test_weighted_average_reports_what_it_drops():
    dropped = []
    assert weighted_average([(1.0, 10), (float("nan"), 5), (3.0, 10), (2.0, 0)], dropped) == pytest.approx(2.0)
    assert dropped == [1, 3]


def test_training_metrics_drop_a_non_finite_client_from_every_mean():
    ups = [ClientUpdate(1, {}, 10, {"train_loss": 1.0, "query_loss": 2.0}),
           ClientUpdate(2, {}, 10, {"train_loss": float("nan"), "query_loss": 100.0}),
           ClientUpdate(3, {}, 30, {"train_loss": 3.0, "query_loss": 4.0})]
    dropped = []
    out = client_metrics(ups, reserved={}, dropped=dropped)
    assert out == {"train_loss": pytest.approx(2.5), "query_loss": pytest.approx(3.5)}
    assert len(dropped) == 1 and dropped[0].startswith("client 2:")


def test_a_metric_no_client_reports_finite_is_nan_and_drops_no_one():
    """local trains nothing: every reply's train_loss is NaN; that is a mean of nothing, not a cohort to reject."""
    ups = [ClientUpdate(c, {}, 10, {"train_loss": float("nan"), "query_loss": float(c)}) for c in (1, 2, 3)]
    dropped = []
    out = client_metrics(ups, reserved={}, dropped=dropped)
    assert math.isnan(out["train_loss"]) and out["query_loss"] == pytest.approx(2.0) and dropped == []


def test_a_left_out_test_client_is_counted_and_logged_in_the_round(tmp_path, monkeypatch, caplog):
    real = SequentialBackend.evaluate
    seen = {}

    def one_empty_query_set(self, theta, cids, rnd):
        out = real(self, theta, cids, rnd)
        if cids == list(self.dataset.heldout_clients):
            seen["kept"] = [m for _, m in out.results[1:]]
            out.results[0] = (out.results[0][0], out.results[0][1] | {"num-examples": 0, "loss_after": float("nan"), "acc_after": 0.0})
        return out

    monkeypatch.setattr(SequentialBackend, "evaluate", one_empty_query_set)
    cfg = build_config(None, ["data.num_clients=20", "data.heldout_fraction=0.2", "simulation.clients_per_round=4",
                              "simulation.rounds=1", "simulation.engine=sequential", "output.progress=false",
                              "meta.inner_steps=2", "meta.eval_steps=2"])
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        summary = fedmeta.simulate(cfg, out=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    kept = seen["kept"]
    weight = sum(m["num-examples"] for m in kept)
    for key in ("loss_after", "acc_after"):
        assert record[f"heldout_{key}"] == pytest.approx(sum(m[key] * m["num-examples"] for m in kept) / weight)
    assert record["rejected"] == 1 and summary["rejected"] == 1
    assert any("left out of every mean" in r.getMessage() for r in caplog.records)
