"""requirements-lock.txt: every dependency pyproject.toml declares is pinned there, within its
range, and the environment running the tests was installed from it (scripts/install-locked.sh)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements-lock.txt"
REFRESH = "refresh the lock: bash scripts/lock.sh"


def _pins(text: str) -> dict[str, str]:
    """name -> version of each `name==version` line; any other requirement line is refused."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"requirements-lock.txt: {line!r} is not an exact name==version pin"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = _pins(LOCK.read_text())
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements-lock.txt: {REFRESH}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements-lock.txt pins {name}=={pins[name]}, outside {requirement}: {REFRESH}"
        )


def test_the_pin_check_refuses_loose_lines() -> None:
    assert _pins("numpy==2.4.6\n    # via onnx\ntorch==2.13.0+cpu\n") == {
        "numpy": "2.4.6",
        "torch": "2.13.0+cpu",
    }
    for loose in ("numpy>=2", "-e .", "numpy @ https://example.org/numpy.whl"):
        try:
            _pins(loose)
        except AssertionError:
            continue
        raise AssertionError(f"{loose!r} was taken for a pin")


def test_this_environment_was_installed_from_the_lock() -> None:
    pins = _pins(LOCK.read_text())
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
    }
    assert "numpy" in installed and "pydantic" in installed
    drift = {
        name: (pins[name], installed[name])
        for name in pins
        if name in installed and installed[name] != pins[name]
    }
    assert not drift, (
        f"installed versions differ from the lock (locked, installed): {drift}; "
        "install with bash scripts/setup-dev.sh (scripts/install-locked.sh)"
    )
