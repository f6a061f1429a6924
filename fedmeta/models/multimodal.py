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
    """[B, H, W] or [B, C, H, W] -> [B, E], a two-layer MLP on the flattened image (``model.image_encoder = "mlp"``)."""

    def __init__(self, spec: ModalitySpec, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(spec.shape), hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embed_dim), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvImageEncoder(nn.Module):
    """[B, H, W] or [B, C, H, W] -> [B, E], a small CNN (``model.image_encoder = "cnn"``).

    Two 3x3 convolutions with stride 2 and padding 1 (each halves H and W, rounding up, so any
    image size works: 8x8 -> 4x4 -> 2x2), ``hidden_dim // 2`` then ``hidden_dim`` channels, ReLU
    after each, then a linear layer from the flattened ``[hidden_dim, ceil(H/4), ceil(W/4)]`` map
    to the embedding. Flattening keeps *where* a stroke is, which global average pooling throws
    away: on avdigits images it reached 0.94 held-out accuracy against 0.78 with pooling
    (docs/design.md). Whether a channel axis is added comes from the spec's rank, never from the
    data, so the encoder runs under ``torch.func.vmap``.
    """

    def __init__(self, spec: ModalitySpec, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        if len(spec.shape) not in (2, 3):
            raise ValueError(f"image modality {spec.name!r}: shape must be [H, W] or [C, H, W], got {list(spec.shape)}")
        self.add_channel = len(spec.shape) == 2
        channels = 1 if self.add_channel else spec.shape[0]
        height, width = spec.shape[-2:]
        mid = max(1, hidden_dim // 2)
        self.conv1 = nn.Conv2d(channels, mid, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(mid, hidden_dim, kernel_size=3, stride=2, padding=1)
        self.out = nn.Linear(hidden_dim * -(-height // 4) * -(-width // 4), embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)  # [B, 1, H, W]
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # [B, hidden, ceil(H/4), ceil(W/4)]
        return torch.relu(self.out(h.flatten(1)))


class SequenceEncoder(nn.Module):
    """[B, T, F] -> [B, E]: a 1-D convolution over time, then mean pooling.

    The convolution (``self.conv``'s weight and bias, an ``nn.Conv1d``) is computed as one matmul over
    the ``kernel_size``-wide windows of the zero-padded sequence: the same cross-correlation, but under
    ``torch.func.vmap`` a batched ``Conv1d`` becomes a grouped convolution (one group per client) whose
    forward and backward were 28 % of the vectorised client update; the matmul form is ~15 % faster
    per update (docs/benchmarks.md, section 2) and agrees with ``nn.Conv1d`` to float rounding.
    """

    def __init__(self, spec: ModalitySpec, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        features = spec.shape[1]
        self.conv = nn.Conv1d(features, hidden_dim, kernel_size=3, padding=1)
        self.out = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        k, pad, steps = self.conv.kernel_size[0], self.conv.padding[0], x.shape[1]
        xp = nn.functional.pad(x, (0, 0, pad, pad))  # [B, T + 2 pad, F]
        windows = torch.stack([xp[:, i : i + steps] for i in range(k)], dim=3)  # [B, T, F, k], as Conv1d's weight
        h = torch.relu(windows.flatten(2) @ self.conv.weight.flatten(1).t() + self.conv.bias)  # [B, T, hidden]
        return torch.relu(self.out(h.mean(dim=1)))


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
IMAGE_ENCODERS = {"mlp": ImageEncoder, "cnn": ConvImageEncoder}  # model.image_encoder


class MultimodalNet(nn.Module):
    """Encoders -> fusion -> head. ``forward(x, present)`` returns logits or regression outputs.

    ``image_encoder`` picks the encoder of ``image`` modalities: ``"mlp"`` (:class:`ImageEncoder`)
    or ``"cnn"`` (:class:`ConvImageEncoder`).
    """

    def __init__(
        self, spec: DatasetSpec, embed_dim: int = 32, hidden_dim: int = 32, fusion: str = "concat", image_encoder: str = "mlp"
    ) -> None:
        super().__init__()
        if image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"model.image_encoder: must be one of 'mlp', 'cnn' (got {image_encoder!r})")
        self.names = list(spec.modality_names)
        self.fusion = fusion
        kinds = dict(ENCODERS, image=IMAGE_ENCODERS[image_encoder])
        self.encoders = nn.ModuleDict({m.name: kinds[m.kind](m, embed_dim, hidden_dim) for m in spec.modalities})
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
        return self.head(self.embed(x, present))

    def embed(self, x: dict[str, Tensor], present: Tensor) -> Tensor:
        """The fused embedding ``[B, embed_dim]`` the head reads (metric-based methods such as ``protonet`` use it)."""
        emb = torch.stack([self.encoders[name](x[name]) for name in self.names], dim=1)  # [B, M, E]
        mask = present.unsqueeze(-1)  # [B, M, 1]
        if self.fusion == "concat":
            emb = torch.where(mask, emb, self.missing.expand_as(emb))
            return self.fuse(emb.flatten(1))
        if self.fusion == "gated":
            scores = self.gate(emb)  # [B, M, 1]
            values = emb
        else:
            scores = (self.key(emb) * self.query).sum(-1, keepdim=True) / math.sqrt(emb.shape[-1])
            values = self.value(emb)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        weights = torch.nan_to_num(weights, nan=0.0)  # a client with no modality at all contributes nothing
        return (weights * values).sum(1)


def build_model(
    spec: DatasetSpec,
    embed_dim: int = 32,
    hidden_dim: int = 32,
    fusion: str = "concat",
    seed: int | None = None,
    image_encoder: str = "mlp",
) -> MultimodalNet:
    """The model for ``spec``; with ``seed`` its initial weights are reproducible."""
    if seed is None:
        return MultimodalNet(spec, embed_dim, hidden_dim, fusion, image_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultimodalNet(spec, embed_dim, hidden_dim, fusion, image_encoder)
