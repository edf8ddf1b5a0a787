"""Drafter LoRA adapters on a frozen base model, switched on and off PER TOKEN inside one forward.

Why not ``peft``: a peft ``LoraLayer`` adds its delta to every token of a forward, and its switches
(``disable_adapter()``, ``set_adapter``) act on a whole forward. This toolkit needs the adapter on for
some tokens and off for others *in the same forward*: the two-stream training row (noisy half on,
clean half off: the clean half must be the frozen base's causal pass, which is what the drafter reads
at inference) and quadratic self-speculation's B(B+1) layout (verify tokens off, draft tokens on). So
this module holds a small LoRA layer of its own; its export keeps peft's file format
(:func:`peft_state_dict`).

How it works. :func:`attach_adapter` freezes every base parameter (``requires_grad=False``; they are
never written) and installs forward hooks:

* on each target ``nn.Linear`` of the decoder (``target_modules``, matched on the last name component,
  e.g. ``o_proj``): ``y = W x`` becomes ``y + gate · (α / r) · B A dropout(x)``, per token;
* on the input embedding: where the token is the mask token AND its gate is on, the embedding is the
  adapter's own trainable row :attr:`DrafterAdapter.mask_embedding` (``[1, d]``, initialised from the
  base's mask row). The base embedding matrix stays frozen: a separate one-row parameter rather than a
  gradient mask, so AdamW's weight decay and moments can never touch the other rows.

The gate is a ``[b, q]`` bool tensor (the shape of the forward's ``input_ids``) set for the duration of
one forward with :func:`adapter_tokens`; ``None`` (the default) means off everywhere, and then the
hooks return the base's outputs untouched (no extra compute). Off tokens get the base output exactly
(``torch.where``, not ``+ 0 · delta``), so verify passes are the unchanged base bit for bit.

Hooks instead of module replacement: the base model's ``state_dict`` keeps its own key names, so the
base exports, checkpoints and ``save_pretrained`` as before, and the adapter's parameters live in one
separate module (:class:`DrafterAdapter`), which is what trains and what is checkpointed.

Pure torch and the standard library: the exported remote code inlines this module
(``export/remote_code.py``) with :mod:`.cached`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DrafterAdapter", "attach_adapter", "find_adapter", "adapter_tokens", "peft_state_dict",
           "load_peft_state_dict", "merge_adapter", "DEFAULT_TARGET_MODULES", "PEFT_PREFIX", "MASK_EMBEDDING_KEY"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_PREFIX = "base_model.model."  # peft's key prefix in adapter_model.safetensors
MASK_EMBEDDING_KEY = "nemodiff.mask_embedding"  # the trainable mask row (not a peft key: peft ignores it)
_ATTR = "_nemodiff_adapter"  # where the adapter hangs on the HF model (a plain attribute, not a submodule)


class LoRAPair(nn.Module):
    """``x [..., in] -> (α / r) · B A dropout(x) [..., out]``; A Kaiming-uniform, B zero (peft's init)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = float(alpha) / float(rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def _key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot hold dots


class DrafterAdapter(nn.Module):
    """The trainable part of a drafter: one :class:`LoRAPair` per target linear + the mask row.

    Attributes:
        paths: the targets' module paths inside the HF model (``model.layers.0.self_attn.o_proj``...).
        lora: ``ModuleDict`` of :class:`LoRAPair` keyed by path with ``.`` → ``__``.
        mask_embedding: ``[1, d]`` trainable input embedding of the mask token (where gated on).
        rank, alpha, dropout, target_modules, mask_token_id: the settings.
        gate: the current ``[b, q]`` bool gate, or None (off everywhere); set by :func:`adapter_tokens`.
    """

    def __init__(self, targets: dict[str, nn.Linear], embedding_row: torch.Tensor, mask_token_id: int, rank: int,
                 alpha: float, dropout: float, target_modules: tuple[str, ...]):
        super().__init__()
        self.paths = list(targets)
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.target_modules = tuple(target_modules)
        self.mask_token_id = int(mask_token_id)
        self.lora = nn.ModuleDict({_key(p): LoRAPair(m.in_features, m.out_features, rank, alpha, dropout)
                                   for p, m in targets.items()})
        for pair, m in zip(self.lora.values(), targets.values()):
            pair.to(device=m.weight.device, dtype=m.weight.dtype)
        self.mask_embedding = nn.Parameter(embedding_row.detach().clone().reshape(1, -1))
        self.gate: torch.Tensor | None = None
        self._handles: list = []

    def pair(self, path: str) -> LoRAPair:
        return self.lora[_key(path)]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _check_gate(gate: torch.Tensor, lead: torch.Size, where: str) -> None:
    if gate.shape != lead:
        raise ValueError(f"adapter gate of shape {tuple(gate.shape)} does not match the {where} tokens "
                         f"{tuple(lead)} of this forward (the gate is [batch, new tokens])")


def _linear_hook(adapter: DrafterAdapter, path: str):
    def hook(module, args, output):
        gate = adapter.gate
        if gate is None:
            return output
        x = args[0]
        _check_gate(gate, x.shape[:-1], path)
        pair = adapter.pair(path)
        # under autocast the matmuls cast by themselves; otherwise match the adapter's dtype
        delta = pair(x if torch.is_autocast_enabled(x.device.type) else x.to(pair.lora_A.weight.dtype))
        return torch.where(gate[..., None], output + delta.to(output.dtype), output)
    return hook


def _embedding_hook(adapter: DrafterAdapter):
    def hook(module, args, output):
        gate = adapter.gate
        if gate is None:
            return output
        ids = args[0]
        _check_gate(gate, ids.shape, "input embedding's")
        use = (ids == adapter.mask_token_id) & gate
        return torch.where(use[..., None], adapter.mask_embedding.to(output.dtype), output)
    return hook


def _decoder(hf: nn.Module) -> nn.Module:
    return hf.get_decoder() if hasattr(hf, "get_decoder") else hf


def attach_adapter(hf: nn.Module, mask_token_id: int, *, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                   target_modules=DEFAULT_TARGET_MODULES) -> DrafterAdapter:
    """Freeze ``hf`` and hook a drafter adapter into it (see the module docstring).

    Args:
        hf: a transformers ``*ForCausalLM`` (or any module with ``get_input_embeddings``).
        mask_token_id: the diffusion mask token; it must be a row of the base vocabulary.
        rank, alpha, dropout: LoRA r, α (the delta is scaled by α / r) and dropout on the adapter's input.
        target_modules: last name components of the decoder's ``nn.Linear`` modules to adapt.
    Returns:
        The :class:`DrafterAdapter` (also reachable with :func:`find_adapter`).
    Raises:
        ValueError: bad settings, a mask id outside the vocabulary, no matching linear module, or a
            model that already has an adapter.
    """
    if find_adapter(hf) is not None:
        raise ValueError("this model already has a drafter adapter attached")
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"adapter: rank must be >= 1, alpha > 0 and dropout in [0, 1) (got {rank}, {alpha}, {dropout})")
    target_modules = tuple(target_modules)
    if not target_modules:
        raise ValueError("adapter: target_modules is empty")
    emb = hf.get_input_embeddings()
    if not 0 <= int(mask_token_id) < emb.weight.shape[0]:
        raise ValueError(f"adapter: mask token id {mask_token_id} is outside the base vocabulary "
                         f"({emb.weight.shape[0]} rows)")
    decoder = _decoder(hf)
    prefix = next((n for n, m in hf.named_modules() if m is decoder), "")
    targets: dict[str, nn.Linear] = {}
    linear_names: set[str] = set()
    for name, module in decoder.named_modules():
        if isinstance(module, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            linear_names.add(leaf)
            if leaf in target_modules:
                targets[f"{prefix}.{name}" if prefix else name] = module
    missing = sorted(set(target_modules) - {p.rsplit(".", 1)[-1] for p in targets})
    if missing:
        raise ValueError(f"adapter.target_modules {missing} match no nn.Linear of the decoder; its linear modules "
                         f"are {sorted(linear_names)}")
    for p in hf.parameters():
        p.requires_grad_(False)
    adapter = DrafterAdapter(targets, emb.weight[int(mask_token_id)], int(mask_token_id), rank, alpha, dropout,
                             target_modules)
    for path, module in targets.items():
        adapter._handles.append(module.register_forward_hook(_linear_hook(adapter, path)))
    adapter._handles.append(emb.register_forward_hook(_embedding_hook(adapter)))
    object.__setattr__(hf, _ATTR, adapter)  # not a submodule: the base's state_dict keeps its keys
    return adapter


def find_adapter(model) -> DrafterAdapter | None:
    """The adapter attached to ``model`` (an HF model, or anything with ``.hf``), or None."""
    hf = getattr(model, "hf", model)
    return getattr(hf, _ATTR, None)


class adapter_tokens:  # noqa: N801 - used like a function: ``with adapter_tokens(model, gate):``
    """Within the block, forwards of ``model`` apply its adapter where ``gate`` (``[b, q]`` bool) is True.

    ``None`` switches it off everywhere. A model without an adapter ignores a ``None`` gate and refuses
    any other (asking for drafter passes of a model that has no drafter is a mistake worth an error).
    The previous gate is restored on exit. (A class, not ``contextlib``: the remote code that inlines
    this module may import only torch, transformers and a few standard modules.)
    """

    def __init__(self, model, gate: torch.Tensor | None):
        self.adapter = find_adapter(model)
        if self.adapter is None and gate is not None:
            raise ValueError("adapter gate given, but this model has no drafter adapter attached")
        if gate is not None and gate.dtype != torch.bool:
            raise TypeError(f"adapter gate must be a bool tensor, got {gate.dtype}")
        self.gate = gate

    def __enter__(self):
        if self.adapter is not None:
            self.previous = self.adapter.gate
            self.adapter.gate = self.gate
        return self

    def __exit__(self, *exc):
        if self.adapter is not None:
            self.adapter.gate = self.previous
        return False


def peft_state_dict(adapter: DrafterAdapter) -> dict[str, torch.Tensor]:
    """The adapter as peft names it in ``adapter_model.safetensors``, plus the mask row.

    ``base_model.model.<path>.lora_A.weight`` ``[r, in]`` and ``....lora_B.weight`` ``[out, r]``, and
    :data:`MASK_EMBEDDING_KEY` ``[1, d]`` (peft warns about and ignores that key).
    """
    out: dict[str, torch.Tensor] = {}
    for path in adapter.paths:
        pair = adapter.pair(path)
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = pair.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = pair.lora_B.weight.detach()
    out[MASK_EMBEDDING_KEY] = adapter.mask_embedding.detach()
    return out


@torch.no_grad()
def load_peft_state_dict(adapter: DrafterAdapter, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`peft_state_dict`: every key must be there with its shape (else ValueError naming it)."""
    expected = peft_state_dict(adapter)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter weights do not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                         f", unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise ValueError(f"adapter weight {key}: shape {tuple(state[key].shape)}, this model needs "
                             f"{tuple(target.shape)}")
        target.copy_(state[key].to(device=target.device, dtype=target.dtype))


@torch.no_grad()
def merge_adapter(hf: nn.Module) -> None:
    """Fold the adapter into ``hf``'s weights for diffusion-only use, and detach it.

    Every target weight becomes ``W + (α / r) B A`` and the mask row of the input embedding becomes the
    adapter's: the result applies the adapter to EVERY token, so its causal passes are no longer the
    base model (AR and self-speculation are not lossless against the base any more).
    """
    adapter = find_adapter(hf)
    if adapter is None:
        raise ValueError("merge_adapter: this model has no drafter adapter attached")
    modules = dict(hf.named_modules())
    for path in adapter.paths:
        pair, linear = adapter.pair(path), modules[path]
        delta = (pair.lora_B.weight.float() @ pair.lora_A.weight.float()) * pair.scaling
        linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
    emb = hf.get_input_embeddings()
    emb.weight[adapter.mask_token_id] = adapter.mask_embedding[0].to(emb.weight.dtype)
    adapter.detach_hooks()
    object.__delattr__(hf, _ATTR)
