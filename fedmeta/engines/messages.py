"""MetaStrategy: the Flower message codec of the ``flower`` engine's backend (any algorithm).

It only translates: theta -> ``Message``s for the sampled nodes, and replies ->
validated :class:`ClientUpdate`s. The maths (sampling, Reptile step, DP,
accounting) lives in :mod:`fedmeta.federation` and is shared with every engine.

Message contents follow Flower's conventions (those of ``FedAvg``):
request ``{"arrays": ArrayRecord(theta), "config": ConfigRecord}``, train
reply ``{"arrays": ArrayRecord(phi), "metrics": MetricRecord(num-examples, ...)}``,
so a stock Flower client that trains and returns its weights also works.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedmeta.config import Config
from fedmeta.federation import ClientUpdate, Params, Replies

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


class ReplyError(ValueError):
    """A malformed client reply; the message says why in one line."""


def validate_phi(theta: Params, record: ArrayRecord) -> Params:
    """Check a reply's arrays against theta: names, shapes and dtypes.

    Finiteness and the update norm are checked for every engine by
    :func:`fedmeta.federation.screen_updates`.
    """
    names, expected = set(record.keys()), set(theta.keys())
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise ReplyError(f"array names differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})")
    phi: Params = {}
    for name, ref in theta.items():
        arr = record[name].numpy()
        if tuple(arr.shape) != tuple(ref.shape):
            raise ReplyError(f"array {name!r} has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        if arr.dtype != np.float32:
            raise ReplyError(f"array {name!r} has dtype {arr.dtype}, expected float32")
        phi[name] = torch.from_numpy(np.array(arr, copy=True)).to(ref.device)
    return phi


def _num_examples(content: RecordDict) -> int:
    for record in content.metric_records.values():
        if "num-examples" in record:
            n = record["num-examples"]
            if not isinstance(n, (int, float)) or not n > 0 or not math.isfinite(n):
                raise ReplyError(f"num-examples must be a positive number (got {n!r})")
            return int(n)
    raise ReplyError("reply has no 'num-examples' metric")


def _origin(requests: Iterable[Message]) -> dict[str, int]:
    """message id -> destination node. Error replies for a node that went away come from the
    SuperLink (``src_node_id`` 1), so replies are matched by ``reply_to_message_id``."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in requests if m.metadata.message_id}


class MetaStrategy:
    """Builds requests and parses replies; keeps no model state of its own."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cfg_json = cfg.model_dump_json()

    def _request(self, message_type: str, node_id: int, theta: ArrayRecord | None, server_round: int, cid: int) -> Message:
        content = RecordDict({CONFIG: ConfigRecord({"server-round": server_round, "cid": cid, "fedmeta-config": self.cfg_json})})
        if theta is not None:
            content[ARRAYS] = theta
        return Message(content=content, dst_node_id=node_id, message_type=message_type)

    def configure_query(self, node_ids: Iterable[int]) -> list[Message]:
        return [self._request(MessageType.QUERY, n, None, 0, -1) for n in node_ids]

    def configure_train(self, theta: Params, targets: list[tuple[int, int]], server_round: int) -> list[Message]:
        arrays = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in theta.items()})
        return [self._request(MessageType.TRAIN, node, arrays, server_round, cid) for cid, node in targets]

    def configure_evaluate(self, theta: Params, targets: list[tuple[int, int]], server_round: int) -> list[Message]:
        arrays = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in theta.items()})
        return [self._request(MessageType.EVALUATE, node, arrays, server_round, cid) for cid, node in targets]

    @staticmethod
    def _answered(sent: dict[int, int], replies: Iterable[Message], requests: Iterable[Message], out: Replies):
        """Yield ``(node, reply)`` for good replies; count error replies and missing ones as failures."""
        origin = _origin(requests)
        answered = set()
        for msg in replies:
            node = origin.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            if msg.has_error():
                out.failures += 1
            else:
                yield node, msg
        out.failures += sum(1 for n in sent if n not in answered)

    @staticmethod
    def _metrics(content: RecordDict) -> dict[str, float]:
        return {k: float(v) for r in content.metric_records.values() for k, v in r.items() if isinstance(v, (int, float))}

    def parse_train(self, theta: Params, sent: dict[int, int], replies: Iterable[Message], requests: Iterable[Message] = ()) -> Replies:
        """``sent`` maps node id -> client id. Missing and error replies are failures; malformed ones are rejected."""
        out = Replies()
        for node, msg in self._answered(sent, replies, requests, out):
            try:
                records = msg.content.array_records
                if not records:
                    raise ReplyError("reply has no ArrayRecord")
                record = records[ARRAYS] if ARRAYS in records else next(iter(records.values()))
                phi = validate_phi(theta, record)
                n = _num_examples(msg.content)
                out.results.append(ClientUpdate(sent.get(node, node), phi, n, self._metrics(msg.content)))
            except ReplyError as err:
                out.rejected.append(f"node {node}: {err}")
        return out

    def parse_evaluate(self, sent: dict[int, int], replies: Iterable[Message], requests: Iterable[Message] = ()) -> Replies:
        out = Replies()
        for node, msg in self._answered(sent, replies, requests, out):
            metrics = self._metrics(msg.content)
            bad = [k for k, v in metrics.items() if k.startswith("loss") and not math.isfinite(v)]
            if bad:
                out.rejected.append(f"node {node}: non-finite evaluation metrics {bad[:3]}")
                continue
            out.results.append((sent.get(node, node), metrics))
        return out

    @staticmethod
    def parse_query(reply: Message) -> dict | None:
        if reply.has_error() or CONFIG not in reply.content.config_records:
            return None
        info = dict(reply.content.config_records[CONFIG])
        if "spec" in info:
            info["spec"] = json.loads(str(info["spec"]))
        return info
