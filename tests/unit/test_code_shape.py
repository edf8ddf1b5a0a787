"""The house rules a reader relies on (docs/architecture.md): modules of at most 400 lines, and in
``engines/`` functions of at most 8 parameters and 60 lines, so a training step reads one screen at a
time. A new exception must be argued here, by name."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nemodiff_train"
MAX_MODULE_LINES = 400
MAX_PARAMETERS, MAX_FUNCTION_LINES = 8, 60


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            if names[:1] in (["self"], ["cls"]):
                names = names[1:]
            yield node.name, len(names) + bool(a.vararg) + bool(a.kwarg), node.end_lineno - node.lineno + 1


def test_modules_stay_under_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these along their seams: {long}"


def test_engine_functions_fit_a_screen():
    found = [(str(p.relative_to(PACKAGE)), name, params, lines) for p in _modules() if "engines" in p.parts
             for name, params, lines in _functions(p) if params > MAX_PARAMETERS or lines > MAX_FUNCTION_LINES]
    assert not found, f"(module, function, parameters, lines) over {MAX_PARAMETERS} / {MAX_FUNCTION_LINES}: {found}"


@pytest.mark.parametrize("source, expected", [
    ("def f(a, b, *c, d, **e):\n    pass\n", ("f", 5, 2)),
    ("class C:\n    def m(self, a):\n        return a\n", ("m", 1, 2)),
])
def test_the_measure_itself(tmp_path, source, expected):
    f = tmp_path / "m.py"
    f.write_text(source)
    assert list(_functions(f)) == [expected]
