"""The session's one trained run, shared by every integration test that only needs *a* trained run.

``demo_run(cwd)`` is one tiny ``memtrain demo``: prep, `memtrain train` of rmt and of the `none`
baseline on 2 ZeRO-3 ranks, `memtrain eval` of both, `memtrain export`, generation from the
export, with tiny.TINY over configs/demo.yaml (~2 min on 2 idle cores). Its outputs lie where a
user's would, under ``cwd/runs/demo``, its MLflow store in ``cwd/mlflow.db``.
``score_exports(run, root)`` adds an fp32 and a bf16 ``memtrain export`` of the run and scores all
three exports in one clean process (clean_python.py, clean_load.py).

tests/integration/conftest.py turns both into session fixtures (``trained_run``, ``exports``).
Tests read these outputs and never change them: copy first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clean_python import run_without_project
from processes import REPO_ROOT, memtrain
from tiny import TINY, as_overrides, experiment

CLEAN_LOAD = Path(__file__).with_name("clean_load.py")
TEXT = "The captain kept the brass key in the kitchen of the old house."  # tokenized by the clean process


@dataclass(frozen=True)
class TrainedRun:
    cwd: Path  # where `memtrain demo` ran
    stdout: str  # what it printed
    data_dir: Path
    output_dir: Path  # train.output_dir of the rmt run: config.yaml, checkpoints/, eval/, tokenizer/
    baseline_dir: Path  # the `none` run
    eval_json: Path  # `memtrain eval --checkpoint output_dir` with the baseline
    export_dir: Path  # the demo's `memtrain export` of output_dir
    tracking_db: Path

    @property
    def config(self) -> Path:
        """The resolved experiment the run saved (configs/demo.yaml + the tiny overrides)."""
        return self.output_dir / "config.yaml"


@dataclass(frozen=True)
class Exports:
    fp32: Path
    bf16: Path
    clean: dict[str, Any]  # what clean_load.py reported for fp32, bf16 and the demo's export


def demo_run(cwd: Path) -> TrainedRun:
    root = cwd / "runs" / "demo"
    tree = experiment(root, tracking={"enabled": True, "uri": f"sqlite:///{cwd / 'mlflow.db'}"},
                      eval={"baseline": str(root / "train-none")})
    proc = memtrain("demo", "--config", str(REPO_ROOT / "configs" / "demo.yaml"), "--set", *as_overrides(tree),
                    cwd=cwd)
    return TrainedRun(cwd=cwd, stdout=proc.stdout, data_dir=root / "data", output_dir=root / "train",
                      baseline_dir=root / "train-none", eval_json=root / "eval.json", export_dir=root / "export",
                      tracking_db=cwd / "mlflow.db")


def score_exports(run: TrainedRun, root: Path) -> Exports:
    fp32, bf16 = root / "fp32", root / "bf16"
    tag_dir = run.output_dir / "checkpoints" / (run.output_dir / "checkpoints" / "latest").read_text().strip()
    from pipeline.cli import main  # in this process: no interpreter start-up per export

    assert main(["export", "--checkpoint", str(run.output_dir), "--out", str(fp32)]) == 0
    assert main(["export", "--checkpoint", str(tag_dir), "--out", str(bf16), "--dtype", "bf16"]) == 0
    ev = TINY["eval"]
    clean = run_without_project(CLEAN_LOAD.read_text(), str(run.data_dir), "val", str(ev["max_samples"]),
                                str(ev["batch_size"]), TEXT, str(fp32), str(bf16), str(run.export_dir), tmp=root)
    return Exports(fp32=fp32, bf16=bf16, clean=clean)
