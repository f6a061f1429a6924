"""The algorithm seam's server half, client state, evaluation hook and method parameters (issue 20)."""

import pytest
import torch

from fedmeta.components import ComponentError
from fedmeta.federation import ClientUpdate, Server
from fedmeta.meta import MetaAlgorithm
from fedmeta.meta.algorithm import algorithm_for


class HalfStep(MetaAlgorithm):
    """A server hook of its own: theta moves half-way to the coordinate-wise max of the deltas, and counts its rounds."""

    def init_server_state(self, theta, num_clients):
        return {"rounds": 0, "n": num_clients}

    def server_update(self, theta, deltas, weights, server_round, state):
        top = {k: torch.stack([d[k] for d in deltas]).max(0).values for k in theta}
        return {k: theta[k] + 0.5 * top[k] for k in theta}, state | {"rounds": state["rounds"] + 1}, {"beta": 0.5}


def test_the_algorithm_owns_the_server_step_and_its_state(small_cfg):
    cfg = small_cfg()
    server = Server(cfg, {"w": torch.zeros(2)}, 8, algorithm=HalfStep(cfg))
    info = server.step([ClientUpdate(0, {"w": torch.tensor([1.0, -4.0])}, 5), ClientUpdate(1, {"w": torch.tensor([3.0, -2.0])}, 1)], 1)
    assert info == {"beta": 0.5}
    assert torch.equal(server.theta["w"], torch.tensor([1.5, -1.0]))
    assert server.state_dict()["algorithm"] == {"rounds": 1, "n": 8}
    again = Server(cfg, {"w": torch.zeros(2)}, 8, algorithm=HalfStep(cfg))
    again.load_state_dict(server.state_dict())
    assert again.state == {"rounds": 1, "n": 8} and torch.equal(again.theta["w"], server.theta["w"])


def test_default_server_hook_is_the_weighted_mean_with_beta(small_cfg):
    cfg = small_cfg("meta.outer_lr=0.5", "meta.outer_lr_final=0.5")
    server = Server(cfg, {"w": torch.zeros(1)}, 8)
    server.step([ClientUpdate(0, {"w": torch.tensor([1.0])}, 3), ClientUpdate(1, {"w": torch.tensor([5.0])}, 1)], 1)
    assert float(server.theta["w"]) == pytest.approx(0.5 * (3 * 1 + 1 * 5) / 4)


def test_a_server_update_dp_cannot_wrap_refuses_privacy(small_cfg, monkeypatch):
    import fedmeta.meta.algorithm as alg

    monkeypatch.setitem(alg.REGISTRY, "halfstep", HalfStep)
    monkeypatch.setattr(HalfStep, "name", "halfstep")
    cfg = small_cfg("privacy.enabled=true", "simulation.sampling=poisson")
    with pytest.raises(ComponentError, match=r"^config error: privacy.enabled: .* overrides server_update"):
        algorithm_for(cfg.model_copy(update={"meta": cfg.meta.model_copy(update={"algorithm": "halfstep"})}))
