"""The optimizer and the learning-rate schedule (memtrain's, not the DeepSpeed JSON's)."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline import launch
from pipeline.config import TrainConfig


def lr_at(train: TrainConfig, step: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup to train.lr over warmup_steps, then a
    cosine down to train.min_lr at max_steps. A pure function of the step, so a resume needs no state."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases, norms or other vectors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # a partitioned ZeRO-3 param is an empty placeholder
        (decay if len(shape) >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: Any, train: TrainConfig, offload: bool = False) -> Any:
    """torch AdamW (DeepSpeed's FusedAdam is never built), or DeepSpeedCPUAdam when ZeRO offloads
    the optimizer to the CPU (DeepSpeed requires it there). On CUDA torch's fused AdamW (one kernel
    for all parameters); on CPU the default, whose results the tests compare bit for bit."""
    groups = param_groups(model, train.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: only ZeRO's optimizer offload uses it

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=train.betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=True if launch.has_gpu() else None)
