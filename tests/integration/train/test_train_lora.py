"""``model.lora`` under 2-rank ZeRO-3: LoRA fine-tuning of a local pretrained base, resumed once; only the
adapters and the memory change; the merged export equals PEFT's own merge and loads without PEFT or the
project; eval and export need no base folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clean_python import run_without_project
from processes import REPO_ROOT, memtrain, process_env, tail
from tiny import experiment, merged, write_experiment
from train_support import TRAIN_TINY, run_train

from pipeline.checkpoint import load_consolidated
from pipeline.config import load_config

pytestmark = pytest.mark.slow

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["c_attn", "c_fc"]}
STEPS = 6  # 3, then resumed to 6

LOAD_EXPORT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
try:
    import pipeline  # noqa: F401
    importable = hasattr(pipeline, "models")
except ImportError:
    importable = False
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"project_importable": importable, "peft_imported": "peft" in sys.modules,
                  "keys": sorted(model.state_dict()), "logits": logits.tolist()}))
"""


ZERO3_START = """
import json, sys
import deepspeed
from pipeline import launch
from pipeline.config import load_config
from pipeline.engine import build_partitioned_model
from pipeline.train import preflight
cfg = load_config(sys.argv[1])
launch.setup()
checks = preflight(cfg, world_size=1)
deepspeed.init_distributed()
model, keep_alive = build_partitioned_model(cfg, checks, checks.ds_config)
adapters = {name: p for name, p in model.named_parameters() if "lora_" in name}
with deepspeed.zero.GatheredParameters(list(adapters.values())):
    sums = {name: float(p.abs().sum()) for name, p in adapters.items()}
print(json.dumps({"partitioned": all(hasattr(p, "ds_id") for p in adapters.values()), "sums": sums}))
"""


def save_base(cfg, manifest: dict, folder: Path) -> None:
    """A tiny random GPT-2 over the data's vocabulary, saved as the local 'pretrained' base."""
    from transformers import AutoModelForCausalLM

    from pipeline.models import decoder_config

    token_ids = {key: manifest[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(decoder_config(cfg.model, manifest["vocab_size"], token_ids)).save_pretrained(folder)


def losses(train_log: Path) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in re.findall(r"\bstep (\d+)/\d+ loss (\S+)", train_log.read_text())}


@pytest.fixture(scope="module")
def lora_run(train_root: Path, tiny_data: Path) -> dict[str, Path]:
    root = train_root / "lora"
    base = root / "base"
    tree = merged(experiment(root, **TRAIN_TINY), {
        "data": {"output_dir": str(tiny_data)}, "model": {"pretrained": str(base), "lora": LORA},
        "train": {"output_dir": str(root / "train"), "max_steps": 3, "save_every": 3, "curriculum": [], "lr": 1e-2,
                  "warmup_steps": 1},
        "tracking": {"enabled": False}})
    config = write_experiment(root / "lora.yaml", tree)
    save_base(load_config(config), json.loads((tiny_data / "manifest.json").read_text()), base)
    for steps in (3, STEPS):  # the second run resumes from the first one's checkpoint
        log = root / f"train-{steps}.log"
        code = run_train(config, "--nproc", "2", "--set", f"train.max_steps={steps}", log=log)
        assert code == 0, tail(log)
    assert "resumed from step_00000003" in (root / f"train-{STEPS}.log").read_text()
    return {"root": root, "base": base, "out": root / "train", "config": config}


def test_lora_run_learns_and_changes_only_adapters_and_memory(lora_run: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    history = losses(lora_run["out"] / "logs" / "train.log")
    assert sorted(history) == list(range(1, STEPS + 1))
    assert history[STEPS - 1] + history[STEPS] < history[1] + history[2], history
    state, _, _ = load_consolidated(lora_run["out"])
    base = load_file(str(lora_run["base"] / "model.safetensors"))
    decoder = {key.removeprefix("decoder.").replace(".base_layer", ""): value for key, value in state.items()
               if key.startswith("decoder.") and "lora_" not in key}
    assert base.keys() <= decoder.keys()
    for key, value in base.items():  # bitwise: the frozen base never moved
        assert torch.equal(decoder[key], value), key
    lora_b = [value for key, value in state.items() if "lora_B" in key]
    assert len(lora_b) == 2 and all(bool(value.abs().sum() > 0) for value in lora_b)  # trained from zero
    assert set(decoder) - set(base) <= {"lm_head.weight"}  # the tied head; nothing else beside the base


def test_adapters_start_as_identity_under_zero_init(lora_run: dict[str, Path]) -> None:
    """zero.Init partitions each adapter as it is made, before PEFT zeroes lora_B: the build redoes it gathered."""
    proc = subprocess.run([sys.executable, "-c", ZERO3_START, str(lora_run["config"])], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=process_env(), stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    start = json.loads(proc.stdout.strip().splitlines()[-1])
    assert start["partitioned"]
    assert {name: value for name, value in start["sums"].items() if "lora_B" in name} == {
        name: 0.0 for name in start["sums"] if "lora_B" in name} and len(start["sums"]) == 4
    assert all(value > 0 for name, value in start["sums"].items() if "lora_A" in name)


def test_merged_export_equals_peft_merge_and_eval_needs_no_base(lora_run: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from pipeline.models import build_model

    out, moved = lora_run["out"], lora_run["root"] / "base-moved"
    final_eval = json.loads((out / "eval" / f"step_{STEPS:08d}.json").read_text())
    lora_run["base"].rename(moved)
    try:
        memtrain("export", "--checkpoint", str(out), "--out", str(tmp_path / "merged"))
        memtrain("export", "--checkpoint", str(out), "--out", str(tmp_path / "adapter"), "--lora", "adapter")
        memtrain("eval", "--checkpoint", str(out), "--json", str(tmp_path / "eval.json"))
    finally:
        moved.rename(lora_run["base"])
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["ppl"] == pytest.approx(final_eval["ppl"], rel=1e-5)
    assert [row["ppl"] for row in evaluated["segments"]] == pytest.approx([r["ppl"] for r in final_eval["segments"]],
                                                                          rel=1e-5)

    # the reference: PEFT's own wrapper and merge over the checkpoint's weights
    cfg = load_config(lora_run["config"])
    manifest = json.loads((out / "data_manifest.json").read_text())
    plain_cfg = load_config(lora_run["config"], ["model.lora=null"])
    plain = build_model(plain_cfg, manifest["vocab_size"], manifest["bos_token_id"], manifest["eos_token_id"],
                        manifest["pad_token_id"])
    reference = get_peft_model(plain, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                 target_modules=LORA["target_modules"], fan_in_fan_out=True))
    state, _, _ = load_consolidated(out)
    reference.base_model.model.load_state_dict(state, strict=True)
    reference = reference.merge_and_unload().eval()
    ids = torch.randint(3, manifest["vocab_size"], (2, cfg.data.sample_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits

    loaded = run_without_project(LOAD_EXPORT, str(tmp_path / "merged"), json.dumps(ids.tolist()), tmp=tmp_path)
    assert not loaded["project_importable"] and not loaded["peft_imported"]
    assert not any("lora" in key for key in loaded["keys"])
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=0, atol=1e-5)
    assert not (tmp_path / "merged" / "adapter").exists()
    assert (tmp_path / "adapter" / "adapter" / "adapter_config.json").is_file()
