#!/usr/bin/env bash
# The main job on a fresh machine: install, then convert the embedded tiny Qwen3 AR model into a DLM
# (joint AR + diffusion pretraining, then SFT), export it to <run>/hf and evaluate all four decoding
# modes on held-out stdlib modules. About 10 minutes on 2 CPU cores.
#   bash scripts/demo.sh [run_dir] [extra hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/demo_cpu}
shift || true
python -m pip install -q "torch==2.13.0" -e ".[eval]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
nemodiff-train recipe=demo_cpu run.dir="$RUN_DIR" "$@"
python - "$RUN_DIR" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
val = [r for r in rows if "val_ar_loss" in r]
first = {s: next(r for r in val if r["stage"] == s) for s in ("pretrain", "sft")}
last = {s: [r for r in val if r["stage"] == s][-1] for s in ("pretrain", "sft")}
for s in ("pretrain", "sft"):
    print(f"{s:8s} val AR loss {first[s]['val_ar_loss']:.3f} -> {last[s]['val_ar_loss']:.3f}   "
          f"val diffusion loss {first[s]['val_diffusion_loss']:.3f} -> {last[s]['val_diffusion_loss']:.3f}")
print(f"exported model: {run / 'hf'}   evaluation: {run / 'eval' / 'eval.json'}")
PY
