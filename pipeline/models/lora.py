"""``model.lora``: PEFT LoRA adapters inside a memory model, and the two ways an export takes them out.

The adapters are injected in place (``peft.inject_adapter_in_model``): the model stays a
``MemoryModelForCausalLM`` for DeepSpeed, checkpoints and eval, its state dict holds the base layers
(``...c_attn.base_layer.weight``) beside the adapters (``...c_attn.lora_A.default.weight``). Only the
adapters and the memory's own parameters train; every weight of the pretrained decoder stays frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.config import LoraSettings
from pipeline.errors import UserError

from .modeling_memtrain import AssociativeLayer, MemoryModelForCausalLM

ADAPTER = "default"  # PEFT's adapter name


def memory_parameters(model: MemoryModelForCausalLM) -> list[nn.Parameter]:
    """The memory's own parameters: the memory kind's, and those of the layers ARMT wraps around the decoder's."""
    wrappers = [module for module in model.decoder.modules() if isinstance(module, AssociativeLayer)]
    return [*model.memory.parameters(), *(p for w in wrappers for p in w.parameters(recurse=False))]


def _adaptable_layers(model: MemoryModelForCausalLM) -> dict[str, type]:
    """Last name part -> class of the decoder's layers LoRA can adapt (linear maps and embeddings)."""
    return {name.rpartition(".")[2]: type(module) for name, module in model.decoder.named_modules()
            if isinstance(module, (nn.Linear, Conv1D, nn.Embedding))}


def peft_config(settings: LoraSettings, model: MemoryModelForCausalLM):
    """The ``peft.LoraConfig`` of ``settings`` on this model's decoder; unknown target names are one UserError."""
    layers = _adaptable_layers(model)
    unknown = [name for name in settings.target_modules if name not in layers]
    if unknown:
        raise UserError(f"model.lora.target_modules: {', '.join(unknown)} not among the decoder's adaptable layers "
                        f"({', '.join(sorted(layers))})")
    conv1d = {layers[name] is Conv1D for name in settings.target_modules}
    if len(conv1d) > 1:
        raise UserError("model.lora.target_modules mixes Conv1D and Linear layers; adapt one kind")
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), fan_in_fan_out=conv1d == {True})


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def add_adapters(model: MemoryModelForCausalLM, settings: LoraSettings) -> None:
    """Inject the adapters, freeze the decoder, keep the memory trainable. Under ZeRO-3's ``zero.Init`` the
    adapters are partitioned as they are created, so PEFT's init (B = 0: the adapted model starts as the
    base) ran on empty placeholders: it is rerun on the gathered values."""
    inject_adapter_in_model(peft_config(settings, model), model, adapter_name=ADAPTER)
    for param in memory_parameters(model):
        param.requires_grad_(True)
    for _, layer in _lora_layers(model):
        params = [*layer.lora_A.parameters(), *layer.lora_B.parameters()]
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed  # lazy: only ZeRO-3-partitioned adapters need it; eval and export run without it

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                layer.reset_lora_parameters(ADAPTER, True)


def remove_adapters(model: MemoryModelForCausalLM, merge: bool) -> MemoryModelForCausalLM:
    """Put every adapted layer's base layer back, with the adapter merged into its weights (``merge``) or
    dropped. The result is a plain model: ``save_pretrained`` writes no PEFT keys."""
    with torch.no_grad():
        for name, layer in _lora_layers(model):
            if merge:
                layer.merge(adapter_names=[ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
    del model.peft_config  # set by inject_adapter_in_model
    return model


def save_adapter(model: MemoryModelForCausalLM, folder: Path) -> None:
    """The adapters of ``model`` as PEFT saves a ``PeftModel`` (``adapter_config.json`` and
    ``adapter_model.safetensors``, keys under ``base_model.model.``), for ``PeftModel.from_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(str(folder))  # what inject_adapter_in_model was given
    weights = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    save_file({f"base_model.model.{key}": value.detach().contiguous() for key, value in weights.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
