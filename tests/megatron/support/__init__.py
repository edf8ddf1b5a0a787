"""Test scaffolding that lets megatron-core 0.19.2 / megatron-bridge 0.6.2 run where the package never needs it.

Never imported by ``nemodiff_train`` (the engine runs unchanged in a NeMo container):

* :mod:`.shims`          import hook: stand-ins for Transformer Engine, modelopt, resiliency-ext and
                         transformers names newer versions removed (CPU tier and the GPU tests);
* :mod:`.cpu_emulation`  CUDA calls → CPU, so ``pretrain()`` runs on gloo/fp32 (subprocesses only);
* :mod:`.cpu_train`      ``python -m tests.megatron.support.cpu_train``: the orchestration with
                         ``engine=megatron`` on CPU (tests/megatron/test_megatron_cpu_pretrain.py);
* :mod:`.engine_check`   ``python -m tests.megatron.support.engine_check``: the Megatron engine's
                         ``build_job``/``launch`` measured on one device (tests/gpu/test_megatron_gpu.py on
                         CUDA, tests/megatron/test_megatron_engine_check_cpu.py on CPU);
* :mod:`.cp_check`     ``python -m tests.megatron.support.cp_check``: the engine's model, forward step and
                         loss at cp = 2 against cp = 1, two processes (gloo on CPU, ``--nccl`` on 2 GPUs;
                         tests/megatron/test_megatron_context_parallel.py, tests/gpu/test_megatron_cp_gpu.py);
* :mod:`.wheels`         megatron wheels carried to a GPU machine → a private site directory.
"""

from __future__ import annotations

import os
import socket

__all__ = ["import_megatron", "single_process_env"]


def import_megatron(*, compile_fusions: bool = True):
    """Install the shims, import ``megatron.bridge.training.pretrain`` and patch what needs it imported.

    Args:
        compile_fusions: ``False`` imports megatron-core's fusion helpers uncompiled (they are wrapped
            in ``torch.compile`` at import time, which needs a host C compiler at run time; the
            fusions are off without Transformer Engine, so they never run).
    Returns:
        the :mod:`.shims` module (for :func:`.shims.report`).
    """
    from . import shims

    shims.install()
    import torch

    real_compile = torch.compile
    if not compile_fusions:
        torch.compile = lambda model=None, **kw: model if model is not None else (lambda fn: fn)
    try:
        import megatron.bridge.training.pretrain  # noqa: F401
    finally:
        torch.compile = real_compile
    shims.patch_after_import()
    return shims


def single_process_env() -> None:
    """``RANK=0``, ``WORLD_SIZE=1`` and a free local rendezvous port, as torchrun would set them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WANDB_MODE": "disabled"})
