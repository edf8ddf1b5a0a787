"""Export a DLM as a Hugging Face directory (+ remote code, model card) and push it to the Hub.

* :func:`export_checkpoint` — a run directory (latest complete checkpoint), a checkpoint or an HF
  directory → ``out``; :func:`export_dlm` — an in-memory :class:`~nemodiff_train.models.hf.DLMModel`
  → ``out``. Both write atomically and fail (with :class:`ExportError`, naming the file or key)
  before writing anything.
* :func:`export_adapter` — a drafter adapter (``adapter=lora``) in PEFT format beside a reference to
  its untouched base (loaded back by :func:`nemodiff_train.models.adapter_export.load_adapter_export`);
  :func:`export_merged` folds it into a full copy.
* :func:`write_model_card` — (re)write ``README.md`` of an export, e.g. after evaluation.
* :func:`check_replaceable` — may ``out`` receive an export (:mod:`.output_dir`, which both exports
  write through)?
* :func:`push_to_hub` — ``create_repo`` + ``upload_folder``; ``dry_run`` lists what would be sent.

CLI: ``nemodiff-export checkpoint=<run|checkpoint|hf dir> out=<dir> [dtype=bfloat16] [remote_code=true]
[push_to_hub=<owner/name> [private=false] [dry_run=true]]``.
"""

from .adapter import export_adapter, export_merged
from .errors import ExportError
from .hub import push_to_hub, upload_plan
from .model_card import read_eval_rows, write_model_card
from .output_dir import check_replaceable
from .dispatch import export_checkpoint
from .writer import export_dlm, training_metadata

__all__ = ["ExportError", "export_checkpoint", "export_dlm", "training_metadata", "write_model_card",
           "read_eval_rows", "push_to_hub", "upload_plan", "export_adapter", "export_merged",
           "check_replaceable"]
