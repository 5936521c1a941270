"""One rank of the ZeRO-3 eval check (started by test_evaluate_zero3.py with torchrun, gloo).

Builds the tiny model partitioned under deepspeed.zero.Init, loads the reference weights
(gathered, rank 0 writes), wraps it in a DeepSpeed engine, writes this rank's evaluate_model
result to OUT/rank{r}.json, then saves the engine as a memtrain checkpoint (step 1) in
train.output_dir for `memtrain eval`.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM  # noqa: F401  (transformers classes before zero.Init)

warnings.filterwarnings("ignore", category=FutureWarning)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from data_prep.manifest import read_manifest  # noqa: E402
from data_prep.shards import open_split  # noqa: E402
from pipeline import checkpoint  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate import evaluate_model  # noqa: E402
from pipeline.data import curriculum_segments  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.run_dir import RunDir  # noqa: E402


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ds_config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_model_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    cfg = load_config(None, job["overrides"])
    manifest = read_manifest(cfg.data.output_dir)
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while the model is built)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(cfg, manifest["vocab_size"], manifest["bos_token_id"], manifest["eos_token_id"],
                            manifest["pad_token_id"])
    assert all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters()), "ZeRO-3 left parameters whole"
    reference = torch.load(job["state"])
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(reference[name])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # a checkpoint's fp32 weights live in its optimizer
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.train()
    result = evaluate_model(engine, open_split(cfg.data.output_dir, cfg.eval.split), cfg)
    assert engine.training, "evaluate_model must restore train mode"
    result.to_json(Path(job["out"]) / f"rank{rank}.json")

    run_dir = Path(cfg.train.output_dir)
    if rank == 0:  # the files `memtrain train` puts beside its checkpoints
        cfg.save(run_dir / "config.yaml")
        shutil.copy2(Path(cfg.data.output_dir) / "manifest.json", run_dir / "data_manifest.json")
    state = checkpoint.CheckpointState(step=1, tokens_seen=0, world_size=world, global_batch=world,
                                       n_segments=curriculum_segments(cfg.train, 1, cfg.data.n_segments),
                                       data_position={}, mlflow_run_id=None, reason="final")
    checkpoint.save(engine, RunDir.of(run_dir).checkpoints, state, keep_last=1)


if __name__ == "__main__":
    main(sys.argv[1])
