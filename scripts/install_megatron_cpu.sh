#!/usr/bin/env bash
# The CPU Megatron tier (engine=megatron code and tests/megatron) on Python 3.11 with torch 2.13.0+cpu.
# megatron-core 0.19.2 / megatron-bridge 0.6.2 declare Python 3.12 and pin CUDA-only dependencies, so
# they are installed without their dependency lists (tests/megatron/INSTALL.md explains each line).
# Never `pip install megatron` or `apex`: unrelated projects of those names.
set -euo pipefail
pip() { python -m pip install -q "$@"; }
pip --no-deps --ignore-requires-python megatron-core==0.19.2
pip --no-deps --ignore-requires-python megatron-bridge==0.6.2
pip --no-deps triton==3.9.0 einops==0.8.2
pip psutil tensorboard "torch==2.13.0"
# (megatron.bridge imports on CPU only through the test shims in tests/megatron/support/shims.py)
python -c "import importlib.metadata as m; print('megatron tier installed:', m.version('megatron-core'), m.version('megatron-bridge'))"
