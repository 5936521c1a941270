"""The arrows between modules run one way: CLI -> stages -> shared pieces, pipeline -> data_prep.

Every import of every module of ``pipeline`` and ``data_prep`` is read from its source (ast), at
module level, inside functions and under ``TYPE_CHECKING`` alike: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "data_prep")
HEAVY = ("torch", "deepspeed", "mlflow", "transformers", "datasets")


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every module of the project's packages."""
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, wherever it sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import pipeline.models.build` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def back_arrows(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    """Imports against the direction: data_prep -> pipeline, and anything -> pipeline.cli."""
    return [f"{src} (line {line}) imports {dst}" for src, edges in sorted(graph.items()) for dst, line in edges
            if (src.startswith("data_prep") and dst.split(".")[0] == "pipeline") or dst == "pipeline.cli"]


def test_no_back_arrows(graph):
    """data_prep is the lower package (pipeline -> data_prep); pipeline.cli dispatches to the stages."""
    assert back_arrows(graph) == [], "back-arrows:\n" + "\n".join(back_arrows(graph))


def find_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[str] | None:
    """One import cycle as a path of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dst, _ in graph.get(node, []):
            if state.get(dst) == 1:
                return path[path.index(dst):] + [dst]
            if dst not in state and (cycle := visit(dst)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (lazy and TYPE_CHECKING imports count): " + " -> ".join(cycle or [])


@pytest.mark.parametrize("src, dst", [("data_prep.shards", "pipeline.train"), ("pipeline.train", "pipeline.cli"),
                                      ("pipeline.report", "pipeline.evaluate")])
def test_the_checks_catch_a_back_arrow(graph, src, dst):
    """The project's graph with one wrong import added: a check above must fail on it."""
    bent = {name: list(edges) for name, edges in graph.items()}
    bent[src].append((dst, 1))
    assert back_arrows(bent) or find_cycle(bent)


def test_cli_help_and_dispatch_modules_import_no_heavy_library():
    """`memtrain --help` and importing every subcommand's module stay light: torch, DeepSpeed, MLflow,
    transformers and datasets load only when a stage runs (they cost seconds of start-up)."""
    probe = f"""
import contextlib, importlib, io, json, sys
from pipeline import cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    cli.main(["--help"])
after_help = sorted(h for h in {HEAVY!r} if h in sys.modules)
for target in cli.HANDLERS.values():
    importlib.import_module(target.partition(":")[0])
print(json.dumps({{"help": after_help, "dispatch": sorted(h for h in {HEAVY!r} if h in sys.modules),
                   "modules": sorted(set(t.partition(":")[0] for t in cli.HANDLERS.values()))}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["help"] == [], f"memtrain --help imports {loaded['help']}"
    assert loaded["dispatch"] == [], f"importing {loaded['modules']} imports {loaded['dispatch']}"
