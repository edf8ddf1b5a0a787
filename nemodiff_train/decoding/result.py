"""What a decoder returns: the generated tokens and exact forward counts (TPF is computed from them).

Counting convention (docs/decoding.md, "Counting forwards", stated because conventions differ between papers): the
prefill is *excluded* from ``forwards`` and reported separately; every other model call is counted,
including passes that commit nothing (a linear-spec draft, a quadratic initial draft, the causal
re-encode after a diffusion block that ends the output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["DecodeStats", "DecodeResult"]


@dataclass
class DecodeStats:
    """Forward counts of one output row.

    Attributes:
        generated_tokens: ``len(DecodeResult.tokens)``.
        prefill_forwards: causal prompt passes (1); not part of ``forwards``.
        forwards: model calls after the prefill that this row took part in.
        committed_per_forward: per counted forward, how many tokens it emitted/committed for this row
            (0 for a pass that commits nothing, e.g. a draft pass). AR, linear and quadratic spec
            record tokens actually emitted (after EOS/length truncation); diffusion records positions
            committed by a denoising pass (some may lie past the first EOS and be cut later), and 1 for
            the post-block causal pass when it produces the seed of a following block.
        drafted: draft tokens proposed to a verifier (self-speculation modes).
        accepted: draft tokens the verifier accepted.
        finished_by: ``"eos"`` or ``"length"``.
    """

    generated_tokens: int
    prefill_forwards: int
    forwards: int
    committed_per_forward: list[int]
    drafted: int = 0
    accepted: int = 0
    finished_by: Literal["eos", "length"] = "length"

    @property
    def tpf(self) -> float:
        """Tokens per forward = generated tokens / counted forwards (prefill excluded).

        A row finished by the prefill alone (0 forwards) reports its token count.
        """
        return self.generated_tokens / max(self.forwards, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class DecodeResult:
    """One prompt's output.

    Attributes:
        tokens: generated token ids only, cut after the first EOS (kept) and at ``max_new_tokens``.
        stats: :class:`DecodeStats`.
        cache: only with ``return_cache=True`` (tests, tools): per layer ``(keys, values)``, each
            ``[1, kv_heads, C_row, head_dim]``, the row's final KV cache with left padding removed.
            Not serialised by :meth:`to_dict`.
    """

    tokens: list[int]
    stats: DecodeStats
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {"tokens": list(self.tokens), "generated_tokens": s.generated_tokens,
                "prefill_forwards": s.prefill_forwards, "forwards": s.forwards, "tpf": s.tpf,
                "committed_per_forward": list(s.committed_per_forward), "drafted": s.drafted,
                "accepted": s.accepted, "finished_by": s.finished_by}
