"""One rank's DeepSpeed engine: the model built partitioned under ``zero.Init``, memtrain's optimizer
around it, and a checkpoint loaded into it shard by shard.

Training (``pipeline.train``) and ``memtrain eval`` across ranks (``pipeline.evaluate``) both start
here, so an evaluation holds the weights exactly as a resumed training would: each rank reads its own
ZeRO shards (``zero_pp_rank_R_*``), never a full copy of the model. A checkpoint saved on another world
size goes through DeepSpeed's universal checkpoint (``pipeline.universal``).

DeepSpeed's ``load_checkpoint(load_module_only=True)`` is not used: under ZeRO-3 (0.19.8) it reads the
full fp32 state dict on every rank and gathers every parameter at once, and it reads the ``latest``
tag whatever tag it is given. Loading the optimizer's shards is what restores ZeRO-3 weights sharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline import checkpoint, universal
from pipeline.config import ExperimentConfig
from pipeline.ds_config import offloads_optimizer, zero_stage


class ModelFacts(Protocol):
    """What the model is built from besides the config: the data manifest (token ids) and the vocabulary."""

    manifest: dict[str, Any]
    vocab_size: int


def import_model_classes(arch: str) -> None:
    """Import the base model's modeling code (and torch._dynamo, which it pulls in lazily) before
    ``zero.Init`` patches tensor construction: imported inside it, they crash."""
    import torch._dynamo  # noqa: F401
    from transformers import AutoModelForCausalLM  # lazy: imported here on purpose, before zero.Init (above)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    AutoModelForCausalLM._model_mapping[CONFIG_MAPPING[arch]]


def build_partitioned_model(cfg: ExperimentConfig, facts: ModelFacts, ds_config: dict[str, Any],
                            saved: Any = None) -> tuple[Any, Any]:
    """(model, HfDeepSpeedConfig): the model built under ``zero.Init`` (ZeRO-3) from ``train.seed``,
    so every world size starts from the same weights. Keep the second item alive with the model.
    ``saved`` (a run's model_config.json) rebuilds a trained model without ``model.pretrained``'s folder."""
    import deepspeed  # lazy: the zero.Init site; torch, DeepSpeed, transformers cost seconds
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    import_model_classes(cfg.model.arch)
    if cfg.model.lora is not None:
        import peft  # noqa: F401  (like the modeling code: never imported first inside zero.Init)
    from pipeline.models import build_model

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(cfg.train.seed)
    manifest = facts.manifest
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage(ds_config) == 3):
        model = build_model(cfg, vocab_size=facts.vocab_size, bos_token_id=manifest["bos_token_id"],
                            eos_token_id=manifest["eos_token_id"], pad_token_id=manifest["pad_token_id"], saved=saved)
    return model, hf_ds_config


def start_engine(model: Any, cfg: ExperimentConfig, ds_config: dict[str, Any]) -> Any:
    """The DeepSpeed engine of ``model`` with memtrain's optimizer (torch AdamW, or DeepSpeedCPUAdam
    under optimizer offload); its ZeRO-3 optimizer holds the fp32 weights a checkpoint restores."""
    import deepspeed  # lazy: seconds of import, off the CLI dispatch path

    from pipeline.optim import make_optimizer  # lazy: torch

    optimizer = make_optimizer(model, cfg.train, offload=offloads_optimizer(ds_config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


@dataclass
class ResumePoint:
    tag_dir: Path  # the complete checkpoint loaded
    load_dir: Path  # what load_checkpoint reads: the checkpoints dir, or its universal/ conversion
    universal: bool

    def ds_config(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        """``ds_config`` as DeepSpeed must see it to load this point (``load_universal`` for a conversion)."""
        if not self.universal:
            return ds_config
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def load_point(tag_dir: Path, world_size: int, is_main: bool) -> ResumePoint:
    """How ``tag_dir`` loads on ``world_size`` ranks: as it is when saved at that size; otherwise rank 0
    converts it to DeepSpeed's universal format first while the other ranks wait on the folder, not in a
    collective that would time out on a large model (pipeline/universal.py; collective)."""
    import deepspeed.comm as dist  # lazy: seconds of import, off the CLI dispatch path

    if checkpoint.CheckpointState.read(tag_dir).world_size == world_size:
        return ResumePoint(tag_dir, tag_dir.parent, universal=False)
    target = universal.convert_or_wait(tag_dir, is_main, dist.barrier)
    return ResumePoint(tag_dir, target.parent, universal=True)


def load_shards(engine: Any, point: ResumePoint) -> dict[str, Any]:
    """Weights, optimizer state and our client state, each rank its own shards. DeepSpeed 0.19.8's
    universal ZeRO-3 load (a) copies the first param group's hyperparameters into every group, so the
    no-decay group would decay: put this run's back; (b) gives every group's state the same ``step``
    tensor, which AdamW increments in place once per group: give each its own."""
    groups = engine.optimizer.param_groups
    hyper = [{key: value for key, value in group.items() if key != "params"} for group in groups]
    _, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag_dir.name, load_lr_scheduler_states=False)
    if point.universal:
        for group, values in zip(engine.optimizer.param_groups, hyper, strict=True):
            group.update(values)
        for state in engine.optimizer.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
    return client


def leave_process_group() -> None:
    """Every rank leaves together and tears its process group down before the interpreter exits: a
    rank that exits with gloo's threads alive while a peer still talks to it can abort in C++
    ("terminate called without an active exception", exit -6) after a run that finished well."""
    import torch.distributed as dist  # lazy: seconds of import, off the CLI dispatch path

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_weights_finite(engine: Any) -> bool:
    """Whether this rank's share of the weights is finite: its ZeRO-3 partition (``ds_tensor``), or
    the whole parameter at lower stages. Cheap next to a step: one pass over this rank's numbers."""
    import torch  # lazy: seconds of import, off the CLI dispatch path

    for param in engine.module.parameters():
        held = getattr(param, "ds_tensor", None)
        held = param.data if held is None else held
        if held.numel() and not bool(torch.isfinite(held).all()):
            return False
    return True


def all_weights_finite(engine: Any) -> bool:
    """Whether every rank's share of the weights is finite (collective)."""
    import torch  # lazy: seconds of import, off the CLI dispatch path
    import torch.distributed as dist

    bad = torch.tensor(float(not local_weights_finite(engine)), device=engine.device)
    dist.all_reduce(bad)
    return bool(bad.item() == 0)
