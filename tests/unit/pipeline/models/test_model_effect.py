"""The effect the project exists for: with memory, a tiny RMT recalls facts from earlier segments.

Books of the same kind as data_prep.synthetic, at token level: segment 0 states a fact (marker F,
value v) and restates it at its end (marker R, v), later segments are filler that end with R and
the same v. Only the values after R are targets. A model without memory learns the in-segment
restatement but can only guess later recalls (1 of VALUES, ln 8 = 2.08 nats); RMT must carry v
through its memory. (On data_prep's text books a tiny model needs far longer than a CI budget to
find the memory path: 600 CPU steps showed no gap. The in-segment restatement is the curriculum
that lets it find the path here in ~150 steps.)
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.models import build_model

SEGMENT_LEN, N_SEGMENTS, VOCAB, VALUES = 8, 3, 64, 8
FACT, RECALL, FIRST_VALUE = 3, 4, 5


def recall_books(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, targets (values after R), recall_mask (targets only memory can predict)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_VALUE + VALUES, VOCAB, (n, N_SEGMENTS * SEGMENT_LEN), generator=generator)
    value = torch.randint(FIRST_VALUE, FIRST_VALUE + VALUES, (n,), generator=generator)
    ids[:, 0], ids[:, 1] = FACT, value
    targets = torch.zeros_like(ids, dtype=torch.bool)
    for k in range(N_SEGMENTS):
        end = (k + 1) * SEGMENT_LEN
        ids[:, end - 2], ids[:, end - 1] = RECALL, value
        targets[:, end - 1] = True
    recall = targets.clone()
    recall[:, :SEGMENT_LEN] = False
    return ids, targets, recall


def train_and_score(kind: str, steps: int = 150) -> torch.Tensor:
    """Mean NLL on the recall tokens of each segment after a short plain-PyTorch training run."""
    cfg = load_config(None, [
        f"memory.kind={kind}", f"data.segment_len={SEGMENT_LEN}", f"data.n_segments={N_SEGMENTS}",
        "memory.num_tokens=2", "model.hidden_size=64", "model.num_heads=2", "model.num_layers=2",
        "model.max_positions=32", "model.segment_checkpointing=false"])
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, 1, 2, 0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        ids, targets, _ = recall_books(32, seed=step)
        model(ids, labels=ids.masked_fill(~targets, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ids, _, recall = recall_books(256, seed=10_000)
    with torch.no_grad():
        out = model.eval()(ids, labels=ids.masked_fill(~recall, -100))
    return out.segment_nll[1:] / out.segment_tokens[1:]


@pytest.mark.slow
def test_rmt_recalls_what_no_memory_cannot():
    rmt, none = train_and_score("rmt"), train_and_score("none")
    assert bool((none > 1.5).all()), f"without memory the recall should stay near chance, got {none}"
    assert bool((rmt < 0.5 * none).all()), f"rmt {rmt.tolist()} vs none {none.tolist()} (nats, segments 1..)"
