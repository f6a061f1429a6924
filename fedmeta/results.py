"""Run outputs: config.json, metrics.jsonl, checkpoint.pt, summary.json, model.pt.

Files that mark a finished run (``summary.json``, ``model.pt``) are written
last and atomically (write to a temp file, then ``os.replace``), so a crash
never leaves a run that looks finished. ``metrics.jsonl`` is appended and
flushed each round; on resume it is cut back to the checkpointed round.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

CONFIG, METRICS, SUMMARY, MODEL, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "model.pt", "checkpoint.pt"
META_STATE = "meta_state.pt"


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunWriter:
    """Owns one run directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def is_finished(self) -> bool:
        return (self.dir / SUMMARY).exists()

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.dir / CONFIG, json.dumps(config, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.dir / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only records of rounds <= ``last_round`` (those a checkpoint covers)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        atomic_write_text(self.dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.dir / CHECKPOINT)

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.dir / CHECKPOINT
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def save_model(self, state_dict: dict[str, torch.Tensor], meta_state: dict[str, torch.Tensor] | None = None) -> None:
        """``model.pt``: the model's meta-learned parameters; ``meta_state.pt``: the algorithm's extra meta-state, if any."""
        if meta_state:
            atomic_torch_save({k: v.detach().cpu() for k, v in meta_state.items()}, self.dir / META_STATE)
        atomic_torch_save({k: v.detach().cpu() for k, v in state_dict.items()}, self.dir / MODEL)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.dir / SUMMARY, json.dumps(_clean(summary), indent=2) + "\n")
