"""Memory models under DeepSpeed ZeRO-3 (2 CPU ranks, gloo) train exactly like plain PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import as_overrides, tiny_tree

from pipeline.config import load_config
from pipeline.models import build_model

STEPS, GLOBAL_BATCH, LR, GRAD_CLIP = 3, 4, 2e-2, 0.5
TOKEN_IDS = {"vocab_size": 53, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
BASE = as_overrides(tiny_tree("zero3"))  # as --set items: the ranks' script rebuilds the config from them
MODELS = {"rmt_gpt2": ["memory.kind=rmt", "model.arch=gpt2"], "armt_llama": ["memory.kind=armt", "model.arch=llama"],
          "rmt_llama_selective": ["memory.kind=rmt", "model.arch=llama", "model.checkpoint_policy=save_matmuls"]}


def plain_pytorch_losses(overrides: list[str], batches: torch.Tensor, state_path: Path) -> list[float]:
    torch.manual_seed(0)
    model = build_model(load_config(None, overrides), **TOKEN_IDS).train()
    with torch.no_grad():  # make ARMT's zero-initialised write projection matter from step one
        for name, param in model.named_parameters():
            if name.endswith("write_value"):
                param.normal_(0.0, 0.2)
    torch.save(model.state_dict(), state_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for ids in batches:
        out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    return losses


@pytest.mark.slow
def test_zero3_two_ranks_match_plain_pytorch(tmp_path: Path, repo_root: Path):
    batches = torch.randint(3, TOKEN_IDS["vocab_size"], (STEPS, GLOBAL_BATCH, 24), generator=torch.Generator().manual_seed(0))
    torch.save(batches, tmp_path / "batches.pt")
    expected, models = {}, {}
    for name, extra in MODELS.items():
        overrides = BASE + extra
        expected[name] = plain_pytorch_losses(overrides, batches, tmp_path / f"{name}.pt")
        models[name] = {"overrides": overrides, "state": str(tmp_path / f"{name}.pt")}
    job = {"batches": str(tmp_path / "batches.pt"), "models": models, "token_ids": TOKEN_IDS, "lr": LR,
           "grad_clip": GRAD_CLIP, "out": str(tmp_path / "losses.json")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo_root)}
    script = repo_root / "tests/integration/models/zero3_model_steps.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "job.json")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 or (tmp_path / "losses.json").exists(), done.stderr[-4000:]
    got = json.loads((tmp_path / "losses.json").read_text())
    for name in MODELS:
        assert got[name] == pytest.approx(expected[name], abs=1e-4), name
        assert max(expected[name]) - min(expected[name]) > 1e-3  # the steps really change the weights
