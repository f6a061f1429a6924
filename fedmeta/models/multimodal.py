"""A multimodal network: one encoder per modality, then fusion, then a head.

Missing modalities are *masked out*: their encoder output is never used.
``concat`` fusion puts a learned "missing" embedding in the absent slot;
``gated`` and ``attention`` fusion give absent modalities zero weight. Nothing
branches on data in Python, so the model works under ``torch.func.vmap``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedmeta.data.base import DatasetSpec, ModalitySpec


class ImageEncoder(nn.Module):
    """[B, H, W] -> [B, E], a two-layer MLP on the flattened image."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(spec.shape), hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embed_dim), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SequenceEncoder(nn.Module):
    """[B, T, F] -> [B, E]: a 1-D convolution over time, then mean pooling."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        features = spec.shape[1]
        self.conv = nn.Conv1d(features, hidden_dim, kernel_size=3, padding=1)
        self.out = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x.transpose(1, 2)))  # [B, hidden, T]
        return torch.relu(self.out(h.mean(dim=2)))


class TokenEncoder(nn.Module):
    """[B, L] token ids (0 = padding) -> [B, E]: embedding, masked mean, linear.

    ``nn.Embedding`` + mean rather than ``nn.EmbeddingBag``, which has no vmap rule.
    """

    def __init__(self, spec: ModalitySpec, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec.vocab_size, hidden_dim, padding_idx=0)
        self.out = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x != 0).unsqueeze(-1).to(self.out.weight.dtype)
        pooled = (self.embed(x) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.relu(self.out(pooled))


class VectorEncoder(nn.Module):
    """[B, D] -> [B, E], a two-layer MLP (the sine task's 1-40-40 body)."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(math.prod(spec.shape), hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embed_dim), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


ENCODERS = {"image": ImageEncoder, "sequence": SequenceEncoder, "tokens": TokenEncoder, "vector": VectorEncoder}


class MultimodalNet(nn.Module):
    """Encoders -> fusion -> head. ``forward(x, present)`` returns logits or regression outputs."""

    def __init__(self, spec: DatasetSpec, embed_dim: int = 32, hidden_dim: int = 32, fusion: str = "concat") -> None:
        super().__init__()
        self.names = list(spec.modality_names)
        self.fusion = fusion
        self.encoders = nn.ModuleDict({m.name: ENCODERS[m.kind](m, embed_dim, hidden_dim) for m in spec.modalities})
        n = len(self.names)
        if fusion == "concat":
            self.missing = nn.Parameter(torch.zeros(n, embed_dim))
            self.fuse = nn.Sequential(nn.Linear(n * embed_dim, embed_dim), nn.ReLU()) if n > 1 else nn.Identity()
        elif fusion == "gated":
            self.gate = nn.Linear(embed_dim, 1)
        elif fusion == "attention":
            self.query = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
            self.key = nn.Linear(embed_dim, embed_dim)
            self.value = nn.Linear(embed_dim, embed_dim)
        else:
            raise ValueError(f"model.fusion: must be one of 'concat', 'gated', 'attention' (got {fusion!r})")
        out = spec.num_classes if spec.task == "classification" else spec.output_dim
        self.head = nn.Linear(embed_dim, out)

    def forward(self, x: dict[str, Tensor], present: Tensor) -> Tensor:
        emb = torch.stack([self.encoders[name](x[name]) for name in self.names], dim=1)  # [B, M, E]
        mask = present.unsqueeze(-1)  # [B, M, 1]
        if self.fusion == "concat":
            emb = torch.where(mask, emb, self.missing.expand_as(emb))
            return self.head(self.fuse(emb.flatten(1)))
        if self.fusion == "gated":
            scores = self.gate(emb)  # [B, M, 1]
            values = emb
        else:
            scores = (self.key(emb) * self.query).sum(-1, keepdim=True) / math.sqrt(emb.shape[-1])
            values = self.value(emb)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        weights = torch.nan_to_num(weights, nan=0.0)  # a client with no modality at all contributes nothing
        return self.head((weights * values).sum(1))


def build_model(spec: DatasetSpec, embed_dim: int = 32, hidden_dim: int = 32, fusion: str = "concat", seed: int | None = None) -> MultimodalNet:
    """The model for ``spec``; with ``seed`` its initial weights are reproducible."""
    if seed is None:
        return MultimodalNet(spec, embed_dim, hidden_dim, fusion)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultimodalNet(spec, embed_dim, hidden_dim, fusion)
