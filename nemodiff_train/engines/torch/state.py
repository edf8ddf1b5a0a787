"""What a torch run checkpoints, registered in one place, and the optimizer over what trains.

:class:`TrainState` is the only place that knows a checkpoint's content: the DCP tensors
(``model``: :func:`trained_module`'s state; ``optim``: the AdamW state) and the JSON trainer state
(every field of :class:`Progress`, plus the stage it was saved in). Adding a piece of checkpointed
state is one edit here: a field of :class:`Progress` (JSON, restored on resume), or an entry of
:meth:`TrainState.tensors` / :meth:`TrainState.load_tensors`'s table :data:`_TENSORS`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ...config.schema import Config, StageConfig
from ...models.hf import DLMModel

__all__ = ["Progress", "TrainState", "trained_module", "make_optimizer"]


def trained_module(dlm: DLMModel) -> nn.Module:
    """What trains and is checkpointed: the drafter adapter (its LoRA pairs and mask row; the frozen
    base is reloaded from ``model.path``) when one is attached, else the whole HF model."""
    return dlm.adapter if dlm.adapter is not None else dlm.hf


def make_optimizer(dlm: DLMModel, cfg: Config, stage: StageConfig) -> torch.optim.Optimizer:
    """A fresh AdamW over :func:`trained_module`'s trainable parameters (norms and biases not decayed)."""
    decay, no_decay = [], []
    for name, p in trained_module(dlm).named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # norms and biases are not decayed
    o = cfg.optim
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=stage.lr or o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=torch.cuda.is_available() and next(dlm.parameters()).is_cuda)


@dataclass
class Progress:
    """The run's counters; every field is saved in ``trainer_state.json`` and restored on resume."""

    step: int = 0  # global optimizer steps done
    tokens: int = 0  # clean tokens consumed (L per sample)


# name -> (read the state of (module, optimizer), load a state into them); "optim" needs an optimizer.
_Get = Callable[[nn.Module, torch.optim.Optimizer], dict]
_Set = Callable[[nn.Module, torch.optim.Optimizer, dict], None]
_TENSORS: dict[str, tuple[_Get, _Set]] = {
    "model": (lambda m, o: get_model_state_dict(m), lambda m, o, s: set_model_state_dict(m, s)),
    "optim": (get_optimizer_state_dict, set_optimizer_state_dict),
}


class TrainState:
    """A run's checkpointed state: the model (what trains), the optimizer and the :class:`Progress`."""

    def __init__(self, dlm: DLMModel, progress: Progress):
        self.dlm = dlm
        self.progress = progress

    def tensors(self, optim: torch.optim.Optimizer | None, *, with_optim: bool = True) -> dict:
        """The DCP state dict (``model``, and ``optim`` when ``with_optim`` and there is one); DCP
        loads in place into these tensors."""
        module = trained_module(self.dlm)
        return {name: get(module, optim) for name, (get, _) in _TENSORS.items()
                if name == "model" or (with_optim and optim is not None)}

    def load_tensors(self, optim: torch.optim.Optimizer | None, state: dict) -> None:
        """Apply a loaded :meth:`tensors` dict to the model (and optimizer, if it holds one)."""
        module = trained_module(self.dlm)
        for name, (_, put) in _TENSORS.items():
            if name in state and (name == "model" or optim is not None):
                put(module, optim, state[name])

    def model_identity_state(self) -> dict:
        """The model's state dict alone (its identity is compared with a checkpoint's)."""
        return self.tensors(None, with_optim=False)["model"]

    def json(self, stage_index: int, stage_name: str, recipe: str | None) -> dict:
        """``trainer_state.json``: the progress counters and the stage they were saved in."""
        return {**asdict(self.progress), "stage": stage_index, "stage_name": stage_name, "recipe": recipe}

    def restore_progress(self, saved: dict) -> None:
        """Take the counters of a saved ``trainer_state.json``."""
        for f in fields(Progress):
            setattr(self.progress, f.name, saved[f.name])
