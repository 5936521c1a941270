"""The user's DeepSpeed JSON, completed from the experiment config and checked against the world.

The JSON owns how ZeRO runs (stage, offload, precision, buckets); the experiment config owns the
batch and the optimisation: ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
``train_batch_size`` and ``gradient_clipping`` are filled where the JSON says ``"auto"`` or nothing,
and an explicit value that disagrees is a UserError (never silently fixed). memtrain builds the
optimizer (torch AdamW, or DeepSpeedCPUAdam under optimizer offload) and the warmup+cosine
schedule itself, so ``optimizer``/``scheduler`` blocks in the JSON are refused rather than ignored.

Batch arithmetic: ``global = micro x accum x world``. With ``train.global_batch_size`` set, accum is
derived from it (so the same run can resume on another world size with the same global batch);
otherwise ``train.grad_accum`` is used as given.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
FILLED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
OWNED_BLOCKS = {
    "optimizer": "train.lr, train.betas and train.weight_decay",
    "scheduler": "train.warmup_steps, train.lr and train.min_lr",
}


@dataclass(frozen=True)
class BatchPlan:
    micro: int
    accum: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world


def batch_plan(train: TrainConfig, world_size: int) -> BatchPlan:
    """Micro batch, accumulation steps and global batch for this world size (UserError if they do not divide)."""
    micro = train.micro_batch_size
    if train.global_batch_size is None:
        return BatchPlan(micro, train.grad_accum, world_size)
    per_step = micro * world_size
    if train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={micro} x {world_size} rank(s) = {per_step}"
        )
    accum = train.global_batch_size // per_step
    if "grad_accum" in train.model_fields_set and train.grad_accum != accum:
        raise UserError(
            f"train.grad_accum={train.grad_accum} contradicts train.global_batch_size={train.global_batch_size} "
            f"= {micro} x {accum} x {world_size} rank(s); set only one of them"
        )
    return BatchPlan(micro, accum, world_size)


def find_ds_config(path: str) -> Path:
    """The JSON as given, or relative to the repository (so ``ds_configs/zero3.json`` works anywhere)."""
    candidates = [Path(path)] if Path(path).is_absolute() else [Path(path), REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"DeepSpeed config not found: {path} (train.ds_config)")


def load_ds_json(path: str) -> dict[str, Any]:
    found = find_ds_config(path)
    try:
        loaded = json.loads(found.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {found} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"DeepSpeed config {found} must hold a JSON object")
    return loaded


def resolve_ds_config(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config this run uses: the user's JSON with batch and clipping filled and checked."""
    source = cfg.train.ds_config
    ds = copy.deepcopy(load_ds_json(source))
    for block, owners in OWNED_BLOCKS.items():
        if block in ds:
            raise UserError(f"{source}: remove the {block!r} block; memtrain sets it from {owners}")
    plan = batch_plan(cfg.train, world_size)
    wanted = {
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": cfg.train.grad_clip,
    }
    origin = {
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": "train.grad_accum / train.global_batch_size",
        "train_batch_size": f"{plan.micro} x {plan.accum} x {world_size} rank(s)",
        "gradient_clipping": "train.grad_clip",
    }
    for key in FILLED_KEYS:
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = wanted[key]
        elif not isinstance(given, (int, float)) or isinstance(given, bool) or given != wanted[key]:
            raise UserError(
                f"{source} sets {key}={given!r} but the experiment config gives {wanted[key]} "
                f"({origin[key]}); use \"auto\" or make them agree"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{source}: zero_optimization.stage must be 0-3, got {stage!r}")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def uses_bf16(ds: dict[str, Any]) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))
