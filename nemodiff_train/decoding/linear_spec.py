"""Mode 3, linear self-speculation (docs/decoding.md; HF ``linear_spec_generate``, SGLang "LinearSpec").

Invariant: the cache holds the causal KV of the emitted tokens except the last one, the seed ``s``
(emitted, not cached). One cycle, at cache length c:

1. draft: ``[s] + [MASK] * (B - 1)`` in one bidirectional pass (cache read, not written); every mask
   is filled at once with its candidate;
2. verify: ``[s, d_1 … d_{B-1}]`` in one causal pass that writes the cache; ``a[i]`` is the AR token
   after ``s, d_1 … d_i``;
3. accept the longest prefix with ``d_{k+1} == a[k]``, emit ``a[:k+1]`` (k drafts + the verifier's
   bonus token), crop the cache to ``c + k + 1`` (``s, d_1 … d_k``) and make ``a[k]`` the next seed.

At temperature 0 every emitted token is the AR greedy token of an AR-greedy prefix, so the output
equals :func:`~nemodiff_train.decoding.ar.ar_generate` token for token (up to floating point). A drafter
adapter (docs/adapters.md) is on for the draft pass and off for the verify pass, so the verifier is the
unchanged base model and the output equals the base's greedy output. At
T > 0 ``a`` is *sampled* from the verifier and a draft is kept iff it equals that sample: each
emitted token is a draw from the AR conditional of the emitted prefix, i.e. the output is
distributed exactly as AR sampling (not bit-equal: different RNG use; lower acceptance than the
min(1, p/q) rule). Both passes are counted: 2 forwards per cycle.

Batches (docs/decoding.md, "Batched self-speculation"): every row drafts and verifies in the same two
passes, and keeps its own acceptance length k, cache length and positions: after the verify each row
keeps its ``k + 1`` new columns and the cache is re-packed right aligned (``CacheState.commit``). A row
with ``r < B`` tokens left drafts over its first ``r`` positions only (the rest of its block is hidden
from them), as it would alone; a finished row rides along uncharged (:mod:`.recorder`). Acceptance,
emission, cache commit and the next seed stay on the device; the host reads one small tensor per cycle
(live rows and the next cache length). A batch of one runs the same code, so at temperature 0 in
float32 row i of a batch equals decoding prompt i alone, and at T > 0 it draws the same random
numbers (row r's generator is seeded ``seed + r``; a row draws in a draft pass only if it drafts).
"""

from __future__ import annotations

import torch

from .batching import CacheState, causal_mask
from .config import DecodeConfig
from .interface import CachedLM
from .recorder import BatchRecorder
from .result import DecodeResult
from .sampling import ban_token, make_generators, pick_tokens

__all__ = ["linear_spec_generate", "check_spec_block"]


def check_spec_block(mode: str, cfg: DecodeConfig) -> None:
    """Self-speculation needs a seed and at least one draft per block."""
    if cfg.block_size < 2:
        raise ValueError(f"{mode} needs block_size >= 2 (one seed + at least one draft), got {cfg.block_size}")


@torch.inference_mode()
def linear_spec_generate(model: CachedLM, prompts: list[list[int]], cfg: DecodeConfig,
                         return_cache: bool = False) -> list[DecodeResult]:
    """Linear self-speculative decoding of a batch of prompts (any lengths; left padded internally).

    Args:
        model: a :class:`CachedLM`.
        prompts: ``b`` token-id lists.
        cfg: :class:`DecodeConfig`; ``block_size`` B is the verify length (B - 1 drafts per cycle).
        return_cache: attach each row's final KV cache (prompt + emitted tokens but the last seed).
    Returns:
        One :class:`DecodeResult` per prompt, with ``drafted``/``accepted`` counts.
    """
    check_spec_block("linear_spec", cfg)
    B, mask_id = cfg.block_size, model.mask_token_id
    state = CacheState(model, prompts)
    b = state.batch
    last = ban_token(state.prefill(), mask_id)  # [b, V]
    dev = last.device
    rec = BatchRecorder(b, cfg.max_new_tokens, cfg.eos_token_ids, dev)
    gens = None if cfg.greedy else make_generators(cfg.seed, b, dev)
    seed = pick_tokens(last[:, None], cfg.temperature, cfg.top_p, gens)[:, 0]  # [b] emitted, not cached
    rec.emit(seed[:, None], torch.ones(b, dtype=torch.long, device=dev), rec.live)
    idx = torch.arange(B, device=dev)
    causal, alone = causal_mask(B, dev), torch.eye(B, dtype=torch.bool, device=dev)
    status = rec.host_status(_drafting(rec, B))
    while status[0]:
        c, rows = state.length, rec.live  # rows live at the start of the cycle
        n = rec.remaining.clamp(max=B)  # [b] the row's block length: never draft past max_new_tokens
        inside = idx[None] < n[:, None]  # [b, B]
        blk = torch.full((b, B), mask_id, dtype=torch.long, device=dev)
        blk[:, 0] = seed
        drafting = [bool(x) for x in status[-b:]]  # live rows with >= 2 tokens left (read with the status)
        if any(drafting):  # a row with one token left drafts nothing: alone it runs no draft pass
            # drafter pass (adapter on): bidirectional over the row's n positions; the others see themselves only
            draft_mask = (inside[:, :, None] & inside[:, None, :]) | alone  # [b, B, B]
            draft = ban_token(state.forward(blk, draft_mask, write_cache=False, draft=True), mask_id)  # [b, B, V]
            picked = pick_tokens(draft, cfg.temperature, cfg.top_p, gens, drafting)
            blk = torch.where(idx[None] >= 1, picked, blk)
            rec.charge(rows & (n > 1))
        # verify pass (the unchanged base): a[:, i] is the AR token after s, d_1 .. d_i
        verify = ban_token(state.forward(blk, causal, write_cache=True), mask_id)  # [b, B, V]
        a = pick_tokens(verify, cfg.temperature, cfg.top_p, gens)  # [b, B]
        match = (a[:, :-1] == blk[:, 1:]) & inside[:, 1:]  # [b, B - 1] d_{i+1} == a[i] inside the row's block
        k = match.long().cumprod(dim=1).sum(dim=1)  # [b] accepted drafts: the longest matching prefix
        kept = rec.emit(a, k + 1, rows)  # a[:, :k + 1], cut at EOS / the cap
        rec.charge(rows, kept)
        rec.drafted += torch.where(rows, n - 1, 0)
        rec.accepted += torch.where(rows, k, 0)
        keep = torch.where(rows, k + 1, 0)  # cache s, d_1 .. d_k; a[k] is the new uncached seed
        seed = a.gather(1, k[:, None])[:, 0]
        status = rec.host_status((c - state.pad + keep).max(), _drafting(rec, B))  # the cycle's one host read
        state.commit(c, idx, keep, status[1])
    return rec.results(state.row_cache if return_cache else None)


def _drafting(rec: BatchRecorder, block: int) -> torch.Tensor:
    """``[b]`` bool: live rows whose next block has a draft position (at least 2 tokens left)."""
    return rec.live & (rec.remaining.clamp(max=block) > 1)
