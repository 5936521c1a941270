"""Memory-augmented decoders (RMT, ARMT, no memory, full attention) as one Hugging Face model class.

Self-contained: this file and its same-folder relative imports are copied next to exported
weights, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without
the memtrain project installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .associative import AssociativeLayer
from .configuration_memtrain import MemoryModelConfig
from .generation_memtrain import generate_with_memory
from .memory_cells import AssociativeCell, MemoryTokens, RecurrentCell, SegmentCell
from .recurrence import run_full, run_logits, run_segments, shift_targets


@dataclass
class MemoryModelOutput(ModelOutput):
    """``loss`` = sum(segment_nll) / sum(segment_tokens). Segment k's statistics are the predictions
    made from segment k's positions (targets k*L+1 .. (k+1)*L)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    segment_nll: torch.Tensor | None = None
    segment_tokens: torch.Tensor | None = None
    token_nll: torch.Tensor | None = None


def decoder_layers(decoder: PreTrainedModel) -> nn.ModuleList:
    """The repeated block list of a HF causal LM (``transformer.h``, ``model.layers``, ``gpt_neox.layers``...)."""
    n_layers = decoder.config.num_hidden_layers
    for module in decoder.base_model.children():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"cannot find the {n_layers} decoder layers of {type(decoder).__name__}")


class MemoryModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder with segment-level memory. ``generate`` is its own (memory needs segment-wise reading);
    GenerationMixin is inherited so transformers gives it a ``generation_config`` and loads the saved one."""

    config_class = MemoryModelConfig
    base_model_prefix = "decoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: MemoryModelConfig, decoder: PreTrainedModel | None = None):
        super().__init__(config)
        if decoder is None:
            decoder = AutoModelForCausalLM.from_config(config.decoder_config)
        else:  # pretrained weights: keep post_init (and ZeRO-3's gathered init) from re-initialising them
            for module in decoder.modules():
                module._is_hf_initialized = True
        self.decoder = decoder
        hidden = config.decoder_config.hidden_size
        init_std = config.memory_init_std or getattr(config.decoder_config, "initializer_range", 0.02)
        kind, m = config.memory_kind, config.num_memory_tokens
        if kind in ("rmt", "armt") and m > 0:
            self.memory = MemoryTokens(m, hidden, init_std)
        if kind == "armt":
            layers = decoder_layers(self.decoder)
            for i in range(len(layers)):
                layers[i] = AssociativeLayer(layers[i], hidden, config.armt_d_mem, config.armt_nu, init_std)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The decoder initialises itself (it is a PreTrainedModel); AssociativeLayer sets its own values.
        if isinstance(module, MemoryTokens):
            nn.init.normal_(module.weight, mean=0.0, std=module.init_std)

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    def cell(self) -> SegmentCell:
        cfg, backbone = self.config, self.decoder.base_model
        if cfg.memory_kind == "armt":
            layers = [m for m in self.decoder.modules() if isinstance(m, AssociativeLayer)]
            return AssociativeCell(backbone, cfg.segment_len, self.memory, layers, cfg.decoder_config.hidden_size)
        if cfg.memory_kind == "rmt" and cfg.num_memory_tokens > 0:
            return RecurrentCell(backbone, cfg.segment_len, self.memory)
        return SegmentCell(backbone, cfg.segment_len)

    def _segment_len_for(self, total: int) -> int:
        cfg = self.config
        if cfg.memory_kind == "full":
            if total > cfg.max_positions:
                raise ValueError(f"full attention over {total} tokens exceeds the decoder's {cfg.max_positions} positions")
            return total
        if total % cfg.segment_len:
            raise ValueError(f"input length {total} is not a multiple of segment_len {cfg.segment_len}")
        return cfg.segment_len

    def forward(self, input_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                return_token_nll: bool = False, inputs_embeds: torch.FloatTensor | None = None) -> MemoryModelOutput:
        """input_ids [B, n_segments * segment_len]; labels same shape, -100 = not a target (shifted here).

        Returns the mean ``loss`` and per-segment NLL sums and target counts (``token_nll`` [B, T] on
        request) when labels are given, else ``logits`` [B, T, V].
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        embeds = self.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        segment_len = self._segment_len_for(embeds.shape[1])
        cell, head = self.cell(), self.get_output_embeddings()
        if labels is None:
            return MemoryModelOutput(logits=run_logits(cell, head, embeds, segment_len))
        targets = shift_targets(labels)
        checkpointing = self.config.segment_checkpointing and torch.is_grad_enabled()
        if self.config.memory_kind == "full":
            stats = run_full(cell, head, embeds, targets, self.config.segment_len, checkpointing, return_token_nll)
        else:
            stats = run_segments(cell, head, embeds, targets, segment_len, self.config.bptt_depth, checkpointing,
                                 return_token_nll)
        loss = stats.nll.sum() / stats.tokens.sum().clamp(min=1)
        return MemoryModelOutput(loss=loss, segment_nll=stats.nll, segment_tokens=stats.tokens,
                                 token_nll=stats.token_nll)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.LongTensor:
        """Read the prompt segment by segment (memory written after each full segment), then continue the
        last (partial) segment with the current memory and a KV cache; no write tokens after the prompt.
        Prompts are unpadded (an attention_mask, if given, must be all ones). An argument left out comes
        from ``self.generation_config`` (as in transformers; the export writes one), then from the model
        config; ``max_new_tokens`` falls back to 20."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("generate takes unpadded prompts of equal length (attention_mask must be all ones)")

        def setting(value, name: str, fallback):
            if value is not None:
                return value
            configured = getattr(self.generation_config, name, None)  # also when it was set to None
            return fallback if configured is None else configured

        return generate_with_memory(self, input_ids, setting(max_new_tokens, "max_new_tokens", 20),
                                    setting(do_sample, "do_sample", False), setting(temperature, "temperature", 1.0),
                                    setting(top_k, "top_k", None),
                                    setting(eos_token_id, "eos_token_id", self.config.eos_token_id),
                                    setting(pad_token_id, "pad_token_id", self.config.pad_token_id))


MemoryModelConfig.register_for_auto_class()
MemoryModelForCausalLM.register_for_auto_class("AutoModelForCausalLM")
