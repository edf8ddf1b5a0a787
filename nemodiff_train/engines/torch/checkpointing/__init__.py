"""Resumable checkpoints with ``torch.distributed.checkpoint`` (DCP): atomic, verified, never silently lost.

Layout of ``<run>/checkpoints/step_00000123/`` (the names are :mod:`nemodiff_train.runs`'s):

* the DCP shards (``__<rank>_<n>.distcp``) and ``.metadata`` of ``{"model", "optim"}``;
* ``rng/rank_<r>.json``: each rank's RNG streams (torch CPU and CUDA, Python ``random``, NumPy);
* ``trainer_state.json``: step, stage, tokens, world size (plain JSON, never pickled);
* ``manifest.json``: every file above with its size (and SHA-256 when under
  :data:`~.manifest.CHECKSUM_LIMIT` bytes), the world size, and the model's identity (every
  state-dict key with its global shape and dtype);
* ``COMPLETE``, written last.

The modules, one concern each:

* :mod:`.manifest` — what a checkpoint must hold to be trusted: the trainer-state check (one
  definition, used by reading and by verifying), the manifest, the model identity,
  :func:`verify_checkpoint`;
* :mod:`.rng` — each rank's RNG streams, saved as JSON and restored on resume;
* :mod:`.save` — :func:`save_checkpoint`: a collective free-space check first (a clear error
  naming the directory and the bytes needed, before anything is written), then everything goes
  to ``step_….tmp`` and is fsynced; the directory is renamed into place only when complete, and
  only then are older checkpoints pruned to ``keep_last`` (counting and deleting only checkpoints
  that verify: one this code could not read is never deleted). A failed save (full disk, I/O
  error) removes its ``.tmp`` and leaves every earlier checkpoint untouched;
* :mod:`.resume` — :func:`select_resume` takes the newest checkpoint that verifies against this
  model — ``COMPLETE`` present, ``trainer_state.json`` readable and consistent, every manifest file
  present with its size and checksum, the same model — and names every newer one it skipped and
  why. A run directory whose checkpoints all fail is an error naming them, never a fresh start. A
  different world size is allowed: DCP reshards the model and optimizer, and the data order does
  not depend on the world size (``batches.py``); each rank's RNG streams are restored when the
  world size matches, otherwise ranks without a saved stream keep the seed's.

Loading unpickles nothing untrusted: DCP's own ``.metadata`` is a pickle, so it is read with an
unpickler restricted to DCP's metadata classes (:class:`SafeFileSystemReader`), and tensors are read
with ``weights_only`` semantics by DCP.
"""

from ....runs.dcp import CheckpointError, SafeFileSystemReader
from .manifest import model_identity, read_trainer_state, verify_checkpoint
from .resume import load_checkpoint, load_model_weights, resume_checkpoint, select_resume
from .rng import restore_rng
from .save import save_checkpoint

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_model_weights", "read_trainer_state",
           "verify_checkpoint", "select_resume", "resume_checkpoint", "model_identity", "restore_rng",
           "SafeFileSystemReader"]
