"""ExperimentConfig -> MemoryModelForCausalLM (random init of model.arch, or a local pretrained decoder)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from pipeline.config import ExperimentConfig, ModelConfig
from pipeline.errors import UserError

from .configuration_memtrain import MemoryModelConfig
from .modeling_memtrain import MemoryModelForCausalLM, memory_kind

DEFAULT_ARMT_D_MEM = 64


def decoder_config(model: ModelConfig, vocab_size: int, token_ids: dict[str, int]) -> PretrainedConfig:
    """The HF config of a randomly initialised ``model.arch`` decoder."""
    if model.hidden_size % model.num_heads:
        raise UserError(f"model.hidden_size {model.hidden_size} is not divisible by model.num_heads {model.num_heads}")
    inner = model.intermediate_size or 4 * model.hidden_size
    common = dict(vocab_size=vocab_size, tie_word_embeddings=model.tie_embeddings, **token_ids)
    if model.arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_positions=model.max_positions, n_embd=model.hidden_size, n_layer=model.num_layers,
            n_head=model.num_heads, n_inner=inner, resid_pdrop=model.dropout, embd_pdrop=model.dropout,
            attn_pdrop=model.dropout, **common)
    shared = dict(hidden_size=model.hidden_size, intermediate_size=inner, num_hidden_layers=model.num_layers,
                  num_attention_heads=model.num_heads, max_position_embeddings=model.max_positions,
                  attention_dropout=model.dropout, **common)
    if model.arch == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_dropout=model.dropout, **shared)
    return AutoConfig.for_model(model.arch, num_key_value_heads=model.num_heads, **shared)


def _gathered(params: list[torch.nn.Parameter]):
    """Full values of ZeRO-3-partitioned parameters inside the block (read only)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # lazy: only ZeRO-3-partitioned parameters need it; eval and export run without it

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def _load_pretrained(path: str, vocab_size: int):
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"model.pretrained {path} is not a Hugging Face model folder (no config.json)")
    decoder = AutoModelForCausalLM.from_pretrained(folder)
    if decoder.config.vocab_size < vocab_size:
        raise UserError(f"model.pretrained has {decoder.config.vocab_size} token embeddings, the data needs {vocab_size}")
    weight = decoder.get_input_embeddings().weight
    with _gathered([weight]):
        std = float(weight.detach().float().std())
    return decoder, std


def memory_config(cfg: ExperimentConfig, vocab_size: int,
                  token_ids: dict[str, int]) -> tuple[MemoryModelConfig, PreTrainedModel | None]:
    """The HF config of ``cfg``'s model, and the loaded decoder when ``model.pretrained`` is set."""
    decoder, init_std = None, None
    if cfg.model.pretrained:
        decoder, init_std = _load_pretrained(cfg.model.pretrained, vocab_size)
        base, hidden = decoder.config.to_dict(), decoder.config.hidden_size  # a copy: leave the decoder's own be
    else:
        base = decoder_config(cfg.model, vocab_size, token_ids)
        hidden = base.hidden_size
    memory = cfg.memory
    try:
        config = MemoryModelConfig(
            decoder_config=base, memory_kind=memory.kind, num_memory_tokens=memory.num_tokens,
            segment_len=cfg.data.segment_len, bptt_depth=memory.bptt_depth, memory_write=memory.write,
            armt_nu=memory.armt_nu, armt_d_mem=memory.armt_d_mem or min(DEFAULT_ARMT_D_MEM, hidden),
            armt_schedule=memory.armt_schedule,
            memory_init_std=init_std, segment_checkpointing=cfg.model.segment_checkpointing,
            checkpoint_policy=cfg.model.checkpoint_policy, vocab_size=vocab_size,
            **token_ids)
        memory_kind(config, cfg.data.sample_len)
    except ValueError as err:
        raise UserError(f"memory.kind={memory.kind}: {err}") from None
    return config, decoder


def saved_model_config(path: Path) -> MemoryModelConfig | None:
    """The model config a training wrote to its run folder (``model_config.json``), None if it has none."""
    return MemoryModelConfig.from_json_file(str(path)) if path.is_file() else None


def build_model(cfg: ExperimentConfig, vocab_size: int, bos_token_id: int, eos_token_id: int,
                pad_token_id: int, saved: MemoryModelConfig | None = None) -> MemoryModelForCausalLM:
    """Build the memory model of ``cfg``. Under ZeRO-3 the caller keeps an ``HfDeepSpeedConfig`` alive
    (and may open ``deepspeed.zero.Init``): construction goes through ``_from_config``, which
    partitions parameters as they are created and initialises them gathered.

    ``saved`` (a run's ``model_config.json``) builds that model with weights for a checkpoint to
    replace: ``model.pretrained``'s folder is not read, so eval and export outlive it."""
    token_ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    config, decoder = (saved, None) if saved is not None else memory_config(cfg, vocab_size, token_ids)
    model = MemoryModelForCausalLM._from_config(config, decoder=decoder)
    if cfg.model.lora is not None:
        from .lora import add_adapters  # lazy: peft loads only with model.lora (seconds of import)

        add_adapters(model, cfg.model.lora)
    if cfg.model.layer_checkpointing:
        model.activation_checkpointing_enable()
    return model
