"""A tiny byte-level BPE tokenizer built in-process, for tests that need a real HF tokenizer.

No download: the BPE is trained with ``tokenizers`` on a handful of strings (a few hundred
milliseconds), wrapped in :class:`transformers.PreTrainedTokenizerFast` and given

* special tokens ``<|endoftext|>`` (EOS), ``<|pad|>`` (PAD, distinct from EOS so tests can tell
  padding from document ends), ``<|im_start|>`` and ``<|im_end|>`` (ChatML turn markers);
* a ChatML chat template, by default with ``{% generation %}`` tags around the assistant
  content (so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` works), or
  without them (``generation_tags=False``) to exercise code paths for templates lacking them.

Byte-level means every string round-trips, so tests can feed arbitrary text.

Usage::

    from tests.helpers.tiny_tokenizer import make_tiny_tokenizer
    tok = make_tiny_tokenizer()                       # in memory
    tok = make_tiny_tokenizer(tmp_path / "tok")       # also saved with save_pretrained
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML; the assistant content plus its <|im_end|> is what the model must generate, so that is
# what the generation block covers (the newline after <|im_end|> is formatting, not generated).
CHATML_WITH_GENERATION = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CHATML_PLAIN = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Diffusion language models denoise masked tokens in parallel.",
    "Autoregressive models predict the next token from the left context.",
    "Hello world! How are you today? I am fine, thank you.",
    "system user assistant: answer the question briefly and politely.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \" ! ?",
]


@lru_cache(maxsize=1)
def _tokenizer_json(vocab_size: int) -> str:
    """Train the BPE once per process and return it serialised (cheap to rebuild wrappers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets: each token's character span includes its leading space, so masks computed
    # from offsets (apply_chat_template's assistant mask) cover the generated text with no gaps.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(save_dir: str | Path | None = None, *, generation_tags: bool = True, vocab_size: int = 320):
    """Build the tiny tokenizer; if ``save_dir`` is given, ``save_pretrained`` it there too.

    Returns a :class:`transformers.PreTrainedTokenizerFast` with ``eos_token=<|endoftext|>``,
    ``pad_token=<|pad|>`` and a ChatML ``chat_template`` (with or without generation tags).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tokenizer_json(vocab_size))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHATML_WITH_GENERATION if generation_tags else CHATML_PLAIN
    tok.model_max_length = 1_000_000  # silence "sequence longer than max length" warnings
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(save_dir))
    return tok
