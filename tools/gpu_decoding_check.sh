#!/usr/bin/env bash
# The decoding GPU check in one command (a lent H100/H200, under 10 minutes; most of it the 8B benches):
#   1. the static-cache / CUDA-graph tests (tests/gpu/test_static_cache_gpu.py: static == eager dynamic in
#      fp32 and bf16 for all modes, graph capture and reuse, remote code and nemodiff-bench on CUDA);
#   2. nemodiff-bench at the Qwen3-8B shape (random weights): every mode at batch 1, ar/diffusion at
#      batch 8, Hugging Face generate (static cache, compiled) in the same interleaved passes;
#   3. nemodiff-bench on the demo's converted model on its held-out arithmetic task (real TPF);
#   4. nemodiff-bench at the Qwen3-8B shape with compile=true (compiled kernels inside our CUDA graphs);
#   5. the other GPU tests (flex attention, the torch engine's bf16 steps, the flex masks), if time is left.
#
#   OUT=/tmp/gpu_decoding bash tools/gpu_decoding_check.sh
#
# Carry .device: .device/wheels (hydra-core, omegaconf, antlr4; tests/megatron/INSTALL.md, "GPU check")
# and, for part 3, a converted model at $DEMO_HF (default runs/demo_cpu/hf, else the embedded base model).
# Every part has its own time limit and the whole script a budget (BUDGET_S, default 560 s): a part that
# would not fit in what is left is skipped and says so. Results: $OUT/summary.log, and every part's log,
# bench.json and bench.png in $OUT/results.tar.gz (one file, written on exit: the device returns few files).
# SHAPE / DEVICE / EXTRA let the same script run its plumbing on a CPU (SHAPE=embedded DEVICE=cpu).
set -u
OUT=${OUT:-/tmp/nemodiff_gpu_decoding}
RESULTS=$(mktemp -d)
trap 'tar -czf "$OUT/results.tar.gz" -C "$RESULTS" . 2>/dev/null' EXIT
BUDGET_S=${BUDGET_S:-560}
SHAPE=${SHAPE:-qwen3-8b}  # the GPU run: shape=qwen3-8b (SHAPE=embedded DEVICE=cpu checks the plumbing)
DEVICE=${DEVICE:-auto}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:/tmp/nemodiff_site${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  WANDB_MODE=disabled PYTHONUNBUFFERED=1
T0=$SECONDS
log() { echo "=== $* (t=$((SECONDS - T0)) s)" | tee -a "$OUT/summary.log"; }
part() {  # part <name> <seconds> <command...>: skipped when the budget has less than <seconds> left
  local name=$1 limit=$2 left=$((BUDGET_S - (SECONDS - T0))); shift 2
  if (( left < limit / 2 )); then log "$name SKIPPED: ${left} s of the budget left, it needs up to ${limit}"; return 99; fi
  (( limit > left )) && limit=$left
  log "$name (limit ${limit} s)"
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc" | tee -a "$OUT/summary.log"
  tail -n 40 "$RESULTS/$name.log"
  return $rc
}
log "environment"
{ nvidia-smi -L 2>&1; python3 -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__)"; } 2>&1 | tee -a "$OUT/summary.log"
if [ -d .device/wheels ] && ! python3 -c "import hydra" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check --target /tmp/nemodiff_site \
    .device/wheels/hydra_core-*.whl .device/wheels/omegaconf-*.whl .device/wheels/antlr4_python3_runtime-*.whl \
    >> "$OUT/summary.log" 2>&1 || log "wheel install FAILED (see summary.log)"
fi

# 1. static cache == eager dynamic path on CUDA (fp32 and bf16, all modes), graph capture and reuse
part static_cache_tests 120 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_static_cache_gpu.py \
  tests/gpu/test_adapter_gpu.py

# 2. the Qwen3-8B shape: every mode at batch 1, ar/diffusion at batch 8, HF generate (static, compiled).
# One prompt per pass at batch 1 (a whole batch at 8), 1 warm-up (graph capture, HF's compilation), 3 passes.
part bench_qwen3_8b 270 python3 -m nemodiff_train.cli.bench shape="$SHAPE" device="$DEVICE" batch_sizes=[1,8] \
  num_prompts=1 warmups=1 runs=3 block_size=16 sol_repeats=5 out="$RESULTS/bench_qwen3_8b" $EXTRA
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 99 ]; then  # graphs off, batch 1 only: the static cache's numbers without graphs
  part bench_qwen3_8b_nographs 150 python3 -m nemodiff_train.cli.bench shape="$SHAPE" device="$DEVICE" \
    batch_sizes=[1] num_prompts=1 warmups=1 runs=3 block_size=16 sol_repeats=5 cuda_graphs=false \
    out="$RESULTS/bench_qwen3_8b_nographs" $EXTRA
fi

# 3. the demo's converted model on its held-out task (real TPF), or the embedded base model
DEMO_HF=${DEMO_HF:-runs/demo_cpu/hf}
MODEL=$([ -d "$DEMO_HF" ] && echo "$DEMO_HF" || echo embedded)
part bench_demo 90 python3 -m nemodiff_train.cli.bench model="$MODEL" device="$DEVICE" task=arithmetic num_prompts=8 \
  batch_sizes=[1,8] warmups=1 runs=3 out="$RESULTS/bench_demo" $EXTRA

# 4. the compiled static path (compile=true: inductor kernels captured in our graphs) against HF's compiled
# generate, at the Qwen3-8B shape, batch 1: the warm-up pays two compilations (q = 1 and q > 1)
part bench_qwen3_8b_compiled 200 python3 -m nemodiff_train.cli.bench shape="$SHAPE" device="$DEVICE" batch_sizes=[1] \
  modes=[ar,quadratic_spec] cache=static compile=true num_prompts=1 warmups=1 runs=3 block_size=16 sol_repeats=5 \
  out="$RESULTS/bench_qwen3_8b_compiled" $EXTRA

# 5. the other GPU tests: flex attention == sdpa/eager, the torch engine's bf16 steps, the flex masks
part gpu_tests 120 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_flex_attention_gpu.py \
  tests/gpu/test_torch_engine_gpu.py tests/unit/test_masks.py

log "done"
