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

import io
import json
import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedmeta.config import Config
from fedmeta.data.base import GROUPS, DataError, spec_from_dict, spec_to_dict
from fedmeta.federation import ClientUpdate, Params, Replies
from fedmeta.meta.aggregate import cohort_cap, valid_count

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
ERROR_RECORD, DATA_ERROR = "fedmeta-error", "data-error"  # a ClientApp's typed refusal: {"reason": ..., "text": ...}
NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: the bytes are an ``np.save`` file
HEADER_MAX = 10_000  # np.load's default max_header_size; an honest header is 128 bytes
NPY_PREFIX = 12  # magic (6) + version (2) + header length (4 in format 2.0)

log = logging.getLogger("fedmeta.server")


from fedmeta.errors import ReplyError  # noqa: E402,F401 - defined in fedmeta.errors


def _why(err: BaseException) -> str:
    """One line for a rejected reply: our own reasons as they are, anything else with its type."""
    text = " ".join(str(err).split())[:200]
    return text if isinstance(err, ReplyError) else f"unreadable ({type(err).__name__}: {text})"


def data_error_reply(msg: Message, err: BaseException) -> Message:
    """The ClientApp's reply when its client's data fail the checks (:func:`fedmeta.data.base.check_client`):
    a typed reason (``data-error``) and the error's one line, instead of an exception Flower would report as
    "the ClientApp raised" (which the server cannot tell from a crash)."""
    text = " ".join(str(err).split())
    return Message(RecordDict({ERROR_RECORD: ConfigRecord({"reason": DATA_ERROR, "text": text})}), reply_to=msg)


def data_error_of(msg: Message) -> str | None:
    """The one line of a ``data-error`` reply (whitespace collapsed, at most 300 characters), else None."""
    try:
        record = msg.content.config_records.get(ERROR_RECORD)
        if record is None or record.get("reason") != DATA_ERROR:
            return None
        return " ".join(str(record.get("text", "")).split())[:300] or "the client's data are invalid"
    except Exception:  # noqa: BLE001 - not a data-error reply; the normal parsing judges it
        return None


def numpy_dtype(ref: torch.Tensor) -> np.dtype:
    return torch.empty((), dtype=ref.dtype).numpy().dtype


def array_to_tensor(name: str, arr: Array, ref: torch.Tensor) -> torch.Tensor:
    """One reply array -> a tensor like ``ref``, checking everything *before* reading the data.

    The announced stype, dtype and shape and the byte length must match ``ref``;
    then the ``np.save`` header inside the bytes must agree, and the data after
    it must be exactly ``ref.numel() * itemsize`` bytes. Only then is anything
    allocated, so an array that claims 10⁹ elements costs nothing.
    """
    if not isinstance(arr, Array):
        raise ReplyError(f"array {name!r} is a {type(arr).__name__}, not a flwr Array")
    if arr.stype != NUMPY_STYPE:
        raise ReplyError(f"array {name!r} has stype {str(arr.stype)[:40]!r}, expected {NUMPY_STYPE!r}")
    want = numpy_dtype(ref)
    try:
        announced = np.dtype(arr.dtype)
    except (TypeError, ValueError):
        announced = None
    if announced != want:
        raise ReplyError(f"array {name!r} has dtype {str(arr.dtype)[:40]!r}, expected {want}")
    shape, expected = tuple(ref.shape), tuple(arr.shape)
    if len(expected) != len(shape) or any(not isinstance(d, int) or d != r for d, r in zip(expected, shape)):
        raise ReplyError(f"array {name!r} has shape {str(expected)[:60]}, expected {shape}")
    data = arr.data
    nbytes = ref.numel() * want.itemsize
    if not isinstance(data, bytes) or not nbytes + NPY_PREFIX <= len(data) <= nbytes + NPY_PREFIX + HEADER_MAX:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ReplyError(f"array {name!r} has {size} bytes, expected {nbytes} plus an np.save header")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0)):
            raise ReplyError(f"unsupported .npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        h_shape, fortran, h_dtype = read_header(fp, max_header_size=HEADER_MAX)
    except Exception as err:  # noqa: BLE001 - any malformed header is the client's fault
        raise ReplyError(f"array {name!r}: bad np.save header ({_why(err)})") from None
    if tuple(h_shape) != shape or h_dtype != want:
        raise ReplyError(f"array {name!r}: its bytes hold {h_dtype} {tuple(h_shape)!s:.60}, announced {want} {shape}")
    if len(data) - fp.tell() != nbytes:
        raise ReplyError(f"array {name!r}: {len(data) - fp.tell()} data bytes, expected {nbytes}")
    flat = np.frombuffer(data, dtype=want, count=ref.numel(), offset=fp.tell())
    values = flat.reshape(shape, order="F" if fortran else "C")
    return torch.from_numpy(np.array(values, copy=True)).to(ref.device)


def validate_phi(theta: Params, record: ArrayRecord) -> Params:
    """Check a reply's arrays against theta: names, stype, dtypes, shapes and byte lengths.

    Finiteness and the update norm are checked for every engine by
    :func:`fedmeta.federation.screen_updates`.
    """
    if not isinstance(record, ArrayRecord):
        raise ReplyError(f"arrays are a {type(record).__name__}, not an ArrayRecord")
    names, expected = set(record.keys()), set(theta.keys())
    if names != expected:
        missing, extra = sorted(expected - names), sorted(map(str, names - expected))
        raise ReplyError(f"array names differ from the model's (missing {missing[:3]}, unexpected {[n[:40] for n in extra[:3]]})")
    return {name: array_to_tensor(name, record[name], ref) for name, ref in theta.items()}


def _num_examples(content: RecordDict) -> float:
    for record in content.metric_records.values():
        if "num-examples" in record:
            try:
                return valid_count(record["num-examples"])
            except ValueError as err:
                raise ReplyError(f"num-examples {err}") from None
    raise ReplyError("reply has no 'num-examples' metric")


def _origin(requests: Iterable[Message]) -> dict[str, int]:
    """message id -> destination node. Error replies for a node that went away come from the
    SuperLink (``src_node_id`` 1), so replies are matched by ``reply_to_message_id``."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in requests if m.metadata.message_id}


def _capped(reported: dict[int, float], announced: dict[int, float]) -> dict[int, float]:
    """Each node's weight: its reported count, capped at the size it announced at discovery or, if it
    announced none, at the cohort's lower median reported count (:func:`fedmeta.meta.aggregate.cohort_cap`)."""
    median = cohort_cap(list(reported.values()))
    return {node: min(n, announced.get(node, median)) for node, n in reported.items()}


class MetaStrategy:
    """Builds requests and parses replies; keeps no model state of its own.

    No exception from one client's reply escapes the ``parse_*`` methods: a
    malformed reply becomes a reason in ``Replies.rejected`` (logged and counted
    by the round loop). ``announced`` maps node id -> the example count the node
    announced at discovery; it caps the node's weight (see :func:`_capped`).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cfg_json = cfg.model_dump_json()
        self.announced: dict[int, float] = {}
        # a ``data-error`` reply: raise DataError with the client's line (simulation: the data are the run's own),
        # or, False (a deployment: the node's own data), count a failure and log it (docs/design.md, "Threat model")
        self.stop_on_data_error = True

    def data_error(self, node: int, msg: Message) -> str | None:
        """A reply saying its client's data are invalid: :class:`DataError` if ``stop_on_data_error``, else its line."""
        text = data_error_of(msg)
        if text is not None:
            if self.stop_on_data_error:
                raise DataError(text)
            log.warning("node %s: its data are invalid, not used this round: %s", node, text)
        return text

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

    def _answered(self, sent: dict[int, int], replies: Iterable[Message], requests: Iterable[Message], out: Replies):
        """Yield ``(node, reply)`` for good replies; count error replies and missing ones as failures.

        A reply for a node that was not asked, or a second reply for one node, is rejected."""
        origin = _origin(requests)
        answered = set()
        for msg in replies:
            try:
                node = origin.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
                if node not in sent or node in answered:
                    out.rejected.append(f"node {node}: {'a second reply' if node in answered else 'a reply nobody asked for'}")
                    continue
                answered.add(node)
                if msg.has_error() or self.data_error(node, msg) is not None:
                    out.failures += 1
                else:
                    yield node, msg
            except DataError:
                raise
            except Exception as err:  # noqa: BLE001 - a broken message object is one client's problem
                out.rejected.append(f"a reply: {_why(err)}")
        out.failures += sum(1 for n in sent if n not in answered)

    @staticmethod
    def _metrics(content: RecordDict) -> dict[str, float]:
        return {k: float(v) for r in content.metric_records.values() for k, v in r.items() if isinstance(v, (int, float))}

    def _parse_train_reply(self, theta: Params, msg: Message) -> tuple[Params, float, dict[str, float]]:
        records = msg.content.array_records
        if not records:
            raise ReplyError("reply has no ArrayRecord")
        record = records[ARRAYS] if ARRAYS in records else next(iter(records.values()))
        n = _num_examples(msg.content)  # before the arrays: it is cheap
        return validate_phi(theta, record), n, self._metrics(msg.content)

    def parse_train(self, theta: Params, sent: dict[int, int], replies: Iterable[Message], requests: Iterable[Message] = ()) -> Replies:
        """``sent`` maps node id -> client id. Missing and error replies are failures; malformed ones are rejected.

        Each update's ``num_examples`` is the reported count capped at what the node announced at
        discovery, or at the cohort's lower median count for a node that announced nothing."""
        out = Replies()
        parsed: dict[int, tuple[Params, dict[str, float]]] = {}
        reported: dict[int, float] = {}
        for node, msg in self._answered(sent, replies, requests, out):
            try:
                phi, reported[node], metrics = self._parse_train_reply(theta, msg)
                parsed[node] = (phi, metrics)
            except Exception as err:  # noqa: BLE001 - no exception from one reply escapes
                reported.pop(node, None)
                out.rejected.append(f"node {node}: {_why(err)}")
        weights = _capped(reported, self.announced)
        for node, (phi, metrics) in parsed.items():
            out.results.append(ClientUpdate(sent[node], phi, weights[node], metrics))
        return out

    @staticmethod
    def _eval_metrics(content: RecordDict) -> dict[str, float]:
        metrics = MetaStrategy._metrics(content)
        if "num-examples" in metrics:
            try:
                metrics["num-examples"] = valid_count(metrics["num-examples"])
            except ValueError as err:
                raise ReplyError(f"num-examples {err}") from None
        bad = [k for k, v in metrics.items() if k.startswith("loss") and not math.isfinite(v)]
        bad += [k for k, v in metrics.items() if k.startswith("acc") and math.isfinite(v) and not 0 <= v <= 1]
        if bad:
            raise ReplyError(f"non-finite or out-of-range evaluation metrics {bad[:3]}")
        return metrics

    def parse_evaluate(self, sent: dict[int, int], replies: Iterable[Message], requests: Iterable[Message] = ()) -> Replies:
        """Like :meth:`parse_train`: ``num-examples`` (the weight of a client's metrics) is validated and capped."""
        out = Replies()
        parsed: dict[int, dict[str, float]] = {}
        for node, msg in self._answered(sent, replies, requests, out):
            try:
                parsed[node] = self._eval_metrics(msg.content)
            except Exception as err:  # noqa: BLE001 - no exception from one reply escapes
                out.rejected.append(f"node {node}: {_why(err)}")
        weights = _capped({node: m["num-examples"] for node, m in parsed.items() if "num-examples" in m}, self.announced)
        for node, metrics in parsed.items():
            if node in weights:
                metrics["num-examples"] = weights[node]
            out.results.append((sent[node], metrics))
        return out

    def parse_query(self, reply: Message) -> dict[str, Any] | None:
        """A node's description: ``partition-id``, ``heldout``, ``group``, ``num-examples`` (None if not announced)
        and ``spec`` (a ``DatasetSpec``, None if not sent); None for an error reply (a stock Flower client
        has no query handler). A malformed description raises :class:`ReplyError`."""
        if reply.has_error():
            return None
        text = data_error_of(reply)
        if text is not None:  # the node has a client, but its data fail the checks
            raise DataError(text)
        configs = reply.content.config_records
        if CONFIG not in configs:
            raise ReplyError("query reply has no 'config' record")
        info = configs[CONFIG]
        pid = info.get("partition-id")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < self.cfg.data.num_clients:
            raise ReplyError(f"partition-id must be an integer in [0, {self.cfg.data.num_clients}) (data.num_clients) (got {str(pid)[:40]!r})")
        heldout = info.get("heldout", False)
        if not isinstance(heldout, bool):
            raise ReplyError(f"heldout must be a bool (got {str(heldout)[:40]!r})")
        group = info.get("group", "test" if heldout else "train")  # a client without "group": heldout decides
        if group not in GROUPS or (group == "train") == heldout:
            raise ReplyError(f"group must be one of {GROUPS}, 'train' exactly when heldout is false (got {str(group)[:40]!r})")
        n = None
        if "num-examples" in info:
            try:
                n = valid_count(info["num-examples"])
            except ValueError as err:
                raise ReplyError(f"num-examples {err}") from None
        spec = None
        if "spec" in info:
            try:
                spec = spec_from_dict(json.loads(str(info["spec"])))
                spec_to_dict(spec)
            except Exception as err:  # noqa: BLE001 - bad JSON, bad structure
                raise ReplyError(f"spec: {_why(err)}") from None
        return {"partition-id": pid, "heldout": heldout, "group": group, "num-examples": n, "spec": spec}
