"""Hugging Face config of a memory-augmented decoder (self-contained: copied next to exported weights)."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

CHECKPOINT_POLICIES = ("full", "save_matmuls")


class MemoryModelConfig(PretrainedConfig):
    """A base decoder config (``decoder_config``, any HF causal LM) plus the memory around it.

    memory_kind (the classes are ``MEMORY_KINDS`` in modeling_memtrain.py, which checks the rest):
        ``rmt``  read/write memory tokens carried from segment to segment,
        ``armt`` per-layer associative matrix memory written by memory tokens (delta rule),
        ``none`` the same segment loop without memory, ``full`` one pass over the whole sample.
    num_memory_tokens: memory tokens per segment (rmt: m read + m write; armt: m write).
    segment_len: tokens per segment (the last segment of an input may be shorter).
    bptt_depth: loss of segment k sends gradient to segment j < k through memory iff
        ``k - j <= bptt_depth``; -1 means no limit (full backpropagation through time).
    memory_write: rmt only: how the output at the write positions becomes the next read memory
        (``paper`` | ``norm`` | ``gated``; see ``modeling_memtrain.RecurrentMemory``). memtrain builds with
        ``norm`` (``memory.write``); the default here stays ``paper`` so a config saved before
        the setting existed loads as the model it was.
    armt_nu: DPFP feature-map order; armt_d_mem: width of the associative keys before DPFP.
    armt_schedule: armt only: the order inference runs its (segment, layer) cells in. ``sequential``:
        segment by segment, layer by layer; ``diagonal``: the cells of one anti-diagonal
        (segment + layer = const) in one vmapped layer call (Sivtsov et al. 2025; see
        ``modeling_memtrain.DiagonalPass``). The same outputs; used without gradients, in eval mode,
        on unpartitioned weights, for inputs of two segments or more; training stays sequential.
    memory_init_std: std of the learned memory tokens; None = the decoder's ``initializer_range``.
    segment_checkpointing: recompute each segment in the backward pass (activation memory stays
        flat in the number of segments).
    checkpoint_policy: what segment checkpointing recomputes: ``full`` (everything) or
        ``save_matmuls`` (keeps matmul and attention outputs, recomputes the pointwise ops).
    fused_head: compute the LM head's loss and gradients in one chunked pass (no full logits, no
        head recompute under segment checkpointing); False = plain logits + cross-entropy.
    """

    model_type = "memtrain_memory"
    sub_configs_defaults = {"decoder_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    decoder_config: dict | PretrainedConfig | None = None
    memory_kind: str = "rmt"
    num_memory_tokens: int = 8
    segment_len: int = 128
    bptt_depth: int = -1
    memory_write: str = "paper"
    armt_nu: int = 3
    armt_d_mem: int = 64
    armt_schedule: str = "sequential"
    memory_init_std: float | None = None
    segment_checkpointing: bool = False
    checkpoint_policy: str = "full"
    fused_head: bool = True
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.segment_len < 1 or self.num_memory_tokens < 0 or self.bptt_depth < -1 or self.armt_nu < 1:
            raise ValueError("segment_len >= 1, num_memory_tokens >= 0, bptt_depth >= -1 and armt_nu >= 1 are required")
        if self.checkpoint_policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoint_policy must be one of {CHECKPOINT_POLICIES}, got {self.checkpoint_policy!r}")
        for name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(self.decoder_config, name))

    @property
    def max_positions(self) -> int:
        return int(self.decoder_config.max_position_embeddings)

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        return self.decoder_config
