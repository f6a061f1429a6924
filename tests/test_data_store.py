"""The memory-mapped store (``data.dataset = "store"``): every bad store is one line and exit 2, never a
traceback, a huge allocation, or a run that silently trains on test clients or reports NaN; for the
ragged version 2 (written by default) and the padded version 1 (still read) alike. A ragged store costs
its clients' rows, and a run on it equals the run on the in-memory dataset."""

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


@pytest.fixture(scope="module", params=[2, 1], ids=["v2-ragged", "v1-padded"])
def pristine(request, tmp_path_factory):
    return write_store(Tiny(), tmp_path_factory.mktemp("store") / "s", version=request.param)


def _version(root) -> int:
    return json.loads((root / "store.json").read_text())["version"]


def _at(cid, row, *rest):
    """Where (client ``cid``, row ``row``) sits in a big array of the store at ``root``: flat in version 2, a slot in 1."""
    return lambda root: (cid * R + row, *rest) if _version(root) == 2 else (cid, row, *rest)


def _edit(name):
    def change(fn):
        def apply(root):
            a = np.load(root / name, allow_pickle=False)
            np.save(root / name, fn(a.copy()))
        return apply
    return change


def _set(name, index, value):
    def apply(root):
        a = np.load(root / name, allow_pickle=False).copy()
        a[index(root) if callable(index) else index] = value
        np.save(root / name, a)
    return apply


def _shaped(name, make):
    """Replace ``name`` by ``make(lead)``, ``lead`` the big arrays' leading axes: ``(P * R,)`` in version 2, ``(P, R)`` in 1."""
    return lambda root: np.save(root / name, make((P * R,) if _version(root) == 2 else (P, R)))


def _lead(root_version: int) -> str:
    return "48" if root_version == 2 else "8, 6"


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
    "n > rows": (_set("n.npy", 0, P * R + 1), "n.npy: client 0 has n=49, n_support=3; need 0 <= n_support <= n <= rows="),
    "sizes do not add up": (_set("n.npy", 0, R + 1), {2: "n.npy: the clients' sizes sum to 49 rows, the store's arrays hold rows=48",
                                                     1: "n.npy: client 0 has n=7, n_support=3; need 0 <= n_support <= n <= rows=6"}),
    "negative n": (_set("n.npy", 4, -2), "n.npy: client 4 has n=-2"),
    "n_support > n": (_set("n_support.npy", 5, R + 1), "n.npy: client 5 has n=6, n_support=7"),
    "n_support 0": (_set("n_support.npy", 6, 0), "n_support.npy: client 6 has n_support=0 of n=6"),
    "label out of range": (_set("y.npy", _at(7, 2), CLASSES), "y.npy: labels outside [0, 3)"),
    "negative label": (_set("y.npy", _at(0, 0), -1), "y.npy: labels outside [0, 3)"),
    "token outside vocab": (_set("x.words.npy", _at(2, 1, 0), VOCAB), "x.words.npy: token ids outside [0, 5)"),
    "int64 image": (_retype("x.image.npy", np.int64), "x.image.npy: dtype int64, the store needs float32"),
    "float y": (_retype("y.npy", np.float32), "y.npy: dtype float32, the store needs int64"),
    "int8 present": (_retype("present.npy", np.int8), "present.npy: dtype int8, the store needs bool"),
    "float n": (_retype("n.npy", np.float64), "n.npy: dtype float64, the store needs int64"),
    "wrong trailing shape": (_shaped("x.image.npy", lambda lead: np.zeros((*lead, 2, 3), np.float32)),
                             {v: f"x.image.npy: shape [{_lead(v)}, 2, 3], the store needs [{_lead(v)}, 2, 2]" for v in (1, 2)}),
    "fewer rows in y": (_edit("y.npy")(lambda a: a[:-1]), {2: "y.npy: shape [47], the store needs [48]", 1: "y.npy: shape [7, 6], the store needs [8, 6]"}),
    "truncated x": (lambda root: (root / "x.image.npy").write_bytes((root / "x.image.npy").read_bytes()[:-8]), "x.image.npy: its header declares"),
    "no num_clients": (lambda root: _index(root, lambda d: d.pop("num_clients")), "store.json: missing key 'num_clients'"),
    "rows many": (lambda root: _index(root, lambda d: d.update(rows="many")), "store.json: 'rows' must be an integer >= 1, got 'many'"),
    "rows lie": (lambda root: _index(root, lambda d: d.update(rows=d["rows"] + 1)), "x.image.npy: shape ["),
    "version 3": (lambda root: _index(root, lambda d: d.update(version=3)), "store.json: not a fedmeta-store index of version 1 or 2"),
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
    needle = needle[_version(root)] if isinstance(needle, dict) else needle
    change(root)
    code, err = _simulate(capsys, root, tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fedmeta: ") and needle in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()


class OneLarge:
    """50 clients of 4 rows and one (client 7) of 1,000: a population whose largest client is 250x the others."""

    spec = SPEC
    num_clients = 51
    train_clients = [c for c in range(51) if c not in (1, 2, 3)]
    heldout_clients = [1, 2, 3]

    def client(self, cid: int) -> ClientData:
        g = torch.Generator().manual_seed(cid)
        n = 1000 if cid == 7 else 4
        return ClientData(
            x={"image": torch.randn(n, 2, 2, generator=g), "words": torch.randint(1, VOCAB, (n, 3), generator=g)},
            y=torch.randint(0, CLASSES, (n,), generator=g), present=torch.ones(n, 2, dtype=torch.bool), n_support=n // 2,
        )


def test_a_ragged_store_costs_its_clients_rows_and_runs_as_the_in_memory_population(tmp_path, capsys):
    """Version 2 holds sum(n) rows (50 x 4 + 1,000 = 1,200), not 51 x 1,000 as the padded version 1 does; every
    client reads back exactly (through the dataset and through the engine's ClientStore over the maps); a
    vectorised run on it (every training client, the large one included) gives the version-1 store's theta."""
    from fedmeta.data.store import HEADER_BYTES
    from fedmeta.engines.vectorized import ClientStore

    ds = OneLarge()
    v2 = write_store(ds, tmp_path / "v2")
    v1 = write_store(ds, tmp_path / "v1", rows=1000, version=1)
    row_bytes = 2 * 2 * 4  # one float32 2x2 image
    assert (v2 / "x.image.npy").stat().st_size == HEADER_BYTES + 1200 * row_bytes
    assert (v1 / "x.image.npy").stat().st_size >= 51 * 1000 * row_bytes  # the padding version 2 drops
    for root in (v2, v1):
        store = StoreDataset(root, num_clients=51)
        engine = ClientStore(store)
        assert engine.mapped and engine.padded == (root == v1)
        for cid in (0, 6, 7, 8, 50):
            want = ds.client(cid)
            for got in (store.client(cid), engine.client(cid)):
                assert got.n == want.n and got.n_support == want.n_support
                assert torch.equal(got.x["image"], want.x["image"]) and torch.equal(got.x["words"], want.x["words"])
                assert torch.equal(got.y, want.y) and torch.equal(got.present, want.present)
        # rows past a client's n read as zero, never as the next client's rows
        x, y, present = engine.take(torch.tensor([6, 7]), torch.tensor([[3, 4], [999, 0]]), torch.device("cpu"))
        assert torch.equal(x["image"][0, 0], ds.client(6).x["image"][3]) and not bool(x["image"][0, 1].any())
        assert not bool(present[0, 1].any()) and torch.equal(x["image"][1, 0], ds.client(7).x["image"][999])
    thetas = []
    for name, data in (("v2", ["data.dataset=store", f"data.path={v2}"]), ("v1", ["data.dataset=store", f"data.path={v1}"])):
        args = [a for kv in data for a in ("--set", kv)]
        code = main(["simulate", *args, "--set", "data.num_clients=51", "--set", "simulation.engine=vectorized",
                     "--set", "simulation.rounds=2", "--set", "data.heldout_fraction=0.05", "--set", "simulation.clients_per_round=48", "--set", "meta.inner_batch_size=2",
                     "--set", "model.embed_dim=4", "--set", "model.hidden_dim=4", "--set", "output.progress=false",
                     "--out", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().err
        thetas.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    assert thetas[0].keys() == thetas[1].keys() and all(torch.equal(thetas[0][k], thetas[1][k]) for k in thetas[0])


def test_writing_a_client_of_another_shape_is_one_line(tmp_path):
    """Version 2 appends raw rows: a client whose rows do not match client 0's trailing shape is refused, not written."""
    from fedmeta.data.base import DataError

    class Odd(Tiny):
        def client(self, cid):
            data = super().client(cid)
            if cid == 4:
                data.x["image"] = torch.zeros(R, 3, 2)
            return data

    with pytest.raises(DataError, match=r"^write_store: client 4: x.image has shape \[6, 3, 2\], the store needs \[6, 2, 2\]"):
        write_store(Odd(), tmp_path / "s")
