"""Where a configured model path or data source points (shared by both engines and the CLI).

``embedded`` names the tiny model shipped in the package and ``embedded:<file>`` one of its data
files; a local directory is used as it is; ``org/name`` is downloaded from the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EMBEDDED", "resolve_model_path", "resolve_data_source"]

EMBEDDED = "embedded"


def resolve_model_path(path: str, revision: str | None = None) -> Path:
    """``embedded`` → the shipped tiny model; a local directory as is; ``org/name`` → Hub snapshot
    (at ``revision``, a branch, tag or commit, when given: a pinned download)."""
    if path == EMBEDDED:
        from . import embedded_model_dir

        return embedded_model_dir()
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if path.count("/") == 1 and not path.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:  # offline, gated, missing: say which model and why
            at = f" at revision {revision!r}" if revision else ""
            raise FileNotFoundError(f"model.path={path!r}: not a local directory and the Hub download{at} failed "
                                    f"({type(e).__name__}: {e}). Download it first or point model.path at a directory.") from None
    raise FileNotFoundError(f"model.path={path!r} is not a directory")


def resolve_data_source(text: str) -> str:
    """``embedded:<file>`` → the path of a data file shipped with the package (weights kept)."""
    if not text.startswith(EMBEDDED + ":"):
        return text
    from . import embedded_data_file

    name, _, weight = text[len(EMBEDDED) + 1:].partition(":")
    path = str(embedded_data_file(name))
    return f"{path}:{weight}" if weight else path
