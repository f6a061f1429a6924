"""The memory-mapped store (``data.dataset = "store"``): every bad store is one line and exit 2, never a
traceback, a huge allocation, or a run that silently trains on test clients or reports NaN."""

import json

import numpy as np
import pytest
import torch

from fedmeta.cli import main
from fedmeta.data.base import ClientData, DatasetSpec, ModalitySpec
from fedmeta.data.store import StoreDataset, write_store

P, R, CLASSES, VOCAB = 8, 6, 3, 5
SPEC = DatasetSpec(
    modalities=(ModalitySpec("image", "image", (2, 2)), ModalitySpec("words", "tokens", (3,), vocab_size=VOCAB)),
    task="classification", num_classes=CLASSES,
)


class Tiny:
    """8 clients of 6 rows (image + tokens), clients 1 and 2 held out."""

    spec = SPEC
    num_clients = P
    train_clients = [0, 3, 4, 5, 6, 7]
    heldout_clients = [1, 2]

    def client(self, cid: int) -> ClientData:
        g = torch.Generator().manual_seed(cid)
        return ClientData(
            x={"image": torch.randn(R, 2, 2, generator=g), "words": torch.randint(1, VOCAB, (R, 3), generator=g)},
            y=torch.randint(0, CLASSES, (R,), generator=g), present=torch.ones(R, 2, dtype=torch.bool), n_support=3,
        )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_store(Tiny(), tmp_path_factory.mktemp("store") / "s")


def _edit(name):
    def change(fn):
        def apply(root):
            a = np.load(root / name, allow_pickle=False)
            np.save(root / name, fn(a.copy()))
        return apply
    return change


def _set(name, index, value):
    def fn(a):
        a[index] = value
        return a
    return _edit(name)(fn)


def _retype(name, dtype):
    return _edit(name)(lambda a: a.astype(dtype))


def _index(root, change):
    doc = json.loads((root / "store.json").read_text())
    change(doc)
    (root / "store.json").write_text(json.dumps(doc))


def _huge_header(root):
    """n.npy whose header declares 2**40 int64 entries (8 TiB), in a 200-byte file."""
    with open(root / "n.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (2**40,)})
        f.write(b"\0" * (200 - f.tell()))


def _nested(root):
    (root / "store.json").write_text("[" * 100_000 + "]" * 100_000)


CASES = {
    # silent before: exit 0
    "test clients also train": (_edit("train.npy")(lambda a: np.concatenate([a, [1, 2]])), "client 1 is listed twice (train_clients and heldout_clients)"),
    "negative id": (_set("train.npy", 0, -1), "train_clients: client ids must be distinct ints in [0, num_clients=8)"),
    "duplicate id": (_edit("train.npy")(lambda a: np.concatenate([a, a[:1]])), "client 0 is listed twice (train_clients)"),
    "n_support == n": (_set("n_support.npy", 3, R), "n_support.npy: client 3 has n_support=6 of n=6; it must be in [1, n - 1]"),
    # tracebacks before
    "id out of range": (_edit("heldout.npy")(lambda a: np.concatenate([a, [P]])), "heldout_clients: client ids must be distinct ints in [0, num_clients=8) split"),
    "n > rows": (_set("n.npy", 0, R + 1), "n.npy: client 0 has n=7, n_support=3; need 0 <= n_support <= n <= rows=6"),
    "negative n": (_set("n.npy", 4, -2), "n.npy: client 4 has n=-2"),
    "n_support > n": (_set("n_support.npy", 5, R + 1), "n.npy: client 5 has n=6, n_support=7"),
    "n_support 0": (_set("n_support.npy", 6, 0), "n_support.npy: client 6 has n_support=0 of n=6"),
    "label out of range": (_set("y.npy", (7, 2), CLASSES), "y.npy: labels outside [0, 3)"),
    "negative label": (_set("y.npy", (0, 0), -1), "y.npy: labels outside [0, 3)"),
    "token outside vocab": (_set("x.words.npy", (2, 1, 0), VOCAB), "x.words.npy: token ids outside [0, 5)"),
    "int64 image": (_retype("x.image.npy", np.int64), "x.image.npy: dtype int64, the store needs float32"),
    "float y": (_retype("y.npy", np.float32), "y.npy: dtype float32, the store needs int64"),
    "int8 present": (_retype("present.npy", np.int8), "present.npy: dtype int8, the store needs bool"),
    "float n": (_retype("n.npy", np.float64), "n.npy: dtype float64, the store needs int64"),
    "wrong trailing shape": (_edit("x.image.npy")(lambda a: np.zeros((P, R, 2, 3), np.float32)), "x.image.npy: shape [8, 6, 2, 3], the store needs [8, 6, 2, 2]"),
    "fewer clients in y": (_edit("y.npy")(lambda a: a[:-1]), "y.npy: shape [7, 6], the store needs [8, 6]"),
    "truncated x": (lambda root: (root / "x.image.npy").write_bytes((root / "x.image.npy").read_bytes()[:-8]), "x.image.npy: its header declares"),
    "no num_clients": (lambda root: _index(root, lambda d: d.pop("num_clients")), "store.json: missing key 'num_clients'"),
    "rows many": (lambda root: _index(root, lambda d: d.update(rows="many")), "store.json: 'rows' must be an integer >= 1, got 'many'"),
    "bad spec": (lambda root: _index(root, lambda d: d["spec"].update(num_classes="x")), "store.json: 'spec.num_classes' must be an integer"),
    "modalities differ": (lambda root: _index(root, lambda d: d.update(modalities=["image"])), "store.json: 'modalities'"),
    "n.npy declares 8 TiB": (_huge_header, "n.npy: shape [1099511627776], the store needs [8]"),
    "nested store.json": (_nested, "store.json: invalid JSON (nested too deeply)"),
    "missing present": (lambda root: (root / "present.npy").unlink(), "present.npy: file not found"),
}


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _simulate(capsys, root, tmp_path):
    code = main(["simulate", "--set", "data.dataset=store", "--set", f"data.path={root}", "--set", f"data.num_clients={P}",
                 "--set", "simulation.engine=vectorized", "--set", "simulation.rounds=1", "--set", "simulation.clients_per_round=2",
                 "--set", "model.embed_dim=4", "--set", "model.hidden_dim=4", "--set", "output.progress=false",
                 "--out", str(tmp_path / "run")])
    return code, capsys.readouterr().err


def test_the_pristine_store_runs(pristine, tmp_path, capsys):
    """The control: the unchanged store opens and a round runs, so each case below fails for its own change."""
    store = StoreDataset(pristine, num_clients=P)
    assert store.heldout_clients == [1, 2] and store.client(3).n_support == 3
    code, err = _simulate(capsys, pristine, tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert np.isfinite(summary["heldout_loss_after"]) and np.isfinite(summary["heldout_acc_after"])


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_store_is_one_line_and_exit_2(pristine, tmp_path, capsys, case):
    change, needle = CASES[case]
    root = _copy(pristine, tmp_path / "s")
    change(root)
    code, err = _simulate(capsys, root, tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedmeta: ") and needle in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()
