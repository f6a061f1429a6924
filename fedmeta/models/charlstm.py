"""LEAF's Shakespeare character model, written against the public model contract as a user would.

``model.factory = "fedmeta.models.charlstm:leaf_lstm"``: an embedding of ``model.embed_dim``
(LEAF: 8) per character, a 2-layer LSTM of ``model.hidden_dim`` units (LEAF: 256), and a
softmax over the next character from the last step's output (LEAF ``shakespeare/stacked_lstm.py``).
Input: the ``tokens`` modality of :mod:`fedmeta.data.shakespeare` (``[B, 80]`` ids, 1-based);
output: ``[B, num_classes]`` logits; loss: cross-entropy.

The LSTM is written from primitives (``Linear`` + ``sigmoid``/``tanh``, a Python loop over the 80
steps) so that ``torch.func.vmap`` can run it, which the vectorised engine needs. Each layer's input
projection is one matmul over all steps; only the recurrent ``h @ W_hh`` is in the loop.
``torch.nn.LSTM`` does not vmap in torch 2.13 (``leaf_lstm_torch`` is that variant, for the
sequential and Flower engines; ``tests/test_shakespeare.py`` checks both facts); with the same
weights both give the same outputs (gate order i, f, g, o as in ``nn.LSTM``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PrimitiveLSTM(nn.Module):
    """A stacked LSTM (batch first, zero initial state) from ``Linear`` layers; vmappable."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.ModuleList(nn.Linear(input_size if l == 0 else hidden_size, 4 * hidden_size) for l in range(num_layers))
        self.hh = nn.ModuleList(nn.Linear(hidden_size, 4 * hidden_size, bias=False) for _ in range(num_layers))
        bound = hidden_size**-0.5  # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, T, F]`` -> the top layer's outputs ``[B, T, H]``."""
        B, T, _ = x.shape
        H = self.hidden_size
        seq = x
        for ih, hh in zip(self.ih, self.hh):
            # the input part of every step at once, split into steps once: indexing gx[:, t] at each step would make
            # every step's backward allocate a zero tensor of the whole [B, T, 4H] (unbind's backward stacks once)
            steps = ih(seq).unbind(1)
            h = torch.zeros(B, H, dtype=x.dtype, device=x.device)
            c = torch.zeros(B, H, dtype=x.dtype, device=x.device)
            outs = []
            for t in range(T):
                i, f, g, o = (steps[t] + hh(h)).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            seq = torch.stack(outs, dim=1)
        return seq

    def load_from_torch(self, lstm: nn.LSTM) -> None:
        """Copy an ``nn.LSTM``'s weights (same gate layout) into this module."""
        with torch.no_grad():
            for l, (ih, hh) in enumerate(zip(self.ih, self.hh)):
                ih.weight.copy_(getattr(lstm, f"weight_ih_l{l}"))
                ih.bias.copy_(getattr(lstm, f"bias_ih_l{l}") + getattr(lstm, f"bias_hh_l{l}"))
                hh.weight.copy_(getattr(lstm, f"weight_hh_l{l}"))


class CharLSTM(nn.Module):
    """Embedding -> 2-layer LSTM -> linear over the next character (LEAF's Shakespeare model)."""

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int = 8, hidden_dim: int = 256, num_layers: int = 2,
                 modality: str = "chars", torch_lstm: bool = False, context: int = 0) -> None:
        super().__init__()
        self.modality = modality
        self.context = int(context)  # > 0: read only the last `context` characters of each window
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = (nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True) if torch_lstm
                     else PrimitiveLSTM(embed_dim, hidden_dim, num_layers))
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: dict[str, Tensor], present: Tensor) -> Tensor:
        tokens = x[self.modality]
        if self.context:
            tokens = tokens[:, -self.context :]
        out = self.lstm(self.embed(tokens))
        if isinstance(out, tuple):  # nn.LSTM
            out = out[0]
        return self.head(out[:, -1])

    def loss(self, outputs: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(outputs, y)


def _tokens(spec) -> tuple[str, int]:
    mods = [m for m in spec.modalities if m.kind == "tokens"]
    if len(mods) != 1 or spec.task != "classification":
        raise ValueError(
            "model.factory: the character LSTM needs a classification dataset with one tokens modality "
            f"(got {[(m.name, m.kind) for m in spec.modalities]}, task {spec.task!r}); use data.dataset = 'fedmeta.data.shakespeare:load'"
        )
    return mods[0].name, mods[0].vocab_size


def leaf_lstm(spec, cfg) -> CharLSTM:
    """``model.factory``: LEAF's character LSTM (``model.embed_dim``, ``model.hidden_dim``), vmappable."""
    name, vocab = _tokens(spec)
    return CharLSTM(vocab, spec.num_classes, cfg.model.embed_dim, cfg.model.hidden_dim, modality=name)


def leaf_lstm_torch(spec, cfg) -> CharLSTM:
    """The same model on ``torch.nn.LSTM`` (faster on one client; not vmappable: sequential/flower engines only)."""
    name, vocab = _tokens(spec)
    return CharLSTM(vocab, spec.num_classes, cfg.model.embed_dim, cfg.model.hidden_dim, modality=name, torch_lstm=True)


REDUCED_CONTEXT = 20


def leaf_lstm_reduced(spec, cfg) -> CharLSTM:
    """The CPU-budget variant of :func:`leaf_lstm` (``experiments/configs/shakespeare_small.toml``): the
    LSTM reads only the last 20 of the window's 80 characters (4x fewer recurrent steps; on CPU the
    cost is per-step dispatch, not FLOPs, so this, not the hidden size, is what makes it affordable)."""
    name, vocab = _tokens(spec)
    return CharLSTM(vocab, spec.num_classes, cfg.model.embed_dim, cfg.model.hidden_dim, modality=name, context=REDUCED_CONTEXT)
