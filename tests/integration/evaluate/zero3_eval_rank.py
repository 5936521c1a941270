"""One rank of the ZeRO-3 eval check (started by test_evaluate_zero3.py with torchrun, gloo).

Builds the tiny model partitioned under deepspeed.zero.Init, loads the reference weights
(gathered, rank 0 writes), wraps it in a DeepSpeed engine and writes this rank's evaluate_model
result to OUT/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM  # noqa: F401  (transformers classes before zero.Init)

warnings.filterwarnings("ignore", category=FutureWarning)

import datasets  # noqa: E402
import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate import evaluate_model  # noqa: E402
from pipeline.models import build_model  # noqa: E402


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ds_config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_model_persistence_threshold": 0},
                 "steps_per_print": 10**9}
    cfg = load_config(None, job["overrides"])
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while the model is built)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(cfg, **job["token_ids"])
    assert all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters()), "ZeRO-3 left parameters whole"
    reference = torch.load(job["state"])
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                param.data.copy_(reference[name])
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.train()
    result = evaluate_model(engine, datasets.load_from_disk(job["data"]), cfg)
    assert engine.training, "evaluate_model must restore train mode"
    result.to_json(Path(job["out"]) / f"rank{rank}.json")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
