"""LEAF's time-ordered support/query split for Shakespeare (``fedmeta.data.shakespeare.split_windows``), checked on
the real texts: no query target sits inside any support window's input, no window is in both parts, and the old
random split (``load_random_split``) is shown to leak, so the check can see a leak."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_shakespeare import needs_texts

from fedmeta.config import build_config
from fedmeta.data import shakespeare as shk
from fedmeta.data.base import DataError


def _positions(ds, cid):
    """The client's text, its windows, and (support, query) window indices as ``client()`` draws them."""
    r = ds._row(cid)
    o = ds._parsed["offsets"]
    text = ds._parsed["text"][o[r] : o[r + 1]]
    x, y = shk.windows(text)
    rng = np.random.default_rng([ds.seed, int(cid), 0x5A4E])
    s, q = shk.split_windows(y.size, ds._cap, ds.support_fraction, rng, ds.split)
    return text, x, y, s, q


def _leaks(text, s, q) -> tuple[int, int]:
    """(query targets inside some support window's input, windows in both parts), by character position:
    window i predicts text position i from the up-to-80 earlier positions of its line."""
    ends = np.flatnonzero(text == shk.NEWLINE)
    starts = np.concatenate([[0], ends[:-1] + 1])
    line_start = np.repeat(starts, ends - starts + 1)
    cover = np.zeros(text.size + 1, np.int64)
    np.add.at(cover, np.maximum(line_start[s], s - shk.SEQ_LEN), 1)
    np.add.at(cover, s, -1)
    return int((np.cumsum(cover)[:-1] > 0)[q].sum()), len(set(s.tolist()) & set(q.tolist()))


def test_split_windows_by_hand():
    rng = np.random.default_rng(0)
    s, q = shk.split_windows(200, 100_000, 0.2, rng, "time")  # m = 120 used: 24 support, gap 80, 96 query
    assert s.tolist() == list(range(24)) and q.tolist() == list(range(104, 200))
    s, q = shk.split_windows(1000, 50, 0.2, np.random.default_rng(1), "time")  # cap: a block of 50 + 80
    assert s.size == 10 and q.size == 40 and q[0] == s[-1] + 1 + shk.SPLIT_GAP and q[-1] - s[0] == 129
    with pytest.raises(DataError, match="needs >= 82 windows"):
        shk.split_windows(81, 100, 0.2, rng, "time")


@needs_texts
def test_time_split_has_zero_overlap_on_the_real_texts_and_random_split_leaks():
    cfg = build_config({}, ["data.dataset=fedmeta.data.shakespeare:load", "data.num_clients=1124",
                            "data.heldout_fraction=0.1", "data.examples_per_client=100000", "data.support_fraction=0.2"])
    ds = shk.load(cfg.data)
    assert ds.split == "time" and ds.num_clients == 1124 and int(ds.samples.min()) >= shk.SPLIT_GAP + 2
    total = 0
    for cid in ds.heldout_clients:  # every test client, all its windows
        text, x, y, s, q = _positions(ds, cid)
        assert _leaks(text, s, q) == (0, 0), cid
        assert s.max() + shk.SPLIT_GAP < q.min()  # the query part starts a full window after the support part
        m = s.size + q.size
        assert s.size == min(max(1, round(0.2 * m)), m - 1)  # data.support_fraction keeps its meaning
        total += q.size
    assert total > 300_000
    c = ds.client(ds.heldout_clients[0])  # the rows client() returns are those windows
    _, x, y, s, q = _positions(ds, ds.heldout_clients[0])
    assert c.n_support == s.size and torch.equal(c.y, torch.from_numpy(y[np.concatenate([s, q])].astype(np.int64)))
    assert torch.equal(c.x["chars"][c.n_support :], torch.from_numpy(x[q].astype(np.int64) + 1))
    # the earlier random split (kept as load_random_split): most query targets sit inside support inputs
    old = shk.load_random_split(build_config({}, ["data.num_clients=1141", "data.heldout_fraction=0.1",
                                                  "data.examples_per_client=100000", "data.support_fraction=0.2"]).data)
    text, _, _, s, q = _positions(old, old.heldout_clients[0])
    inside, both = _leaks(text, s, q)
    assert inside > 0.5 * q.size and both == 0


@needs_texts
def test_time_split_with_a_cap_uses_consecutive_windows():
    ds = shk.ShakespeareDataset(num_clients=30, examples_per_client=100, support_fraction=0.2, seed=3, split="time")
    for cid in ds.heldout_clients + ds.validation_clients:
        text, _, _, s, q = _positions(ds, cid)
        assert s.size + q.size == min(100, text.size - shk.SPLIT_GAP) and _leaks(text, s, q) == (0, 0)
        assert ds.client(cid).n == s.size + q.size
    with pytest.raises(DataError, match="split must be"):
        shk.ShakespeareDataset(split="shuffle")
