#!/usr/bin/env bash
# The CPU Megatron tier (engine=megatron code and tests/megatron) in a virtual environment of its own,
# under megatron-bridge 0.6.2's own version pins (constraints/megatron.txt: transformers <=5.12.1,
# wandb ==0.29.0, hydra-core <1.4, ...). It sees this interpreter's packages (torch 2.13.0+cpu and the
# rest) and overrides only what the pins change, so the main environment keeps its newer versions.
#
#   bash scripts/install_megatron_cpu.sh        # prints the tier's python last: scripts/test.sh uses it
#
# NEMODIFF_MEGATRON_VENV: where (default /tmp/nemodiff-megatron-venv; reused when present).
# What it cannot install here (tests/megatron/INSTALL.md explains each line): megatron-core 0.19.2 and
# megatron-bridge 0.6.2 declare Python 3.12 but the only CPU torch build here is for 3.11, so they are
# installed --no-deps --ignore-requires-python; their CUDA-only requirements are left out, and
# `pip check` below accepts exactly those missing names (MEGATRON_NOT_INSTALLED) and nothing else.
# Never `pip install megatron` or `apex`: unrelated projects of those names.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${NEMODIFF_MEGATRON_VENV:-/tmp/nemodiff-megatron-venv}
[[ -x $venv/bin/python ]] || python -m venv --system-site-packages "$venv"
py=$venv/bin/python
pip() { "$py" -m pip install -q -c constraints/megatron.txt "$@"; }

# the shared libraries at megatron-bridge's pins (the constraints choose the versions)
pip "torch==2.13.0" transformers kernels wandb hydra-core omegaconf datasets peft tensorboard einops psutil
pip --no-deps --ignore-requires-python megatron-core megatron-bridge
pip --no-deps triton==3.9.0

# megatron-bridge 0.6.2's direct requirements that this tier does not install (everything else must
# be clean). Cannot be had on this CPU machine:
#   fast-hadamard-transform  sdist only (no wheel on PyPI); its setup.py needs nvcc (CUDA toolkit) and
#                            fails already at metadata generation without it
# Installable, left out: GPU-only kernels or code paths the CPU tier never imports, and heavy trees
# (mlflow alone brings a web server and SQL stack) that would cost CI minutes for nothing tested:
#   flashinfer-python, flashinfer-cubin (295 MB of CUDA binaries), flash-linear-attention (Triton GPU
#   kernels), nvidia-resiliency-ext (GPU-cluster fault tolerance), mistral-common, qwen-vl-utils, timm,
#   open-clip-torch, diffusers (other model families), mlflow, comet-ml (other experiment trackers)
# (megatron-core[dev]'s own pin nvidia-resiliency-ext==0.6.0 has only manylinux_2_39 wheels; glibc here
# is 2.36. pip check does not read extras' requirements, so it does not show up below.)
MEGATRON_NOT_INSTALLED=(
    fast-hadamard-transform flashinfer-python flashinfer-cubin flash-linear-attention nvidia-resiliency-ext
    mistral-common qwen-vl-utils timm open-clip-torch diffusers mlflow comet-ml
)
report=$("$py" -m pip check 2>&1) && status=0 || status=$?
unexpected=$(printf '%s\n' "$report" | grep -v -E "^No broken requirements found" | while read -r line; do
    name=$(sed -nE 's/^megatron-bridge 0\.6\.2 requires ([A-Za-z0-9_.-]+), which is not installed\.$/\1/p' <<<"$line")
    [[ -n $name && " ${MEGATRON_NOT_INSTALLED[*]} " == *" $name "* ]] || printf '%s\n' "$line"
done)
if [[ -n $unexpected ]]; then
    echo "megatron tier: pip check found problems beyond the documented missing CUDA-only requirements:" >&2
    printf '%s\n' "$unexpected" >&2
    exit 1
fi
"$py" -c "import importlib.metadata as m; print('megatron tier installed:', *(f'{n} {m.version(n)}' for n in ('megatron-core', 'megatron-bridge', 'transformers', 'wandb')))"
echo "$py"
