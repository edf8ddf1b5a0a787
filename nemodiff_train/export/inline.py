"""Inline a package's source into one flat module: what ``modeling_nemodiff.py`` is built from (:mod:`.remote_code`).

The modules reachable from an entry module through relative imports are concatenated in dependency
order, their relative imports, ``__future__`` imports, module docstrings and ``__all__`` lists removed
and their absolute imports hoisted (merged by :func:`merge_imports`). A module that imports outside its
allowed roots, a relative import inside a function, or two modules defining the same name is refused
with an :class:`~nemodiff_train.export.errors.ExportError`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from .errors import ExportError

__all__ = ["ADAPTER_ROOTS", "ALLOWED_ROOTS", "DECODING_DIR", "MODELS_DIR", "defined_names", "inline_decoding",
           "inline_package", "merge_imports"]

DECODING_DIR = Path(__file__).resolve().parents[1] / "decoding"
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
ALLOWED_ROOTS = frozenset(sys.stdlib_module_names) | {"torch"}
ADAPTER_ROOTS = ALLOWED_ROOTS | {"transformers"}  # the model adapter may use transformers (remote code has it)


def _module_source(package: Path, name: str) -> str:
    file = package / f"{name}.py"
    if not file.is_file():
        raise ExportError(f"remote_code: decoding module {file} not found")
    return file.read_text()


def _dependency_order(package: Path, entry: str = "__init__", allowed: frozenset = ALLOWED_ROOTS) -> list[str]:
    """Modules reachable from ``entry`` by relative imports, dependencies first."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ExportError(f"remote_code: import cycle through {package / name}.py")
        visiting.add(name)
        tree = ast.parse(_module_source(package, name))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                where = f"{package / name}.py line {node.lineno}"
                if node.level > 1 or node.module is None:
                    raise ExportError(f"remote_code: {where}: only 'from .module import name' can be inlined")
                if id(node) not in top:
                    raise ExportError(f"remote_code: {where}: relative import inside a function cannot be inlined")
                visit(node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                roots = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) \
                    else [(node.module or "").split(".")[0]]
                bad = [r for r in roots if r not in allowed]
                if bad:
                    raise ExportError(f"remote_code: {package / name}.py line {node.lineno} imports {bad[0]!r}; "
                                      f"{package.name} modules may import only {_allowed_text(allowed)}")
        visiting.discard(name)
        order.append(name)

    visit(entry)
    return order


def _allowed_text(allowed: frozenset) -> str:
    extra = sorted(allowed - frozenset(sys.stdlib_module_names))
    return " and ".join(extra) + " and the standard library" if extra else "the standard library"


def defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def inline_decoding(package: Path = DECODING_DIR) -> tuple[list[str], str, list[str]]:
    """The decoding package as one flat module (see :func:`inline_package`; torch and stdlib only)."""
    imports, body, modules = inline_package(package, label="decoding")
    return merge_imports(imports), body, modules


def inline_package(package: Path, entry: str = "__init__", allowed: frozenset = ALLOWED_ROOTS,
                   label: str | None = None):
    """The modules of ``package`` reachable from ``entry`` as one flat module.

    Returns:
        ``(imports, body, modules)``: the hoisted absolute import nodes, the concatenated code and the
        inlined module names in order.
    Raises:
        ExportError: a module imports something outside ``allowed``, or two modules define the
            same top-level name (they would overwrite each other in one namespace).
    """
    label = label or package.name  # the folder name messages and section comments show
    modules = _dependency_order(package, entry, allowed)
    imports: list[ast.Import | ast.ImportFrom] = []
    parts: list[str] = []
    owner: dict[str, str] = {}
    for name in modules:
        src = _module_source(package, name)
        tree = ast.parse(src)
        lines = src.splitlines()
        drop: set[int] = set()  # 0-based line numbers
        replace: dict[int, list[str]] = {}
        for i, node in enumerate(tree.body):
            span = range(node.lineno - 1, node.end_lineno)
            if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str):
                drop.update(span)  # module docstring
            elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
                drop.update(span)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                drop.update(span)
                aliases = [f"{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
                if aliases:
                    replace[node.lineno - 1] = aliases
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                drop.update(span)
                imports.append(node)
            elif any(n == "__all__" for n in defined_names(node)):
                drop.update(span)
            else:
                for defined in defined_names(node):
                    if defined in owner and owner[defined] != name:
                        raise ExportError(f"remote_code: {defined!r} is defined in both {label}/{owner[defined]}.py "
                                          f"and {label}/{name}.py; they cannot share the inlined namespace")
                    owner[defined] = name
        kept = []
        for n, line in enumerate(lines):
            if n in replace:
                kept.extend(replace[n])
            if n not in drop:
                kept.append(line)
        body = "\n".join(kept).strip("\n")
        parts.append(f"# {'-' * 96}\n# inlined from nemodiff_train/{label}/{name}.py\n# {'-' * 96}\n\n{body}\n")
    return imports, "\n\n".join(parts), modules


def merge_imports(nodes: list[ast.Import | ast.ImportFrom]) -> list[str]:
    """One ``import`` line per module, names merged in first-seen order (``from typing import Any, Literal``)."""
    plain: list[str] = []
    from_names: dict[str, list[str]] = {}
    for node in nodes:
        names = [a.name if not a.asname else f"{a.name} as {a.asname}" for a in node.names]
        if isinstance(node, ast.Import):
            plain.extend(n for n in names if n not in plain)
        else:
            bucket = from_names.setdefault(node.module, [])
            bucket.extend(n for n in names if n not in bucket)
    return [f"import {n}" for n in plain] + [f"from {m} import {', '.join(ns)}" for m, ns in from_names.items()]
