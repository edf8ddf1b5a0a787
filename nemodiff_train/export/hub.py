"""Upload an export to the Hugging Face Hub (``create_repo`` + ``upload_folder``).

The token comes from the ``token`` argument, else ``HF_TOKEN``, else huggingface_hub's stored login;
it is never printed or logged, and is scrubbed from any error message before that is raised.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import ExportError

log = logging.getLogger(__name__)

__all__ = ["push_to_hub", "upload_plan"]

# what upload_folder leaves out by itself
_IGNORED_PARTS = {".git", ".cache"}


def upload_plan(folder: Path, repo: str, private: bool) -> dict[str, Any]:
    """What :func:`push_to_hub` would send: ``repo_id``, ``private``, ``files`` [(path, bytes)], ``total_bytes``."""
    folder = Path(folder)
    files = [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*"))
             if p.is_file() and not _IGNORED_PARTS.intersection(p.relative_to(folder).parts)]
    return {"repo_id": repo, "private": bool(private), "files": files, "total_bytes": sum(s for _, s in files)}


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _print_plan(plan: dict, dry_run: bool) -> None:
    verb = "would upload" if dry_run else "uploading"
    print(f"{verb} {len(plan['files'])} files ({_human(plan['total_bytes'])}) to "
          f"{'private' if plan['private'] else 'public'} repo {plan['repo_id']}")
    for path, size in plan["files"]:
        print(f"  {size:>14,d}  {path}")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _create_or_check(api, repo: str, private: bool) -> None:
    """Create ``repo`` with the asked visibility, or check an existing one: a push asked to be private
    never goes to an existing public repo (create_repo(exist_ok=True) would keep it public)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo, repo_type="model")
    except RepositoryNotFoundError:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.repo_info(repo, repo_type="model")  # created meanwhile by someone else: check it too
    if private and not getattr(info, "private", False):
        raise ExportError(f"push_to_hub: {repo} exists and is public, but private=true was asked: nothing was "
                          "uploaded. Make the repo private on the Hub, push to another repo, or pass private=false "
                          "to publish")


def push_to_hub(folder: str | Path, repo: str, private: bool = True, dry_run: bool = False,
                token: str | None = None, commit_message: str | None = None) -> dict[str, Any]:
    """Create (if needed) the model repo ``repo`` and upload ``folder`` to it.

    Args:
        folder: an export directory (must hold ``config.json``).
        repo: ``owner/name``.
        private: visibility when the repo is created; an existing public repo is refused when ``True``
            (nothing is uploaded), an existing private one is used as it is.
        dry_run: only print and return the plan; nothing is sent.
        token: a Hub token; default ``HF_TOKEN`` or the stored login. Never printed.
    Returns:
        The plan (see :func:`upload_plan`), plus ``commit_url`` after a real upload.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"push_to_hub: {folder} is not an export directory (no config.json)")
    if not isinstance(repo, str) or repo.count("/") != 1 or not all(repo.split("/")):
        raise ExportError(f"push_to_hub: repo {repo!r} must be 'owner/name'")
    plan = upload_plan(folder, repo, private)
    _print_plan(plan, dry_run)
    if dry_run:
        print("dry run: nothing uploaded")
        return plan
    from huggingface_hub import HfApi

    token = token or os.environ.get("HF_TOKEN") or None
    try:
        api = HfApi(token=token)
        _create_or_check(api, repo, private)
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                   commit_message=commit_message or "Upload nemodiff DLM export")
    except ExportError as e:
        raise ExportError(_scrub(str(e), token)) from None
    except Exception as e:  # never let the token reach a message or log
        message = f"{type(e).__name__}: {e}"
        if token:
            message = message.replace(token, "***")
        raise ExportError(f"push_to_hub to {repo} failed: {message}") from None
    plan["commit_url"] = str(getattr(commit, "commit_url", commit))
    print(f"uploaded to https://huggingface.co/{repo} ({plan['commit_url']})")
    return plan
