"""A corpus of hostile DCP ``.metadata`` pickles, hand-built from pickle opcodes.

Each case would create ``marker`` if it ran (a ``touch``, ``torch.save`` or ``Path.touch`` of it): a
test that loads the case through the package and then finds no marker proves that nothing ran.
``live`` cases do create the marker when loaded with plain :func:`pickle.loads` (tested, so the corpus
is made of working attacks, not of typos); the others are refused shapes that need more than
``pickle.loads`` to run (a persistent-id hook, or a call chain the unrestricted unpickler breaks on).

The extension-registry cases use :data:`EXT_CODES`, registered by :func:`registered_extensions` to
functions that run a shell command while a test runs, so refusing them does not depend on an empty registry.
"""

from __future__ import annotations

import contextlib
import copyreg
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

MD = "torch.distributed.checkpoint.metadata"
FS = "torch.distributed.checkpoint.filesystem"
EXT_CODES = {"EXT1": 0xC9, "EXT2": 0x9D09, "EXT4": 0x6B6D49}  # 1, 2 and 4 bytes wide
# what each code stands for while registered_extensions() is active: one code per (module, name) pair
EXT_TARGETS = {"EXT1": ("os", "system"), "EXT2": ("posix", "system"), "EXT4": ("subprocess", "getoutput")}


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    live: bool  # plain pickle.loads creates the marker
    family: str


def _proto(n: int) -> bytes:
    return pickle.PROTO + bytes([n]) if n >= 2 else b""


def _s(text: str, proto: int) -> bytes:
    """Push a str: UNICODE (protocol 0), BINUNICODE (1 to 3), SHORT_BINUNICODE (4+)."""
    raw = text.encode()
    if proto == 0:
        return pickle.UNICODE + text.encode("raw-unicode-escape") + b"\n"
    if proto < 4:
        return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def _global(module: str, name: str, proto: int) -> bytes:
    if proto >= 4:
        return _s(module, proto) + _s(name, proto) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"


def _tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _call(module: str, name: str, *args: bytes, proto: int = 4) -> bytes:
    """``module.name(*args)`` (GLOBAL/STACK_GLOBAL + REDUCE), without PROTO and STOP."""
    return _global(module, name, proto) + _tuple(*args) + pickle.REDUCE


def _program(body: bytes, proto: int = 4) -> bytes:
    return _proto(proto) + body + pickle.STOP


def build_corpus(marker: Path) -> list[Case]:
    """Every hostile case, each aimed at creating ``marker``."""
    cmd = f"touch {marker}"
    code = f"import os; os.system({cmd!r})"
    cases: list[Case] = []

    def add(name, data, live, family):
        cases.append(Case(name, data, live, family))

    # 1. GLOBAL os.system with protocols 0 to 5 (STACK_GLOBAL from 4 on, plain GLOBAL as well)
    for p in range(6):
        body = pickle.GLOBAL + b"os\nsystem\n" + _tuple(_s(cmd, p)) + pickle.REDUCE
        add(f"global_os_system_proto{p}", _program(body, p), True, "global")
    for p in (4, 5):
        add(f"stack_global_os_system_proto{p}", _program(_call("os", "system", _s(cmd, p), proto=p), p), True, "global")
    add("global_py2_builtin_eval_proto0", _program(pickle.GLOBAL + b"__builtin__\nexec\n" + _tuple(_s(code, 0))
                                                   + pickle.REDUCE, 0), True, "global")
    add("global_builtins_exec_proto2", _program(_call("builtins", "exec", _s(code, 2), proto=2), 2), True, "global")

    # 2. dotted names through every allowed module (protocol 4 resolves "a.b.c" attribute by attribute)
    for module, path in ((MD, "os.system"), (FS, "os.system"), ("torch", "os.system"),
                         ("torch.serialization", "os.system"), ("pathlib", "os.system")):
        add(f"dotted_{module.replace('.', '_')}__{path.replace('.', '_')}",
            _program(_call(module, path, _s(cmd, 4))), True, "dotted")
    # through an allowed module's function or an allowed class: builtins.exec via __builtins__.get
    for module, path in (("collections", "namedtuple.__builtins__.get"), (MD, "StorageMeta.__init__.__builtins__.get"),
                         ("torch.serialization", "_get_layout.__builtins__.get")):
        body = _call(module, path, _s("exec", 4)) + _tuple(_s(code, 4)) + pickle.REDUCE
        add(f"dotted_{module.split('.')[-1]}__{path.split('.')[0]}_builtins_exec", _program(body), True, "dotted")
    add("dotted_allowed_class_method_PosixPath_touch",
        _program(_call("pathlib", "PosixPath.touch", _call("pathlib", "PosixPath", _s(str(marker), 4)))), True, "dotted")
    add("dotted_torch_Size_class_mro", _program(_call("torch", "Size.__class__.__call__", _s("x", 4))), False, "dotted")

    # 3. functions (and non-class names) that live in allowed modules
    add("function_torch_save", _program(_call("torch", "save", _s("x", 4), _s(str(marker), 4))), True, "function")
    add("function_torch_serialization_save",
        _program(_call("torch.serialization", "save", _s("x", 4), _s(str(marker), 4))), True, "function")
    add("class_not_listed_pathlib_Path",
        _program(_global("pathlib", "Path", 4) + pickle.EMPTY_TUPLE + pickle.REDUCE), False, "function")
    add("function_torch_load", _program(_call("torch", "load", _s(str(marker), 4))), False, "function")
    add("function_collections_namedtuple", _program(_call("collections", "namedtuple", _s("T", 4), _s("a", 4))),
        False, "function")
    add("function_metadata_field", _program(_call(MD, "field")), False, "function")
    add("reconstructor_get_layout_non_string",
        _program(_global("torch.serialization", "_get_layout", 4) + _tuple(pickle.NONE) + pickle.REDUCE), False,
        "function")
    add("constant_dtype_called", _program(_call("torch", "float32", _s("x", 4))), False, "function")

    # 4. INST / OBJ / NEWOBJ / NEWOBJ_EX / BUILD on refused classes (or allowed names that are no class)
    add("inst_os_system_proto0", _program(pickle.MARK + _s(cmd, 0) + pickle.INST + b"os\nsystem\n", 0), True, "opcode")
    add("obj_os_system_proto1", _program(pickle.MARK + _global("os", "system", 1) + _s(cmd, 1) + pickle.OBJ, 1), True,
        "opcode")
    add("inst_allowed_dtype_constant", _program(pickle.MARK + _s("x", 0) + pickle.INST + b"torch\nfloat32\n", 0),
        False, "opcode")
    add("obj_allowed_reconstructor",
        _program(pickle.MARK + _global("torch.serialization", "_get_layout", 2) + pickle.NONE + pickle.OBJ, 2), False,
        "opcode")
    add("newobj_subprocess_Popen",
        _program(_global("subprocess", "Popen", 4) + _tuple(_s(cmd, 4)) + pickle.NEWOBJ), False, "opcode")
    add("newobj_allowed_reconstructor",
        _program(_global("torch.serialization", "_get_layout", 4) + pickle.EMPTY_TUPLE + pickle.NEWOBJ), False, "opcode")
    add("newobj_ex_os_wrap_close",
        _program(_global("os", "_wrap_close", 4) + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT + pickle.NEWOBJ_EX), False,
        "opcode")
    add("newobj_ex_allowed_constant",
        _program(_global("torch", "int64", 4) + pickle.EMPTY_TUPLE + pickle.EMPTY_DICT + pickle.NEWOBJ_EX), False,
        "opcode")
    add("build_on_refused_class",
        _program(_global("argparse", "Namespace", 4) + pickle.EMPTY_TUPLE + pickle.NEWOBJ + pickle.EMPTY_DICT
                 + pickle.BUILD), False, "opcode")
    add("build_on_a_dict", _program(pickle.EMPTY_DICT + pickle.EMPTY_DICT + pickle.BUILD), False, "opcode")

    # 5. persistent ids and the copyreg extension registry
    add("persid", _program(pickle.PERSID + b"os.system\n", 0), False, "registry")
    add("binpersid", _program(_s(cmd, 4) + pickle.BINPERSID), False, "registry")
    for op, width, fmt in ((pickle.EXT1, "EXT1", "<B"), (pickle.EXT2, "EXT2", "<H"), (pickle.EXT4, "EXT4", "<i")):
        body = op + struct.pack(fmt, EXT_CODES[width]) + _tuple(_s(cmd, 2)) + pickle.REDUCE
        add(f"extension_{width.lower()}_os_system", _program(body, 2), True, "registry")

    # 6. an attack inside an otherwise well-formed Metadata (what a tampered checkpoint looks like)
    for p in (2, 5):
        add(f"embedded_in_metadata_proto{p}", _embedded(cmd, p), True, "embedded")
    return cases


def _embedded(cmd: str, proto: int) -> bytes:
    """Real DCP ``Metadata`` whose ``storage_meta`` is replaced by ``os.system(cmd)``."""
    import os

    from torch.distributed.checkpoint.metadata import Metadata

    class Evil:
        def __reduce__(self):
            return (os.system, (cmd,))

    return pickle.dumps(Metadata(state_dict_metadata={}, storage_data={}, storage_meta=Evil()), protocol=proto)


@contextlib.contextmanager
def registered_extensions():
    """Register :data:`EXT_CODES` to :data:`EXT_TARGETS` (as a process that used copyreg might have)."""
    added = []
    try:
        for width, code in EXT_CODES.items():
            copyreg.add_extension(*EXT_TARGETS[width], code)
            added.append((*EXT_TARGETS[width], code))
        yield
    finally:
        for module, name, code in added:
            copyreg.remove_extension(module, name, code)
