"""The restricted unpickler of DCP's ``.metadata``: exact classes only, no code of the file's author runs.

DCP writes its checkpoint index as a pickle. A pickle is a small program: its ``GLOBAL`` /
``STACK_GLOBAL`` / ``INST`` opcodes import any name, ``REDUCE`` / ``NEWOBJ`` / ``OBJ`` call it, and
``BUILD`` runs ``__setstate__``. So this unpickler (a subclass of Python's own, with its opcode table
vetted) admits:

* names: the exact ``(module, qualified name)`` pairs of :data:`ALLOWED_CLASSES`,
  :data:`ALLOWED_RECONSTRUCTORS` and :data:`ALLOWED_CONSTANTS`, resolved as one attribute of the
  module (no dotted path is ever walked, so ``torch.distributed.checkpoint.metadata`` cannot lead to
  a module it imported, such as ``os``);
* calls (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``OBJ``, ``INST``): allowed classes only, plus the
  reconstructor ``torch.serialization._get_layout`` with one string argument;
* ``BUILD``: on instances of allowed classes only;
* never: persistent ids (``PERSID`` / ``BINPERSID``) or the ``copyreg`` extension registry (``EXT1`` /
  ``EXT2`` / ``EXT4``; the C unpickler would serve those from a cache that bypasses ``find_class``).

The lists are what DCP's metadata holds in torch 2.11 to 2.13 (``Metadata`` and the dataclasses of
``torch/distributed/checkpoint/metadata.py``, ``filesystem._StorageInfo``, ``torch.Size``, the dtypes,
the layout reconstructor and the ``pathlib`` path of ``StorageMeta.checkpoint_id``); the test
``tests/unit/test_dcp_metadata_pickle.py`` checks a real save of a model and its optimizer needs
nothing else.
"""

from __future__ import annotations

import importlib
import io
import pickle

import torch

from . import DCP_METADATA

__all__ = ["UnsafeCheckpointError", "ALLOWED_CLASSES", "ALLOWED_RECONSTRUCTORS", "ALLOWED_CONSTANTS",
           "load_dcp_metadata_pickle"]

_DCP_MD = "torch.distributed.checkpoint.metadata"
_PATHS = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")

ALLOWED_CLASSES: frozenset[tuple[str, str]] = frozenset({
    (_DCP_MD, "Metadata"), (_DCP_MD, "MetadataIndex"), (_DCP_MD, "StorageMeta"), (_DCP_MD, "TensorProperties"),
    (_DCP_MD, "TensorStorageMetadata"), (_DCP_MD, "BytesStorageMetadata"), (_DCP_MD, "ChunkStorageMetadata"),
    (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    *(("pathlib", p) for p in _PATHS), *(("pathlib._local", p) for p in _PATHS),  # Python 3.13 names them so
})
"""Classes the file may name and instantiate."""

ALLOWED_RECONSTRUCTORS: frozenset[tuple[str, str]] = frozenset({("torch.serialization", "_get_layout")})
"""Functions the file may call, each with one string argument (``_get_layout("torch.strided")``)."""

ALLOWED_CONSTANTS: frozenset[tuple[str, str]] = frozenset(
    ("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))
"""Objects the file may name but never call: the ``torch`` dtypes (``torch.bfloat16``, ...)."""

_ALLOWED_NAMES = ALLOWED_CLASSES | ALLOWED_RECONSTRUCTORS | ALLOWED_CONSTANTS


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asks to import or call something a checkpoint never needs (refused; nothing ran)."""


def _resolve(module: str, name: str):
    return getattr(importlib.import_module(module), name)


class _RestrictedUnpickler(pickle._Unpickler):  # the Python implementation: its opcode table can be vetted
    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where
        self._classes = {id(c): c for c in (_resolve(m, n) for m, n in ALLOWED_CLASSES if _importable(m))}
        self._reconstructors = {id(_resolve(m, n)) for m, n in ALLOWED_RECONSTRUCTORS}

    def refuse(self, what: str):
        raise UnsafeCheckpointError(f"{self.where}: refusing {what} (DCP metadata may only build the classes "
                                    "listed in nemodiff_train/runs/safe_pickle.py; nothing in the file was run)")

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_NAMES:
            self.refuse(f"to import {module}.{name}")
        return _resolve(module, name)  # one attribute of the module: no dotted path is walked

    def persistent_load(self, pid):
        self.refuse(f"persistent id {pid!r}")

    def _check_class(self, obj, opcode: str):
        if not (isinstance(obj, type) and self._classes.get(id(obj)) is obj):
            self.refuse(f"{opcode} of {_describe(obj)}, which is not an allowed class")

    def _reduce(self):
        func, args = self.stack[-2], self.stack[-1]
        if id(func) in self._reconstructors:
            if not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], str)):
                self.refuse(f"REDUCE of {_describe(func)} with arguments other than one string")
        else:
            self._check_class(func, "REDUCE")
        pickle._Unpickler.load_reduce(self)

    def _newobj(self):
        self._check_class(self.stack[-2], "NEWOBJ")
        pickle._Unpickler.load_newobj(self)

    def _newobj_ex(self):
        self._check_class(self.stack[-3], "NEWOBJ_EX")
        pickle._Unpickler.load_newobj_ex(self)

    def _instantiate(self, klass, args):  # INST and OBJ
        self._check_class(klass, "INST/OBJ")
        super()._instantiate(klass, args)

    def _build(self):
        inst = self.stack[-2]
        if self._classes.get(id(type(inst))) is not type(inst):
            self.refuse(f"BUILD (setting the state) of a {_describe(type(inst))} object")
        pickle._Unpickler.load_build(self)

    def _extension(self):
        self.refuse("a copyreg extension-registry code (EXT1/EXT2/EXT4)")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.NEWOBJ[0]] = _newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _newobj_ex
    dispatch[pickle.BUILD[0]] = _build
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _extension
    del _op


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:  # pathlib._local exists from Python 3.13 on
        return False


def _describe(obj) -> str:
    if isinstance(obj, type) or callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    return f"a {type(obj).__name__}"


def load_dcp_metadata_pickle(data: bytes, where: str = DCP_METADATA):
    """Unpickle DCP metadata bytes with the restricted unpickler (``where`` names the file in errors).

    Raises:
        UnsafeCheckpointError: the pickle names or calls something outside the allow-lists.
        pickle.UnpicklingError, EOFError, ...: a garbled file.
    """
    return _RestrictedUnpickler(data, where).load()
