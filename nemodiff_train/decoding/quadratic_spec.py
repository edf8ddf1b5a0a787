"""Mode 4, quadratic self-speculation (docs/decoding.md; TiDAR-style verify + pre-draft in one pass).

State at a cycle: the cache holds the causal KV of every emitted token (C positions) and a draft
``d_0 … d_{B-1}`` whose ``d_0`` is the AR token after the emitted prefix. One forward over B
sub-blocks ``[d_j, MASK × B]`` (B + 1 tokens each; token r of sub-block j at position C + j + r):

* first tokens form a causal chain, so the output at ``d_j`` is the exact AR logit after
  prefix + d_0 … d_j (``P[j, 0]``, the verifier);
* the masks of sub-block j see prefix + d_0 … d_j and their own sub-block, so ``P[j, 1:]`` is a
  diffusion draft of positions C + j + 1 … C + j + B conditioned on that prefix.

``acc`` = 1 + length of the run ``d_j == P[j-1, 0]``; ``d[:acc]`` is emitted, only the first-token KV
of accepted sub-blocks is kept (= AR KV), and the next draft is ``P[acc-1, 1:]`` with its first token
replaced by the AR token ``P[acc-1, 0]`` (so the next ``d_0`` is again an AR token). Lossless at T = 0
(every emitted token is the AR greedy token of its prefix); at T > 0 distribution-equal to AR
sampling, like :mod:`.linear_spec`. Counts: one forward per cycle + one initial draft-only pass.

A drafter adapter (docs/adapters.md) is switched per token inside the one forward: off for the
first tokens (the verifier's causal chain, whose KV is kept: the unchanged base), on for the masks.

Batches: one forward serves every row; each row has its own ``acc``, keeps its own first-token columns
(``CacheState.commit`` re-packs the cache per row on the device) and takes its own next draft, so row i
of a batch decodes exactly as prompt i alone; the host reads one small tensor per cycle (see
:mod:`.linear_spec`, "Batches").
"""

from __future__ import annotations

import torch

from .batching import CacheState, full_mask
from .config import DecodeConfig
from .interface import CachedLM
from .linear_spec import check_spec_block
from .recorder import BatchRecorder
from .result import DecodeResult
from .sampling import ban_token, make_generators, pick_tokens

__all__ = ["quadratic_spec_generate", "quadratic_mask", "quadratic_offsets"]


def quadratic_mask(block: int, device=None) -> torch.Tensor:
    """Attention among the B(B+1) new tokens: ``[Q, Q]`` bool, Q = B(B+1), flat index j(B+1) + r.

    ``allow(q, k) = (k is a first token and k <= q) or (same sub-block and q is not a first token)``;
    the cached prefix (not part of this matrix) is visible to all.
    """
    j = torch.arange(block, device=device).repeat_interleave(block + 1)  # [Q] sub-block index
    r = torch.arange(block + 1, device=device).repeat(block)              # [Q] index inside the sub-block
    chain = (r[None, :] == 0) & (j[None, :] <= j[:, None])
    within = (j[None, :] == j[:, None]) & (r[:, None] != 0)
    return chain | within


def quadratic_offsets(block: int, device=None) -> torch.Tensor:
    """Position offsets ``[Q]`` from C: token r of sub-block j sits at C + j + r."""
    j = torch.arange(block, device=device).repeat_interleave(block + 1)
    r = torch.arange(block + 1, device=device).repeat(block)
    return j + r


@torch.inference_mode()
def quadratic_spec_generate(model: CachedLM, prompts: list[list[int]], cfg: DecodeConfig,
                            return_cache: bool = False) -> list[DecodeResult]:
    """Quadratic self-speculative decoding of a batch of prompts (any lengths; left padded internally).

    Args:
        model: a :class:`CachedLM`.
        prompts: ``b`` token-id lists.
        cfg: :class:`DecodeConfig`; ``block_size`` B (each forward has B(B+1) query tokens per row).
        return_cache: attach each row's final KV cache (prompt + every emitted token).
    Returns:
        One :class:`DecodeResult` per prompt; ``drafted`` counts B - 1 drafts per cycle, ``accepted`` = Σ (acc - 1).
    """
    check_spec_block("quadratic_spec", cfg)
    B, mask_id = cfg.block_size, model.mask_token_id
    state = CacheState(model, prompts)
    b = state.batch
    last = ban_token(state.prefill(), mask_id)  # [b, V]
    dev = last.device
    rec = BatchRecorder(b, cfg.max_new_tokens, cfg.eos_token_ids, dev)
    gens = None if cfg.greedy else make_generators(cfg.seed, b, dev)
    d = _first_draft(state, last, cfg, gens, mask_id)  # [b, B], d[:, 0] = AR token
    rec.charge(rec.live)
    mask, offsets = quadratic_mask(B, dev), quadratic_offsets(B, dev)
    drafts = torch.arange(B + 1, device=dev).repeat(B) != 0  # [Q] the masks (r > 0) are drafter tokens
    first_tokens = (B + 1) * torch.arange(B, device=dev)  # [B] column offsets of the causal chain
    live = b  # nothing is emitted before the first cycle
    while live:
        c, rows = state.length, rec.live  # rows live at the start of the cycle
        sub = torch.full((b, B, B + 1), mask_id, dtype=torch.long, device=dev)
        sub[:, :, 0] = d
        logits = ban_token(state.forward(sub.view(b, -1), mask, write_cache=True, offsets=offsets, draft=drafts),
                           mask_id)  # [b, Q, V]
        P = pick_tokens(logits, cfg.temperature, cfg.top_p, gens).view(b, B, B + 1)
        P[:, :, 1] = P[:, :, 0]  # the first new draft position is exactly the verifier's AR token
        # acc = 1 + the run of d_j == P[j-1, 0] (d_0 is an AR token: always valid)
        acc = 1 + (P[:, :-1, 0] == d[:, 1:]).long().cumprod(dim=1).sum(dim=1)  # [b]
        kept = rec.emit(d, acc, rows)  # < acc when an EOS or the length cap cuts the cycle
        rec.charge(rows, kept)
        rec.drafted += torch.where(rows, B - 1, 0)
        rec.accepted += torch.where(rows, acc - 1, 0)
        keep = torch.where(rows, kept, 0)  # the first-token (causal-chain) KV of the emitted sub-blocks
        d = P.gather(1, (acc - 1)[:, None, None].expand(b, 1, B + 1))[:, 0, 1:]  # [b, B] next draft
        live, length = rec.host_status((c - state.pad + keep).max())  # the cycle's one host read
        state.commit(c, first_tokens, keep, length)
    return rec.results(state.row_cache if return_cache else None)


def _first_draft(state: CacheState, last: torch.Tensor, cfg: DecodeConfig, gens, mask_id: int) -> torch.Tensor:
    """``[AR token] + diffusion draft`` per row for the first block: one bidirectional pass, cache not written.

    ``last`` ``[b, V]`` → ``[b, B]``.
    """
    B = cfg.block_size
    d0 = pick_tokens(last[:, None], cfg.temperature, cfg.top_p, gens)[:, 0]  # [b]
    blk = torch.full((last.shape[0], B), mask_id, dtype=torch.long, device=last.device)
    blk[:, 0] = d0
    draft = ban_token(state.forward(blk, full_mask(B, last.device), write_cache=False, draft=True), mask_id)  # [b, B, V]
    blk[:, 1:] = pick_tokens(draft, cfg.temperature, cfg.top_p, gens)[:, 1:]
    return blk
