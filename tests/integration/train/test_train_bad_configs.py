"""Bad configs stop `memtrain train --nproc 2` with one line and exit 2 before any rank starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from processes import REPO_ROOT, memtrain
from train_support import write_config

from pipeline.cli import main


@pytest.fixture()
def config(tiny_data: Path, tmp_path: Path) -> Path:
    return write_config(tmp_path / "run.yaml", tiny_data, tmp_path / "out", None)


@pytest.mark.parametrize("overrides, message", [
    (["train.global_batch_size=6"], "train.global_batch_size=6 is not a multiple of train.micro_batch_size=2 x 2 rank(s)"),
    (["train.ds_config=ds_configs/no_such.json"], "DeepSpeed config not found: ds_configs/no_such.json"),
    (["data.vocab_size=512"], "use a vocabulary of 320 tokens but data.vocab_size=512"),
    (["data.n_segments=8"], "the shards in"),
    (["train.max_step=3"], "unknown config key 'train.max_step'; did you mean 'train.max_steps'?"),
])
def test_bad_config_is_one_line_before_any_rank(config: Path, overrides: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--config", str(config), "--nproc", "2", "--set", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (config.parent / "out").exists()  # no rank started: nothing was written


def test_explicit_ds_value_that_contradicts_the_config(config: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ds_json = json.loads((REPO_ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({**ds_json, "train_batch_size": 8}))
    assert main(["train", "--config", str(config), "--nproc", "2", "--set", f"train.ds_config={ds_path}"]) == 2
    assert "train_batch_size=8 but the experiment config gives 4" in capsys.readouterr().err


def test_the_console_prints_no_traceback(config: Path) -> None:
    proc = memtrain("train", "--config", str(config), "--nproc", "2", "--set", "data.n_segments=8", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "segments per sample" in proc.stderr
