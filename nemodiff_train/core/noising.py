"""Forward (noising) process of masked diffusion: which tokens of ``x_0`` become ``[MASK]``.

Every random draw for a sample comes from a generator derived from ``(seed, sample_index)`` only,
where ``sample_index`` is the sample's position in the global data order. The noise a sample gets
therefore does not depend on batch size, world size, batch composition or the resume point
(a peer's corruption noise came from the global RNG and rank, so tensor-parallel peers corrupted the
same batch differently: Automodel#3149).

Schedules (registry :data:`SCHEDULES`):

* ``uniform`` (the public Nemotron-Labs-Diffusion recipe, docs/method.md, "Training row"): ``t ~ U(0,1)`` per sequence,
  ``p = (1-ε)t + ε``, each eligible token masked independently with probability ``p``.
* ``position_dependent`` (Efficient-DLM ``forward_process_exp``, docs/method.md, "Training row"): per block of ``B`` tokens,
  ``m ~ U(ε, 1)``, exactly ``round(m·n)`` of the block's ``n`` eligible tokens masked, drawn without
  replacement with weights ``exp(λ(1-m)j)``, ``λ = ln2 / (h·B)`` — later positions are masked more
  often at low noise; ``p = m`` is the loss weight. In packed rows the blocks restart at every
  document start, exactly where the attention patterns' per-document blocks do
  (:func:`~nemodiff_train.core.masks.document_positions`).

``full_block_fraction`` q (any schedule): after the schedule's draws, each block is, with probability q,
masked whole (every eligible token; ``p = 1``). Both self-speculation decoders draft from exactly that
state (a clean first token, every other position masked) and block diffusion's first pass of every block
starts from it, but the schedules above give it to few blocks (position-dependent at ``B = 8`` with a
clean block start: ``m ≥ 13/14``, about 7 %).

Tokens with ``loss_mask = 0`` (prompts in SFT, padding) are never masked. With ``keep_block_start``
the first token of every diffusion block is never masked either: at inference a block always starts
with a clean token (the AR seed, or the accepted draft's bonus token), so a training row that hides it
asks the diffusion view for a state it never decodes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .masks import document_positions

__all__ = ["NoisedBatch", "sample_generator", "apply_noise", "SCHEDULES", "NoiseConfigError", "diffusion_blocks",
           "block_starts"]

_MASK64 = (1 << 64) - 1


class NoiseConfigError(ValueError):
    """An impossible noising setting (for example eps outside (0, 1))."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_generator(seed: int, sample_index: int) -> torch.Generator:
    """CPU generator seeded from (seed, global sample index) by a splitmix64 hash (63-bit seed)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_splitmix64(_splitmix64(int(seed)) ^ int(sample_index)) >> 1)
    return g


@dataclass
class NoisedBatch:
    """Result of noising a batch.

    Attributes:
        noisy_ids: ``[b, L]`` x_t: x_0 with masked positions replaced by the mask token.
        masked: ``[b, L]`` bool, True where a token was masked.
        mask_prob: ``[b, L]`` float32 masking probability of each position (the 1/p loss weight's p).
    """

    noisy_ids: torch.Tensor
    masked: torch.Tensor
    mask_prob: torch.Tensor


def _uniform(length: int, eligible: torch.Tensor, gen: torch.Generator, eps: float, blocks: list[tuple[int, int]],
             block_size: int, half_life: float):
    u = torch.rand((), generator=gen)
    p = (1.0 - eps) * u + eps
    draws = torch.rand(length, generator=gen)
    return (draws < p) & eligible, torch.full((length,), float(p))


def _position_dependent(length: int, eligible: torch.Tensor, gen: torch.Generator, eps: float,
                        blocks: list[tuple[int, int]], block_size: int, half_life: float):
    masked = torch.zeros(length, dtype=torch.bool)
    prob = torch.empty(length)
    for start, stop in blocks:
        n = stop - start
        m = eps + (1.0 - eps) * torch.rand((), generator=gen)
        gumbel = -torch.log(-torch.log(torch.rand(n, generator=gen).clamp_min(1e-20)))
        prob[start:stop] = m
        elig = eligible[start:stop]
        k = int(torch.round(m * int(elig.sum())))
        if k == 0:
            continue
        lam = math.log(2.0) / (half_life * block_size)
        log_w = lam * (1.0 - m) * torch.arange(n, dtype=torch.float32)
        keys = torch.where(elig, log_w + gumbel, torch.full_like(gumbel, -math.inf))
        masked[start + keys.topk(k).indices] = True
    return masked, prob


ScheduleFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
SCHEDULES: dict[str, ScheduleFn] = {"uniform": _uniform, "position_dependent": _position_dependent}


def _mask_whole_blocks(masked: torch.Tensor, prob: torch.Tensor, eligible: torch.Tensor,
                       blocks: list[tuple[int, int]], chosen: torch.Tensor) -> None:
    """In place: mask every eligible token of each chosen block (``[L]`` masked / prob / eligible; ``chosen``
    ``[n_blocks]`` bool) and set its masking probability to 1 (the loss weight of a certain mask)."""
    for (start, stop), whole in zip(blocks, chosen.tolist()):
        if whole:
            masked[start:stop] = eligible[start:stop]
            prob[start:stop] = 1.0


def block_starts(doc_ids: torch.Tensor | None, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """``[b, L]`` bool (CPU): the first position of every diffusion block: the grid ``0, B, 2B, ...``, or in
    packed rows every B-th token of each document (a document start has position 0, so it starts a block)."""
    if doc_ids is None:
        return (torch.arange(shape[1]) % block_size == 0).expand(shape)
    return document_positions(doc_ids.to("cpu")) % block_size == 0


def _block_spans(starts: torch.Tensor) -> list[list[tuple[int, int]]]:
    """``[b, L]`` bool block starts → per row, the ``[start, stop)`` span of each block, in order."""
    length = starts.shape[1]
    out = []
    for row in starts.tolist():
        begin = [i for i, s in enumerate(row) if s]
        out.append(list(zip(begin, begin[1:] + [length])))
    return out


def diffusion_blocks(doc_ids: torch.Tensor | None, length: int, block_size: int) -> list[list[tuple[int, int]]] | None:
    """The ``[start, stop)`` spans of every row's diffusion blocks.

    Args:
        doc_ids: ``[b, L]`` document id per token, or None (every row is one document).
        length: L.
        block_size: B.
    Returns:
        Per row, its blocks in order: B tokens from each document start (the last block of a
        document may be shorter). None when ``doc_ids`` is None (the fixed grid ``0, B, 2B, ...``).
    """
    if doc_ids is None:
        return None
    return _block_spans(block_starts(doc_ids, (doc_ids.shape[0], length), block_size))


def apply_noise(x0: torch.Tensor, loss_mask: torch.Tensor, sample_indices: torch.Tensor | list[int], *,
                seed: int, mask_token_id: int, schedule: str = "uniform", eps: float = 1e-3,
                block_size: int = 64, half_life_ratio: float = 0.25,
                doc_ids: torch.Tensor | None = None, keep_block_start: bool = False,
                full_block_fraction: float = 0.0) -> NoisedBatch:
    """Mask a batch of clean rows.

    Args:
        x0: ``[b, L]`` clean token ids.
        loss_mask: ``[b, L]`` bool/int; positions with 0 are never masked.
        sample_indices: ``[b]`` global index of each row in the data order (seeds its noise).
        seed: run seed.
        mask_token_id: id written at masked positions.
        schedule: a key of :data:`SCHEDULES`.
        eps: lower clip of the masking probability (the 1/p weight explodes as p → 0).
        block_size: block length for the position-dependent schedule.
        half_life_ratio: h of the position-dependent schedule.
        doc_ids: ``[b, L]`` document ids of packed rows: position-dependent blocks restart at every
            document start. None: one document per row.
        keep_block_start: never mask the first token of a diffusion block (:func:`block_starts`).
        full_block_fraction: probability that a block is masked whole (module docstring); 0 draws nothing
            more, so the noise is then exactly the schedule's.
    Returns:
        :class:`NoisedBatch` on ``x0.device``.
    """
    if schedule not in SCHEDULES:
        raise NoiseConfigError(f"unknown noise schedule {schedule!r}; known: {sorted(SCHEDULES)}")
    if not 0.0 < eps < 1.0:
        raise NoiseConfigError(f"eps must be in (0, 1), got {eps}")
    if half_life_ratio <= 0:
        raise NoiseConfigError(f"half_life_ratio must be > 0, got {half_life_ratio}")
    if not 0.0 <= full_block_fraction <= 1.0:
        raise NoiseConfigError(f"full_block_fraction must be in [0, 1], got {full_block_fraction}")
    b, length = x0.shape
    indices = [int(i) for i in (sample_indices.tolist() if torch.is_tensor(sample_indices) else sample_indices)]
    if len(indices) != b:
        raise ValueError(f"got {len(indices)} sample indices for a batch of {b} rows")
    eligible = loss_mask.to("cpu", torch.bool)
    # the schedule (or whole-block masking) needs each row's own blocks
    per_document = doc_ids is not None and (schedule != "uniform" or full_block_fraction > 0)
    # the block starts, once per batch, for both uses
    starts = block_starts(doc_ids, (b, length), block_size) if keep_block_start or per_document else None
    if keep_block_start:
        eligible = eligible & ~starts
    fn = SCHEDULES[schedule]
    grid = [(s, min(s + block_size, length)) for s in range(0, length, block_size)]
    row_blocks = _block_spans(starts) if per_document else None
    masks, probs = [], []
    for row, index in enumerate(indices):
        blocks = grid if row_blocks is None else row_blocks[row]
        gen = sample_generator(seed, index)
        m, p = fn(length, eligible[row], gen, eps, blocks, block_size, half_life_ratio)
        if full_block_fraction > 0:
            _mask_whole_blocks(m, p, eligible[row], blocks, torch.rand(len(blocks), generator=gen) < full_block_fraction)
        masks.append(m)
        probs.append(p)
    masked = torch.stack(masks).to(x0.device)
    mask_prob = torch.stack(probs).to(x0.device, torch.float32)
    noisy = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
    return NoisedBatch(noisy_ids=noisy, masked=masked, mask_prob=mask_prob)
