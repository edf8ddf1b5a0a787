"""The package's layers, checked by parsing every import (lazy ones inside functions included) with ``ast``.

* the engines are siblings: ``engines/torch`` and ``engines/megatron`` never import each other;
* the engines only train: they import no ``eval/``, ``export/``, ``bench/``, ``cli/`` or ``orchestrate``;
* ``export/``, ``eval/`` and ``bench/`` import no engine, no ``cli/``, no ``orchestrate`` (``orchestrate``
  composes them; ``cli/`` is the top) and none of each other: what they share (loading an export,
  the stop set, the timing protocol, the task registry) sits below them;
* the third-party ``megatron`` packages are imported only inside ``engines/megatron``;
* the lower layers (``core/``, ``decoding/``, ``models/``, ``data/``, ``runs/``, ``config/``,
  ``tasks/``, ``timing``) import nothing above them;
* ``core/`` and ``decoding/`` are pure PyTorch: no transformers, no ``torch.distributed``, and no
  other package layer (``decoding/`` reaches models only through its ``CachedLM`` interface).

The package also has no import cycle (lazy imports included): its import graph is checked for one.
The checkers themselves are tested on synthetic sources, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "nemodiff_train"
ROOT = Path(__file__).resolve().parents[2] / PKG

ENGINES = (f"{PKG}.engines.torch", f"{PKG}.engines.megatron")
SIBLINGS = (f"{PKG}.eval", f"{PKG}.export", f"{PKG}.bench")  # above the engines, beside each other
ABOVE_ENGINES = (*SIBLINGS, f"{PKG}.cli", f"{PKG}.orchestrate")
LOWER = ("core", "decoding", "models", "data", "runs", "config", "tasks", "timing")
PURE_TORCH_FORBIDDEN = ("transformers", "torch.distributed")
TOP = (f"{PKG}.cli", f"{PKG}.orchestrate")

# (modules the rule applies to, imports they may not make, imports allowed although matched)
RULES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    (ENGINES[0], (ENGINES[1],), ()),
    (ENGINES[1], (ENGINES[0],), ()),
    (f"{PKG}.engines", ABOVE_ENGINES, ()),
    *[(s, (f"{PKG}.engines", *TOP, *(o for o in SIBLINGS if o != s)), ()) for s in SIBLINGS],
    *[(layer, ("megatron",), ()) for layer in (ENGINES[0], *ABOVE_ENGINES, *(f"{PKG}.{m}" for m in LOWER))],
    *[(f"{PKG}.{layer}", (f"{PKG}.engines", *ABOVE_ENGINES), ()) for layer in LOWER],
    (f"{PKG}.core", PURE_TORCH_FORBIDDEN + (f"{PKG}.",), (f"{PKG}.core",)),
    (f"{PKG}.decoding", PURE_TORCH_FORBIDDEN + (f"{PKG}.",), (f"{PKG}.decoding",)),
]


def _within(name: str, prefix: str) -> bool:
    """``name`` is the module ``prefix`` or inside it (a trailing dot matches any submodule)."""
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source``, the module being ``module``.

    ``from . import x`` counts as importing ``<package>.x`` (it may be a submodule), so a relative
    import of a sibling layer is caught like an absolute one.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            if node.module is None:  # `from .. import eval`: the names may be modules
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every import of ``source`` (as module ``module``) that a rule forbids, as readable lines."""
    out = []
    for line, target in imports_of(source, module, is_package):
        for applies, forbidden, allowed in RULES:
            if not _within(module, applies):
                continue
            if any(_within(target, f) for f in forbidden) and not any(_within(target, a) for a in allowed):
                out.append(f"{module}:{line} imports {target} (rule: {applies} must not import {forbidden})")
    return out


def _package_modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield path, ".".join(parts), is_package


def test_the_package_respects_its_layers():
    found = []
    for path, module, is_package in _package_modules():
        found += violations(path.read_text(), module, is_package)
    assert not found, "layer violations:\n" + "\n".join(found)


def test_every_layer_is_checked():
    """The rules name real packages (a renamed layer would silently drop its rule)."""
    modules = {m for _, m, _ in _package_modules()}
    for applies, _, _ in RULES:
        assert any(_within(m, applies) for m in modules), applies


@pytest.mark.parametrize("module, source", [
    (f"{PKG}.engines.torch.trainer", "from ..megatron.train import run"),
    (f"{PKG}.engines.megatron.data", "from ...engines.torch.batches import collate"),
    (f"{PKG}.engines.torch.trainer", "def f():\n    from ...export import export_checkpoint\n"),
    (f"{PKG}.engines.megatron.train", "from ... import eval"),
    (f"{PKG}.export.writer", "import nemodiff_train.engines.megatron.export"),
    (f"{PKG}.eval.runner", "from ..engines.torch import setup"),
    (f"{PKG}.core.losses", "import torch.distributed as dist"),
    (f"{PKG}.decoding.ar", "from transformers import AutoModel"),
    (f"{PKG}.decoding.ar", "from ..models.cached import HFCachedLM"),
    (f"{PKG}.models.hf", "from ..orchestrate import train"),
    (f"{PKG}.eval.lm_eval_plugin", "from ..cli._console import quiet_libraries"),
    (f"{PKG}.orchestrate", "def f():\n    import megatron.bridge\n"),
    (f"{PKG}.export.writer", "from megatron.core import parallel_state"),
    (f"{PKG}.export.writer", "def f():\n    from ..eval.loading import resolve_model_dir\n"),
    (f"{PKG}.eval.loading", "from ..export.adapter import load_adapter_export"),
    (f"{PKG}.eval.runner", "from ..bench.protocol import run_interleaved"),
    (f"{PKG}.bench.runner", "from ..eval import tasks"),
    (f"{PKG}.bench.runner", "from ..export.writer import export_dlm"),
    (f"{PKG}.tasks.scoring", "from ..eval.report import print_table"),
    (f"{PKG}.timing", "from .bench import runner"),
])
def test_the_checker_catches_a_violation(module, source):
    assert violations(source, module), f"{source!r} in {module} should be refused"


@pytest.mark.parametrize("module, source", [
    (f"{PKG}.engines.torch.trainer", "from ...core.losses import joint_loss_parts\nfrom .. import TrainOutcome"),
    (f"{PKG}.engines.megatron.train", "from ... import runs\nfrom ...data.prepare import prepare"),
    (f"{PKG}.export.writer", "from .. import runs\nfrom ..models.stop_tokens import stop_token_ids"),
    (f"{PKG}.bench.runner", "from ..timing import run_interleaved\nfrom ..tasks import get_task"),
    (f"{PKG}.eval.runner", "from ..models.loading import load_for_decoding\nfrom ..timing import TimedRun"),
    (f"{PKG}.core.noising", "from .masks import document_positions\nimport torch"),
    (f"{PKG}.decoding.ar", "from .interface import CachedLM"),
    (f"{PKG}.orchestrate", "from .engines.megatron.train import run\nfrom .export import export_checkpoint"),
    (f"{PKG}.engines.megatron.model", "from megatron.bridge import AutoBridge"),
    (f"{PKG}.cli.lm_eval", "from ._console import quiet_libraries"),
])
def test_the_checker_allows_legitimate_imports(module, source):
    assert violations(source, module) == []


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (lazy imports included), from ``{module: (source, is_package)}``.

    An import names the deepest module of ``sources`` it reaches (``from .x import f`` → ``x``). Edges to
    the module's own enclosing packages are left out: Python imports those before the module anyway.
    """
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, (source, is_package) in sources.items():
        for _, target in imports_of(source, module, is_package):
            while target and target not in sources:
                target = target.rpartition(".")[0]
            if target and target != module and not _within(module, target):
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_package_has_no_import_cycle():
    sources = {module: (path.read_text(), is_package) for path, module, is_package in _package_modules()}
    graph = import_graph(sources)
    assert sum(map(len, graph.values())) > 100  # the graph was built (a broken resolver gives no edges)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_lazy_cycle_and_ignores_parent_packages():
    p = f"{PKG}.export"
    sources = {p: ("from .writer import export_dlm", True),
               f"{p}.writer": ("from . import errors\ndef f():\n    from .adapter import export_adapter\n", False),
               f"{p}.adapter": ("from .writer import export_dlm", False),
               f"{p}.errors": ("", False)}
    graph = import_graph(sources)
    assert graph[f"{p}.writer"] == {f"{p}.errors", f"{p}.adapter"}  # `from . import errors`: not the package
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and sorted(cycle[1:]) == [f"{p}.adapter", f"{p}.writer"]
    sources[f"{p}.adapter"] = ("from .errors import ExportError", False)
    assert find_cycle(import_graph(sources)) is None
