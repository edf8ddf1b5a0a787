#!/usr/bin/env bash
# The GPU check, as one command on a lent H100/H200 without internet: a thin wrapper of
#
#     python3 -m pytest -m gpu tests/gpu          (plus the gpu-marked tests of tests/unit/test_masks.py)
#
# which is the whole check wherever pytest, hydra-core and megatron-core/bridge are installed. Here the
# wheels carried in the git-ignored .device/wheels (tests/megatron/INSTALL.md, "GPU check") are first
# installed into a private target (the device's Python may be externally managed; tensorboard from
# .device/wheels/optional only when `import tensorboard` fails). After the tests it runs the one
# benchmark the README's performance table cites (a measurement, not a test).
#
#   OUT=/tmp/gpu bash tools/gpu_check.sh        # logs and JSON under $OUT; exit status = pytest's
set -u
OUT=${OUT:-/tmp/nemodiff_gpu}
SITE=${NEMODIFF_SITE:-/tmp/nemodiff_site}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
{ nvidia-smi -L; python3 -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__)"; } 2>&1 | tee "$OUT/environment.log"

shopt -s nullglob
wheels=(.device/wheels/*.whl)
python3 -c "import tensorboard" 2>/dev/null || wheels+=(.device/wheels/optional/*.whl)
if (( ${#wheels[@]} )); then
  python3 -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check --upgrade \
    --target "$SITE" "${wheels[@]}" > "$OUT/install.log" 2>&1 || { echo "wheel install failed:"; tail -n 20 "$OUT/install.log"; }
fi

python3 -m pytest -q -rs -s -p no:cacheprovider -m gpu tests/gpu tests/unit/test_masks.py 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}

timeout 100 python3 tools/bench_train_step.py --random qwen3-1.7b --seq-len 4096 --batch 1 --block-size 64 \
  --device cuda --dtype bfloat16 --repeats 5 --json "$OUT/train_step_1p7b.json" > "$OUT/bench_train_step.log" 2>&1
echo "bench_train_step rc=$? -> $OUT/train_step_1p7b.json"
exit "$rc"
