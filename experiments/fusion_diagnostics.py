"""Why does (or doesn't) fusion beat one modality? Evidence from the fusion study's trained models.

    python -m experiments.fusion_diagnostics        # after: python -m experiments.protocol avdigits-fusion

For every reported run of the fusion study's fused arms (concat, gated, attention), on that run's **test**
clients, from its final θ (``model.pt``):

* **reliance on audio**: accuracy after adaptation with both modalities, and with audio masked out
  (``present`` False, data zeroed) at evaluation; a model that ignores audio loses nothing;
* **gradient share**: the norm of the support-loss gradient at θ in the image encoder, the audio
  encoder and the rest (fusion + head), averaged over clients: what the inner loop adapts;
* **gate weights** (gated and attention fusion): the mean softmax weight on image and on audio at θ;
* **parameter counts** per part, fused vs image only.

Writes ``docs/results/avdigits-fusion-diagnostics.{json,md}``.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

DOCS = Path("docs")


def _load(run_dir: Path):
    from fedmeta.client import model_for
    from fedmeta.config import config_from_json
    from fedmeta.data import build_dataset

    cfg = config_from_json((run_dir / "config.json").read_text())
    ds = build_dataset(cfg.data, cfg.model.modalities)
    model = model_for(cfg, ds.spec)
    theta = torch.load(run_dir / "model.pt", weights_only=True)
    if (run_dir / "meta_state.pt").exists():  # e.g. Meta-SGD's learned rates: evaluation adapts with them
        theta |= torch.load(run_dir / "meta_state.pt", weights_only=True)
    return cfg, ds, model, theta


def _without_audio(data):
    j = 1  # spec order: image, audio
    present = data.present.clone()
    present[:, j] = False
    x = dict(data.x, audio=torch.zeros_like(data.x["audio"]))
    return replace(data, x=x, present=present)


def _part(name: str) -> str:
    return "image encoder" if name.startswith("encoders.image") else "audio encoder" if name.startswith("encoders.audio") else "fusion + head"


def diagnose(run_dir: Path) -> dict:
    from torch.func import functional_call

    from fedmeta.client import evaluate_client
    from fedmeta.meta.inner import task_loss

    cfg, ds, model, theta = _load(run_dir)
    acc, acc_no_audio, shares, gates = [], [], {"image encoder": [], "audio encoder": [], "fusion + head": []}, []
    for cid in ds.heldout_clients:
        data = ds.client(cid)
        acc.append(evaluate_client(model, theta, data, cfg, ds.spec, cfg.simulation.rounds, cid)["acc_after"])
        acc_no_audio.append(evaluate_client(model, theta, _without_audio(data), cfg, ds.spec, cfg.simulation.rounds, cid)["acc_after"])
        s = data.support()
        params = {k: v.clone().requires_grad_(True) for k, v in theta.items() if "/" not in k}  # the model's own
        loss = task_loss(model, functional_call(model, params, (s.x, s.present)), s.y, ds.spec.task)
        grads = torch.autograd.grad(loss, list(params.values()))
        sq = {p: 0.0 for p in shares}
        for (name, _), g in zip(params.items(), grads):
            sq[_part(name)] += float((g**2).sum())
        for p in shares:
            shares[p].append(sq[p] ** 0.5)
        if cfg.model.fusion in ("gated", "attention"):
            with torch.no_grad():
                net = model
                net.load_state_dict(theta, strict=False)
                emb = torch.stack([net.encoders[n](s.x[n]) for n in net.names], dim=1)
                scores = net.gate(emb) if cfg.model.fusion == "gated" else (net.key(emb) * net.query).sum(-1, keepdim=True) / emb.shape[-1] ** 0.5
                scores = scores.masked_fill(~s.present.unsqueeze(-1), float("-inf"))
                w = torch.nan_to_num(torch.softmax(scores, dim=1), nan=0.0)[..., 0]  # [B, M]
                both = s.present.all(1)
                if both.any():
                    gates.append(w[both].mean(0).tolist())
    counts: dict[str, int] = {}
    for name, v in theta.items():
        if "/" in name:
            continue
        counts[_part(name)] = counts.get(_part(name), 0) + v.numel()
    out = {"run_dir": str(run_dir), "fusion": cfg.model.fusion, "acc_after": statistics.mean(acc),
           "acc_after_audio_masked": statistics.mean(acc_no_audio),
           "grad_norm": {p: statistics.mean(v) for p, v in shares.items()}, "params": counts}
    if gates:
        out["gate_weight"] = dict(zip(ds.spec.modality_names, [statistics.mean(g[i] for g in gates) for i in range(2)]))
    return out


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    src = DOCS / "results" / "avdigits-fusion.json"
    if not src.exists():
        print(f"{src}: run `python -m experiments.protocol avdigits-fusion` first", file=sys.stderr)
        return 2
    study = json.loads(src.read_text())
    rows, lines = {}, ["# avdigits-fusion diagnostics", "", "Command: `python -m experiments.fusion_diagnostics`", "",
                       "Test clients of every reported seed, from each run's final θ; mean ± std over seeds.", "",
                       "| arm | acc after | acc after, audio masked | ‖∇‖ image enc. | ‖∇‖ audio enc. | ‖∇‖ fusion+head | gate weight image / audio | params image / audio / rest |",
                       "|---|---|---|---|---|---|---|---|"]
    pm = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
    for arm, res in study["arms"].items():
        if arm.split("/")[-1] not in ("concat", "gated", "attention"):
            continue
        ds = [diagnose(Path(r["run_dir"])) for r in res["runs"]]
        rows[arm] = ds
        gate = " / ".join(pm([d["gate_weight"][m] for d in ds]) for m in ("image", "audio")) if "gate_weight" in ds[0] else "–"
        c = ds[0]["params"]
        lines.append(f"| {arm} | {pm([d['acc_after'] for d in ds])} | {pm([d['acc_after_audio_masked'] for d in ds])} | "
                     + " | ".join(pm([d["grad_norm"][p] for d in ds]) for p in ("image encoder", "audio encoder", "fusion + head"))
                     + f" | {gate} | {c.get('image encoder', 0)} / {c.get('audio encoder', 0)} / {c.get('fusion + head', 0)} |")
        print(lines[-1], flush=True)
    (DOCS / "results" / "avdigits-fusion-diagnostics.json").write_text(json.dumps(rows, indent=1) + "\n")
    (DOCS / "results" / "avdigits-fusion-diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
