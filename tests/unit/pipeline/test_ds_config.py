import json

import pytest

from pipeline.config import load_config
from pipeline.ds_config import batch_plan, json_precision, resolve_ds_config
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


HF_STYLE = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto"}}


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_hf_style_autos_are_filled_like_transformers(tmp_path, precision) -> None:
    cfg = load_config(overrides=[f"train.ds_config={write(tmp_path, HF_STYLE)}", "model.hidden_size=64",
                                 f"train.precision={precision}"])
    ds = resolve_ds_config(cfg, world_size=1)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (precision == "bf16", precision == "fp16")
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (64 * 64, int(0.9 * 64 * 64), 640)


def test_hidden_size_of_a_pretrained_base_comes_from_its_config(tmp_path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 48}))
    cfg = load_config(overrides=[f"train.ds_config={write(tmp_path, HF_STYLE)}", f"model.pretrained={base}",
                                 "train.precision=bf16"])
    assert resolve_ds_config(cfg, 1)["zero_optimization"]["reduce_bucket_size"] == 48 * 48


def test_precision_absent_from_the_json_is_written_in(tmp_path) -> None:
    cfg = load_config(overrides=[f"train.ds_config={write(tmp_path, {})}", "train.precision=bf16"])
    ds = resolve_ds_config(cfg, 1)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


def test_explicit_json_precision_stands_when_train_precision_is_not_set(tmp_path) -> None:
    cfg = load_config(overrides=[f"train.ds_config={write(tmp_path, {'bf16': {'enabled': True}})}"])
    assert json_precision(resolve_ds_config(cfg, 1)) == "bf16"
    assert json_precision(resolve_ds_config(load_config(overrides=[f"train.ds_config={write(tmp_path, HF_STYLE)}"]), 1)) == "fp32"
    both = load_config(overrides=[f"train.ds_config={write(tmp_path, {'bf16': {'enabled': True}, 'fp16': {'enabled': True}})}"])
    with pytest.raises(UserError, match="enables both bf16 and fp16"):
        resolve_ds_config(both, 1)


def test_precision_contradicting_the_json_is_refused(tmp_path) -> None:
    cfg = load_config(overrides=[f"train.ds_config={write(tmp_path, {'bf16': {'enabled': True}})}",
                                 "train.precision=fp32"])
    with pytest.raises(UserError, match="bf16.enabled=true but train.precision is fp32"):
        resolve_ds_config(cfg, 1)


def test_an_auto_memtrain_does_not_fill_is_refused_with_its_key(tmp_path) -> None:
    body = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "auto"}}
    cfg = load_config(overrides=[f"train.ds_config={write(tmp_path, body)}"])
    with pytest.raises(UserError, match=r'zero_optimization.stage3_max_live_parameters="auto", which memtrain'):
        resolve_ds_config(cfg, 1)
