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
"""

from __future__ import annotations

import torch

from .batching import CacheState, causal_mask, full_mask
from .config import DecodeConfig
from .interface import CachedLM
from .result import DecodeResult, RowRecorder
from .sampling import ban_token, make_generators, pick_tokens

__all__ = ["linear_spec_generate", "check_single_prompt"]


def check_single_prompt(mode: str, prompts: list[list[int]], cfg: DecodeConfig) -> None:
    """Self-speculation decodes one sequence at a time (its cache is cropped per row)."""
    if len(prompts) != 1:
        raise ValueError(f"{mode} supports batch size 1 only (got {len(prompts)} prompts); "
                         "call it once per prompt, e.g. via nemodiff_train.decoding.generate")
    if cfg.block_size < 2:
        raise ValueError(f"{mode} needs block_size >= 2 (one seed + at least one draft), got {cfg.block_size}")


@torch.inference_mode()
def linear_spec_generate(model: CachedLM, prompts: list[list[int]], cfg: DecodeConfig,
                         return_cache: bool = False) -> list[DecodeResult]:
    """Linear self-speculative decoding of ONE prompt.

    Args:
        model: a :class:`CachedLM`.
        prompts: exactly one token-id list.
        cfg: :class:`DecodeConfig`; ``block_size`` B is the verify length (B - 1 drafts per cycle).
        return_cache: attach the final KV cache (prompt + emitted tokens but the last seed).
    Returns:
        ``[DecodeResult]`` with ``drafted``/``accepted`` counts.
    """
    check_single_prompt("linear_spec", prompts, cfg)
    mask_id = model.mask_token_id
    state = CacheState(model, prompts)
    row = RowRecorder(cfg.max_new_tokens, cfg.eos_token_ids)
    last = ban_token(state.prefill(), mask_id)  # [1, V]
    gens = None if cfg.greedy else make_generators(cfg.seed, 1, last.device)
    seed = int(pick_tokens(last[:, None], cfg.temperature, cfg.top_p, gens)[0, 0])
    row.emit([seed])  # emitted, not cached
    while not row.done:
        c = state.length
        # never draft past max_new_tokens: the cycle can emit at most `n` tokens anyway
        n = min(cfg.block_size, row.remaining)
        blk = torch.full((1, n), mask_id, dtype=torch.long, device=last.device)  # [1, n]
        blk[0, 0] = seed
        if n > 1:
            # drafter pass (adapter on); the verify pass below runs the unchanged base (adapter off)
            draft = ban_token(state.forward(blk, full_mask(n), write_cache=False, draft=True), mask_id)  # [1, n, V]
            blk[0, 1:] = pick_tokens(draft, cfg.temperature, cfg.top_p, gens)[0, 1:]
            row.forward(0)
        verify = ban_token(state.forward(blk, causal_mask(n), write_cache=True), mask_id)  # [1, n, V] shifted
        a = pick_tokens(verify, cfg.temperature, cfg.top_p, gens)[0].tolist()  # a[i]: token at position c+i+1
        d = blk[0].tolist()
        k = 0
        while k < n - 1 and a[k] == d[k + 1]:
            k += 1
        state.keep(torch.arange(c + k + 1))  # keep s, d_1..d_k; a[k] is the new uncached seed
        row.drafted += n - 1
        row.accepted += k
        row.forward(row.emit(a[:k + 1]))
        seed = a[k]
    return [row.result(state.row_cache(0) if return_cache else None)]
