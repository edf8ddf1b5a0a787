"""Loading the Hugging Face tokenizer of a preparation and describing it for ``meta.json``.

The tokenizer is named by a local directory (``save_pretrained`` output or a model directory) or
a Hub name; a Hub name only works where the Hub is reachable or the tokenizer is cached.

The fingerprint of a preparation includes :func:`tokenizer_digest`, a hash of the tokenizer
*files* of a local directory (not of model weights), so editing the vocabulary or the chat
template in place makes an existing prepared directory refuse to be reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["TokenizerError", "load_tokenizer", "tokenizer_digest", "special_ids", "control_strings"]

# Files that define a tokenizer (never weights, which can be huge and do not change tokenisation).
_TOKENIZER_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges*",
    "*.model",
    "*.tiktoken",
    "chat_template*",
)


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded or lacks something the preparation needs."""


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained(name_or_path)`` with an error that says what to do."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError, ValueError, connection errors, ...
        raise TokenizerError(
            f"cannot load tokenizer {name_or_path!r}: {type(e).__name__}: {e}. Pass a local directory "
            "with the tokenizer files (e.g. the model directory); a Hub name needs the Hub or HF_HUB_OFFLINE=1 "
            "with the tokenizer already in the Hugging Face cache."
        ) from e
    # Documents can be far longer than the model context; they are packed afterwards, so the
    # tokenizer's "sequence longer than model_max_length" warning would be noise.
    tok.model_max_length = int(1e30)
    return tok


def tokenizer_digest(name_or_path: str) -> str:
    """sha256 over the tokenizer files of a local directory; for a Hub name, of the name."""
    h = hashlib.sha256()
    path = Path(name_or_path)
    if path.is_dir():
        files = sorted({f for pat in _TOKENIZER_FILE_PATTERNS for f in path.glob(pat) if f.is_file()})
        for f in files:
            h.update(f.name.encode() + b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    else:
        h.update(b"hub:" + name_or_path.encode())
    return h.hexdigest()


def special_ids(tok) -> dict[str, int | None]:
    """``vocab_size`` (incl. added tokens), ``eos_token_id`` and ``pad_token_id`` for ``meta.json``.

    ``pad_token_id`` falls back to ``eos_token_id`` when the tokenizer has no pad token (the
    common case for base LLMs); padded positions always have ``loss_mask`` 0 and their own
    document id, so reusing EOS as the pad id is harmless.
    """
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return {"vocab_size": len(tok), "eos_token_id": eos, "pad_token_id": pad}


def control_strings(tok) -> list[str]:
    """Strings that the tokenizer turns into special (control) tokens, e.g. ``<|im_end|>``.

    Chat templates render the conversation to text and tokenize it whole, so such a string inside
    a message would become a real turn marker; SFT skips those rows (see ``sft.py``).
    """
    found = set(getattr(tok, "all_special_tokens", []) or [])
    for added in getattr(tok, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content if hasattr(added, "content") else added))
    return sorted(s for s in found if s)
