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

Every other ``"auto"`` is filled the way transformers' DeepSpeed integration fills it, so an HF-style
JSON means what its authors expect: ``bf16.enabled``/``fp16.enabled`` from ``train.precision``,
``reduce_bucket_size = h*h``, ``stage3_prefetch_bucket_size = 0.9*h*h`` and
``stage3_param_persistence_threshold = 10*h`` from the decoder's hidden size ``h``. An ``"auto"``
memtrain does not know is a UserError naming the key: DeepSpeed would otherwise silently fall back
to its defaults (fp32, default buckets).
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
PRECISION_BLOCKS = ("bf16", "fp16")
FILLED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
# zero_optimization "auto" values from the hidden size h, as transformers.integrations.deepspeed fills them
BUCKET_RULES = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
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
    _resolve_precision(ds, cfg.train, source)
    _fill_buckets(ds, cfg)
    leftover = _auto_keys(ds)
    if leftover:
        raise UserError(f"{source} sets {leftover[0]}=\"auto\", which memtrain does not fill; give it a value")
    return ds


def _resolve_precision(ds: dict[str, Any], train: TrainConfig, source: str) -> None:
    """``bf16``/``fp16`` ``enabled`` where the JSON says "auto" or nothing: from ``train.precision``
    (fp32 by default, as transformers' ``bf16=False``). An explicit JSON value stands unless
    ``train.precision`` is set and disagrees: then it is a UserError."""
    for block in PRECISION_BLOCKS:
        section = ds.get(block) if isinstance(ds.get(block), dict) else {}
        given, wanted = section.get("enabled", "auto"), train.precision == block
        if given == "auto":
            ds[block] = {**section, "enabled": wanted}
        elif bool(given) != wanted and "precision" in train.model_fields_set:
            raise UserError(f"{source} sets {block}.enabled={json.dumps(given)} but train.precision is "
                            f"{train.precision}; use \"auto\" or make them agree")
    if json_precision(ds) not in ("bf16", "fp16", "fp32"):
        raise UserError(f"{source} enables both bf16 and fp16; enable one (or set them to \"auto\")")


def json_precision(ds: dict[str, Any]) -> str:
    """"bf16", "fp16" or "fp32": what DeepSpeed will train in with this (resolved) JSON."""
    enabled = [block for block in PRECISION_BLOCKS if ds.get(block, {}).get("enabled") is True]
    return "+".join(enabled) or "fp32"


def _fill_buckets(ds: dict[str, Any], cfg: ExperimentConfig) -> None:
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    h = None
    for key, value in BUCKET_RULES.items():
        if zero.get(key) == "auto":
            h = h or decoder_hidden_size(cfg)
            zero[key] = value(h)


def decoder_hidden_size(cfg: ExperimentConfig) -> int:
    """The base decoder's hidden size: ``model.hidden_size``, or read from ``model.pretrained``'s config.json."""
    if not cfg.model.pretrained:
        return cfg.model.hidden_size
    config_file = Path(cfg.model.pretrained) / "config.json"
    try:
        base = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"model.pretrained: cannot read {config_file}: {err}") from None
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(base.get(key), int):
            return base[key]
    raise UserError(f"model.pretrained: {config_file} names no hidden size (hidden_size, n_embd or d_model)")


def _auto_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted names of every value still "auto"."""
    if isinstance(tree, dict):
        return [name for key, value in tree.items() for name in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if tree == "auto" else []


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def at_world_size(ds: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A run's resolved JSON (its ``ds_config.json``) on ``world_size`` ranks that only evaluate: DeepSpeed
    checks ``train_batch_size = micro x accum x world`` at start, and the file holds the training's world."""
    per_rank = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    return {**ds, "train_batch_size": per_rank * world_size}
