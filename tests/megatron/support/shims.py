"""Import shims that let megatron-core 0.19.2 / megatron-bridge 0.6.2 import WITHOUT Transformer Engine,
nvidia-modelopt, nvidia-resiliency-ext and on transformers newer than the bridge pins (<= 5.12.1).

Used ONLY by the tests (``tests/megatron/conftest.py``, :func:`tests.megatron.support.import_megatron`); never by the package
(``nemodiff_train.engines.megatron`` runs unchanged in a full NeMo container, where none of this is needed).

Nothing here creates a real package on ``sys.path`` or in ``sys.modules``. An import hook hands a
stand-in to a NAMED importing module for a NAMED missing package, and only after the real import failed.
Modules that guard an import with
``try: import transformer_engine ... except ImportError: HAVE_TE = False`` never get a stand-in, so
megatron-core's availability flags stay honest (``HAVE_TE`` is False).

Rules (found by importing the wheels on Python 3.11 / transformers 5.24, CPU):

* ``transformer_engine``: unguarded in a few bridge modules (LoRA layers, some model bridges).
* ``modelopt``: distillation / modelopt-state hooks in ``megatron.bridge.training.*``; the stand-in
  behaves like modelopt does for a model that is not a ``DistillationModel``.
* ``nvidia_resiliency_ext``: a type hint in ``training/pretrain.py``.
* ``megatron.energon`` / ``datasets``: multimodal and SFT data modules (stand-in only when missing).
* ``transformers`` names the bridge's bundled remote-code models import but newer transformers
  removed (e.g. ``transformers.modeling_attn_mask_utils``): a module proxy that returns the real
  attribute where it exists and a stand-in otherwise. Only ``megatron.bridge.*`` importers get it.
* ``typing.override`` (3.12+) used by ``megatron.training``: ``typing_extensions.override``.
* ``compile_helpers`` in ``megatron.bridge.training.initialize`` runs ``make``, which a wheel cannot
  do: replaced by an import check of the prebuilt ``helpers_cpp`` extension.
"""

from __future__ import annotations

import builtins
import importlib
import sys
import types
import typing

__all__ = ["install", "report", "patch_after_import", "USED"]

# importer module name prefix -> package prefixes it may get a stand-in for (after a failed import)
PREFIX_RULES: dict[str, tuple[str, ...]] = {
    "megatron.bridge.": ("transformer_engine", "modelopt", "nvidia_resiliency_ext", "megatron.energon", "datasets"),
    "megatron.training.": ("modelopt", "nvidia_resiliency_ext"),
}
# guarded imports that re-raise (the module is unusable without the package): stand in anyway
FORCE_RULES: dict[str, tuple[str, ...]] = {
    "megatron.bridge.training.post_training.checkpointing": ("modelopt",),  # has_modelopt_state() on export
}
TRANSFORMERS_IMPORTERS = ("megatron.bridge.",)

USED: list[tuple[str, str]] = []
_installed = False
_real_import = builtins.__import__


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    m.__nemodiff_shim__ = True
    return m


def _modelopt_tree() -> dict[str, types.ModuleType]:
    class DistillationModel:  # nothing is ever an instance of this
        pass

    def _none(*args, **kwargs):
        return None

    plugins_megatron = _module("modelopt.torch.distill.plugins.megatron",
                               get_tensor_shapes_adjust_fn_for_distillation=_none,
                               DistillationConfig=type("DistillationConfig", (), {}))
    distill_plugins = _module("modelopt.torch.distill.plugins", megatron=plugins_megatron)
    distill = _module("modelopt.torch.distill", DistillationModel=DistillationModel, plugins=distill_plugins)
    opt_plugins = _module("modelopt.torch.opt.plugins", restore_modelopt_state=_none, save_modelopt_state=_none,
                          save_sharded_modelopt_state=_none, restore_sharded_modelopt_state=_none)
    opt = _module("modelopt.torch.opt", plugins=opt_plugins)
    torch_ = _module("modelopt.torch", distill=distill, opt=opt)
    root = _module("modelopt", torch=torch_, __version__="0.0.0+nemodiff_shim")
    return {m.__name__: m for m in (root, torch_, distill, distill_plugins, plugins_megatron, opt, opt_plugins)}


def _nvrx_tree() -> dict[str, types.ModuleType]:
    class CallWrapper:  # only a type hint; in-process restart is off
        iteration = 0

    inprocess = _module("nvidia_resiliency_ext.inprocess", CallWrapper=CallWrapper)
    root = _module("nvidia_resiliency_ext", inprocess=inprocess, __version__="0.0.0+nemodiff_shim")
    return {"nvidia_resiliency_ext": root, "nvidia_resiliency_ext.inprocess": inprocess}


class _SinkMeta(type):
    def __getattr__(cls, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _sink(f"{cls.__qualname__}.{item}")


def _sink(name: str) -> type:
    """A stand-in symbol: a class (so it can be called, subclassed, decorated with, and has a
    ``__name__``) whose attributes and call results are stand-ins too. Never does anything."""

    def _init(self, *args, **kwargs):
        pass

    def _getattr(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _sink(f"{name}.{item}")

    def _call(self, *args, **kwargs):
        return _sink(f"{name}()")

    short = name.rsplit(".", 1)[-1].strip("()[]") or "stand_in"
    return _SinkMeta(short, (), {"__init__": _init, "__getattr__": _getattr, "__call__": _call,
                                 "__qualname__": name, "__module__": "nemodiff_shim"})


def _stand_in(name: str, fromlist):
    top = name.split(".")[0]
    if top in ("modelopt", "nvidia_resiliency_ext"):
        tree = _modelopt_tree() if top == "modelopt" else _nvrx_tree()
        if name not in tree:
            return _sink_module(name)
        return tree[name] if fromlist else tree[top]
    if not fromlist and top == "megatron":
        raise ImportError("the shim never stands in for the `megatron` namespace")
    return _sink_module(name)


def _sink_module(name: str) -> types.ModuleType:
    class _M(types.ModuleType):
        def __getattr__(self, item):
            if item.startswith("__"):
                raise AttributeError(item)
            return _sink(f"{name}.{item}")

    m = _M(name)
    m.__nemodiff_shim__ = True
    return m


class _ProxyModule(types.ModuleType):
    """A real module whose missing attributes are stand-ins (for names newer transformers removed)."""

    def __init__(self, real: types.ModuleType, importer: str):
        super().__init__(real.__name__)
        self.__dict__["_real"] = real
        self.__dict__["_importer"] = importer

    def __getattr__(self, item):
        real = self.__dict__["_real"]
        try:
            return getattr(real, item)
        except AttributeError:
            USED.append((self.__dict__["_importer"], f"{real.__name__}.{item}"))
            return _sink(f"{real.__name__}.{item}")


def _wanted(importer: str | None, name: str) -> bool:
    if not importer:
        return False
    if any(name == p or name.startswith(p + ".") for p in FORCE_RULES.get(importer, ())):
        return True
    for prefix, pkgs in PREFIX_RULES.items():
        if importer.startswith(prefix):
            for p in pkgs:
                if name == p or name.startswith(p + "."):
                    return True
    return False


_GUARDED_LINES: dict[str, set[int]] = {}


def _guarded(filename: str | None, lineno: int) -> bool:
    """True when line ``lineno`` of ``filename`` sits inside a ``try:`` body (a guarded import: the
    module handles the ImportError itself, e.g. sets ``HAVE_TE = False``; it must see the truth)."""
    if not filename:
        return False
    if filename not in _GUARDED_LINES:
        import ast

        lines: set[int] = set()
        try:
            with open(filename, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Try) and node.body:
                    lines.update(range(node.body[0].lineno, node.body[-1].end_lineno + 1))
        except (OSError, SyntaxError, ValueError):
            pass
        _GUARDED_LINES[filename] = lines
    return lineno in _GUARDED_LINES[filename]


def _hook(name, globals=None, locals=None, fromlist=(), level=0):
    importer = globals.get("__name__") if isinstance(globals, dict) else None
    if level == 0 and importer and _wanted(importer, name):
        try:
            return _real_import(name, globals, locals, fromlist, level)
        except ImportError:
            caller = sys._getframe(1)
            forced = any(name == p or name.startswith(p + ".") for p in FORCE_RULES.get(importer, ()))
            if not forced and _guarded(globals.get("__file__"), caller.f_lineno):
                raise
            USED.append((importer, name))
            return _stand_in(name, fromlist)
    if (level == 0 and fromlist and importer and name.startswith("transformers")
            and importer.startswith(TRANSFORMERS_IMPORTERS)):
        try:
            mod = _real_import(name, globals, locals, fromlist, level)
        except ImportError:
            USED.append((importer, name))
            return _sink_module(name)
        if all(hasattr(mod, n) for n in fromlist if n != "*"):
            return mod
        return _ProxyModule(mod, importer)
    return _real_import(name, globals, locals, fromlist, level)


def install() -> None:
    """Install the import hook and the ``typing.override`` back-port (idempotent)."""
    global _installed
    if _installed:
        return
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
        USED.append(("typing", "override -> typing_extensions.override"))
    builtins.__import__ = _hook
    _installed = True


def patch_after_import() -> None:
    """Patches that need megatron imported: ``compile_helpers`` -> prebuilt ``helpers_cpp`` check."""
    init = importlib.import_module("megatron.bridge.training.initialize")

    def _compile_helpers_prebuilt():
        from megatron.core.datasets import helpers_cpp  # noqa: F401

    init.compile_helpers = _compile_helpers_prebuilt


def report(prefix: str = "MEGATRON_SHIMS") -> list[str]:
    """One line per (importer, stand-in) pair actually handed out."""
    seen: list[tuple[str, str]] = []
    for pair in USED:
        if pair not in seen:
            seen.append(pair)
    if not seen:
        return [f"{prefix}: none used"]
    return [f"{prefix}: {name} -> stand-in for {importer}" for importer, name in seen]


if __name__ == "__main__":  # import check: python -m tests.megatron.support.shims
    install()
    for m in sys.argv[1:] or ["megatron.core", "megatron.bridge", "megatron.bridge.training.pretrain",
                              "megatron.bridge.training.config", "megatron.bridge.models.conversion.auto_bridge"]:
        importlib.import_module(m)
        print("OK", m)
    patch_after_import()
    print("\n".join(report()))
