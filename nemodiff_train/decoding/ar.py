"""Mode 1, autoregressive decoding (docs/decoding.md, "AR"): causal prefill, then one token per forward.

The first token comes from the prefill logits, so a row of N tokens costs N - 1 counted forwards
(prefill excluded; TPF = N / (N - 1) ≥ 1). Batches are left padded (see :mod:`.batching`); a row
that has finished keeps being fed (its extra tokens are cut, its forwards not counted) so all rows
share one cache length. Tokens and counts are recorded on the device (:mod:`.recorder`): the host reads
one flag per step (are rows left).

CPU example::

    PYTHONPATH=. python -c "from tests.helpers.tiny_models import tiny_model; \
from nemodiff_train.models.cached import HFCachedLM; from nemodiff_train.decoding import *; \
print(ar_generate(HFCachedLM(tiny_model(), mask_token_id=3), [[5, 6, 7]], DecodeConfig(max_new_tokens=8)))"
"""

from __future__ import annotations

import torch

from .batching import CacheState, causal_mask
from .config import DecodeConfig
from .interface import CachedLM
from .recorder import BatchRecorder
from .result import DecodeResult
from .sampling import ban_token, make_generators, pick_tokens

__all__ = ["ar_generate"]


@torch.inference_mode()
def ar_generate(model: CachedLM, prompts: list[list[int]], cfg: DecodeConfig,
                return_cache: bool = False) -> list[DecodeResult]:
    """Greedy or sampled AR decoding of a batch of prompts.

    Args:
        model: a :class:`CachedLM`.
        prompts: ``b`` token-id lists (any lengths; left padded internally).
        cfg: :class:`DecodeConfig` (``max_new_tokens``, ``temperature``, ``top_p``, ``eos_token_ids``, ``seed``).
        return_cache: attach each row's final KV cache (prompt + emitted tokens but the last) to its result.
    Returns:
        One :class:`DecodeResult` per prompt, equal to decoding that prompt alone.
    """
    state = CacheState(model, prompts)
    last = state.prefill()  # [b, V]
    rec = BatchRecorder(state.batch, cfg.max_new_tokens, cfg.eos_token_ids, last.device)
    gens = None if cfg.greedy else make_generators(cfg.seed, len(prompts), last.device)
    one_each = torch.ones(state.batch, dtype=torch.long, device=last.device)
    token = _choose(model, last, cfg, gens)  # [b]
    rec.emit(token[:, None], one_each, rec.live)
    one = causal_mask(1, last.device)  # built on the device: a host→device copy inside the loop would sync
    while rec.host_status()[0]:  # the step's one host read
        rows = rec.live
        logits = state.forward(token[:, None], one, write_cache=True)[:, -1]  # [b, V]
        token = _choose(model, logits, cfg, gens)
        rec.charge(rows, rec.emit(token[:, None], one_each, rows))
    return rec.results(state.row_cache if return_cache else None)


def _choose(model: CachedLM, logits: torch.Tensor, cfg: DecodeConfig, gens) -> torch.Tensor:
    """``[b, V]`` logits → ``[b]`` next tokens (mask banned). Every row draws its random numbers, finished
    ones too (their tokens are discarded), so a live row's draws never depend on the rest of the batch."""
    return pick_tokens(ban_token(logits, model.mask_token_id)[:, None], cfg.temperature, cfg.top_p, gens)[:, 0]
