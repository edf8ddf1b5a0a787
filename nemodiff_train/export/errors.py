"""The one error type of the export package."""

from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(RuntimeError):
    """An export, model card or Hub upload that cannot be done; the message names the file or key at fault.

    Raised before anything is written to the output directory: a failed export leaves no trace.
    """
