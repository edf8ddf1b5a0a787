"""Turn the loaded fp32 model into what trains: precision, activation checkpointing, data parallelism.

One step, in torchtitan's order, instead of settings spread through setup:

1. **precision** (:func:`precision_plan`): parameters, gradients and optimizer state stay float32
   (master weights) whatever ``model.dtype`` says; ``model.dtype`` / ``engine.precision`` choose the
   *compute* dtype. At the recipes' learning rate (1e-5) an AdamW update is below half a bf16
   rounding step for most weights, so bf16 parameters would silently drop most updates.
2. **activation checkpointing** (``model.gradient_checkpointing``): every decoder layer recomputes
   its forward in backward (non-reentrant, so FSDP2's hooks run again in the recomputation).
3. **compile**: ``engine.compile`` is rejected at config validation (not supported by this engine).
4. **wrapping**: one process → the module itself, compute in ``torch.autocast``; DDP → the same
   autocast, float32 gradients all-reduced; FSDP2 → ``fully_shard`` per decoder layer, then the root,
   with ``MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=float32)``: parameters are
   all-gathered in the compute dtype, gradients reduce-scattered in float32 into float32 shards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ...config.errors import ConfigError
from ...config.schema import Config
from ...models.dtypes import torch_dtype
from .distributed import DistEnv

__all__ = ["Precision", "precision_plan", "cpu_precision_note", "Parallelized", "parallelize"]



@dataclass(frozen=True)
class Precision:
    """What each part of a step is kept in.

    Attributes:
        compute: dtype of the forward / backward matmuls (bf16 or fp32).
        param: master parameters, gradients and optimizer state: always float32.
        reduce: data-parallel gradient reduction: always float32.
    """

    compute: torch.dtype
    param: torch.dtype = torch.float32
    reduce: torch.dtype = torch.float32


def precision_plan(cfg: Config, device: torch.device) -> Precision:
    """The compute dtype of a run.

    ``engine.precision=bf16|fp32`` is explicit; ``auto`` computes in bf16 when ``model.dtype`` is
    ``bfloat16`` or the device is CUDA, else in fp32. ``model.dtype=bfloat16`` with
    ``engine.precision=fp32`` contradicts itself and is refused.
    """
    p, md = cfg.engine.precision, cfg.model.dtype
    if p == "fp32" and md == "bfloat16":
        raise ConfigError("engine.precision=fp32 contradicts model.dtype=bfloat16 (model.dtype is the compute "
                          "dtype; master weights are float32 either way): set one of them to match the other")
    if p == "auto":
        compute = torch.bfloat16 if (md == "bfloat16" or device.type == "cuda") else torch.float32
    else:
        compute = torch_dtype(p)
    return Precision(compute=compute)


def cpu_precision_note(precision: Precision, device: torch.device) -> str | None:
    """What bf16 compute means on this CPU (None off the CPU or in fp32).

    A CPU with AVX512-BF16 or AMX multiplies bf16 natively (on the 2-core AVX512-BF16 machine the
    demo was measured on, a training step is about 1.3x faster than in fp32); without them bf16 is
    converted in software and is usually *slower* than fp32, so the run says so.
    """
    if device.type != "cpu" or precision.compute != torch.bfloat16:
        return None
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return "engine.precision: bf16 compute on this CPU (native bf16 matmuls), float32 master weights"
    return ("engine.precision: bf16 compute, but this CPU has no native bf16 matmul (AVX512-BF16 / AMX): "
            "expect it slower than fp32; set engine.precision=fp32")


@dataclass
class Parallelized:
    """The training module and how to run a forward through it.

    Attributes:
        module: what the training step calls (``DDP(loss_module)``, the fully-sharded loss module, or
            the loss module itself in one process).
        loss_module: the unwrapped loss module (validation calls it; under FSDP2 it is ``module``,
            since ``fully_shard`` converts the module in place and every rank must take part).
        precision: the :class:`Precision` in force.
        fsdp: True when FSDP2's mixed-precision policy casts (no autocast then).
    """

    module: nn.Module
    loss_module: nn.Module
    precision: Precision
    fsdp: bool

    def compute_context(self, device: torch.device):
        """``torch.autocast`` to the compute dtype (DDP / one process); nothing under FSDP2 or in fp32."""
        if self.fsdp or self.precision.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.precision.compute)


def parallelize(loss_module: nn.Module, cfg: Config, env: DistEnv) -> Parallelized:
    """Apply precision, activation checkpointing and DP wrapping to ``loss_module`` (holds ``.dlm``).

    ``loss_module`` must hold float32 parameters (on CPU or already on ``env.device``); FSDP2 moves
    each layer to the device as it shards it, so a large model never sits whole on one GPU.
    """
    precision = precision_plan(cfg, env.device)
    dlm = loss_module.dlm
    bad = sorted({str(p.dtype) for p in loss_module.parameters() if p.dtype != precision.param})
    if bad:
        raise ValueError(f"parallelize expects {precision.param} master parameters, got {bad} "
                         "(load the model in float32; model.dtype only sets the compute dtype)")
    if cfg.model.gradient_checkpointing:
        dlm.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.engine.compile:  # validate() refuses it; a Config built in code must not slip through
        raise ConfigError("engine.compile=true is not supported by the torch engine")
    dlm.hf.train()
    if env.world_size == 1:
        return Parallelized(loss_module.to(env.device), loss_module, precision, fsdp=False)
    if cfg.engine.distributed == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        layer_policy = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=precision.reduce)
        # the root's forward input is the micro-batch: its float mask probabilities (the 1/p loss
        # weights) must not be cast to bf16, so the root does not cast inputs
        root_policy = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=precision.reduce,
                                           cast_forward_inputs=False)
        for layer in dlm.backbone.layers:
            fully_shard(layer, mp_policy=layer_policy)
        fully_shard(loss_module, mp_policy=root_policy)
        return Parallelized(loss_module, loss_module, precision, fsdp=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    loss_module = loss_module.to(env.device)
    ddp = DDP(loss_module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return Parallelized(ddp, loss_module, precision, fsdp=False)
