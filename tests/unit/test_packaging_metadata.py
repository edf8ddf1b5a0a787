"""pyproject.toml's version ranges agree with the constraint files CI installs (oldest, Megatron tier)."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _ranges() -> dict[str, Requirement]:
    """Every requirement of the package and its extras, by normalised name."""
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {_norm(r.name): r for r in reqs}


def _constraints(name: str) -> list[Requirement]:
    lines = (REPO / "constraints" / name).read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def test_oldest_pins_are_the_lower_bounds():
    ranges = _ranges()
    for pin in _constraints("oldest.txt"):
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        bounds = [s for s in ranges[_norm(pin.name)].specifier if s.operator == ">="]
        assert [Version(s.version) for s in bounds] == [Version(spec.version)], \
            f"constraints/oldest.txt pins {pin}, pyproject.toml says {ranges[_norm(pin.name)]}"


def test_megatron_pins_fall_inside_our_ranges():
    """Each exact or upper pin of megatron-bridge's is a version our own ranges admit."""
    ranges = _ranges()
    for pin in _constraints("megatron.txt"):
        ours = ranges.get(_norm(pin.name))
        for spec in pin.specifier:
            if ours is not None and spec.operator in ("==", "<="):
                assert ours.specifier.contains(spec.version, prereleases=True), f"{pin} vs pyproject {ours}"


def test_upper_bounds_where_internals_are_used_and_peft_in_the_test_extra():
    ranges = _ranges()
    for name in ("torch", "transformers", "hydra-core", "lm-eval"):
        assert any(s.operator in ("<", "<=") for s in ranges[name].specifier), name
    assert any(_norm(Requirement(r).name) == "peft" for r in _project()["optional-dependencies"]["test"])
