"""``export_checkpoint``: a run directory, a checkpoint or an HF directory → an export.

It picks the writer: a full conversion (:func:`.writer.export_dlm`) or, for a drafter-adapter run or
adapter export, :func:`.adapter.export_adapter` / :func:`.adapter.export_merged`. Kept apart from both
writers so that ``export/`` has no import cycle (the adapter writer reuses the full writer's files).
"""

from __future__ import annotations

from pathlib import Path

from .. import runs
from .errors import ExportError
from .output_dir import check_replaceable
from .options import DEFAULT_MAX_SHARD_SIZE, dtype_name, shard_size
from .writer import export_dlm

__all__ = ["export_checkpoint"]


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32",
                      metadata: dict | None = None, remote_code: bool = False, eval_json: str | Path | None = None,
                      overwrite: bool = False, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                      merge: bool = False) -> Path:
    """Export a run directory (its latest complete checkpoint), a checkpoint directory or an HF directory.

    A run's ``<run>/eval/eval.json`` is used for the model card when ``eval_json`` is not given.
    Other arguments as :func:`export_dlm`; ``metadata`` adds to what the run records. A Megatron run
    directory is refused here: :func:`nemodiff_train.orchestrate.export_any` converts it first.

    A drafter-adapter run (``adapter=lora``) or adapter export exports as an adapter
    (:func:`nemodiff_train.export.adapter.export_adapter`: no base weights), or with ``merge`` as a full
    model with the adapter folded in (:func:`~nemodiff_train.export.adapter.export_merged`, diffusion-only).
    """
    from .checkpoint import load_source, resolve_source

    out = Path(out)
    dtype_name(dtype)
    shard_size(max_shard_size)
    if runs.is_megatron_run(checkpoint):  # its engine converts it first; export/ imports no engine
        raise ExportError(f"{checkpoint} is a Megatron run directory: export it with nemodiff-export "
                          "(nemodiff_train.orchestrate.export_any), which converts its checkpoint first")
    src = resolve_source(checkpoint)
    protect = [Path(checkpoint)] + [p for p in (src.run_dir, src.ckpt_dir, src.hf_dir) if p is not None]
    check_replaceable(out, overwrite, protect)
    if eval_json is None and src.run_dir is not None and (src.run_dir / runs.EVAL_DIR / runs.EVAL_JSON).is_file():
        eval_json = src.run_dir / runs.EVAL_DIR / runs.EVAL_JSON
    adapter = _export_adapter_source(src, out, dtype=dtype, metadata=metadata, remote_code=remote_code,
                                     eval_json=eval_json, overwrite=overwrite, max_shard_size=max_shard_size,
                                     merge=merge, protect=protect)
    if adapter is not None:
        return adapter
    if merge:
        raise ExportError(f"merge=true: {checkpoint} is not a drafter-adapter run or export (adapter=lora); "
                          "a full conversion has nothing to merge")
    dlm, meta = load_source(src)
    meta.update(metadata or {})
    return export_dlm(dlm, out, dtype=dtype, metadata=meta, remote_code=remote_code, eval_json=eval_json,
                      overwrite=overwrite, max_shard_size=max_shard_size, _protect=protect)


def _export_adapter_source(src, out: Path, *, dtype, metadata, remote_code, eval_json, overwrite, max_shard_size,
                           merge, protect) -> Path | None:
    """Export a drafter-adapter run or adapter export (None when ``src`` is neither)."""
    from ..models.adapter_export import AdapterExportError, is_adapter_export, load_adapter_export, recorded_base
    from .adapter import export_adapter, export_merged, is_adapter_run, load_adapter_run
    from .checkpoint import _run_config, checkpoint_metadata

    if src.kind == "hf":
        if not is_adapter_export(src.hf_dir):
            return None
        try:
            dlm = load_adapter_export(src.hf_dir)
        except AdapterExportError as e:  # reported as every other export failure
            raise ExportError(str(e)) from None
        record = dict(dlm.hf.config.nemodiff)
        base_path = next((p for p, rev in recorded_base(src.hf_dir, record["adapter"]) if rev is None), None)
        hub_id, revision = record["adapter"].get("base_hub_id"), record["adapter"].get("base_revision")
        meta = {k: v for k, v in record.items() if k != "adapter"}
    else:
        run_cfg = _run_config(src.run_dir)
        if not is_adapter_run(run_cfg):
            return None
        dlm, base_path, hub_id, revision = load_adapter_run(src, run_cfg)
        meta = checkpoint_metadata(src, dict(dlm.hf.config.nemodiff or {}), run_cfg)
    meta.update(metadata or {})
    if merge:
        return export_merged(dlm, out, dtype=dtype, metadata=meta, remote_code=remote_code, eval_json=eval_json,
                             overwrite=overwrite, max_shard_size=max_shard_size, _protect=protect)
    return export_adapter(dlm, out, base_path=base_path, base_hub_id=hub_id, base_revision=revision, metadata=meta,
                          dtype=dtype,
                          remote_code=remote_code, overwrite=overwrite, eval_json=eval_json)
