"""Which config keys and environment variables hold secrets, and scrubbing them from what a run writes.

A key is a secret when its words say *credential*: ``password``, ``secret``, ``credentials``, an
``api_key`` / ``access_key`` / ``private_key``, or a ``token`` qualified as a credential (``token``,
``hf_token``, ``auth_token``, ``access_token``...). Tokenizer vocabulary is not: ``mask_token``,
``mask_token_id``, ``pad_token``, ``max_new_tokens`` and ``training_tokens`` are settings a dashboard
must keep. Words are split at ``_``, ``-``, ``.`` and camelCase, so ``HF_TOKEN``, ``wandbApiKey`` and
``hub.token`` are all recognised.

Three places use it: :func:`redact` (the W&B config), :func:`secret_env_interpolations` (a recipe's
``${oc.env:HF_TOKEN}`` is refused by :func:`nemodiff_train.config.load.to_config`) and
:func:`scrub_env_values` (the saved ``config.yaml`` and the export's ``nemodiff`` record: the value of
any secret-named environment variable that reached them anyway, through a variable or a key whose
name does not say secret, becomes ``***``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

__all__ = ["is_secret_key", "redact", "secret_env_interpolations", "scrub_env_values", "MASK"]

MASK = "***"
_SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials",
                           "apikey", "privatekey"})
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("ssh", "key"),
                           ("signing", "key"), ("client", "secret")})
# a word before "token" that makes it a credential (hf_token), not vocabulary (mask_token)
_CREDENTIAL_QUALIFIERS = frozenset({"hf", "huggingface", "hub", "access", "auth", "api", "bearer", "refresh", "session",
                                    "wandb", "github", "gh", "gitlab", "slack", "openai", "oauth", "id", "private",
                                    "personal", "write", "read", "user", "jwt", "csrf", "client", "service", "bot",
                                    "secret", "login", "upload", "aws", "azure", "gcp", "security"})
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_MIN_SCRUB = 8  # shorter environment values are too likely to occur by chance in a config


def _words(key: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", _CAMEL.sub("_", str(key)).lower())


def is_secret_key(key: Any) -> bool:
    """Whether a config key or environment variable name denotes a credential (see the module docstring)."""
    words = _words(str(key))
    if not words:
        return False
    if _SECRET_WORDS.intersection(words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:])):
        return True
    if words[-1] != "token":  # mask_token_id, max_new_tokens, tokenizer, token_budget: not credentials
        return False
    return len(words) == 1 or words[-2] in _CREDENTIAL_QUALIFIERS


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts / lists) with the values of secret keys replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "", False) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


_ENV_INTERP = re.compile(r"\$\{\s*(?:oc\.env|env)\s*:\s*([^,}]*)")


def secret_env_interpolations(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(config key, variable)`` for every ``${oc.env:VAR}`` in an unresolved config whose variable is
    secret-named (or computed by another interpolation, so its name cannot be checked)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from secret_env_interpolations(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from secret_env_interpolations(v, f"{prefix}.{i}")
    elif isinstance(node, str):
        for m in _ENV_INTERP.finditer(node):
            var = m.group(1).strip().strip("'\"")
            if "$" in var or is_secret_key(var):
                yield prefix, var


def _secret_env_values() -> list[str]:
    values = {v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= _MIN_SCRUB}
    return sorted(values, key=len, reverse=True)


def scrub_env_values(obj: Any) -> Any:
    """A copy of ``obj`` (a string or nested dicts / lists) in which the value of every secret-named
    environment variable (``HF_TOKEN``, ``WANDB_API_KEY``, ...) is replaced by ``***``."""
    values = _secret_env_values()
    if not values:
        return obj

    def scrub(x):
        if isinstance(x, str):
            for v in values:
                x = x.replace(v, MASK)
            return x
        if isinstance(x, dict):
            return {scrub(k): scrub(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(scrub(v) for v in x)
        return x

    return scrub(obj)
