"""Plain PyTorch training, one process, from the weights the ZeRO-3 trainer starts from.

``python plain_reference.py CONFIG STEPS`` prints a JSON list: the mean loss of each of the first
STEPS steps over the same global batches (same micro-batch layout, LR schedule, clipping and AdamW)
as ``memtrain train``. The initial weights come from the trainer's own ZeRO-3 build at world size 1,
gathered into a model built without DeepSpeed; everything after that is plain torch.
"""

import json
import sys

import torch

from pipeline import launch
from pipeline.config import load_config
from pipeline.data import TrainBatches, open_train_split, segments_for_step
from pipeline.ds_config import batch_plan
from pipeline.optim import lr_at, param_groups
from pipeline.train import build_partitioned_model, preflight


def initial_weights(cfg, checks) -> dict[str, torch.Tensor]:
    import deepspeed

    deepspeed.init_distributed()
    model, keep_alive = build_partitioned_model(cfg, checks, checks.ds_config)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
    del model, keep_alive  # HfDeepSpeedConfig gone: the next build is a plain one
    return weights


def main() -> None:
    config, steps = sys.argv[1], int(sys.argv[2])
    cfg = load_config(config)
    launch.setup()
    checks = preflight(cfg, world_size=1)
    weights = initial_weights(cfg, checks)

    from pipeline.models import build_model

    manifest = checks.manifest
    model = build_model(cfg, vocab_size=checks.vocab_size, bos_token_id=manifest["bos_token_id"],
                        eos_token_id=manifest["eos_token_id"], pad_token_id=manifest["pad_token_id"])
    assert not any(hasattr(p, "ds_id") for p in model.parameters()), "the reference model must be plain"
    model.load_state_dict(weights, strict=True)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=cfg.train.betas)
    plan = batch_plan(cfg.train, world_size=1)
    batches = TrainBatches(open_train_split(cfg.data.output_dir), plan, 0, cfg.data.segment_len, cfg.train.seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.train, step)
        total = 0.0
        for micro in batches.next_step(segments_for_step(cfg.train, step, cfg.data.n_segments, plan.accum)):
            loss = model(input_ids=micro.input_ids, labels=micro.labels).loss
            (loss / plan.accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / plan.accum)
    print(json.dumps(losses))


if __name__ == "__main__":
    main()
