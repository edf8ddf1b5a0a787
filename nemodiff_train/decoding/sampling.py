"""Token choice shared by the decoders: mask ban, greedy / Gumbel-max sampling, confidences.

Randomness is always drawn from a per-row ``torch.Generator`` (seeded ``cfg.seed + row``), for a row
whenever decoding it alone would draw (a finished row may draw too: its draws are never used), so a
row's samples do not depend on the other rows of its batch.
"""

from __future__ import annotations

import torch

__all__ = ["ban_token", "make_generators", "pick_tokens", "confidence"]


def ban_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """``logits`` ``[..., V]`` with column ``token_id`` set to -inf (a copy; ``[MASK]`` is never emitted)."""
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[token_id] = True
    return logits.masked_fill(banned, float("-inf"))


def make_generators(seed: int, rows: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per row, seeded ``seed + row``."""
    gens = []
    for r in range(rows):
        g = torch.Generator(device=device)
        g.manual_seed(seed + r)
        gens.append(g)
    return gens


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p`` (at least one). ``[..., V]``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the mass *before* it already reaches top_p: the top token is always kept
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generators: list[torch.Generator] | None, active: list[bool] | None = None) -> torch.Tensor:
    """Choose one token per position.

    Args:
        logits: ``[b, q, V]`` (the mask column already banned).
        temperature: 0 = argmax; > 0 = Gumbel-max sampling from softmax(logits / T) after the top-p filter.
        generators: per-row generators (required when temperature > 0).
        active: rows that draw randomness; inactive rows take the argmax and consume no random numbers.
    Returns:
        ``[b, q]`` int64 token ids.
    """
    tokens = logits.argmax(dim=-1)  # [b, q]
    if temperature == 0.0:
        return tokens
    for r in range(logits.shape[0]):
        if active is not None and not active[r]:
            continue
        scaled = _top_p_filter(logits[r].double() / temperature, top_p)  # [q, V]
        # Gumbel-max in float64 (as LLaDA/Fast-dLLM) == a draw from softmax(scaled).
        u = torch.rand(scaled.shape, generator=generators[r], dtype=torch.float64, device=scaled.device)
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-300, max=1.0 - 1e-16)))
        tokens[r] = (scaled + gumbel).argmax(dim=-1)
    return tokens


def confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Softmax probability (temperature 1, mask banned) of the chosen tokens: ``[b, q, V]``, ``[b, q]`` → ``[b, q]``."""
    return logits.float().softmax(dim=-1).gather(-1, tokens[..., None])[..., 0]
