"""Plain PyTorch training, one process: ``memtrain train``'s batches, LR schedule, clipping and AdamW.

Two users. The ZeRO-3 test compares the first steps' losses with the trainer's:
``python plain_training.py CONFIG STEPS`` prints them as a JSON list, starting from the weights the
trainer's own ZeRO-3 build (world size 1) starts from, gathered into a model built without
DeepSpeed. The demo-memory test trains the demo's settings for its steps and evaluates
(``train_and_evaluate``), without the 2-rank start-up.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from data_prep.manifest import read_manifest
from data_prep.shards import open_split
from pipeline.config import ExperimentConfig, load_config
from pipeline.data import TrainBatches, open_train_split, step_batches
from pipeline.demo import DEMO_RANKS
from pipeline.ds_config import batch_plan
from pipeline.evaluate import evaluate_model
from pipeline.models import build_model
from pipeline.optim import make_optimizer, set_lr


def train_steps(model: torch.nn.Module, cfg: ExperimentConfig, steps: int) -> list[float]:
    """Train ``model`` for ``steps`` optimizer steps; the mean loss of each. One process accumulates the
    micro-batches every rank would see (the same global batches when train.global_batch_size is set)."""
    optimizer = make_optimizer(model, cfg.train)
    plan = batch_plan(cfg.train, world_size=1)
    batches = TrainBatches(open_train_split(cfg.data.output_dir), plan, 0, cfg.data.segment_len, cfg.train.seed)
    model.train()
    losses = []
    for step in range(steps):
        set_lr(optimizer, cfg.train, step)
        total = 0.0
        for micro in step_batches(batches, cfg.train, step, cfg.data.n_segments, plan.accum):
            loss = model(input_ids=micro.input_ids, labels=micro.labels).loss
            (loss / plan.accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / plan.accum)
    return losses


def train_and_evaluate(config: str, overrides: list[str]) -> dict[str, Any]:
    """Train ``config`` (+ ``overrides``) for train.max_steps with the global batch of DEMO_RANKS ranks,
    one thread; the EvalResult dict on eval.split."""
    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    if cfg.train.global_batch_size is None:
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * DEMO_RANKS
        cfg = load_config(config, [*overrides, f"train.global_batch_size={global_batch}"])
    manifest = read_manifest(cfg.data.output_dir)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=manifest["vocab_size"], bos_token_id=manifest["bos_token_id"],
                        eos_token_id=manifest["eos_token_id"], pad_token_id=manifest["pad_token_id"])
    train_steps(model, cfg, cfg.train.max_steps)
    return evaluate_model(model, open_split(cfg.data.output_dir, cfg.eval.split), cfg).to_dict()


def zero3_initial_weights(cfg: ExperimentConfig, checks: Any) -> dict[str, torch.Tensor]:
    import deepspeed

    from pipeline.engine import build_partitioned_model

    deepspeed.init_distributed()
    model, keep_alive = build_partitioned_model(cfg, checks, checks.ds_config)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
    del model, keep_alive  # HfDeepSpeedConfig gone: the next build is a plain one
    return weights


def main() -> None:
    from pipeline import launch
    from pipeline.train import preflight

    config, steps = sys.argv[1], int(sys.argv[2])
    cfg = load_config(config)
    launch.setup()
    checks = preflight(cfg, world_size=1)
    weights = zero3_initial_weights(cfg, checks)
    manifest = checks.manifest
    model = build_model(cfg, vocab_size=checks.vocab_size, bos_token_id=manifest["bos_token_id"],
                        eos_token_id=manifest["eos_token_id"], pad_token_id=manifest["pad_token_id"])
    assert not any(hasattr(p, "ds_id") for p in model.parameters()), "the reference model must be plain"
    model.load_state_dict(weights, strict=True)
    print(json.dumps(train_steps(model, cfg, steps)))


if __name__ == "__main__":
    main()
