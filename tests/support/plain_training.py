"""Plain PyTorch training of a memory model on prepared shards: one process, one thread, no DeepSpeed.

The same model, optimizer, schedule, clipping and batch size as ``memtrain train`` with
``DEMO_RANKS`` ranks, without the 2-rank start-up: for tests that need a trained model's numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.shards import open_split
from data_prep.tokenizer import describe
from pipeline.config import load_config
from pipeline.data import open_train_split, to_micro_batch
from pipeline.demo import DEMO_RANKS
from pipeline.evaluate import evaluate_model
from pipeline.models import build_model
from pipeline.optim import lr_at, make_optimizer


def train_and_evaluate(config: str, overrides: list[str]) -> dict[str, Any]:
    """Train ``config`` (+ ``overrides``) for train.max_steps; the EvalResult dict on eval.split."""
    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    info = describe(Path(cfg.data.output_dir) / "tokenizer")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, info.vocab_size, info.bos_token_id, info.eos_token_id, info.pad_token_id).train()
    optimizer = make_optimizer(model, cfg.train)
    samples = open_train_split(cfg.data.output_dir)
    batch_size = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.train.grad_accum * DEMO_RANKS
    order = np.random.default_rng(cfg.train.seed)
    for step in range(cfg.train.max_steps):
        rows = samples[np.sort(order.choice(len(samples), batch_size, replace=False))]
        batch = to_micro_batch(rows, cfg.data.sample_len, cfg.data.n_segments)
        model(batch.input_ids, labels=batch.labels).loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.train, step)
        optimizer.step()
        optimizer.zero_grad()
    return evaluate_model(model, open_split(cfg.data.output_dir, cfg.eval.split), cfg).to_dict()
