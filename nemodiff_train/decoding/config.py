"""Decoding settings shared by every mode (AR, diffusion, linear and quadratic self-speculation).

A mode reads only the fields it needs: ``block_size`` is the diffusion block / speculation draft
length, ``threshold`` and ``steps_per_block`` only matter for diffusion (docs/decoding.md).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMMIT_RULES", "DecodeConfig"]

COMMIT_RULES = ("confident", "prefix", "prefix_ar")
"""Block diffusion's commit rules (:attr:`DecodeConfig.commit_rule`)."""


@dataclass
class DecodeConfig:
    """How to decode.

    Attributes:
        max_new_tokens: generated tokens per prompt at most (the EOS token included).
        block_size: diffusion block length B / self-speculation draft length.
        threshold: diffusion confidence threshold τ: each denoising step commits every masked position
            whose confidence is ≥ τ (and always the most confident one). None selects the fixed-steps
            variant: each step commits the k most confident, k = an even split of the block's masks
            over ``steps_per_block`` steps.
        steps_per_block: step budget of the fixed-steps variant (None = ``block_size``); only valid
            with ``threshold=None``.
        commit_rule: which of a diffusion step's candidates it commits. ``"confident"`` (the method's
            rule): every masked position that passes (≥ τ, or among the k most confident), anywhere in
            the block. ``"prefix"``: only the leftmost run of masked positions that pass, and at least the
            leftmost masked position, so a block fills left to right and no token is committed before
            the masks to its left. ``"prefix_ar"``: as ``"prefix"``, but a pass where no mask reaches τ
            commits nothing and ends the block at its committed prefix; the causal pass that closes the
            block then gives the next token, the AR view's (docs/decoding.md, "Commit rule").
        temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / T).
        top_p: nucleus filter applied before sampling (1.0 = off); ignored when greedy.
        eos_token_ids: a row stops after emitting any of these; the EOS token is kept in the output.
        seed: row r samples with a ``torch.Generator`` seeded ``seed + r`` (reproducible, and a row's
            randomness does not depend on the other rows of its batch).
    """

    max_new_tokens: int = 128
    block_size: int = 32
    threshold: float | None = 0.9
    steps_per_block: int | None = None
    commit_rule: str = "confident"
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        # Hydra/JSON hand over lists; a tuple keeps the config hashable and immutable in spirit.
        self.eos_token_ids = tuple(self.eos_token_ids)
        self._check_int("max_new_tokens", self.max_new_tokens, 1)
        self._check_int("block_size", self.block_size, 1)
        self._check_int("seed", self.seed, None)
        if self.threshold is not None:
            if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) \
                    or not 0.0 <= self.threshold <= 1.0:
                raise ValueError(f"threshold must be a number in [0, 1] or None, got {self.threshold!r}")
            if self.steps_per_block is not None:
                raise ValueError("steps_per_block applies only to the fixed-steps variant: set threshold=None "
                                 f"or steps_per_block=None (got threshold={self.threshold}, "
                                 f"steps_per_block={self.steps_per_block})")
        if self.commit_rule not in COMMIT_RULES:
            raise ValueError(f"commit_rule must be one of {list(COMMIT_RULES)}, got {self.commit_rule!r}")
        if self.commit_rule == "prefix_ar" and self.threshold is None:
            raise ValueError("commit_rule='prefix_ar' ends a block where no mask reaches the threshold: it needs "
                             "a threshold (got threshold=None)")
        if self.steps_per_block is not None:
            self._check_int("steps_per_block", self.steps_per_block, 1)
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        for t in self.eos_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"eos_token_ids must be non-negative ints, got {self.eos_token_ids!r}")

    @staticmethod
    def _check_int(name: str, value, minimum: int | None) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
