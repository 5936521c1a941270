"""pyproject.toml declares ranges; requirements.txt is the lock: every locked pin lies in its range,
and every declared dependency (runtime and extras) is locked."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_lock_satisfies_the_declared_ranges() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    assert set(extras) == {"test", "bench"}
    lock = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    for req in [*declared, *(r for reqs in extras.values() for r in reqs)]:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is declared but not locked in requirements.txt"
        assert req.specifier.contains(lock[name]), f"locked {req.name}=={lock[name]} is outside {req.specifier}"
    runtime = {canonicalize_name(r.name) for r in declared}
    extra_names = {canonicalize_name(r.name) for reqs in extras.values() for r in reqs}
    assert set(lock) == runtime | extra_names, set(lock) ^ (runtime | extra_names)
