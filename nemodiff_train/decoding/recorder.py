"""Device-side output and forward counts of a batch: the decode loop never reads a token on the host.

Keeping each row's output in Python lists would make every emitted token a device→host read, which
stalls the host until the device catches up. :class:`BatchRecorder` keeps the record in tensors on the
model's device: emitted tokens, per-row length, finished flags, forward counts, drafted/accepted counts and one
``committed`` entry per model call. EOS and length-cap truncation happen on the device; the host reads
everything once, in :meth:`BatchRecorder.results`. The only read a decoder needs inside its loop is
:meth:`BatchRecorder.host_status` (are rows still live, plus the few ints that size the next pass),
one ``tolist`` per cycle.

Counting forwards in a batch (docs/decoding.md, "Counting forwards"): a batched model call is charged to
a row only if the row was live when the call started and the call computes something the row uses. So a
row's ``forwards`` and ``committed_per_forward`` are exactly those of decoding it alone, whatever the
rest of its batch does (a finished row rides along uncharged; a linear-spec draft pass is not charged
to a row with a single token left, as decoding it alone runs no draft for it).
"""

from __future__ import annotations

import torch

from .result import DecodeResult, DecodeStats

__all__ = ["BatchRecorder"]


class BatchRecorder:
    """The outputs of ``b`` rows, kept on ``device``.

    Args:
        batch: rows b.
        max_new_tokens: the length cap N.
        eos_token_ids: stop tokens (kept in the output).
        device: where the tensors live (the model's device).

    Attributes:
        tokens: ``[b, N + 1]`` int64 emitted tokens (column N is a scratch slot for discarded writes).
        length: ``[b]`` int64 tokens emitted so far.
        done: ``[b]`` bool, finished (EOS emitted or N reached).
        by_eos: ``[b]`` bool, finished by an EOS.
        forwards, drafted, accepted: ``[b]`` int64 counts.
    """

    def __init__(self, batch: int, max_new_tokens: int, eos_token_ids: tuple[int, ...], device):
        self.batch, self.cap, self.device = batch, max_new_tokens, torch.device(device)
        zeros = lambda dtype=torch.long: torch.zeros(batch, dtype=dtype, device=self.device)  # noqa: E731
        self.tokens = torch.zeros(batch, max_new_tokens + 1, dtype=torch.long, device=self.device)
        self.length, self.forwards, self.drafted, self.accepted = zeros(), zeros(), zeros(), zeros()
        self.done, self.by_eos = zeros(torch.bool), zeros(torch.bool)
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        self._log: list[torch.Tensor] = []  # per model call: [b] committed tokens, -1 where not charged

    @property
    def live(self) -> torch.Tensor:
        """``[b]`` bool, rows still decoding."""
        return ~self.done

    @property
    def remaining(self) -> torch.Tensor:
        """``[b]`` int64 tokens a row may still emit."""
        return self.cap - self.length

    def emit(self, tokens: torch.Tensor, count: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Append ``tokens[r, :count[r]]`` to each row in ``rows``, cut after the first EOS and at the cap.

        Args:
            tokens: ``[b, n]`` candidate tokens, in order.
            count: ``[b]`` int64 how many of them the row offers (a prefix).
            rows: ``[b]`` bool rows that emit (a finished row never does).
        Returns:
            ``[b]`` int64 tokens actually kept per row.
        """
        n = tokens.shape[1]
        idx = torch.arange(n, device=self.device)[None]  # [1, n]
        offered = (idx < count[:, None]) & rows[:, None] & ~self.done[:, None] & (idx < self.remaining[:, None])
        is_eos = (tokens[..., None] == self.eos).any(dim=-1) & offered  # not isin: it may sort (a sync)
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS earlier in this row's offer
        kept = offered & ~after_eos  # [b, n], a prefix per row
        slot = torch.where(kept, self.length[:, None] + idx, torch.full_like(idx, self.cap))
        self.tokens.scatter_(1, slot, tokens)
        taken = kept.sum(dim=1)
        self.length += taken
        hit = (is_eos & kept).any(dim=1)
        self.by_eos |= hit
        self.done |= hit | (self.length >= self.cap)
        return taken

    def charge(self, rows: torch.Tensor, committed: torch.Tensor | int = 0) -> None:
        """Count one model call for ``rows`` (``[b]`` bool) that committed ``committed`` (``[b]`` or int) tokens."""
        if isinstance(committed, int):  # filled on the device: a host→device copy of a scalar would sync
            committed = torch.full((self.batch,), committed, dtype=torch.long, device=self.device)
        self.forwards += rows.long()
        self._log.append(torch.where(rows, committed, torch.full_like(committed, -1)))

    def host_status(self, *extra: torch.Tensor) -> list[int]:
        """The cycle's one device→host read: ``[live rows, *extra]``, each ``extra`` an integer tensor of any
        shape, flattened in order."""
        values = [self.live.sum().reshape(1)] + [e.reshape(-1).to(device=self.device, dtype=torch.long) for e in extra]
        return torch.cat(values).tolist()

    def results(self, caches=None) -> list[DecodeResult]:
        """One :class:`DecodeResult` per row (reads everything to the host once).

        Args:
            caches: optional callable ``row -> cache`` attached to each result.
        """
        log = torch.stack(self._log, dim=1).tolist() if self._log else [[] for _ in range(self.batch)]
        tokens, length = self.tokens.tolist(), self.length.tolist()
        forwards, drafted, accepted = self.forwards.tolist(), self.drafted.tolist(), self.accepted.tolist()
        by_eos = self.by_eos.tolist()
        out = []
        for r in range(self.batch):
            stats = DecodeStats(generated_tokens=length[r], prefill_forwards=1, forwards=forwards[r],
                                committed_per_forward=[c for c in log[r] if c >= 0], drafted=drafted[r],
                                accepted=accepted[r], finished_by="eos" if by_eos[r] else "length")
            out.append(DecodeResult(tokens=tokens[r][:length[r]], stats=stats,
                                    cache=None if caches is None else caches(r)))
        return out
