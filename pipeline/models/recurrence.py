"""The segment loop: per-segment loss inside each step, truncated BPTT, segment checkpointing.

Truncated BPTT with depth d (``bptt_depth``): the loss of segment k sends gradient to segment
j <= k (its inputs, and through them to every parameter used there) iff ``k - j <= d``;
d = -1 means no limit. The learned initial memory counts as part of segment 0.

Detaching the memory every d segments (the usual shortcut) gives some pairs depth d and others
depth 0. To be exact per pair, the loop carries a window of memory *versions* with the same
value but different graphs: version r was detached r segments ago. Segment k runs once on all
versions stacked along the batch (at most d + 1 of them); the loss reads the deepest version,
version r feeds version r + 1 of the next segment and version 0 is always a detached copy. This
costs up to (d + 1)x the compute of a segment when 0 < d < n_segments - 1; d = 0 and d = -1 (or
d >= n_segments - 1) run a single version.

Each step returns only (next memory state, NLL sum, target count[, per-token NLL]); logits never
outlive their step, so with segment checkpointing activation memory is flat in the segment count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .memory_cells import SegmentCell, State

IGNORE_INDEX = -100


@dataclass
class SegmentStats:
    nll: torch.Tensor  # float32 [n_segments]: NLL sums over the batch
    tokens: torch.Tensor  # int64 [n_segments]: counted targets
    token_nll: torch.Tensor | None  # float32 [B, T] in target frame (column t = NLL of target t), or None


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[:, t + 1] (across segment boundaries); the last position predicts nothing."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def head_nll(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
             per_token: bool) -> tuple[torch.Tensor, ...]:
    """(NLL sum, count[, per-position NLL]) of ``head(hidden)`` against ``targets``, in float32."""
    logits = head(hidden).float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    nll = nll.view(targets.shape)
    count = (targets != IGNORE_INDEX).sum()
    return (nll.sum(), count, nll) if per_token else (nll.sum(), count)


def _maybe_checkpoint(enabled: bool, fn: Callable, *args):
    return checkpoint(fn, *args, use_reentrant=False) if enabled else fn(*args)


def _split_versions(state: State, copies: int) -> list[State]:
    return [tuple(t.chunk(copies)[i] for t in state) for i in range(copies)]


def run_segments(cell: SegmentCell, head: Callable, embeds: torch.Tensor, targets: torch.Tensor,
                 segment_len: int, bptt_depth: int, checkpointing: bool, per_token: bool) -> SegmentStats:
    """Loss statistics of a recurrent pass over ``embeds`` [B, n * segment_len, d]."""
    batch, total = embeds.shape[:2]
    n_segments = total // segment_len
    state = cell.begin(batch, embeds.device)
    truncated = bool(state) and torch.is_grad_enabled() and 0 <= bptt_depth < n_segments - 1
    versions = [state]
    nll, counts, token_nll = [], [], []
    for k in range(n_segments):
        write = k < n_segments - 1
        copies = len(versions)
        stacked = tuple(torch.cat(parts) for parts in zip(*versions)) if copies > 1 else versions[0]
        segment = embeds[:, k * segment_len:(k + 1) * segment_len]
        segment = segment.repeat(copies, 1, 1) if copies > 1 else segment
        seg_targets = targets[:, k * segment_len:(k + 1) * segment_len]

        def step(stacked_state, segment, seg_targets, write=write):
            hidden, next_state, _ = cell.step(stacked_state, segment, write)
            return next_state, head_nll(head, hidden[-batch:], seg_targets, per_token)

        next_state, stats = _maybe_checkpoint(checkpointing, step, stacked, segment, seg_targets)
        nll.append(stats[0])
        counts.append(stats[1])
        if per_token:
            token_nll.append(stats[2])
        if not write:
            break
        if not truncated:
            versions = [next_state]
        else:
            outs = _split_versions(next_state, copies)
            versions = [tuple(t.detach() for t in outs[0])] + outs[:min(copies, bptt_depth)]
    return SegmentStats(torch.stack(nll), torch.stack(counts), _to_target_frame(token_nll) if per_token else None)


def run_full(cell: SegmentCell, head: Callable, embeds: torch.Tensor, targets: torch.Tensor, segment_len: int,
             checkpointing: bool, per_token: bool) -> SegmentStats:
    """Loss statistics of one pass over the whole sample, still reported per segment."""
    hidden, _, _ = cell.step((), embeds, write=False)
    nll, counts, token_nll = [], [], []
    for start in range(0, embeds.shape[1], segment_len):
        stats = _maybe_checkpoint(checkpointing, lambda h, t: head_nll(head, h, t, per_token),
                                  hidden[:, start:start + segment_len], targets[:, start:start + segment_len])
        nll.append(stats[0])
        counts.append(stats[1])
        if per_token:
            token_nll.append(stats[2])
    return SegmentStats(torch.stack(nll), torch.stack(counts), _to_target_frame(token_nll) if per_token else None)


def _to_target_frame(position_nll: list[torch.Tensor]) -> torch.Tensor:
    """Per-position NLLs (position t predicts target t + 1) -> column t holds the NLL of target t."""
    nll = torch.cat(position_nll, dim=1)
    return torch.cat([torch.zeros_like(nll[:, :1]), nll[:, :-1]], dim=1)


def run_logits(cell: SegmentCell, head: Callable, embeds: torch.Tensor, segment_len: int) -> torch.Tensor:
    """Logits [B, T, V] of every position (inference; no loss, no truncation)."""
    state = cell.begin(embeds.shape[0], embeds.device)
    n_segments = embeds.shape[1] // segment_len
    logits = []
    for k in range(n_segments):
        hidden, state, _ = cell.step(state, embeds[:, k * segment_len:(k + 1) * segment_len], k < n_segments - 1)
        logits.append(head(hidden))
    return torch.cat(logits, dim=1)
