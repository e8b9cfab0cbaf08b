"""The pins that make a fresh machine reproduce a green CI: constraints.txt pins every requirement that
pyproject.toml names for the runtime and the test extra, at a version inside pyproject's own range."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"constraints.txt:{n}: {line!r} is not an exact pin"
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


def test_every_runtime_and_test_requirement_is_pinned_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


def test_torch_is_pinned_to_the_cpu_build_this_environment_ships():
    assert _pins()["torch"] == Version("2.13.0")


def test_make_installs_into_its_own_environment_from_the_pins():
    makefile = (ROOT / "Makefile").read_text()
    install = makefile.split("\ninstall:", 1)[1].split("\n\n", 1)[0]
    pip_lines = [line for line in install.splitlines() if "$(PIP) install" in line]
    assert "$(PYTHON) -m venv $(VENV)" in makefile and pip_lines
    assert all("-c constraints.txt" in line for line in pip_lines), pip_lines
