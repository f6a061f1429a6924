"""Client-level DP for the server step: DP-FedAvg's clip + noise + fixed denominator, then Reptile.

Each round (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"):

    Δᵢ = φᵢ − θ,   mean = (Σᵢ clip(Δᵢ, C) + N(0, (zC)²·I)) / (q·N),   θ ← θ + β·mean

with clients Poisson-sampled at rate q = clients_per_round / N, which is what
the accountant assumes. Every attempted round is accounted, whether or not
enough clients replied (conservative: a skipped round still reveals that it
was skipped). ``mode = "client"`` means clients clip before sending (the
server re-checks the norms); ``adaptive_clipping`` follows Andrew et al. 2021,
with the update's noise multiplier raised so the combined mechanism keeps z.

Randomness: the Gaussian noise and the Poisson cohorts of a private run come
from a 128-bit secret drawn from the OS (:func:`new_secret`) when the run
starts. It lives in :class:`ServerPrivacy` and the server checkpoint only
(never in ``config.json``, never in a Flower message); each round's generator
seed is a keyed BLAKE2b hash of (stream, round, attempt) under the secret
(:func:`secret_seed`), so a resumed run regenerates the very noise and cohort
of a re-run round. A re-run round whose output differs from the one first
released (a client failed this time, a non-deterministic client) must not
share that noise: the server records a digest of every release
(:func:`release_digest`, ``releases.jsonl`` in the run directory, 0600),
and a differing re-run draws fresh noise keyed by a release counter and is
charged to the accountant as one more release (:meth:`fedmeta.federation.Server.release`).
``privacy.reproducible_noise = true`` keeps the old
config-seeded draws instead (anyone holding the config can regenerate and
subtract the noise; the run is then reported as not private against them).
See docs/design.md, "Threat model".
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

import torch
from torch import Tensor

from fedmeta.config import Config
from fedmeta.privacy.accountant import Accountant, PrivacyError
from fedmeta.privacy.mechanism import (
    AdaptiveClipper,
    adjusted_noise_multiplier,
    default_clipped_count_stddev,
    global_norm,
    noisy_mean_of_clipped,
    private_mean,
)


SECRET_BITS = 128


def new_secret() -> int:
    """A fresh 128-bit secret from the OS's entropy (:mod:`secrets`), drawn once when a private run starts."""
    return secrets.randbits(SECRET_BITS)


def release_digest(theta: dict[str, Tensor]) -> str:
    """sha256 of a released theta (names, dtypes, shapes and bytes, in name order): what ``releases.jsonl`` records."""
    h = hashlib.sha256()
    for k in sorted(theta):
        v = theta[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def secret_seed(secret: int, *keys: int, bits: int = 63) -> int:
    """A ``bits``-bit seed for one generator: keyed BLAKE2b of the integer ``keys`` under ``secret`` (a PRF).

    Knowing some rounds' seeds tells nothing about other rounds' or about the secret.
    """
    if not 0 < bits <= 256:
        raise ValueError(f"bits: must be in 1..256 (got {bits})")
    msg = b"".join(int(k).to_bytes(16, "little", signed=True) for k in keys)
    digest = hashlib.blake2b(msg, key=int(secret).to_bytes(SECRET_BITS // 8, "little"), digest_size=32).digest()
    return int.from_bytes(digest, "little") >> (256 - bits)


class ServerPrivacy:
    """The server step's DP state (mechanism, accountant, adaptive clip) for one run.

    The config has already required Poisson sampling (``Config`` refuses DP with fixed-size).

    ``sample_rate`` is the sampler's q (:func:`fedmeta.federation.sample_rate`), handed in so the
    accountant and the sampler cannot disagree.
    """

    def __init__(self, cfg: Config, num_train_clients: int, sample_rate: float) -> None:
        p = cfg.privacy
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.denominator = self.sample_rate * num_train_clients  # expected cohort size, fixed
        self.noise_multiplier = p.noise_multiplier
        self.clip_norm = p.clip_norm
        self.accountant = Accountant(p.accountant)
        self.clipper: AdaptiveClipper | None = None
        self.update_noise_multiplier = p.noise_multiplier
        if p.adaptive_clipping:
            sigma_b = p.clipped_count_stddev or default_clipped_count_stddev(self.denominator)
            self.clipper = AdaptiveClipper(p.clip_norm, p.target_quantile, p.clip_lr, sigma_b)
            self.update_noise_multiplier = adjusted_noise_multiplier(p.noise_multiplier, sigma_b)
        self._epsilon_cache: tuple[int, float] | None = None
        # None: privacy.reproducible_noise = true, draws seeded from the config (fedmeta.federation does that)
        self.secret: int | None = None if p.reproducible_noise else new_secret()

    def noise_generator(self, stream: int, server_round: int, attempt: int = 0, release: int = 0) -> torch.Generator:
        """The CPU generator of one round's noise, seeded from the secret (a Mersenne Twister: see docs/design.md).

        ``release`` > 0: the fresh noise of a re-run round whose output differs from its earlier release(s).
        """
        if self.secret is None:
            raise PrivacyError("noise_generator: this run has no secret (privacy.reproducible_noise = true)")
        keys = (stream, server_round, attempt) if release == 0 else (stream, server_round, attempt, release)
        return torch.Generator().manual_seed(secret_seed(self.secret, *keys))

    def sampling_seed(self, stream: int, server_round: int, attempt: int = 0) -> int:
        """A 128-bit seed for one round's cohort draw (numpy's PCG64), from the secret."""
        if self.secret is None:
            raise PrivacyError("sampling_seed: this run has no secret (privacy.reproducible_noise = true)")
        return secret_seed(self.secret, stream, server_round, attempt, bits=128)

    def budget_exhausted(self) -> str | None:
        """A reason to stop if one more round would exceed ``privacy.target_epsilon``."""
        target = self.cfg.privacy.target_epsilon
        if target > 0 and self.accountant.would_exceed(target, self.cfg.privacy.delta, self.noise_multiplier, self.sample_rate):
            return f"privacy budget: another round would exceed target_epsilon={target:g} (epsilon now {self.epsilon():.4f})"
        return None

    def account_round(self, releases: int = 1) -> None:
        for _ in range(releases):
            self.accountant.step(self.noise_multiplier, self.sample_rate)

    def aggregate(self, deltas: list[dict[str, Tensor]], generator: torch.Generator,
                  like: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The noisy mean update; ``like`` (zeros shaped as theta) lets an empty cohort release noise / D."""
        clip = self.clip_norm
        if self.cfg.privacy.mode == "client":
            mean = noisy_mean_of_clipped(deltas, clip, self.update_noise_multiplier, self.denominator, generator, like=like)
        else:
            mean = private_mean(deltas, clip, self.update_noise_multiplier, self.denominator, generator, like=like)
        info = {"clip_norm": clip}
        if self.clipper is not None:
            norms = [float(global_norm(d)) for d in deltas]
            self.clip_norm = self.clipper.update(norms, self.denominator, generator)
        return mean, info

    def epsilon(self) -> float:
        rounds = self.accountant.rounds
        if self._epsilon_cache is None or self._epsilon_cache[0] != rounds:
            self._epsilon_cache = (rounds, self.accountant.epsilon(self.cfg.privacy.delta))
        return self._epsilon_cache[1]

    def report(self) -> dict[str, Any]:
        noise = {} if self.secret is not None else {
            "noise": "reproducible: NOT private against anyone holding config.json (privacy.reproducible_noise = true)"}
        return noise | {
            "epsilon": self.epsilon(),
            "delta": self.cfg.privacy.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "accountant": self.accountant.effective_kind,  # "rdp" after a PLD fallback (see Accountant)
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "clip_norm": self.clip_norm,
            "clipper": None if self.clipper is None else vars(self.clipper).copy(),
            # server-side only: the checkpoint is the one place the secret is written (hex: a plain string)
            "secret": None if self.secret is None else format(self.secret, "032x"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if self.secret is not None:  # a resume must redraw the noise and cohorts of the rounds it re-runs
            secret = state.get("secret")
            if not isinstance(secret, str) or not re.fullmatch(r"[0-9a-f]{32}", secret):
                raise PrivacyError("checkpoint: has no noise secret (written with privacy.reproducible_noise = true "
                                 "or by an older fedmeta); a private run cannot be resumed from it")
            self.secret = int(secret, 16)
        self.clip_norm = state["clip_norm"]
        if self.clipper is not None and state.get("clipper"):
            vars(self.clipper).update(state["clipper"])
        self._epsilon_cache = None


class PrivateServer:
    """DP as a wrapper of an algorithm's server hook: clip each delta, sum, noise (:meth:`ServerPrivacy.aggregate`),
    account each attempted round, then the algorithm's own :meth:`~fedmeta.meta.MetaAlgorithm.server_apply`
    (beta, ServerAdam, SCAFFOLD's control variates ...) on the private mean.

    It replaces the algorithm's ``aggregate`` (the only step that sees individual clients), so any method
    whose ``server_update`` is the default ``aggregate`` + ``server_apply`` can be made private; the others
    are refused by ``build_algorithm`` (``MetaAlgorithm.private_server``). ``noise_generator(cfg, privacy, round, attempt)`` is the
    DP noise seeding call site (:func:`fedmeta.federation.noise_generator`).
    """

    def __init__(self, algorithm, cfg: Config, num_train_clients: int, sample_rate: float, noise_generator) -> None:
        self.algorithm = algorithm
        self.cfg = cfg
        self.privacy = ServerPrivacy(cfg, num_train_clients, sample_rate)
        self.noise_generator = noise_generator

    def update(self, theta, deltas, weights, server_round: int, state, attempt: int = 0, release: int = 0):
        # DP noise: the one generator of this attempt (release > 0: a re-run whose output differs, fresh noise)
        generator = self.noise_generator(self.cfg, self.privacy, server_round, attempt, release)
        like = {k: torch.zeros_like(v) for k, v in theta.items()}  # an empty cohort releases noise / D alone
        n = next(iter(deltas.values())).shape[0] if deltas else 0
        per_client = [{k: v[i] for k, v in deltas.items()} for i in range(n)]  # the mechanism clips each client's delta
        mean, dp_info = self.privacy.aggregate(per_client, generator, like=like)
        theta, state, info = self.algorithm.server_apply(theta, mean, server_round, state)
        return theta, state, info | dp_info

    @property
    def secret_noise(self) -> bool:
        """Noise and cohorts from the server's secret (False only under ``privacy.reproducible_noise``)."""
        return self.privacy.secret is not None

    def sampling_seed(self, stream: int, server_round: int, attempt: int) -> int | None:
        """The cohort's seed: keyed by the server's secret, or None (the config's seed) with ``reproducible_noise``."""
        return self.privacy.sampling_seed(stream, server_round, attempt) if self.secret_noise else None

    def budget_exhausted(self) -> str | None:
        return self.privacy.budget_exhausted()

    def account_round(self, releases: int = 1) -> None:
        self.privacy.account_round(releases)

    def report(self) -> dict[str, float]:
        return self.privacy.report()

    def state_dict(self) -> dict[str, Any]:
        return self.privacy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.privacy.load_state_dict(state)
