#!/usr/bin/env bash
# Every GPU-specific check of the project in one prepared run (a lent H100/H200: Python 3.12, torch
# with CUDA, transformers, triton; no internet, no Megatron, no Transformer Engine).
#
# Carry: .device (wheels: hydra-core, omegaconf, antlr4, pytest, megatron-core, megatron-bridge ...)
# and runs/demo_cpu/hf (the demo's exported model). Writes JSON/log files under $OUT.
#   OUT=/tmp/gpu bash tools/gpu_check.sh
# Each part has its own time limit so a hang in one still leaves the others' results.
set -u
OUT=${OUT:-/tmp/nemodiff_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/nemodiff_site${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
log() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.log"; }
part() {  # part <name> <seconds> <command...>
  local name=$1 limit=$2; shift 2
  log "$name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc" | tee -a "$OUT/summary.log"
  tail -n 15 "$OUT/$name.log"
}

log "environment"
{ nvidia-smi -L; python3 -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__)"; } 2>&1 | tee -a "$OUT/summary.log"
# into a private target: the device's Python may be externally managed
python3 -m pip install -q --no-deps --no-index --target /tmp/nemodiff_site .device/wheels/hydra_core-*.whl .device/wheels/omegaconf-*.whl \
  .device/wheels/antlr4_python3_runtime-*.whl .device/wheels/pytest-*.whl .device/wheels/pluggy-*.whl \
  .device/wheels/iniconfig-*.whl >> "$OUT/summary.log" 2>&1

# 1. flex-attention BlockMask == dense mask on CUDA, and the CUDA tests of every tier
part gpu_tests 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_masks.py

# 2. the torch engine on CUDA: bf16 autocast, flex-attention BlockMask through HF's own modules
part torch_engine_cuda 75 python3 -m nemodiff_train.cli.train recipe=tiny_cpu run.dir="$OUT/run_cuda" \
  engine.device=cuda stages.0.steps=30 checkpoint.every=15 logging.val_every=10 export.at_end=false
cp "$OUT/run_cuda/metrics.jsonl" "$OUT/torch_engine_cuda_metrics.jsonl" 2>/dev/null

# 3. DLM step vs AR step, Qwen3-1.7B shape, L = 4096, bf16 (PERFORMANCE.md target: <= 2.1x with flex)
part train_step_1p7b 100 python3 tools/bench_train_step.py --random qwen3-1.7b --seq-len 4096 --batch 1 \
  --block-size 64 --device cuda --dtype bfloat16 --repeats 5 --json "$OUT/train_step_1p7b.json"

# 4. Megatron-Bridge: pretrain() with the two-stream attention, tiny + 1.2B MFU (tools/gpu_megatron_check.py)
part megatron 280 python3 tools/gpu_megatron_check.py --budget 270 --out "$OUT"

# 5. decoding: all four modes on the demo's exported model, on the GPU (TPF, tok/s, lossless)
DEMO_HF=${DEMO_HF:-runs/demo_cpu/hf}
if [ -d "$DEMO_HF" ]; then
  part eval_demo_cuda 40 python3 -m nemodiff_train.cli.evaluate model="$DEMO_HF" out="$OUT/eval_demo" \
    device=cuda limit=20 sweep.threshold=[]
fi
log "done"
