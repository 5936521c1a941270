import json

import pytest

from pipeline.config import load_config
from pipeline.ds_config import batch_plan, resolve_ds_config
from pipeline.errors import UserError


def write(tmp_path, body: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    return str(path)


def test_auto_and_absent_fields_are_filled_from_the_config(tmp_path) -> None:
    ds_path = write(tmp_path, {"train_batch_size": "auto", "zero_optimization": {"stage": 3}})
    cfg = load_config(overrides=[f"train.ds_config={ds_path}", "train.micro_batch_size=3",
                                 "train.grad_accum=2", "train.grad_clip=0.5"])
    ds = resolve_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("shipped", ["zero3.json", "zero3_cpu.json", "zero3_offload.json", "zero2.json"])
def test_shipped_configs_resolve_from_any_directory(shipped, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ds = resolve_ds_config(load_config(overrides=[f"train.ds_config=ds_configs/{shipped}"]), world_size=2)
    assert ds["train_batch_size"] == 2 * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    assert "auto" not in json.dumps(ds)


def test_explicit_value_that_contradicts_the_config_is_an_error(tmp_path) -> None:
    ds_path = write(tmp_path, {"train_batch_size": 16, "gradient_clipping": 1.0})
    cfg = load_config(overrides=[f"train.ds_config={ds_path}", "train.micro_batch_size=4"])
    assert resolve_ds_config(cfg, world_size=4)["train_batch_size"] == 16
    with pytest.raises(UserError, match="train_batch_size=16 but the experiment config gives 8"):
        resolve_ds_config(cfg, world_size=2)


def test_global_batch_derives_accumulation_and_must_divide() -> None:
    cfg = load_config(overrides=["train.global_batch_size=8", "train.micro_batch_size=2"])
    assert batch_plan(cfg.train, 2).accum == 2 and batch_plan(cfg.train, 1).accum == 4
    with pytest.raises(UserError, match="not a multiple"):
        batch_plan(cfg.train, 3)
    both = load_config(overrides=["train.global_batch_size=8", "train.micro_batch_size=2", "train.grad_accum=1"])
    with pytest.raises(UserError, match="contradicts"):
        batch_plan(both.train, 2)


def test_missing_json_and_owned_blocks_are_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="DeepSpeed config not found"):
        resolve_ds_config(load_config(overrides=[f"train.ds_config={tmp_path}/nope.json"]), 1)
    ds_path = write(tmp_path, {"optimizer": {"type": "Adam"}})
    with pytest.raises(UserError, match="remove the 'optimizer' block"):
        resolve_ds_config(load_config(overrides=[f"train.ds_config={ds_path}"]), 1)
