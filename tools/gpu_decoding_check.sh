#!/usr/bin/env bash
# The decoding GPU check in one command (a lent H100/H200, under 5 minutes):
#   1. every decoding GPU test: static cache == eager dynamic (fp32, bf16, all modes, batched), CUDA-graph
#      capture and reuse, compile=true, the adapter's gated graphs, batched self-speculation == alone with
#      graphs and one synchronizing CUDA call per cycle (tests/gpu/test_batched_spec_gpu.py), flex attention;
#   2. nemodiff-bench on the demo's converted model (real TPF): the batch sweep 1/4/16/64, every mode and
#      Hugging Face generate interleaved, the crossover batch size per self-speculation mode; then block
#      diffusion with commit_rule=prefix_ar beside AR at batch 1 and 16;
#   3. nemodiff-bench at the Qwen3-8B shape (random weights), ar with compile=true against HF's compiled
#      static-cache generate at batch 1 and 8;
#   4. the batch sweep at the Qwen3-8B shape (shorter outputs), if the budget has room left.
#
#   OUT=/tmp/gpu_decoding bash tools/gpu_decoding_check.sh
#
# Carry .device: .device/wheels (hydra-core, omegaconf, antlr4; tests/megatron/INSTALL.md, "GPU check")
# and, for part 3, a converted model at $DEMO_HF (default runs/demo_cpu/hf, else the embedded base model).
# Every part has its own time limit and the whole script a budget (BUDGET_S, default 285 s): a part that
# would not fit in what is left is skipped and says so. Results: $OUT/summary.log, and every part's log,
# bench.json and bench.png in $OUT/results.tar.gz (one file, written on exit: the device returns few files).
# SHAPE / DEVICE / EXTRA let the same script run its plumbing on a CPU (SHAPE=embedded DEVICE=cpu).
set -u
OUT=${OUT:-/tmp/nemodiff_gpu_decoding}
RESULTS=$(mktemp -d)
trap 'tar -czf "$OUT/results.tar.gz" -C "$RESULTS" . 2>/dev/null' EXIT
BUDGET_S=${BUDGET_S:-285}
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

# 1. every decoding GPU test (static cache, graphs, compile, adapter gates, batched spec, host syncs, flex)
part gpu_tests 100 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu/test_batched_spec_gpu.py \
  tests/gpu/test_static_cache_gpu.py tests/gpu/test_adapter_gpu.py tests/gpu/test_flex_attention_gpu.py

# 2. the demo's converted model (or the embedded base model): the batch sweep and the crossover
DEMO_HF=${DEMO_HF:-runs/demo_cpu/hf}
MODEL=$([ -d "$DEMO_HF" ] && echo "$DEMO_HF" || echo embedded)
part bench_demo_sweep 70 python3 -m nemodiff_train.cli.bench model="$MODEL" device="$DEVICE" task=arithmetic \
  num_prompts=8 batch_sizes=[1,4,16,64] max_new_tokens=64 warmups=1 runs=2 sol_repeats=3 out="$RESULTS/bench_demo" $EXTRA

# 2b. block diffusion with the demo's commit rule (left to right, AR where unsure): a cache re-pack per block
part bench_demo_prefix_ar 40 python3 -m nemodiff_train.cli.bench model="$MODEL" device="$DEVICE" task=arithmetic \
  modes=[ar,diffusion] commit_rule=prefix_ar num_prompts=8 batch_sizes=[1,16] max_new_tokens=64 warmups=1 runs=2 \
  sol_repeats=1 out="$RESULTS/bench_demo_prefix_ar" $EXTRA

# 3. the Qwen3-8B shape: our compiled AR (inductor kernels in our CUDA graphs) against HF's compiled generate
part bench_qwen3_8b_ar 80 python3 -m nemodiff_train.cli.bench shape="$SHAPE" device="$DEVICE" batch_sizes=[1,8] \
  modes=[ar] cache=static compile=true num_prompts=1 max_new_tokens=64 warmups=1 runs=2 block_size=16 sol_repeats=3 \
  out="$RESULTS/bench_qwen3_8b_ar" $EXTRA

# 4. the batch sweep at the Qwen3-8B shape (random weights accept no drafts: this prices the forwards)
part bench_qwen3_8b_sweep 60 python3 -m nemodiff_train.cli.bench shape="$SHAPE" device="$DEVICE" \
  batch_sizes=[1,4,16,64] modes=[ar,linear_spec,quadratic_spec] num_prompts=1 prompt_len=64 max_new_tokens=16 \
  warmups=1 runs=1 block_size=8 sol_repeats=2 out="$RESULTS/bench_qwen3_8b_sweep" $EXTRA

log "done"
