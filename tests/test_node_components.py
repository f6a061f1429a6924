"""A deployed node runs only the components its own configuration names (issue 17, item 6)."""

import logging
import sys
from types import SimpleNamespace

import pytest
from flwr.app import Context, RecordDict

import clients.app as node_app
from fedmeta.engines.messages import MetaStrategy

PLANTED = "import pathlib\npathlib.Path(__file__).with_name('MARKER').write_text('ran')\ndef make(*a):\n    raise SystemExit\n"


def _context(node_config):
    return Context(run_id=1, node_id=7, node_config=dict(node_config), state=RecordDict(), run_config={})


def _train_message(cfg):
    """What the server's message carries (MetaStrategy's request content); the node reads nothing else first."""
    return SimpleNamespace(content={"config": {"server-round": 1, "cid": 0, "fedmeta-config": MetaStrategy(cfg).cfg_json}})


@pytest.mark.parametrize("key,value", [("model.factory", "evil_mod:make"), ("data.dataset", "evil_mod:make"),
                                       ("meta.algorithm", "evil_mod:Algo")])
def test_a_message_naming_code_the_node_did_not_agree_to_is_refused_before_any_import(small_cfg, tmp_path, monkeypatch, caplog, key, value):
    (tmp_path / "evil_mod.py").write_text(PLANTED)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])  # importable, were the node to try
    cfg = small_cfg(f"{key}={value}")
    msg = _train_message(cfg)
    context = _context({"partition-dir": str(tmp_path / "part"), "device": "cpu"})  # a deployed SuperNode
    with caplog.at_level(logging.WARNING, logger="fedmeta.node"):
        for handler in (node_app.train, node_app.evaluate, node_app.query):
            with pytest.raises(node_app.RefusedComponent, match=f"the server's {key}='{value}' is not this node's"):
                handler(msg, context)  # Flower turns the exception into an error reply: the server counts a failure
    assert not (tmp_path / "MARKER").exists() and "evil_mod" not in sys.modules
    assert len([r for r in caplog.records if r.name == "fedmeta.node"]) == 3  # one line per refused message
    # the node's own setting that differs from the server's is refused too
    other = _context({"partition-dir": "p", key: "mine:make"})
    with pytest.raises(node_app.RefusedComponent, match="'mine:make'"):
        node_app.check_components(cfg, dict(other.node_config))


def test_built_ins_and_the_references_a_node_names_are_accepted(small_cfg):
    node_app.check_components(small_cfg(), {"partition-dir": "p"})  # defaults: fedmeta's own code
    node_app.check_components(small_cfg("meta.algorithm=maml", "data.dataset=sine"), {"partition-dir": "p"})
    mine = {"partition-dir": "p", "model.factory": "my_model:make", "data.dataset": "my_data:make", "meta.algorithm": "my_algorithm:ProxReptile"}
    node_app.check_components(small_cfg("model.factory=my_model:make", "data.dataset=my_data:make", "meta.algorithm=my_algorithm:ProxReptile"), mine)
    with pytest.raises(node_app.RefusedComponent):  # naming one key does not open the others
        node_app.check_components(small_cfg("model.factory=my_model:make", "meta.algorithm=x:Y"), {"model.factory": "my_model:make"})


def test_only_flowers_simulation_runtime_takes_the_runs_references(small_cfg, monkeypatch):
    cfg = small_cfg("model.factory=my_model:make")
    sim = {"partition-id": 0, "num-partitions": 10}
    monkeypatch.setitem(sys.modules, "ray", sys.modules.get("ray") or type(sys)("ray"))
    node_app.check_components(cfg, sim)  # a Ray actor of the user's own simulation
    monkeypatch.delitem(sys.modules, "ray")
    with pytest.raises(node_app.RefusedComponent):  # the same node config outside Ray: a deployed node
        node_app.check_components(cfg, sim)
    with pytest.raises(node_app.RefusedComponent):
        node_app.check_components(cfg, {**sim, "device": "cpu"})
