"""The "hostile files" family: what a run directory from someone else may hold, fed to the real paths.

Shared by the fault tier (tests/faults/test_hostile_files.py) and the campaign
(tools/fault_campaign.py, which reports the counts):

* :func:`metadata_corpus`: every case of tests/helpers/hostile_pickles.py as a run's DCP ``.metadata``
  (``manifest.json`` deleted), through ``export_checkpoint`` and the trainer's ``select_resume``;
* :func:`byte_entry_run`: a checkpoint whose optimizer setting or model weight is a pickled call;
* :func:`overwrite_case`: ``overwrite=true`` on a directory that is not an export;
* :func:`absolute_paths`: the machine's paths grepped in every file of an export.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from nemodiff_train import runs
from tests.helpers.hostile_pickles import build_corpus, registered_extensions

REFUSED = "nothing in the file was run"  # every refusal of the metadata unpickler says it


def poisoned_run(baseline: Path, dest: Path, data: bytes | None = None) -> Path:
    """A copy of the reference run (no export) whose checkpoints have no manifest and, given ``data``,
    that as their ``.metadata``."""
    shutil.copytree(baseline, dest, ignore=shutil.ignore_patterns("hf", "eval", "data"))  # data: bound to its run dir
    for ckpt in runs.step_dirs(dest):
        if data is not None:
            (ckpt / runs.DCP_METADATA).write_bytes(data)
        (ckpt / runs.MANIFEST).unlink()
    return dest


def metadata_corpus(baseline: Path, work: Path) -> dict:
    """Each corpus case through export and resume: counts and the cases that were not refused."""
    from nemodiff_train.engines.torch.checkpointing import CheckpointError, select_resume
    from nemodiff_train.export import export_checkpoint
    from nemodiff_train.export.errors import ExportError

    marker = work / "metadata_ran"
    cases = build_corpus(marker)
    run = poisoned_run(baseline, work / "metadata_run")
    files = [c / runs.DCP_METADATA for c in runs.step_dirs(run)]
    out = {"cases": len(cases), "live_attacks": sum(c.live for c in cases), "refused_export": 0, "refused_resume": 0,
           "ran": 0, "families": {}, "failures": []}
    with registered_extensions():
        for case in cases:
            for f in files:
                f.write_bytes(case.data)
            target = work / f"metadata_out_{case.name}"
            export_refused = resume_refused = False
            try:
                export_checkpoint(run, target)
            except ExportError as e:
                export_refused = REFUSED in str(e)
            try:
                select_resume(run)
            except CheckpointError as e:
                resume_refused = str(e).count(REFUSED) == len(files)  # each checkpoint, by name
            ran = marker.exists() or target.exists()
            out["refused_export"] += export_refused
            out["refused_resume"] += resume_refused
            out["ran"] += ran
            out["families"][case.family] = out["families"].get(case.family, 0) + 1
            if ran or not (export_refused and resume_refused):
                out["failures"].append(case.name)
            marker.unlink(missing_ok=True)
    shutil.rmtree(run, ignore_errors=True)
    return out


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def byte_entry_run(baseline: Path, dest: Path, where: str, marker: Path) -> Path:
    """A copy of the reference run whose only checkpoint (mid-stage) holds a pickled call as a byte entry:
    ``where="optim"``: the first parameter group's learning rate; ``"model"``: the final norm weight."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # loads into an empty dict

    run = poisoned_run(baseline, dest)
    ckpt, *later = runs.step_dirs(run)  # the oldest, mid-stage (its optimizer state is resumed); no newer one
    for other in later:
        shutil.rmtree(other)
    state: dict = {}
    with warnings.catch_warnings():  # our own reference checkpoint: trusted here, rewritten below
        warnings.filterwarnings("ignore")
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(ckpt)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        if where == "optim":
            state["optim"]["param_groups"][0]["lr"] = _Payload(marker)
        else:
            key = next(k for k in state["model"] if k.endswith("norm.weight"))
            state["model"][key] = _Payload(marker)
        for f in ckpt.glob("*.distcp"):
            f.unlink()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(ckpt)), no_dist=True)
    return run


def overwrite_case(baseline: Path, work: Path) -> dict:
    """``overwrite=true`` onto a user's directory: refused, and every file stays as it was."""
    from nemodiff_train.export import export_checkpoint
    from nemodiff_train.export.errors import ExportError

    mine = work / "not_an_export"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "config.json").write_text("{}")
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    try:
        export_checkpoint(baseline, mine, overwrite=True)
        refused = False
    except ExportError as e:
        refused = "is not an earlier nemodiff export" in str(e)
    after = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    return {"refused": refused, "untouched": before == after}


def absolute_paths(baseline: Path, assets: Path, work: Path) -> dict:
    """Export the reference run (remote code on) and grep every file of it and of the run's own export
    for the run's, the assets' (base model, data) and the output's absolute paths."""
    from nemodiff_train.export import export_checkpoint

    out = export_checkpoint(baseline, work / "published", remote_code=True)
    needles = {str(p) for p in (baseline, baseline.resolve(), assets, assets.resolve(), work, work.resolve())}
    files = [p for folder in (baseline / runs.EXPORT_DIR, out) for p in folder.rglob("*") if p.is_file()]
    found = [f"{needle} in {f.name}" for f in files for needle in needles if needle.encode() in f.read_bytes()]
    return {"files_checked": len(files), "paths_found": found}
