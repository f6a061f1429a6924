"""Synthetic multimodal few-shot tasks, generated from a seed (no files).

Every client is a task, as in Omniglot-style N-way classification:

* A shared bank of latent *concepts* (class prototypes) and one fixed random
  decoder per modality are drawn from the seed. They are what the clients
  share, so a meta-learned initialisation helps.
* Each client draws ``num_classes`` concepts and its own random label order,
  plus a client-specific shift of the latent space. Labels mean different
  things on different clients, so adaptation is needed.
* Three modalities of different shapes: an 8x8 ``image``, a 12x8 ``audio``
  sequence (frames x features) and 8 ``text`` tokens from a 32-word vocabulary.
* A fraction of clients lacks one modality (mask set to False, data zero).

Support and query sets are stratified so that every class appears in both.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmeta.data.base import ClientData, DataError, DatasetSpec, ModalitySpec, split_clients, per_client_missing
from fedmeta.registry import DATASETS

LATENT = 16
IMAGE = (8, 8)
AUDIO = (12, 8)
TEXT_LEN, VOCAB = 8, 32


class SyntheticMultimodal:
    """A population of synthetic multimodal classification tasks."""

    def __init__(
        self,
        num_clients: int = 60,
        examples_per_client: int = 40,
        num_classes: int = 5,
        support_fraction: float = 0.5,
        heldout_fraction: float = 0.2,
        missing_modality_fraction: float = 0.2,
        missing_modality: str = "",
        seed: int = 0,
        noise: float = 0.8,
        shift: float = 0.5,
    ) -> None:
        self.spec = DatasetSpec(
            modalities=(
                ModalitySpec("image", "image", IMAGE),
                ModalitySpec("audio", "sequence", AUDIO),
                ModalitySpec("text", "tokens", (TEXT_LEN,), vocab_size=VOCAB),
            ),
            task="classification",
            num_classes=num_classes,
        )
        if missing_modality and missing_modality not in self.spec.modality_names:
            raise DataError(
                f"data.missing_modality: must be one of {self.spec.modality_names} or empty (got {missing_modality!r})"
            )
        n_support = round(support_fraction * examples_per_client)
        if n_support < num_classes or examples_per_client - n_support < num_classes:
            raise DataError(
                f"data.examples_per_client: support and query need >= num_classes ({num_classes}) examples each; "
                f"got {n_support} support and {examples_per_client - n_support} query"
            )
        self.num_clients = num_clients
        self.examples_per_client = examples_per_client
        self.n_support = n_support
        self.missing_modality_fraction = missing_modality_fraction
        self.missing_modality = missing_modality
        self.seed = seed
        self.noise = noise
        self.shift = shift
        split = split_clients(num_clients, heldout_fraction, seed)
        self.train_clients, self.heldout_clients = split.train, split.heldout

        g = np.random.default_rng([seed, 0x5EED])
        self.num_concepts = max(4 * num_classes, 20)
        self.concepts = g.normal(size=(self.num_concepts, LATENT)).astype(np.float32)
        self.dec_image = (g.normal(size=(LATENT, IMAGE[0] * IMAGE[1])) / np.sqrt(LATENT)).astype(np.float32)
        self.dec_audio = (g.normal(size=(LATENT, AUDIO[0] * AUDIO[1])) / np.sqrt(LATENT)).astype(np.float32)
        self.dec_text = (g.normal(size=(LATENT, VOCAB - 1)) / np.sqrt(LATENT) * 3).astype(np.float32)

    def client(self, cid: int) -> ClientData:
        if not 0 <= cid < self.num_clients:
            raise DataError(f"client id: must be in [0, {self.num_clients}) (got {cid})")
        g = np.random.default_rng([self.seed, 0xC1, cid])
        k = self.spec.num_classes
        concepts = g.choice(self.num_concepts, size=k, replace=False)  # label j -> concept concepts[j]
        shift = g.normal(scale=self.shift, size=LATENT).astype(np.float32)

        def labels(n: int) -> np.ndarray:
            return g.permutation(np.arange(n) % k)

        n = self.examples_per_client
        y = np.concatenate([labels(self.n_support), labels(n - self.n_support)])
        z = self.concepts[concepts[y]] + shift + g.normal(scale=self.noise, size=(n, LATENT)).astype(np.float32)

        image = np.tanh(z @ self.dec_image).reshape(n, *IMAGE)
        audio = np.tanh(z @ self.dec_audio).reshape(n, *AUDIO)
        logits = z @ self.dec_text
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        text = np.stack([g.choice(VOCAB - 1, size=TEXT_LEN, p=p) + 1 for p in probs])  # 0 is padding

        present = np.ones((n, 3), dtype=bool)
        if g.random() < self.missing_modality_fraction:
            names = self.spec.modality_names
            missing = self.missing_modality or names[g.integers(len(names))]
            present[:, names.index(missing)] = False
        x = {
            "image": torch.from_numpy(image.astype(np.float32)),
            "audio": torch.from_numpy(audio.astype(np.float32)),
            "text": torch.from_numpy(text.astype(np.int64)),
        }
        for j, name in enumerate(self.spec.modality_names):
            if not present[0, j]:
                x[name] = torch.zeros_like(x[name])
        return ClientData(x=x, y=torch.from_numpy(y.astype(np.int64)), present=torch.from_numpy(present), n_support=self.n_support)


@DATASETS.register("synthetic")
def make_synthetic(cfg) -> SyntheticMultimodal:
    """``data.dataset = "synthetic"``: the built-in dataset factory of a ``DataConfig``."""
    return SyntheticMultimodal(
        num_clients=cfg.num_clients,
        examples_per_client=cfg.examples_per_client,
        num_classes=cfg.num_classes,
        support_fraction=cfg.support_fraction,
        heldout_fraction=cfg.heldout_fraction,
        missing_modality_fraction=per_client_missing(cfg),
        missing_modality=cfg.missing_modality,
        seed=cfg.seed,
    )
