"""avdigits content: duplicate TTS clips kept once (``data.audio_dedup``) and a tuning population sharing no image
or speaker with the reported ones (``data.content_pool``); both off by default, so the published data is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeta.config import build_config
from fedmeta.data import build_dataset
from fedmeta.data.avdigits import ASSET, AVDigits, _audio, unique_clips
from fedmeta.data.base import DataError

POP = ["data.dataset=avdigits", "data.num_clients=90", "data.examples_per_client=20", "data.num_classes=10",
       "data.audio_domain=both", "data.heldout_fraction=0.2", "data.validation_fraction=0.2", "data.missing_modality_fraction=0"]


def _clip_bytes(ds: AVDigits, cid: int) -> set[bytes]:
    a = _audio(str(ASSET))
    rows = ds._clips[a["speaker"][ds._clips] == ds._speaker[cid]]
    return {a["features"][r].tobytes() for r in rows}


def test_the_asset_has_duplicate_speakers_and_dedup_keeps_each_clip_once():
    a = _audio(str(ASSET))
    feats = a["features"].reshape(len(a["features"]), -1)
    keep = unique_clips(a)
    assert len(keep) < len(feats) and len(np.unique(feats[keep], axis=0)) == len(keep)  # duplicates exist; now gone
    awb = np.nonzero(a["speaker_voice"] == "awb_time")[0]
    assert len(awb) == 6 and all(np.array_equal(feats[a["speaker"] == awb[0]], feats[a["speaker"] == s]) for s in awb)
    base = AVDigits(num_clients=200, examples_per_client=4, audio_domain="both")
    dedup = AVDigits(num_clients=200, examples_per_client=4, audio_domain="both", audio_dedup=True)
    assert len(set(base._speaker.tolist())) == 132 and len(set(dedup._speaker.tolist())) == 127  # 5 awb_time copies out
    clips = [_clip_bytes(dedup, s) for s in {int(dedup._speaker[c]): c for c in range(200)}.values()]
    assert sum(len(c) for c in clips) == len(set().union(*clips))  # no two speakers share a clip


def test_with_dedup_no_test_client_hears_a_clip_a_training_client_has():
    cfg = build_config({}, POP + ["data.audio_dedup=true"])
    ds = build_dataset(cfg.data)
    train = set().union(*(_clip_bytes(ds, c) for c in ds.train_clients))
    assert not any(_clip_bytes(ds, c) & train for c in ds.heldout_clients)
    old = build_dataset(build_config({}, POP).data)  # the published data: some test clients share clips with training
    train_old = set().union(*(_clip_bytes(old, c) for c in old.train_clients))
    assert any(_clip_bytes(old, c) & train_old for c in old.heldout_clients)


def test_defaults_leave_the_published_data_as_it_was():
    cfg = build_config({}, POP)
    assert cfg.data.audio_dedup is False and cfg.data.content_pool == "all"
    a, b = build_dataset(cfg.data), AVDigits(num_clients=90, examples_per_client=20, audio_domain="both", heldout_fraction=0.2,
                                             missing_modality_fraction=0.0, num_classes=10)
    for cid in (0, 7, 42):
        ca, cb = a.client(cid), b.client(cid)
        assert torch.equal(ca.y, cb.y) and torch.equal(ca.x["audio"], cb.x["audio"]) and torch.equal(ca.x["image"], cb.x["image"])


def test_tuning_and_report_pools_share_no_image_and_no_speaker():
    def content(pool, seed):
        ds = build_dataset(build_config({}, POP + [f"data.content_pool={pool}", f"data.seed={seed}"]).data)
        imgs = set(np.concatenate([ds._image_indices(c) for c in range(ds.num_clients)]).tolist())
        return imgs, set(ds._speaker.tolist())

    tune_img, tune_spk = content("tuning", 100)
    for seed in (0, 1):
        img, spk = content("report", seed)
        assert img and spk and not (img & tune_img) and not (spk & tune_spk)
    shared_img, _ = content("all", 0)
    assert shared_img & content("all", 100)[0]  # the default pool: seeds share images
    with pytest.raises(DataError, match="content_pool"):
        AVDigits(content_pool="half")
