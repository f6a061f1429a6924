"""Audio-visual digits: real handwritten digit images paired with spoken digits.

Modalities (spec order; ``modalities`` picks a subset):

* ``image``  kind ``image``, ``[8, 8]`` in ``[0, 1]``: scikit-learn's bundled 8x8 handwritten
  digits (``sklearn.datasets.load_digits``, 1,797 images, no download).
* ``audio``  kind ``sequence``, ``[24, 20]`` (frames x log-mel bands) in ``[0, 1]``: the words
  "zero".."nine" spoken by the espeak-ng and flite TTS engines, shipped as features in
  ``assets/avdigits_audio.npz`` (made by ``scripts/make_avdigits.py``; see
  ``assets/PROVENANCE.md``). 132 speakers (96 espeak-ng accent/voice-variant/speed/pitch
  combinations and 36 flite voice/stretch/F0 combinations), 4 jittered takes per digit each.
* ``signal`` kind ``sequence``, ``[40, 1]`` (optional): an MNIST-1D-style 1-D signal, a fixed
  template per digit, randomly stretched, shifted, sheared and noised per example.

Clients (natural partition):

* every client is one **speaker** (a TTS voice setting) and gets only that speaker's clips; when
  ``num_clients`` exceeds the number of speakers in the chosen domain, speakers are reused by
  several clients (each then draws its own take order and noise);
* the image pool is split over clients by ``flwr_datasets``' ``DirichletPartitioner``
  (``partition_by="label"``, ``alpha=dirichlet_alpha``): label-skewed, *disjoint* across
  clients. A client has ``min(len(partition), examples_per_client)`` examples, so sizes vary;
* each example pairs the client's image with a clip of the same digit by the client's speaker
  (and a ``signal`` of the same digit); rows are in the partitioner's shuffled order, and the
  first ``round(support_fraction * n)`` (at least 1, at most ``n - 1``) rows are the support set;
* ``audio_domain`` picks the speakers: ``"espeak"``, ``"flite"`` or ``"both"``.
  ``heldout_audio_domain`` (with ``audio_domain="both"``) gives held-out clients speakers of that
  domain only and training clients speakers of the other one: a train/test domain shift;
* ``missing_modality_fraction``: exactly ``round(fraction * num_clients)`` clients (chosen by
  seed) lack one modality for all their examples (``missing_modality``, or a random one per client
  when ``None``); their ``present`` column is False and the data zeros.

* ``audio_dedup`` (``data.audio_dedup``, default off so published numbers stay as they were): byte-identical
  clips are kept once (the first speaker's); a speaker left without a clip of some digit leaves the pool. The
  asset's six flite ``awb_time`` speakers are byte-identical for every digit (all four takes too), and two flite
  ``rms`` speakers share a clip of "nine": with dedup 127 speakers remain and no two speakers share a clip;
* ``content_pool`` (``data.content_pool``): ``"all"`` (default) draws from every image and speaker;
  ``"tuning"`` / ``"report"`` draw from two fixed, disjoint halves of the images and of each domain's
  speakers (the same halves for every seed), so a tuning population shares no image or speaker with a
  reported one.

Everything is a deterministic function of the arguments; ``client(cid)`` builds one client only.
"""

from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedmeta.data.base import ClientData, DataError, DatasetSpec, ModalitySpec, split_clients, per_client_missing
from fedmeta.registry import DATASETS

ASSET = Path(__file__).resolve().parent / "assets" / "avdigits_audio.npz"
MODALITY_NAMES = ("image", "audio", "signal")
AUDIO_DOMAINS = ("espeak", "flite", "both")
CONTENT_POOLS = ("all", "tuning", "report")
SIGNAL_LEN = 40

# MNIST-1D-style templates (12 control points per digit, hand-designed, loosely following the
# strokes of each digit); interpolated to SIGNAL_LEN samples and then randomly transformed.
_TEMPLATES = np.array(
    [
        [5, 6, 6, 5, 3, 1, 1, 3, 5, 6, 6, 5],  # 0
        [5, 5, 5, 5, 5, 5, 0, 0, 0, 0, 0, 0],  # 1
        [3, 5, 6, 5, 3, 1, 0, 0, 2, 4, 6, 6],  # 2
        [2, 5, 6, 4, 3, 4, 6, 5, 2, 1, 1, 2],  # 3
        [0, 2, 4, 6, 6, 3, 3, 3, 6, 6, 6, 0],  # 4
        [6, 6, 0, 0, 3, 5, 6, 5, 3, 1, 0, 0],  # 5
        [6, 4, 2, 0, 0, 1, 3, 4, 3, 1, 1, 3],  # 6
        [0, 6, 6, 5, 4, 3, 2, 1, 1, 0, 0, 0],  # 7
        [3, 6, 3, 0, 3, 6, 3, 0, 3, 6, 3, 0],  # 8
        [3, 1, 1, 3, 4, 3, 5, 6, 6, 5, 4, 2],  # 9
    ],
    dtype=np.float64,
) / 6.0 * 2.0 - 1.0


@lru_cache(maxsize=1)
def _images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits scaled to [0, 1], and labels.

    Read straight from the CSV that scikit-learn ships (what ``load_digits`` reads) so that a
    client process need not import scikit-learn (seconds); falls back to ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        d = np.loadtxt(csv, delimiter=",")
        data, target = d[:, :-1].reshape(-1, 8, 8), d[:, -1]
    else:  # pragma: no cover - layout change in scikit-learn
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DataError(f"avdigits: scikit-learn is needed for the image modality ({e})") from None
        b = load_digits()
        data, target = b.images, b.target
    return (data / 16.0).astype(np.float32), target.astype(np.int64)  # pixel values 0..16


@lru_cache(maxsize=4)
def _audio(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: avdigits audio asset not found (regenerate with scripts/make_avdigits.py)")
    try:
        with np.load(p, allow_pickle=False) as z:
            out = {k: z[k] for k in ("features", "label", "speaker", "speaker_domain", "speaker_voice")}
    except KeyError as e:
        raise DataError(f"{p}: avdigits audio asset lacks array {e}") from None
    except Exception as e:  # zip/npy corruption
        raise DataError(f"{p}: unreadable avdigits audio asset ({type(e).__name__}: {e})") from None
    f = out["features"]
    if f.ndim != 3 or f.dtype != np.uint8 or len(out["label"]) != len(f) or len(out["speaker"]) != len(f):
        raise DataError(f"{p}: avdigits audio asset has inconsistent arrays (features {f.shape} {f.dtype})")
    return out


def _partition_images(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int
) -> "object":
    """A DirichletPartitioner over the image pool (label column + row index), not yet materialised."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels), dtype=np.int64)})
    last: Exception | None = None
    for attempt in range(3):
        part = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=2,
            self_balancing=True,
            shuffle=True,
            seed=int(np.random.default_rng([seed, attempt, 0xD1F]).integers(2**31)),
        )
        part.dataset = ds
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                part.load_partition(0)  # materialises the assignment of every client
            return part
        except ValueError as e:
            last = e
    raise DataError(
        f"avdigits: cannot split {len(labels)} images over {num_clients} clients with at least 2 each "
        f"at dirichlet_alpha={alpha} ({last}); raise data.dirichlet_alpha or lower data.num_clients"
    )


def _signals(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MNIST-1D-style signals ``[n, SIGNAL_LEN, 1]`` for ``labels``."""
    n = len(labels)
    out = np.empty((n, SIGNAL_LEN), dtype=np.float64)
    grid = np.linspace(0, 1, _TEMPLATES.shape[1])
    t = np.linspace(0, 1, SIGNAL_LEN)
    for i, c in enumerate(labels):
        width = rng.uniform(0.6, 0.85)  # fraction of the window the digit occupies
        start = rng.uniform(0.0, 1.0 - width)
        u = (t - start) / width
        sig = np.interp(u, grid, _TEMPLATES[c], left=0.0, right=0.0)
        sig = sig * rng.uniform(0.8, 1.2) + rng.uniform(-0.4, 0.4) * (t - 0.5)  # scale + shear
        corr = np.convolve(rng.normal(0, 1, SIGNAL_LEN + 8), np.ones(9) / 3.0, mode="valid")
        out[i] = sig + 0.15 * corr + rng.normal(0, 0.1, SIGNAL_LEN)
    return out[:, :, None].astype(np.float32)


def unique_clips(a: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of the audio asset with every byte-identical clip kept once (its first row)."""
    _, first = np.unique(a["features"].reshape(len(a["features"]), -1), axis=0, return_index=True)
    return np.sort(first)


def _complete_speakers(a: dict[str, np.ndarray], clips: np.ndarray, num_classes: int) -> np.ndarray:
    """Per speaker: has it a clip of every digit ``< num_classes`` among ``clips``?"""
    have = np.zeros((len(a["speaker_domain"]), 10), dtype=bool)
    have[a["speaker"][clips], a["label"][clips]] = True
    return have[:, :num_classes].all(axis=1)


def _content_half(items: np.ndarray, pool: str, salt: int) -> np.ndarray:
    """``pool`` "all": ``items``; "tuning" / "report": a fixed (seed-independent) half of them, disjoint."""
    if pool == "all":
        return items
    perm = np.random.default_rng([0xC0DE, salt]).permutation(items)
    half = len(items) // 2
    return np.sort(perm[:half] if pool == "tuning" else perm[half:])


class AVDigits:
    """The audio-visual digits federated dataset (see the module docstring).

    Arguments named like ``DataConfig`` fields mean the same; ``path`` overrides the audio asset.
    """

    def __init__(
        self,
        num_clients: int = 100,
        heldout_fraction: float = 0.2,
        support_fraction: float = 0.5,
        examples_per_client: int = 32,
        num_classes: int = 10,
        missing_modality_fraction: float = 0.0,
        missing_modality: str | None = None,
        dirichlet_alpha: float = 0.5,
        seed: int = 0,
        path: str | None = None,
        audio_domain: str = "both",
        heldout_audio_domain: str | None = None,
        modalities: Sequence[str] = ("image", "audio"),
        audio_noise: float = 0.1,
        audio_dedup: bool = False,
        content_pool: str = "all",
    ) -> None:
        if content_pool not in CONTENT_POOLS:
            raise DataError(f"data.content_pool: one of {CONTENT_POOLS}, got {content_pool!r}")
        missing_modality = missing_modality or None  # "" (Flower run config) means None
        mods = tuple(modalities)
        if not mods or any(m not in MODALITY_NAMES for m in mods) or len(set(mods)) != len(mods):
            raise DataError(f"avdigits: modalities must be distinct names from {MODALITY_NAMES}, got {mods}")
        mods = tuple(m for m in MODALITY_NAMES if m in mods)  # canonical order
        if not 2 <= num_classes <= 10:
            raise DataError(f"data.num_classes: avdigits has 2..10 classes, got {num_classes}")
        if examples_per_client < 2:
            raise DataError(f"data.examples_per_client: need at least 2, got {examples_per_client}")
        if not 0.0 < support_fraction < 1.0:
            raise DataError(f"data.support_fraction: must be in (0, 1), got {support_fraction}")
        if not 0.0 <= missing_modality_fraction <= 1.0:
            raise DataError(f"data.missing_modality_fraction: must be in [0, 1], got {missing_modality_fraction}")
        if missing_modality is not None and missing_modality not in mods:
            raise DataError(f"data.missing_modality: {missing_modality!r} is not one of {mods}")
        if missing_modality_fraction > 0 and len(mods) < 2:
            raise DataError("data.missing_modality_fraction: needs at least two modalities")
        if dirichlet_alpha <= 0:
            raise DataError(f"data.dirichlet_alpha: must be > 0, got {dirichlet_alpha}")
        if audio_domain not in AUDIO_DOMAINS:
            raise DataError(f"avdigits audio_domain: one of {AUDIO_DOMAINS}, got {audio_domain!r}")
        if heldout_audio_domain is not None:
            if heldout_audio_domain not in ("espeak", "flite"):
                raise DataError(f"avdigits heldout_audio_domain: 'espeak', 'flite' or None, got {heldout_audio_domain!r}")
            if audio_domain != "both":
                raise DataError("avdigits heldout_audio_domain needs audio_domain='both'")

        self.num_clients = int(num_clients)
        split = split_clients(self.num_clients, heldout_fraction, seed)
        self.train_clients, self.heldout_clients = split.train, split.heldout
        self.seed = int(seed)
        self.support_fraction = float(support_fraction)
        self.examples_per_client = int(examples_per_client)
        self.num_classes = int(num_classes)
        self.modalities = mods
        self.audio_noise = float(audio_noise)
        self.audio_path = str(path) if path else str(ASSET)

        shapes = {"image": (8, 8), "audio": (24, 20), "signal": (SIGNAL_LEN, 1)}
        kinds = {"image": "image", "audio": "sequence", "signal": "sequence"}
        self.spec = DatasetSpec(
            modalities=tuple(ModalitySpec(m, kinds[m], shapes[m]) for m in mods),  # type: ignore[arg-type]
            task="classification",
            num_classes=self.num_classes,
        )

        # image pool (restricted to the first num_classes digits) and its Dirichlet partition
        _, labels = _images()
        self._pool = _content_half(np.nonzero(labels < self.num_classes)[0], content_pool, 0x1A6E)
        self.content_pool = content_pool
        self._partitioner = None
        self._alpha = float(dirichlet_alpha)
        if self.num_clients * 2 > len(self._pool):
            raise DataError(
                f"data.num_clients: {self.num_clients} clients need at least {2 * self.num_clients} images, "
                f"avdigits has {len(self._pool)} for {self.num_classes} classes"
            )

        # speakers per client (small int array; clips are gathered lazily in client())
        self._speaker = np.full(self.num_clients, -1, dtype=np.int64)
        self._speaker_round = np.zeros(self.num_clients, dtype=np.int64)
        if "audio" in mods:
            a = _audio(self.audio_path)
            dom = a["speaker_domain"]
            self._clips = unique_clips(a) if audio_dedup else np.arange(len(a["label"]))  # clip rows in use
            complete = _complete_speakers(a, self._clips, self.num_classes)
            pools = {d: _content_half(np.nonzero((dom == d) & complete)[0], content_pool, 0x5BE1) for d in ("espeak", "flite")}
            pools["both"] = np.sort(np.concatenate([pools["espeak"], pools["flite"]]))
            if heldout_audio_domain is not None:
                other = "flite" if heldout_audio_domain == "espeak" else "espeak"
                groups = [(self.train_clients, pools[other]), (self.heldout_clients, pools[heldout_audio_domain])]
            else:
                groups = [(list(range(self.num_clients)), pools[audio_domain])]
            for gi, (cids, pool) in enumerate(groups):
                if len(pool) == 0:
                    raise DataError(f"{self.audio_path}: no speakers of the requested audio domain")
                perm = np.random.default_rng([self.seed, gi, 0x5BEA]).permutation(pool)
                for j, cid in enumerate(cids):
                    self._speaker[cid] = perm[j % len(perm)]
                    self._speaker_round[cid] = j // len(perm)

        # which clients lack which modality (-1: none)
        self._missing = np.full(self.num_clients, -1, dtype=np.int64)
        n_miss = int(round(missing_modality_fraction * self.num_clients))
        if n_miss:
            rng = np.random.default_rng([self.seed, 0x3155])
            who = rng.permutation(self.num_clients)[:n_miss]
            if missing_modality is not None:
                self._missing[who] = mods.index(missing_modality)
            else:
                self._missing[who] = rng.integers(0, len(mods), size=n_miss)

    # ------------------------------------------------------------------ helpers
    def _image_indices(self, cid: int) -> np.ndarray:
        """Rows of the sklearn digits array that client ``cid`` holds (disjoint across clients)."""
        if self._partitioner is None:
            _, labels = _images()
            self._partitioner = _partition_images(labels[self._pool], self.num_clients, self._alpha, self.seed)
        idx = np.asarray(self._partitioner.load_partition(int(cid))["idx"], dtype=np.int64)  # type: ignore[attr-defined]
        return self._pool[idx[: self.examples_per_client]]

    def client_info(self, cid: int) -> dict:
        """Who a client is: speaker voice and domain, and the modality it lacks (if any)."""
        self._check(cid)
        info: dict = {"cid": cid, "heldout": cid in set(self.heldout_clients), "missing": None}
        if self._missing[cid] >= 0:
            info["missing"] = self.modalities[self._missing[cid]]
        if self._speaker[cid] >= 0:
            a = _audio(self.audio_path)
            s = int(self._speaker[cid])
            info.update(speaker=s, voice=str(a["speaker_voice"][s]), domain=str(a["speaker_domain"][s]),
                        speaker_reuse=int(self._speaker_round[cid]))
        return info

    def _check(self, cid: int) -> None:
        if not 0 <= int(cid) < self.num_clients:
            raise DataError(f"avdigits: client id {cid} out of range [0, {self.num_clients})")

    # ------------------------------------------------------------------ protocol
    def client(self, cid: int) -> ClientData:
        self._check(cid)
        cid = int(cid)
        images, labels = _images()
        rows = self._image_indices(cid)
        y = labels[rows]
        n = len(y)
        rng = np.random.default_rng([self.seed, cid, 0xA7D1])
        x: dict[str, torch.Tensor] = {}
        if "image" in self.modalities:
            x["image"] = torch.from_numpy(images[rows].copy())
        if "audio" in self.modalities:
            a = _audio(self.audio_path)
            spk = int(self._speaker[cid])
            mine = self._clips[a["speaker"][self._clips] == spk]
            feats = np.empty((n, *a["features"].shape[1:]), dtype=np.float32)
            for c in np.unique(y):
                clips = mine[a["label"][mine] == c]
                if len(clips) == 0:
                    raise DataError(f"{self.audio_path}: speaker {spk} has no clip of digit {c}")
                where = np.nonzero(y == c)[0]
                order = rng.permutation(clips)
                feats[where] = a["features"][order[np.arange(len(where)) % len(order)]] / 255.0
            if self.audio_noise > 0:
                feats += rng.normal(0.0, self.audio_noise, size=feats.shape).astype(np.float32)
                np.clip(feats, 0.0, 1.0, out=feats)
            x["audio"] = torch.from_numpy(feats)
        if "signal" in self.modalities:
            x["signal"] = torch.from_numpy(_signals(y, rng))
        present = torch.ones(n, len(self.modalities), dtype=torch.bool)
        m = int(self._missing[cid])
        if m >= 0:
            present[:, m] = False
            x[self.modalities[m]].zero_()
        n_support = min(max(1, int(round(self.support_fraction * n))), n - 1)
        return ClientData(x=x, y=torch.from_numpy(y.copy()), present=present, n_support=n_support)


@DATASETS.register("avdigits")
def make_avdigits(cfg) -> AVDigits:
    """``data.dataset = "avdigits"``: the built-in dataset factory of a ``DataConfig``."""
    return AVDigits(
        num_clients=cfg.num_clients,
        heldout_fraction=cfg.heldout_fraction,
        support_fraction=cfg.support_fraction,
        examples_per_client=cfg.examples_per_client,
        num_classes=cfg.num_classes,
        missing_modality_fraction=per_client_missing(cfg),
        missing_modality=cfg.missing_modality or None,
        dirichlet_alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        audio_domain=cfg.audio_domain,
        path=cfg.path or None,
        audio_dedup=cfg.audio_dedup,
        content_pool=cfg.content_pool,
    )
