"""Issue 18: a client whose data fail the checks stops a Flower run with the same one-line DataError as
the sequential and vectorised engines (the ClientApp replies a typed ``data-error``; the server raises)."""

import logging

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

import fedmeta
from fedmeta.config import build_config
from fedmeta.data import build_dataset
from fedmeta.data.base import DataError
from fedmeta.engines.messages import DATA_ERROR, ERROR_RECORD, MetaStrategy
from fedmeta.meta import params_of
from fedmeta.client import model_for
from tests.harness.partitions import disk_without_a_query_set

FAST = ["data.num_clients=10", "simulation.clients_per_round=8", "simulation.rounds=1", "output.progress=false",
        "meta.inner_steps=2", "meta.eval_steps=2", "model.embed_dim=4", "model.hidden_dim=4"]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run/node ids from the running task; give this test process one."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _bad_disk(tmp_path):
    """A partition directory whose first training client has no query set; the config that reads it."""
    return disk_without_a_query_set(tmp_path, FAST)


def _ask(cfg, message_type, cid, theta=None):
    strategy = MetaStrategy(cfg)
    if message_type == MessageType.QUERY:
        return strategy, strategy.configure_query([cid + 1])[0]
    build = strategy.configure_train if message_type == MessageType.TRAIN else strategy.configure_evaluate
    msg = build(theta, [(cid, cid + 1)], 1)[0]
    msg.metadata.__dict__["_message_id"] = f"msg-{cid}"  # what the Grid does when it sends it
    return strategy, msg


def test_the_client_app_replies_data_error_and_the_server_stops_with_the_other_engines_line(tmp_path, caplog):
    import clients.app as node_app

    cfg, cid = _bad_disk(tmp_path)
    with pytest.raises(DataError) as seq:  # the line the sequential engine stops with
        fedmeta.simulate(build_config(None, [*FAST, "data.dataset=disk", f"data.path={tmp_path / 'p'}", "simulation.engine=sequential"]),
                         out=tmp_path / "seq")
    line = str(seq.value)
    assert len(line.splitlines()) == 1 and f"client {cid}: n_support must be an integer in [1, n - 1]" in line
    theta = params_of(model_for(cfg, build_dataset(cfg.data, cfg.model.modalities).spec))
    context = Context(run_id=1, node_id=cid + 1, node_config={"partition-id": cid, "num-partitions": 10},
                      state=RecordDict(), run_config={})
    for kind in (MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE):
        strategy, msg = _ask(cfg, kind, cid, theta)
        with caplog.at_level(logging.WARNING, logger="fedmeta.node"):
            reply = node_app.app(msg, context)  # the ClientApp as Flower calls it: no exception, a typed reply
        assert not reply.has_error() and reply.content.config_records[ERROR_RECORD]["reason"] == DATA_ERROR
        with pytest.raises(DataError) as got:
            if kind == MessageType.QUERY:
                strategy.parse_query(reply)
            elif kind == MessageType.TRAIN:
                strategy.parse_train(theta, {cid + 1: cid}, [reply], [msg])
            else:
                strategy.parse_evaluate({cid + 1: cid}, [reply], [msg])
        assert str(got.value) == line  # the very line of the other engines
    assert sum(line in r.getMessage() for r in caplog.records if r.name == "fedmeta.node") == 3  # the node says it too
    # a good client of the same directory still trains normally
    good = next(c for c in build_dataset(cfg.data).train_clients if c != cid)
    strategy, msg = _ask(cfg, MessageType.TRAIN, good, theta)
    ok = node_app.app(msg, Context(run_id=1, node_id=good + 1, node_config={"partition-id": good, "num-partitions": 10},
                                   state=RecordDict(), run_config={}))
    assert len(strategy.parse_train(theta, {good + 1: good}, [ok], [msg]).results) == 1


def test_in_a_deployment_a_node_with_invalid_data_is_a_counted_failure_with_its_line_logged(tmp_path, caplog):
    import clients.app as node_app

    cfg, cid = _bad_disk(tmp_path)
    theta = params_of(model_for(cfg, build_dataset(cfg.data, cfg.model.modalities).spec))
    strategy, msg = _ask(cfg, MessageType.TRAIN, cid, theta)
    strategy.stop_on_data_error = False  # what FlowerBackend sets on a deployment's grid (not the Simulation Engine's)
    reply = node_app.app(msg, Context(run_id=1, node_id=cid + 1, node_config={"partition-id": cid, "num-partitions": 10},
                                      state=RecordDict(), run_config={}))
    with caplog.at_level(logging.WARNING, logger="fedmeta.server"):
        out = strategy.parse_train(theta, {cid + 1: cid}, [reply], [msg])
    assert out.failures == 1 and not out.results and not out.rejected
    assert any(f"node {cid + 1}: its data are invalid" in r.getMessage() and "n_support" in r.getMessage() for r in caplog.records)


def test_only_the_simulation_engines_grid_counts_as_simulated():
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedmeta.engines.flower import simulated_grid

    class Deployed:  # any other Grid (GrpcGrid in a deployment)
        pass

    assert simulated_grid(InMemoryGrid.__new__(InMemoryGrid)) and not simulated_grid(Deployed())


@pytest.mark.slow
def test_fedmeta_simulate_on_the_flower_engine_stops_with_the_bad_clients_one_line(tmp_path):
    import subprocess
    import sys

    cfg, cid = _bad_disk(tmp_path)
    sets = [a for s in [*FAST, "data.dataset=disk", f"data.path={tmp_path / 'p'}", "simulation.engine=flower"] for a in ("--set", s)]
    r = subprocess.run([sys.executable, "-m", "fedmeta.cli", "simulate", *sets, "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if f"client {cid}: n_support must be an integer in [1, n - 1]" in ln]
    assert lines and lines[-1] == r.stderr.strip().splitlines()[-1], r.stderr[-3000:]  # the run's last word
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped at discovery, before round 1
