"""The optimizer and the learning-rate schedule (memtrain's, not the DeepSpeed JSON's)."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline import launch
from pipeline.config import TrainConfig, separate_memory_groups
from pipeline.models.modeling_memtrain import memory_parameters


def lr_at(train: TrainConfig, step: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup to train.lr over warmup_steps, then a
    cosine down to train.min_lr at max_steps. A pure function of the step, so a resume needs no state."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: Any, weight_decay: float, memory_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases, norms or other vectors). With ``memory_lr_scale``
    other than 1 the memory's own parameters (``memory_parameters``) get groups of their own, marked
    ``memory`` for ``set_lr``; at 1 the groups are the two of runs that predate the setting."""
    memory = {id(p) for p in memory_parameters(model)} if separate_memory_groups(memory_lr_scale) else set()
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # a partitioned ZeRO-3 param is an empty placeholder
        groups.setdefault((len(shape) >= 2, id(param) in memory), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "memory": is_memory}
            for (decays, is_memory), params in sorted(groups.items(), key=lambda item: (item[0][1], not item[0][0]))]


def memory_lr_scale(train: TrainConfig) -> float:
    """``train.memory_lr_scale``, which the experiment config resolves (its default depends on the curriculum)."""
    if train.memory_lr_scale is None:
        raise ValueError("train.memory_lr_scale is unresolved: take the train section of an ExperimentConfig")
    return train.memory_lr_scale


def set_lr(optimizer: Any, train: TrainConfig, step: int) -> float:
    """Set every group's LR for optimizer step ``step`` (the memory's groups at ``train.memory_lr_scale``
    times it, read from the config, not from a checkpoint's groups); returns the decoder's LR."""
    lr = lr_at(train, step)
    for group in optimizer.param_groups:
        group["lr"] = lr * (memory_lr_scale(train) if group.get("memory") else 1.0)
    return lr


def make_optimizer(model: Any, train: TrainConfig, offload: bool = False) -> Any:
    """torch AdamW (DeepSpeed's FusedAdam is never built), or DeepSpeedCPUAdam when ZeRO offloads
    the optimizer to the CPU (DeepSpeed requires it there). On CUDA torch's fused AdamW (one kernel
    for all parameters); on CPU the default, whose results the tests compare bit for bit."""
    groups = param_groups(model, train.weight_decay, memory_lr_scale(train))
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: only ZeRO's optimizer offload uses it

        return DeepSpeedCPUAdam(groups, lr=train.lr, betas=train.betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=True if launch.has_gpu() else None)
