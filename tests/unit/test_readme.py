"""The README is the user's manual: its commands, config keys and paths must exist."""

import re
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.config import ExperimentConfig, load_config
from pipeline.config_reference import END, START, render_reference

SECTIONS = "|".join(ExperimentConfig.model_fields)
# a dotted key, not a path (logs/train.log), a file (eval.json) or a call (model.generate(...))
KEY = re.compile(rf"(?<![/\w.-])((?:{SECTIONS})\.[a-z_]+(?:\.[a-z_]+)*)(?![\w(])")
FILE_SUFFIXES = {"json", "log", "yaml", "csv", "png", "py"}


@pytest.fixture(scope="module")
def readme(repo_root: Path) -> str:
    return (repo_root / "README.md").read_text()


def _resolves(key: str) -> bool:
    model = ExperimentConfig
    for part in key.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def test_two_setup_commands_exist(readme: str, repo_root: Path) -> None:
    assert "make demo" in readme and "make test" in readme
    makefile = (repo_root / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "memtrain demo" in makefile
    assert "make test" in (repo_root / ".ci" / "run").read_text()


def test_every_config_key_in_readme_exists(readme: str) -> None:
    prose = readme.split(START)[0]
    keys = {k for k in KEY.findall(prose) if k.rsplit(".", 1)[1] not in FILE_SUFFIXES}
    assert len(keys) > 20, "the manual should talk about the config keys users set"
    unknown = sorted(k for k in keys if not _resolves(k))
    assert not unknown, f"README mentions config keys that do not exist: {unknown}"


def test_every_memtrain_subcommand_in_readme_exists(readme: str) -> None:
    # commands in code: indented lines and `inline code`, not prose ("memtrain is ...")
    commands = set(re.findall(r"(?:^\s+|`)memtrain (\w+)", readme, re.M))
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)  # argparse keeps subcommands here
    assert {"prep", "train", "eval", "export", "submit", "demo"} <= commands
    assert commands <= known, commands - known


def test_paths_in_readme_exist(readme: str, repo_root: Path) -> None:
    paths = set(re.findall(r"\b((?:configs|ds_configs|slurm|bench)/[\w./-]+\w)", readme))
    missing = sorted(p for p in paths if not (repo_root / p).exists())
    assert not missing, f"README points at files that do not exist: {missing}"


def test_config_reference_is_generated(readme: str) -> None:
    block = readme.split(START)[1].split(END)[0].strip()
    assert block == render_reference(), "run: python -m pipeline.config_reference --write README.md"


def test_shipped_configs_load(repo_root: Path) -> None:
    configs = sorted((repo_root / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)


def test_no_shipped_config_bakes_an_eval_baseline(repo_root: Path) -> None:
    """Users copy these configs: a baked relative baseline (runs/.../train-none) fails `memtrain eval`
    anywhere else, so the baseline is passed where it runs (--set eval.baseline=DIR), as the demo does."""
    baked = [path.name for path in sorted((repo_root / "configs").glob("*.yaml")) if load_config(path).eval.baseline]
    assert baked == []
