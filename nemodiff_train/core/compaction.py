"""Run a two-stream forward over only the positions its loss reads (an exact saving).

The diffusion loss reads the noisy stream at masked positions only. A noisy position that is not
masked still matters when a masked position attends to it (its block-mates), but a noisy block with no
masked token feeds nothing the loss reads: no clean position and no other block attends to it
(docs/method.md, "Attention"). SFT rows leave every prompt token unmasked, and at low noise many
response blocks have no masked token either, so on the demo's SFT rows about half of the noisy
stream is such dead weight. Computing only the needed positions gives the same loss and gradients
(up to float summation order) for less work: attention over ``S'`` instead of ``S = 2L`` positions
costs ``(S'/S)²`` as much.

Which positions are needed is read off the attention mask itself, not from a separate notion of
blocks: :func:`required_positions` closes the loss's positions under "attends to" to a fixed point, so
it holds for every pattern and any number of layers. :class:`Compaction` gathers those positions
into shorter rows (right-padded to the longest), gives the matching mask, and scatters the results
back to full rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["required_positions", "Compaction"]


def required_positions(allowed: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Positions a forward must compute so that the hidden states at ``seeds`` are exact.

    Args:
        allowed: ``[b, 1, S, S]`` bool, True where query row may attend key column (every layer's
            mask OR-ed together when layers differ).
        seeds: ``[b, S]`` bool, the positions the loss reads.
    Returns:
        ``[b, S]`` bool: ``seeds`` and every position they attend to, directly or through others.
    """
    if allowed.dim() != 4 or allowed.shape[1] != 1 or allowed.shape[-1] != allowed.shape[-2]:
        raise ValueError(f"allowed must be [b, 1, S, S], got {tuple(allowed.shape)}")
    if seeds.shape != (allowed.shape[0], allowed.shape[-1]):
        raise ValueError(f"seeds must be [b, S] = {(allowed.shape[0], allowed.shape[-1])}, got {tuple(seeds.shape)}")
    edges = allowed[:, 0].float()  # [b, S, S]
    need = seeds.bool()
    while True:  # breadth-first over "attends to"; the two-stream patterns settle after two rounds
        grown = need | (torch.bmm(need.float().unsqueeze(1), edges).squeeze(1) > 0)
        if torch.equal(grown, need):
            return need
        need = grown


@dataclass(frozen=True)
class Compaction:
    """Where each kept position of a row goes in the shorter row, and back.

    Attributes:
        index: ``[b, S']`` int64 position (in the full row) of each compact slot; padding slots point
            at position 0 (their inputs are never read by a real slot).
        valid: ``[b, S']`` bool, False on the padding that makes rows the same length.
        length: S, the full row length.
    """

    index: torch.Tensor
    valid: torch.Tensor
    length: int

    @property
    def width(self) -> int:
        """S', the compact row length."""
        return self.index.shape[1]

    @classmethod
    def of(cls, keep: torch.Tensor) -> "Compaction":
        """The compaction of ``keep`` ``[b, S]`` bool (kept positions stay in their order)."""
        counts = keep.sum(dim=1)
        width = max(int(counts.max()), 1)
        # a stable sort puts each row's kept positions first, in order
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
        return cls(torch.where(valid, order, torch.zeros_like(order)), valid, keep.shape[1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, S, ...]`` → ``[b, S', ...]``."""
        idx = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return torch.gather(x, 1, idx)

    def mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """``[b, 1, S, S]`` bool → ``[b, 1, S', S']``: the kept positions' mask; a padding slot attends
        only to itself (a softmax needs one key) and no slot attends to it."""
        b, width = self.index.shape
        rows = torch.gather(allowed[:, 0], 1, self.index.unsqueeze(-1).expand(-1, -1, self.length))
        sub = torch.gather(rows, 2, self.index.unsqueeze(1).expand(-1, width, -1))
        pair_valid = self.valid.unsqueeze(2) & self.valid.unsqueeze(1)
        pad_self = torch.diag_embed(~self.valid)
        return ((sub & pair_valid) | pad_self).unsqueeze(1)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """``[b, S', d]`` → ``[b, S, d]``, zeros at the positions left out (differentiable)."""
        b, _, d = y.shape
        slot = torch.where(self.valid, self.index, torch.full_like(self.index, self.length))  # padding → a spare row
        out = y.new_zeros(b, self.length + 1, d).scatter(1, slot.unsqueeze(-1).expand(-1, -1, d), y)
        return out[:, : self.length]
