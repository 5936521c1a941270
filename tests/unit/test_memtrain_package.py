"""``python -m memtrain`` is the ``memtrain`` console script, and the ``memtrain`` package is what the
wheel installs next to pipeline and data_prep."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

REPO_ROOT = Path(__file__).resolve().parents[2]


def memtrain_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memtrain", *args], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_python_m_memtrain_is_the_cli() -> None:
    helped = memtrain_module("--help", cwd=REPO_ROOT)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: memtrain ") and "prep" in helped.stdout and "train" in helped.stdout
    sub = memtrain_module("train", "--help", cwd=REPO_ROOT)
    assert sub.returncode == 0 and sub.stdout.startswith("usage: memtrain train"), sub.stderr


def test_version_is_the_project_version() -> None:
    import memtrain

    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert memtrain.__version__ == version
    shown = memtrain_module("--version", cwd=REPO_ROOT)
    assert shown.returncode == 0 and shown.stdout.strip() == f"memtrain {version}", shown.stderr


def test_exit_code_passes_through(tmp_path: Path) -> None:
    """A user error is exit 2 and one line, as from the console script (the module hands main's code to sys.exit)."""
    proc = memtrain_module("prep", "--config", str(tmp_path / "nope.yaml"), cwd=REPO_ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("memtrain prep: error:"), (proc.returncode, proc.stderr)


def test_the_wheel_ships_the_memtrain_package() -> None:
    found = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(REPO_ROOT), include=found["include"])
    assert {"memtrain", "pipeline", "data_prep"} <= set(packages), packages
