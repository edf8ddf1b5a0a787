"""Two-stream training inputs ``[x_t ; x_0]``: ids, RoPE position ids and the split of outputs.

Both halves use the same positions (0..L-1, restarting at every document start of a packed row), so
the clean half is exactly the AR model's pass over ``x_0`` and the noisy block b sees clean blocks
< b at the positions they have at inference through the KV cache (docs/method.md, "Training row").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import document_positions

__all__ = ["TwoStreamInputs", "two_stream_inputs", "split_streams"]


@dataclass
class TwoStreamInputs:
    """Model inputs of one two-stream forward.

    Attributes:
        input_ids: ``[b, 2L]`` = ``[x_t ; x_0]``.
        position_ids: ``[b, 2L]`` per-document positions, repeated for both halves.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor


def two_stream_inputs(noisy_ids: torch.Tensor, clean_ids: torch.Tensor,
                      doc_ids: torch.Tensor | None = None) -> TwoStreamInputs:
    """Concatenate the streams and build their position ids.

    Args:
        noisy_ids, clean_ids: ``[b, L]``.
        doc_ids: optional ``[b, L]`` document ids of a packed row.
    """
    if noisy_ids.shape != clean_ids.shape:
        raise ValueError(f"noisy {tuple(noisy_ids.shape)} and clean {tuple(clean_ids.shape)} shapes differ")
    b, length = clean_ids.shape
    if doc_ids is None:
        pos = torch.arange(length, device=clean_ids.device).expand(b, length)
    else:
        pos = document_positions(doc_ids)
    return TwoStreamInputs(torch.cat([noisy_ids, clean_ids], dim=1), torch.cat([pos, pos], dim=1))


def split_streams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[b, 2L, ...]`` outputs into (noisy ``[b, L, ...]``, clean ``[b, L, ...]``)."""
    length = x.shape[1] // 2
    return x[:, :length], x[:, length:]
