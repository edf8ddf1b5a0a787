"""Mode 2, block diffusion decoding (docs/decoding.md, "Block diffusion"; HF ``generate`` / SGLang "FastDiffuser").

Per block: ``x = [seed] + [MASK] * (n - 1)`` (the seed is the AR token of the previous causal pass),
then denoising steps, each one bidirectional forward over the block reading the cache without
writing it (with a drafter adapter on; the causal re-encode runs with it off). A step commits every masked position whose confidence (softmax probability of its
candidate) is ≥ τ and always the most confident one; with ``threshold=None`` it commits the k most
confident, k = an even split of the remaining masks over the remaining steps. Denoising stops early
once an EOS is committed with no mask left of it. Then ONE causal forward over the block writes its
KV (the cache only ever holds causal states) and yields the next seed. Every denoising pass and every
post-block causal pass is counted (prefill excluded), so a block costs ≥ 2 forwards: TPF ≤ B / 2.

Batches run in lockstep: a row with nothing left to denoise in the current block skips committing
(and is not charged for the pass), so each row's output and counts equal decoding it alone.
"""

from __future__ import annotations

import torch

from .batching import CacheState, causal_mask, full_mask
from .config import DecodeConfig
from .interface import CachedLM
from .result import DecodeResult, RowRecorder
from .sampling import ban_token, confidence, make_generators, pick_tokens

__all__ = ["diffusion_generate", "select_commits"]


@torch.inference_mode()
def diffusion_generate(model: CachedLM, prompts: list[list[int]], cfg: DecodeConfig,
                       return_cache: bool = False) -> list[DecodeResult]:
    """Block-diffusion decoding of a batch of prompts.

    Args:
        model: a :class:`CachedLM` (bidirectional passes predict the token AT each position,
            causal passes the NEXT token).
        prompts: ``b`` token-id lists (left padded internally).
        cfg: :class:`DecodeConfig`; ``block_size`` B, ``threshold`` τ or ``steps_per_block``.
        return_cache: attach each row's final KV cache (prompt + every decoded block) to its result.
    Returns:
        One :class:`DecodeResult` per prompt.
    """
    mask_id = model.mask_token_id
    state = CacheState(model, prompts)
    rows = [RowRecorder(cfg.max_new_tokens, cfg.eos_token_ids) for _ in prompts]
    last = ban_token(state.prefill(), mask_id)  # [b, V]
    gens = None if cfg.greedy else make_generators(cfg.seed, len(prompts), last.device)
    seed = pick_tokens(last[:, None], cfg.temperature, cfg.top_p, gens)[:, 0]  # [b] AR tokens
    while not all(row.done for row in rows):
        live = [r for r, row in enumerate(rows) if not row.done]
        n = min(cfg.block_size, rows[live[0]].remaining)  # lockstep: every live row has emitted as much
        x = torch.full((len(prompts), n), mask_id, dtype=torch.long, device=seed.device)  # [b, n]
        x[:, 0] = seed
        _denoise_block(state, x, rows, cfg, gens, mask_id)
        # re-encode the finished block causally: AR-view KV for later blocks + the next seed
        logits = ban_token(state.forward(x, causal_mask(n), write_cache=True)[:, -1], mask_id)  # [b, V]
        for r in live:
            rows[r].emit(x[r].tolist())
            rows[r].forward(0 if rows[r].done else 1)  # this pass's seed is committed iff a block follows
        active = [not row.done for row in rows]
        seed = pick_tokens(logits[:, None], cfg.temperature, cfg.top_p, gens, active)[:, 0]
    return [row.result(state.row_cache(r) if return_cache else None) for r, row in enumerate(rows)]


def _denoise_block(state: CacheState, x: torch.Tensor, rows: list[RowRecorder], cfg: DecodeConfig,
                   gens, mask_id: int) -> None:
    """Fill the masks of ``x`` (``[b, n]``, edited in place) with bidirectional passes."""
    b, n = x.shape
    eos = torch.tensor(sorted(cfg.eos_token_ids), dtype=torch.long, device=x.device)
    # threshold mode commits >= 1 per step, so n steps always suffice; fixed mode has its own budget
    steps = n if cfg.threshold is not None else (cfg.steps_per_block or cfg.block_size)
    for step in range(steps):
        active = [not rows[r].done and not _settled(x[r], mask_id, eos) for r in range(b)]
        if not any(active):
            return
        # a denoising pass is a drafter pass (adapter on, when the model has one)
        logits = ban_token(state.forward(x, full_mask(n), write_cache=False, draft=True), mask_id)  # [b, n, V]
        cand = pick_tokens(logits, cfg.temperature, cfg.top_p, gens, active)  # [b, n]
        masked = (x == mask_id) & torch.tensor(active, device=x.device)[:, None]  # [b, n]
        commit = select_commits(confidence(logits, cand), masked, cfg.threshold, steps - step)
        x[commit] = cand[commit]
        for r in range(b):
            if active[r]:
                rows[r].forward(int(commit[r].sum()))
    if any(not rows[r].done and not _settled(x[r], mask_id, eos) for r in range(b)):
        raise RuntimeError("diffusion step budget ended with masks left")  # cannot happen: see select_commits


def _settled(row: torch.Tensor, mask_id: int, eos: torch.Tensor) -> bool:
    """A block row needs no more denoising: no mask left, or an EOS with no mask before it. ``row`` ``[n]``."""
    masked = row == mask_id
    if not bool(masked.any()):
        return True
    is_eos = torch.isin(row, eos)
    if not bool(is_eos.any()):
        return False
    first_eos = int(is_eos.nonzero()[0, 0])
    return not bool(masked[:first_eos].any())


def select_commits(conf: torch.Tensor, masked: torch.Tensor, threshold: float | None, steps_left: int) -> torch.Tensor:
    """Which masked positions one denoising step commits.

    Args:
        conf: ``[b, n]`` confidence of each position's candidate.
        masked: ``[b, n]`` bool, still-masked positions of rows that commit this step.
        threshold: τ: commit ``conf >= τ`` plus the single most confident position (progress is
            guaranteed); None: commit the ``ceil(masks / steps_left)`` most confident positions (the
            LLaDA even split, which empties the block exactly at the last step).
        steps_left: steps remaining including this one (fixed-steps variant).
    Returns:
        ``[b, n]`` bool commit mask (subset of ``masked``).
    """
    score = conf.masked_fill(~masked, float("-inf"))  # [b, n]
    rows = torch.arange(conf.shape[0], device=conf.device)
    if threshold is not None:
        commit = masked & (score >= threshold)
        commit[rows, score.argmax(dim=-1)] |= masked.any(dim=-1)
        return commit
    k = (masked.sum(dim=-1) + steps_left - 1) // steps_left  # [b] ceil(masks / steps_left)
    order = score.argsort(dim=-1, descending=True, stable=True)  # [b, n]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return masked & (rank < k[:, None])
