#!/usr/bin/env python3
"""Regenerate ``fedmeta/data/assets/avdigits_audio.npz``: spoken digits from real TTS engines.

Needs the Debian packages ``espeak-ng`` and ``flite`` (``apt-get install -y espeak-ng flite``)
and numpy + scipy. The shipped loader (``fedmeta.data.avdigits``) needs neither.

Every *speaker* is one TTS voice setting: for espeak-ng an (accent, voice variant, speed,
pitch) combination, for flite a (voice, duration stretch, target F0) combination. For every
speaker and every digit word "zero".."nine" the script renders ``--takes`` clips, each with a
small jitter of speed and pitch around the speaker's setting, so a speaker has its own set of
distinct clips per digit.

Features: mono, resampled to 16 kHz, leading/trailing silence trimmed (-35 dB below peak),
power STFT (25 ms Hann window, 10 ms hop, 512-point FFT), 20 HTK mel bands 60-7600 Hz,
10*log10 power relative to the clip's maximum, clipped to [-80, 0] dB, linearly resampled in
time to 24 frames, stored as uint8 (``round((dB + 80) / 80 * 255)``), i.e. ``[N, 24, 20]``.

Usage::

    python scripts/make_avdigits.py [--out fedmeta/data/assets/avdigits_audio.npz] [--takes 4]

The output is deterministic for fixed engine versions (speaker settings come from a seeded RNG).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from scipy.signal import resample_poly

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SR = 16000
N_FFT = 512
WIN = 400
HOP = 160
N_MELS = 20
N_FRAMES = 24
FMIN, FMAX = 60.0, 7600.0
DB_RANGE = 80.0

# "en" is espeak-ng's British English (gmw/en); the rest are its other English accents.
ESPEAK_ACCENTS = [
    "en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
    "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt", "awb_time"]
FLITE_NO_F0 = {"rms", "awb_time"}  # target-F0 setting has no effect on these voices


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


def mel_filterbank() -> np.ndarray:
    mels = np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2)
    hz = _mel_to_hz(mels)
    freqs = np.linspace(0, SR / 2, N_FFT // 2 + 1)
    fb = np.zeros((N_MELS, freqs.size))
    for i in range(N_MELS):
        lo, c, hi = hz[i], hz[i + 1], hz[i + 2]
        up = (freqs - lo) / (c - lo)
        down = (hi - freqs) / (hi - c)
        fb[i] = np.maximum(0.0, np.minimum(up, down))
    return fb


FB = mel_filterbank()


def features(wav_path: str) -> np.ndarray:
    sr, x = wavfile.read(wav_path)
    x = x.astype(np.float64)
    if x.ndim > 1:
        x = x.mean(axis=1)
    if sr != SR:
        g = np.gcd(sr, SR)
        x = resample_poly(x, SR // g, sr // g)
    # trim silence
    env = np.convolve(np.abs(x), np.ones(160) / 160, mode="same")
    thr = env.max() * 10 ** (-35 / 20)
    idx = np.nonzero(env > thr)[0]
    if idx.size:
        x = x[max(0, idx[0] - 160): idx[-1] + 160]
    if x.size < WIN:
        x = np.pad(x, (0, WIN - x.size))
    n_frames = 1 + (x.size - WIN) // HOP
    win = np.hanning(WIN)
    frames = np.stack([x[i * HOP: i * HOP + WIN] * win for i in range(n_frames)])
    spec = np.abs(np.fft.rfft(frames, n=N_FFT, axis=1)) ** 2  # [frames, bins]
    mel = spec @ FB.T  # [frames, mels]
    db = 10 * np.log10(np.maximum(mel, 1e-10))
    db = np.clip(db - db.max(), -DB_RANGE, 0.0)
    # resample time axis to N_FRAMES
    src = np.linspace(0, 1, db.shape[0])
    dst = np.linspace(0, 1, N_FRAMES)
    out = np.stack([np.interp(dst, src, db[:, j]) for j in range(N_MELS)], axis=1)
    return np.round((out + DB_RANGE) / DB_RANGE * 255).astype(np.uint8)


def speakers(seed: int = 1234) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for acc in ESPEAK_ACCENTS:
        for var in ESPEAK_VARIANTS:
            out.append(dict(
                domain="espeak", voice=f"{acc}+{var}",
                speed=int(rng.integers(120, 200)), pitch=int(rng.integers(20, 80)),
            ))
    for v in FLITE_VOICES:
        if v in FLITE_NO_F0:
            combos = [(s, 0) for s in (0.8, 0.9, 1.0, 1.1, 1.25, 1.4)]
        else:
            combos = [(s, f) for s in (0.85, 1.0, 1.25) for f in (-25, 25)]
        for stretch, df0 in combos:
            out.append(dict(domain="flite", voice=v, speed=stretch, pitch=df0))
    return out


def render(job) -> np.ndarray:
    spk, word, take, tmpdir, seed = job
    rng = np.random.default_rng([seed, take, WORDS.index(word), zlib.crc32(spk["voice"].encode()), int(spk["speed"] * 100), int(spk["pitch"]) + 100])
    path = os.path.join(tmpdir, f"{os.getpid()}_{hashlib.md5(repr(job[:3]).encode()).hexdigest()}.wav")
    if spk["domain"] == "espeak":
        jit_s = 1.0 if take == 0 else rng.uniform(0.9, 1.1)
        jit_p = 0 if take == 0 else int(rng.integers(-6, 7))
        cmd = ["espeak-ng", "-v", spk["voice"], "-s", str(int(spk["speed"] * jit_s)),
               "-p", str(int(np.clip(spk["pitch"] + jit_p, 0, 99))), "-w", path, word]
    else:
        jit_s = 1.0 if take == 0 else rng.uniform(0.92, 1.08)
        jit_p = 0 if take == 0 else int(rng.integers(-8, 9))
        cmd = ["flite", "-voice", spk["voice"], "--setf", f"duration_stretch={spk['speed'] * jit_s:.3f}"]
        if spk["voice"] not in FLITE_NO_F0:
            base = 100 if spk["voice"] in ("kal", "kal16", "awb") else 170
            cmd += ["--setf", f"int_f0_target_mean={base + spk['pitch'] + jit_p}"]
        cmd += ["-t", word, "-o", path]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        return features(path)
    finally:
        os.unlink(path)


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0 if cmd[0] == "espeak-ng" else -1].strip()
    except (OSError, IndexError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "fedmeta" / "data" / "assets" / "avdigits_audio.npz"
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--takes", type=int, default=4, help="clips per (speaker, digit)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workers", type=int, default=max(2, (os.cpu_count() or 2) * 2))
    args = ap.parse_args(argv)

    t0 = time.time()
    spks = speakers(args.seed)
    jobs, meta = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for si, spk in enumerate(spks):
            for d, w in enumerate(WORDS):
                for t in range(args.takes):
                    jobs.append((spk, w, t, tmp, args.seed))
                    meta.append((si, d, t))
        with ThreadPoolExecutor(args.workers) as ex:
            feats = list(ex.map(render, jobs, chunksize=16))
    meta_a = np.asarray(meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        features=np.stack(feats),                               # uint8 [N, 24, 20]
        label=meta_a[:, 1].astype(np.int8),                     # digit
        speaker=meta_a[:, 0].astype(np.int16),                  # index into speaker_* arrays
        take=meta_a[:, 2].astype(np.int8),
        speaker_domain=np.array([s["domain"] for s in spks]),
        speaker_voice=np.array([s["voice"] for s in spks]),
        speaker_speed=np.array([float(s["speed"]) for s in spks]),
        speaker_pitch=np.array([float(s["pitch"]) for s in spks]),
        engine_versions=np.array([tool_version(["espeak-ng", "--version"]),
                                  tool_version(["flite", "--version"])]),
    )
    dt = time.time() - t0
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(feats)} clips, "
          f"{len(spks)} speakers, {dt:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
