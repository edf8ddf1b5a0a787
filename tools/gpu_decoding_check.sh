#!/usr/bin/env bash
# The decoding GPU check in one command (a lent H100/H200; under 5 minutes): the static-cache / CUDA-graph
# tests, then nemodiff-bench at the Qwen3-8B shape (random weights, batch 1 and 8) and on the demo's
# converted model (or the embedded base model when there is none).
#   OUT=/tmp/gpu_decoding bash tools/gpu_decoding_check.sh
# Carry .device (the wheels tools/gpu_check.sh installs: hydra-core, omegaconf, antlr4, pytest) and, if
# present, runs/demo_cpu/hf. Each part has its own time limit; results land under $OUT.
set -u
OUT=${OUT:-/tmp/nemodiff_gpu_decoding}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/nemodiff_site${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
log() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.log"; }
part() {  # part <name> <seconds> <command...>
  local name=$1 limit=$2; shift 2
  log "$name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?" | tee -a "$OUT/summary.log"
  tail -n 25 "$OUT/$name.log"
}
log "environment"
{ nvidia-smi -L; python3 -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__)"; } 2>&1 | tee -a "$OUT/summary.log"
if [ -d .device/wheels ] && ! python3 -c "import hydra, pytest" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/nemodiff_site .device/wheels/hydra_core-*.whl \
    .device/wheels/omegaconf-*.whl .device/wheels/antlr4_python3_runtime-*.whl .device/wheels/pytest-*.whl \
    .device/wheels/pluggy-*.whl .device/wheels/iniconfig-*.whl >> "$OUT/summary.log" 2>&1
fi

# 1. static cache == eager dynamic path on CUDA (fp32 and bf16, all modes), graph capture and reuse
part static_cache_tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_static_cache_gpu.py

# 2. the Qwen3-8B shape: every mode at batch 1, ar/diffusion at batch 8, HF generate (static, compiled)
part bench_qwen3_8b 150 python3 -m nemodiff_train.cli.bench shape=qwen3-8b batch_sizes=[1,8] num_prompts=8 \
  block_size=16 out="$OUT/bench_qwen3_8b"

# 3. the demo's converted model on its held-out task (real TPF), or the embedded base model
DEMO_HF=${DEMO_HF:-runs/demo_cpu/hf}
MODEL=$([ -d "$DEMO_HF" ] && echo "$DEMO_HF" || echo embedded)
part bench_demo 60 python3 -m nemodiff_train.cli.bench model="$MODEL" task=arithmetic num_prompts=8 \
  batch_sizes=[1,8] out="$OUT/bench_demo"
log "done"
