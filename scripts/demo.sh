#!/usr/bin/env bash
# The main job on a fresh machine: install, then convert the embedded tiny Qwen3 AR model into a DLM
# (joint AR + diffusion pretraining, then SFT), export it to <run>/hf and evaluate all four decoding
# modes on the held-out splits of both embedded tasks (code completion, arithmetic word problems).
#   bash scripts/demo.sh [run_dir] [extra hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/demo_cpu}
shift || true
echo "installing nemodiff-train with pip (torch==2.13.0, extra [eval]); quiet, the first time takes a while..."
python -m pip install -q "torch==2.13.0" -e ".[eval]"
echo "installed; training recipe=demo_cpu into $RUN_DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
nemodiff-train recipe=demo_cpu run.dir="$RUN_DIR" "$@"
python - "$RUN_DIR" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
val = [r for r in rows if "val_ar_loss" in r]
print("\n== what the conversion did (validation, held-out rows) ==")
for s in ("pretrain", "sft"):
    v = [r for r in val if r["stage"] == s]
    if v:
        a, b = v[0], v[-1]
        print(f"{s:8s} AR loss {a['val_ar_loss']:.3f} -> {b['val_ar_loss']:.3f}   diffusion loss "
              f"{a['val_diffusion_loss']:.3f} -> {b['val_diffusion_loss']:.3f}   masked-token accuracy "
              f"{a.get('val_masked_token_accuracy', float('nan')):.3f} -> {b.get('val_masked_token_accuracy', float('nan')):.3f}")
probe = [r for r in val if "probe_diffusion_tpf" in r]
if probe:
    modes = [m for m in ("diffusion", "linear_spec", "quadratic_spec") if f"probe_{m}_tpf" in probe[0]]
    acc = next(k for k in probe[0] if k.startswith("probe_ar_") and not k.endswith("_tpf"))
    print("\n== TPF during training (eval.probe: held-out word problems decoded at each validation) ==")
    print("  step  stage    " + "  ".join(f"{m:>14s}" for m in modes) + f"  {'AR ' + acc[len('probe_ar_'):]:>16s}")
    for r in probe:
        print(f"  {r['step']:4d}  {r['stage']:8s} " + "  ".join(f"{r[f'probe_{m}_tpf']:14.2f}" for m in modes)
              + f"  {r[acc]:16.3f}")
print(f"\nexported model: {run / 'hf'}   evaluation: {run / 'eval' / 'eval.json'} (table above), "
      f"plot: {run / 'eval' / 'tpf_accuracy.png'}")
PY
