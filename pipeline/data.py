"""Training batches: a deterministic, resumable, distributed walk over the Arrow sample shards.

Every epoch is a permutation of the split seeded by ``(train.seed, epoch)``. A step consumes the
next ``global_batch`` samples of it, laid out micro-step major: micro-step ``m`` of rank ``r``
takes samples ``[m*world*micro + r*micro, ... + micro)`` of the step's slice, so one rank with
twice the accumulation sees the same samples as two ranks (a resume on another world size keeps
the global batch and the order). An epoch's tail shorter than a global batch is skipped.
The position ``(epoch, index)`` is all the state there is: it goes into the checkpoint.

Shapes are the same on every rank at every micro-step (ZeRO-3 gathers parameters collectively, a
rank with fewer segments would hang the others): the curriculum is a function of the step and the
random truncation is drawn from a generator seeded by ``(seed, step, micro-step)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.shards import open_split
from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.ds_config import BatchPlan
from pipeline.errors import UserError

IGNORE_INDEX = -100


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # next unread position in this epoch's permutation

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [micro, n_segments * segment_len], int64
    labels: torch.Tensor  # same shape, IGNORE_INDEX where loss_mask is 0
    n_segments: int


@dataclass
class TrainBatches:
    """This rank's micro-batches, step after step; see the module docstring for the layout."""

    dataset: Any  # datasets.Dataset with numpy format over input_ids and loss_mask
    plan: BatchPlan
    rank: int
    segment_len: int
    seed: int
    position: DataPosition = field(default_factory=DataPosition)

    def __post_init__(self) -> None:
        if len(self.dataset) < self.plan.global_batch:
            raise UserError(
                f"the train split holds {len(self.dataset)} samples, fewer than one global batch "
                f"({self.plan.global_batch}); make more data or lower train.micro_batch_size"
            )
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._order_epoch = epoch
        return self._order

    def next_step(self, n_segments_per_micro: list[int]) -> list[MicroBatch]:
        """The ``plan.accum`` micro-batches of the next step, truncated to the given segment counts."""
        if self.position.index + self.plan.global_batch > len(self.dataset):
            self.position = DataPosition(self.position.epoch + 1, 0)
        order = self._permutation(self.position.epoch)
        step_ids = order[self.position.index:self.position.index + self.plan.global_batch]
        self.position = DataPosition(self.position.epoch, self.position.index + self.plan.global_batch)
        per_micro = self.plan.micro * self.plan.world
        batches = []
        for m, n_segments in enumerate(n_segments_per_micro):
            start = m * per_micro + self.rank * self.plan.micro
            rows = self.dataset[step_ids[start:start + self.plan.micro].tolist()]
            batches.append(to_micro_batch(rows, n_segments * self.segment_len, n_segments))
        return batches


@dataclass
class LengthPools:
    """QA samples (``n_segments`` column) are never truncated: a step of n segments takes samples of
    exactly n segments (left-aligned, so cutting the row to n segments drops only padding). Each length
    is its own TrainBatches walk; the position is one DataPosition per length."""

    dataset: Any
    plan: BatchPlan
    rank: int
    segment_len: int
    seed: int
    positions: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = np.asarray(self.dataset["n_segments"])
        self.pools = {int(n): TrainBatches(self.dataset.select(np.flatnonzero(lengths == n)), self.plan, self.rank,
                                           self.segment_len, self.seed + int(n),
                                           DataPosition(**self.positions.get(str(int(n)), {})))
                      for n in np.unique(lengths)}

    @property
    def position(self) -> "LengthPools":
        return self  # as_dict() below is what the checkpoint stores

    def as_dict(self) -> dict[str, Any]:
        return {"pools": {str(n): pool.position.as_dict() for n, pool in self.pools.items()}}

    def next_step(self, n_segments_per_micro: list[int]) -> list[MicroBatch]:
        n = n_segments_per_micro[0]
        if n not in self.pools or any(c != n for c in n_segments_per_micro):
            raise UserError(f"no training samples of {n} segments (the data has {sorted(self.pools)})")
        return self.pools[n].next_step(n_segments_per_micro)


def make_train_batches(dataset: Any, plan: BatchPlan, rank: int, segment_len: int, seed: int,
                       saved: dict[str, Any] | None) -> "TrainBatches | LengthPools":
    """The walk that fits the data: LengthPools for QA samples, else TrainBatches; ``saved`` is the
    checkpoint's ``data_position`` (None for a fresh run)."""
    if "n_segments" in dataset.column_names:
        return LengthPools(dataset, plan, rank, segment_len, seed, (saved or {}).get("pools", {}))
    return TrainBatches(dataset, plan, rank, segment_len, seed, DataPosition(**(saved or {})))


def to_micro_batch(rows: dict[str, Any], length: int, n_segments: int) -> MicroBatch:
    input_ids = torch.as_tensor(np.stack(rows["input_ids"])[:, :length], dtype=torch.long)
    loss_mask = torch.as_tensor(np.stack(rows["loss_mask"])[:, :length])
    labels = input_ids.masked_fill(loss_mask == 0, IGNORE_INDEX)
    return MicroBatch(input_ids=input_ids, labels=labels, n_segments=n_segments)


def curriculum_segments(train: TrainConfig, step: int, default: int) -> int:
    """n_segments of the curriculum stage that holds ``step`` (``default`` without a curriculum)."""
    n_segments = default
    for stage in train.curriculum:
        if stage.from_step <= step:
            n_segments = stage.n_segments
    return n_segments


def segments_for_step(train: TrainConfig, step: int, max_segments: int, accum: int) -> list[int]:
    """Per micro-step segment counts: the curriculum's, randomly truncated with probability
    ``train.random_truncation`` to 1..n (the same draw on every rank)."""
    n_segments = curriculum_segments(train, step, max_segments)
    if train.random_truncation == 0:
        return [n_segments] * accum
    counts = []
    for micro in range(accum):
        rng = np.random.default_rng([train.seed, step, micro])
        truncate = rng.random() < train.random_truncation
        counts.append(int(rng.integers(1, n_segments + 1)) if truncate else n_segments)
    return counts


def step_batches(batches: "TrainBatches | LengthPools", train: TrainConfig, step: int, max_segments: int,
                 accum: int) -> list[MicroBatch]:
    """This rank's micro-batches of ``step``: the curriculum's segment counts, as the first segments of
    each sample, or (``train.curriculum_split``) as every sample cut into chains of that many segments."""
    counts = segments_for_step(train, step, max_segments, accum)
    if not train.curriculum_split:
        return batches.next_step(counts)
    return [as_chains(micro, n) for micro, n in zip(batches.next_step([max_segments] * accum), counts)]


def as_chains(micro: MicroBatch, n_segments: int) -> MicroBatch:
    """[B, k * n * L] -> [B * k, n * L]: each row cut into k independent chains of ``n_segments`` segments.
    The target across a cut is lost (one per chain), as at any sample boundary."""
    chains = micro.n_segments // n_segments
    rows = micro.input_ids.shape[0] * chains
    return MicroBatch(input_ids=micro.input_ids.reshape(rows, -1), labels=micro.labels.reshape(rows, -1),
                      n_segments=n_segments)


def check_data(cfg: ExperimentConfig, manifest: dict[str, Any], tokenizer_vocab: int) -> None:
    """The shards must fit the model and the config: segment shape, segment count, vocabulary."""
    where = cfg.data.output_dir
    if manifest["segment_len"] != cfg.data.segment_len:
        raise UserError(
            f"shards in {where} have segment_len={manifest['segment_len']} but data.segment_len={cfg.data.segment_len}"
        )
    wanted = max([cfg.data.n_segments, *(s.n_segments for s in cfg.train.curriculum)])
    if wanted > manifest["n_segments"]:
        raise UserError(
            f"the config asks for {wanted} segments per sample but the shards in {where} hold "
            f"n_segments={manifest['n_segments']}; prepare the data again or lower data.n_segments"
        )
    if manifest["vocab_size"] != tokenizer_vocab:
        raise UserError(
            f"shards in {where} were made with vocab_size={manifest['vocab_size']} but the tokenizer "
            f"there has {tokenizer_vocab} tokens"
        )
    if cfg.data.tokenizer is None and manifest["vocab_size"] != cfg.data.vocab_size:
        raise UserError(
            f"shards in {where} use a vocabulary of {manifest['vocab_size']} tokens but "
            f"data.vocab_size={cfg.data.vocab_size}; point data.output_dir at matching shards or prepare again"
        )


def check_splits(cfg: ExperimentConfig, manifest: dict[str, Any], global_batch: int) -> None:
    """Every split the run reads holds enough samples: a global batch of train, one sample of the
    eval split (the final eval always runs). Found at start, not after the whole run."""
    where = cfg.data.output_dir
    counts = manifest["counts"]
    if counts.get("train", 0) < global_batch:
        raise UserError(f"the train split in {where} holds {counts.get('train', 0)} samples, fewer than one global "
                        f"batch ({global_batch}); make more data or lower train.global_batch_size")
    if counts.get(cfg.eval.split, 0) == 0:
        raise UserError(f"the {cfg.eval.split} split in {where} holds no samples, and every run ends with an eval "
                        f"on it; prepare with data.val_fraction > 0 or set eval.split")


def open_train_split(data_dir: str | Path) -> Any:
    """The train split as a memory-mapped dataset returning numpy rows."""
    split = open_split(data_dir, "train")
    columns = ["input_ids", "loss_mask"] + (["n_segments"] if "n_segments" in split.column_names else [])
    return split.with_format("numpy", columns=columns)
