"""Mode 2, block diffusion decoding (docs/decoding.md, "Block diffusion"; HF ``generate`` / SGLang "FastDiffuser").

Per block: ``x = [seed] + [MASK] * (n - 1)`` (the seed is the AR token of the previous causal pass),
then denoising steps, each one bidirectional forward over the block reading the cache without
writing it (with a drafter adapter on; the causal re-encode runs with it off). A step commits every masked position whose confidence (softmax probability of its
candidate) is ≥ τ and always the most confident one; with ``threshold=None`` it commits the k most
confident, k = an even split of the remaining masks over the remaining steps. ``commit_rule="prefix"``
commits only the leftmost run of those (at least the leftmost mask): the block fills left to right.
``commit_rule="prefix_ar"`` also ends a row's block at its committed prefix when no mask reaches τ: the
causal pass keeps only that prefix and gives the next seed, the AR token after it (docs/decoding.md,
"Commit rule"). Denoising stops early once an EOS is committed with no mask left of it. Then ONE causal
forward over the block writes its KV (the cache only ever holds causal states) and yields the next seed. Every denoising pass and every
post-block causal pass is counted (prefill excluded), so a block costs ≥ 2 forwards: TPF ≤ B / 2.

Batches run in lockstep: a row with nothing left to denoise in the current block skips committing
(and is not charged for the pass, nor draws random numbers), so each row's output and counts equal
decoding it alone. Commits, EOS checks and counts stay on the device (:mod:`.recorder`); the host reads
one small tensor per forward (which rows still denoise, or which rows are left after a block).
"""

from __future__ import annotations

import torch

from .batching import CacheState, causal_mask, full_mask
from .config import DecodeConfig
from .interface import CachedLM
from .recorder import BatchRecorder
from .result import DecodeResult
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
    last = ban_token(state.prefill(), mask_id)  # [b, V]
    b, dev = state.batch, last.device
    rec = BatchRecorder(b, cfg.max_new_tokens, cfg.eos_token_ids, dev)
    gens = None if cfg.greedy else make_generators(cfg.seed, b, dev)
    seed = pick_tokens(last[:, None], cfg.temperature, cfg.top_p, gens)[:, 0]  # [b] AR tokens
    adaptive = cfg.commit_rule == "prefix_ar"  # a row's block may end early, at its committed prefix
    emitted, unsettled = 0, torch.zeros((), dtype=torch.long, device=dev)  # lockstep: live rows emitted as much
    while True:
        # an adaptive row fills at most what it may still emit, so a block's length is the row's own
        # (rows emit different amounts) and each row decodes as it would alone
        n = min(cfg.block_size, cfg.max_new_tokens) if adaptive else max(1, min(cfg.block_size,
                                                                                cfg.max_new_tokens - emitted))
        span = rec.remaining.clamp(1, n) if adaptive else torch.full((b,), n, dtype=torch.long, device=dev)  # [b]
        rows = rec.live
        x = torch.full((b, n), mask_id, dtype=torch.long, device=dev)  # [b, n]
        x[:, 0] = seed
        ends = _denoise_block(state, x, rec, cfg, gens, (mask_id, span), unsettled)  # [b] block length per row
        if ends is None:
            break  # no row left
        unsettled = ends.new_zeros(()) if adaptive else \
            (rec.live & ~_settled(x, mask_id, rec.eos, span)).long().sum()  # checked at the next read
        # re-encode the finished block causally: AR-view KV for later blocks + the next seed
        base = state.length
        logits = state.forward(x, causal_mask(n, dev), write_cache=True)  # [b, n, V]
        if adaptive:  # keep each row's block up to its end (one host read: the re-packed cache length)
            state.commit(base, torch.arange(n, device=dev), ends, int((base - state.pad + ends).max()))
        last = ban_token(logits.gather(1, (ends - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0], mask_id)
        rec.emit(x, ends, rows)
        rec.charge(rows, (~rec.done).long())  # this pass's seed is committed iff a block follows
        emitted += n
        # every row draws (a finished row's draws are never used), so no host read is needed here
        seed = pick_tokens(last[:, None], cfg.temperature, cfg.top_p, gens)[:, 0]
    return rec.results(state.row_cache if return_cache else None)


def _denoise_block(state: CacheState, x: torch.Tensor, rec: BatchRecorder, cfg: DecodeConfig,
                   gens, block: tuple[int, torch.Tensor], unsettled: torch.Tensor) -> torch.Tensor | None:
    """Fill the masks of ``x`` (``[b, n]``, edited in place) with bidirectional passes; one host read per
    pass (which rows still denoise). The first read also carries whether any row is left and the previous
    block's ``unsettled`` rows (0-d; > 0 only if a step budget ran out).

    ``block`` is ``(mask_id, span)``: row r fills positions ``< span[r]`` (``[b]``) only. With
    ``commit_rule="prefix_ar"`` a pass where none of a row's masks reaches τ commits nothing for it and
    ends its block at the committed prefix: the causal pass that closes the block gives the next token.
    Returns ``[b]`` each row's block length (its first mask left, else ``span``), or None when no row is left.
    """
    mask_id, span = block
    b, n = x.shape
    eos = rec.eos  # on the device already (a host→device copy per block would sync)
    fill = torch.arange(n, device=x.device)[None] < span[:, None]  # [b, n]
    ended = torch.zeros(b, dtype=torch.bool, device=x.device)  # prefix_ar rows whose block ended early
    # threshold mode commits >= 1 per step, so n steps always suffice; fixed mode has its own budget
    steps = n if cfg.threshold is not None else (cfg.steps_per_block or cfg.block_size)
    for step in range(steps):
        active_t = rec.live & ~ended & ~_settled(x, mask_id, eos, span)  # [b]
        head = [rec.live.long().sum(), unsettled] if step == 0 else []
        status = torch.stack(head + list(active_t.long().unbind())).tolist()  # the pass's one host read
        if step == 0:
            if status[1]:
                raise RuntimeError("diffusion step budget ended with masks left")  # cannot happen: select_commits
            if not status[0]:
                return None
            status = status[2:]
        if not any(status):
            break
        # a denoising pass is a drafter pass (adapter on, when the model has one)
        logits = ban_token(state.forward(x, full_mask(n, x.device), write_cache=False, draft=True), mask_id)  # [b, n, V]
        cand = pick_tokens(logits, cfg.temperature, cfg.top_p, gens, [bool(a) for a in status])  # [b, n]
        conf = confidence(logits, cand)  # [b, n]
        masked = (x == mask_id) & fill & active_t[:, None]  # [b, n]
        commit = select_commits(conf, masked, cfg.threshold, steps - step, cfg.commit_rule)
        if cfg.commit_rule == "prefix_ar":
            ended |= active_t & ~commit.any(dim=1)  # no mask reached τ: the block ends here
        x.copy_(torch.where(commit, cand, x))
        rec.charge(active_t, commit.sum(dim=1))
    still = (x == mask_id) & fill  # [b, n]
    return torch.where(still.any(dim=1), still.long().argmax(dim=1), span)


def _settled(x: torch.Tensor, mask_id: int, eos: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``[b]`` bool: a block row needs no more denoising (no mask left in its first ``span`` positions, or an
    EOS with no mask before it)."""
    n = x.shape[1]
    idx = torch.arange(n, device=x.device)[None]
    is_eos = (x[..., None] == eos).any(dim=-1)  # [b, n] (not isin: it may sort, a host sync on a GPU)
    first_eos = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), torch.full_like(x[:, 0], n))  # [b]
    return ~((x == mask_id) & (idx < torch.minimum(first_eos, span)[:, None])).any(dim=1)


def select_commits(conf: torch.Tensor, masked: torch.Tensor, threshold: float | None, steps_left: int,
                   rule: str = "confident") -> torch.Tensor:
    """Which masked positions one denoising step commits.

    Args:
        conf: ``[b, n]`` confidence of each position's candidate.
        masked: ``[b, n]`` bool, still-masked positions of rows that commit this step.
        threshold: τ: a position passes when ``conf >= τ``; None: the ``k = ceil(masks / steps_left)``
            most confident pass (the LLaDA even split, which empties the block exactly at the last step).
        steps_left: steps remaining including this one (fixed-steps variant).
        rule: ``"confident"`` commits every passing position plus, with τ, the single most confident
            (progress is guaranteed); ``"prefix"`` commits the leftmost run of masked positions that pass
            (with τ; the k leftmost masked without), and at least the leftmost masked position;
            ``"prefix_ar"`` the same run without that forced position (it may be empty: the block ends).
    Returns:
        ``[b, n]`` bool commit mask (subset of ``masked``).
    """
    score = conf.masked_fill(~masked, float("-inf"))  # [b, n]
    rows = torch.arange(conf.shape[0], device=conf.device)
    if rule in ("prefix", "prefix_ar"):
        if threshold is None:  # the k leftmost masks: the fixed-steps split, filled left to right
            k = (masked.sum(dim=-1) + steps_left - 1) // steps_left  # [b]
            return masked & (masked.long().cumsum(dim=-1) <= k[:, None])
        # a masked position that fails blocks every position right of it; committed ones block nothing
        blocked = (masked & (score < threshold)).long().cumsum(dim=-1) > 0  # [b, n]
        commit = masked & ~blocked
        if rule == "prefix":  # progress: the leftmost masked, always (prefix_ar ends the block instead)
            commit[rows, masked.long().argmax(dim=-1)] |= masked.any(dim=-1)
        return commit
    if threshold is not None:
        commit = masked & (score >= threshold)
        commit[rows, score.argmax(dim=-1)] |= masked.any(dim=-1)
        return commit
    k = (masked.sum(dim=-1) + steps_left - 1) // steps_left  # [b] ceil(masks / steps_left)
    order = score.argsort(dim=-1, descending=True, stable=True)  # [b, n]
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    return masked & (rank < k[:, None])
