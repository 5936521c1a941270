"""One rank of the ZeRO-3 model check (launched by test_model_zero3.py with torchrun, 2 ranks, gloo).

For each model in the job: build it under deepspeed.zero.Init with an HfDeepSpeedConfig alive,
check that parameters are really partitioned, load the reference weights (gathered, rank 0
writes), run a few DeepSpeed steps on this rank's half of each global batch, and let rank 0 write
the global-batch losses.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
from transformers import AutoModelForCausalLM  # noqa: F401  (transformers classes before zero.Init)

warnings.filterwarnings("ignore", category=FutureWarning)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_model  # noqa: E402


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = torch.load(job["batches"])
    micro = batches.shape[1] // world
    ds_config = {
        "train_batch_size": batches.shape[1], "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1, "gradient_clipping": job["grad_clip"],
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_model_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }
    results = {}
    for name, spec in job["models"].items():
        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while the model is built)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(load_config(None, spec["overrides"]), **job["token_ids"])
        whole = [n for n, p in model.named_parameters() if p.ds_numel >= world and p.ds_tensor.numel() == p.ds_numel]
        assert not whole, f"ZeRO-3 left parameters whole: {whole}"
        reference = torch.load(spec["state"])
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if rank == 0:
                for param_name, param in params.items():
                    param.data.copy_(reference[param_name])
        optimizer = torch.optim.AdamW(model.parameters(), lr=job["lr"], weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        losses = []
        for batch in batches:
            ids = batch[rank * micro:(rank + 1) * micro]
            out = engine(ids, labels=ids)
            engine.backward(out.loss)
            engine.step()
            totals = torch.stack([out.segment_nll.detach().sum(), out.segment_tokens.sum().double()]).double()
            dist.all_reduce(totals)
            losses.append(float(totals[0] / totals[1]))
        results[name] = losses
    if rank == 0:
        with open(job["out"], "w") as f:
            json.dump(results, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
