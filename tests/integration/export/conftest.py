"""One tiny 2-rank ZeRO-3 training run, shared by every export test, plus its `memtrain eval` table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from export_support import TINY, TrainedRun, memtrain

from pipeline.config import load_config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> TrainedRun:
    from data_prep import prepare

    root = tmp_path_factory.mktemp("export_run")
    tree = {**TINY, "data": {**TINY["data"], "output_dir": str(root / "data")},
            "train": {**TINY["train"], "output_dir": str(root / "train")}}
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tree))
    prepare(load_config(config))
    memtrain("train", "--config", str(config), "--nproc", "2", cwd=repo_root)
    eval_json = root / "eval.json"
    memtrain("eval", "--checkpoint", str(root / "train"), "--json", str(eval_json), cwd=repo_root)
    return TrainedRun(config=config, data_dir=root / "data", output_dir=root / "train", eval_json=eval_json)
