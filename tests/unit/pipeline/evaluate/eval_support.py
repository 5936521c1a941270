"""Helpers of the eval tests: a tiny memory model and a split in the shard format (input_ids, loss_mask, recall_mask)."""

from __future__ import annotations

import datasets
import torch

from tiny import VARIANTS, tiny_config

from pipeline.config import ExperimentConfig
from pipeline.models import build_model

VOCAB, BOS, EOS, PAD = 53, 1, 2, 0
SEGMENT_LEN, N_SEGMENTS = VARIANTS["eval"]["data"]["segment_len"], VARIANTS["eval"]["data"]["n_segments"]


def eval_config(*overrides: str) -> ExperimentConfig:
    """tiny.py's "eval" variant (``--set``-style overrides on top)."""
    return tiny_config("eval", *overrides)


def tiny_model(cfg: ExperimentConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg, VOCAB, BOS, EOS, PAD)


def split_rows(n_samples: int = 7, seed: int = 0) -> dict[str, list]:
    """Random samples; sample 2 ends in padding (loss_mask 0); recall marks also fall on position 0
    and on padding, where they must not count."""
    g = torch.Generator().manual_seed(seed)
    length = SEGMENT_LEN * N_SEGMENTS
    ids = torch.randint(3, VOCAB, (n_samples, length), generator=g)
    loss_mask = torch.ones(n_samples, length, dtype=torch.int8)
    ids[2, -5:], loss_mask[2, -5:] = PAD, 0
    recall = (torch.rand(n_samples, length, generator=g) < 0.25).to(torch.int8)
    recall[:, 0], recall[2, -2] = 1, 1
    return {"input_ids": ids.int().tolist(), "loss_mask": loss_mask.tolist(), "recall_mask": recall.tolist(),
            "book_id": [f"book{i // 3}" for i in range(n_samples)], "sample_index": [i % 3 for i in range(n_samples)]}


def as_dataset(rows: dict[str, list]) -> datasets.Dataset:
    length = len(rows["input_ids"][0])
    tokens = lambda dtype: datasets.List(datasets.Value(dtype), length=length)  # noqa: E731
    return datasets.Dataset.from_dict(rows, features=datasets.Features({
        "input_ids": tokens("int32"), "loss_mask": tokens("int8"), "recall_mask": tokens("int8"),
        "book_id": datasets.Value("string"), "sample_index": datasets.Value("int32")}))
