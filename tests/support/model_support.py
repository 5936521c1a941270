"""Tiny memory models for the model tests (CPU, fp32, a few thousand parameters): tiny.py's "model" variant."""

from __future__ import annotations

import tiny
import torch

from pipeline.config import ExperimentConfig
from pipeline.models import MemoryModelForCausalLM, build_model

VOCAB = 61
BOS, EOS, PAD = 1, 2, 0
SEGMENT_LEN = tiny.VARIANTS["model"]["data"]["segment_len"]


def tiny_config(kind: str = "rmt", arch: str = "gpt2", *overrides: str) -> ExperimentConfig:
    return tiny.tiny_config("model", f"memory.kind={kind}", f"model.arch={arch}", *overrides)


def tiny_model(kind: str = "rmt", arch: str = "gpt2", *overrides: str, seed: int = 0) -> MemoryModelForCausalLM:
    torch.manual_seed(seed)
    model = build_model(tiny_config(kind, arch, *overrides), VOCAB, BOS, EOS, PAD)
    randomize_memory_weights(model)
    return model.eval()


def randomize_memory_weights(model: MemoryModelForCausalLM) -> None:
    """ARMT writes through a zero-initialised value projection (as published); tests need it non-zero."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("write_value"):
                param.normal_(0.0, 0.2)


def random_ids(batch: int, n_segments: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, n_segments * SEGMENT_LEN), generator=generator)
