import datasets
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data import (IGNORE_INDEX, DataPosition, TrainBatches, check_data, curriculum_segments, segments_for_step,
                           step_batches)
from pipeline.ds_config import BatchPlan
from pipeline.errors import UserError

SEG, NSEG = 4, 3


def dataset(n: int) -> datasets.Dataset:
    # sample i holds the value i everywhere, padding (loss_mask 0) in its last position
    ids = [[i] * (SEG * NSEG) for i in range(n)]
    mask = [[1] * (SEG * NSEG - 1) + [0] for _ in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": mask}).with_format("numpy")


def samples(batches: TrainBatches, steps: int, n_segments: int = NSEG) -> list[list[int]]:
    out = []
    for _ in range(steps):
        micro = batches.next_step([n_segments] * batches.plan.accum)
        out.append([int(row[0]) for mb in micro for row in mb.input_ids])
    return out


def test_ranks_split_each_global_batch_and_one_rank_with_more_accumulation_sees_the_same() -> None:
    data = dataset(20)
    two = [samples(TrainBatches(data, BatchPlan(2, 1, 2), rank, SEG, seed=7), 4) for rank in (0, 1)]
    one = samples(TrainBatches(data, BatchPlan(2, 2, 1), 0, SEG, seed=7), 4)
    for step in range(4):
        assert two[0][step] + two[1][step] == one[step]  # micro-step major: same samples, same order
    seen = [s for step in one for s in step]
    assert len(set(seen)) == 16  # no sample twice within an epoch


def test_position_resumes_the_walk_and_epochs_reshuffle() -> None:
    data = dataset(10)
    full = TrainBatches(data, BatchPlan(4, 1, 1), 0, SEG, seed=1)
    steps = samples(full, 5)  # 2 steps per epoch (the tail of 2 is skipped)
    assert full.position == DataPosition(epoch=2, index=4)
    resumed = TrainBatches(data, BatchPlan(4, 1, 1), 0, SEG, seed=1, position=DataPosition(1, 4))
    assert samples(resumed, 2) == steps[3:]  # (1, 4): the next unread sample after step 3
    assert steps[0] + steps[1] != steps[2] + steps[3]  # epoch 1 is another permutation


def test_labels_mask_padding_and_truncation_keeps_whole_segments() -> None:
    batch = TrainBatches(dataset(8), BatchPlan(2, 1, 1), 0, SEG, seed=0).next_step([NSEG])[0]
    assert batch.input_ids.shape == (2, SEG * NSEG) and (batch.labels[:, -1] == IGNORE_INDEX).all()
    assert (batch.labels[:, :-1] == batch.input_ids[:, :-1]).all()
    short = TrainBatches(dataset(8), BatchPlan(2, 1, 1), 0, SEG, seed=0).next_step([2])[0]
    assert short.input_ids.shape == (2, 2 * SEG) and short.n_segments == 2


def test_too_few_samples_for_one_global_batch_is_a_user_error() -> None:
    with pytest.raises(UserError, match="fewer than one global batch"):
        TrainBatches(dataset(3), BatchPlan(2, 1, 2), 0, SEG, seed=0)


def test_curriculum_by_step_and_random_truncation_drawn_the_same_everywhere() -> None:
    cfg = load_config(overrides=["data.n_segments=8", "train.curriculum=[{from_step: 0, n_segments: 2}, "
                                 "{from_step: 10, n_segments: 8}]", "train.random_truncation=0.5"])
    assert [curriculum_segments(cfg.train, s, 8) for s in (0, 9, 10, 99)] == [2, 2, 8, 8]
    draws = [segments_for_step(cfg.train, step, 8, accum=4) for step in range(10, 60)]
    assert draws == [segments_for_step(cfg.train, step, 8, accum=4) for step in range(10, 60)]
    flat = np.array(draws).ravel()
    assert flat.min() >= 1 and flat.max() == 8 and 0.3 < (flat < 8).mean() < 0.7
    plain = load_config(overrides=["data.n_segments=8", "train.curriculum=[]"])
    assert segments_for_step(plain.train, 5, 8, accum=2) == [8, 8]


def test_curriculum_split_trains_every_token_as_shorter_chains() -> None:
    stages = "train.curriculum=[{from_step: 0, n_segments: 1}, {from_step: 2, n_segments: 3}]"
    cut = load_config(overrides=[f"data.n_segments={NSEG}", stages, "train.curriculum_split=false"])
    split = load_config(overrides=[f"data.n_segments={NSEG}", stages, "train.curriculum_split=true"])
    data = dataset(8)
    first = step_batches(TrainBatches(data, BatchPlan(2, 1, 1), 0, SEG, seed=3), cut.train, 0, NSEG, 1)[0]
    assert first.input_ids.shape == (2, SEG) and first.n_segments == 1  # truncation: the first segment only
    walk = TrainBatches(data, BatchPlan(2, 1, 1), 0, SEG, seed=3)
    chains = step_batches(walk, split.train, 0, NSEG, 1)[0]
    whole = TrainBatches(data, BatchPlan(2, 1, 1), 0, SEG, seed=3).next_step([NSEG])[0]
    assert chains.input_ids.shape == (2 * NSEG, SEG) and chains.n_segments == 1
    assert (chains.input_ids.reshape(2, -1) == whole.input_ids).all()  # every token, in order, sample by sample
    assert (chains.labels.reshape(2, -1) == whole.labels).all()
    later = step_batches(walk, split.train, 2, NSEG, 1)[0]
    assert later.input_ids.shape == (2, SEG * NSEG)  # from step 2 whole samples again


def test_auto_curriculum_grows_through_the_divisors_and_is_written_out() -> None:
    cfg = load_config(overrides=["data.n_segments=6", "train.max_steps=300"])
    assert [(s.from_step, s.n_segments) for s in cfg.train.curriculum] == [(0, 1), (75, 2), (150, 3), (225, 6)]
    assert cfg.train.curriculum_split is True
    again = load_config(overrides=["data.n_segments=6", "train.max_steps=600",
                                   *(f"{k}={v}" for k, v in cfg.flat().items() if k.startswith("train.curriculum"))])
    assert again.train.curriculum == cfg.train.curriculum  # as config.yaml stores it
    assert load_config(overrides=["data.n_segments=7"]).train.curriculum[-1].n_segments == 7  # a prime: 1 then 7
    assert load_config(overrides=["data.n_segments=1"]).train.curriculum == []
    assert load_config(overrides=["data.n_segments=8", "train.max_steps=2"]).train.curriculum == []
    assert load_config(overrides=["train.random_truncation=0.5"]).train.curriculum_split is False


def test_curriculum_split_refuses_what_it_cannot_cut() -> None:
    with pytest.raises(UserError, match="use a divisor of 6"):
        load_config(overrides=["data.n_segments=6", "train.curriculum_split=true",
                               "train.curriculum=[{from_step: 0, n_segments: 4}]"])
    with pytest.raises(UserError, match="train.random_truncation cuts samples"):
        load_config(overrides=["train.curriculum_split=true", "train.random_truncation=0.5"])


def test_manifest_is_checked_against_the_config() -> None:
    cfg = load_config(overrides=["data.segment_len=16", "data.n_segments=4", "data.vocab_size=300"])
    manifest = {"segment_len": 16, "n_segments": 4, "vocab_size": 300}
    check_data(cfg, manifest, tokenizer_vocab=300)
    with pytest.raises(UserError, match="segment_len=32"):
        check_data(cfg, {**manifest, "segment_len": 32}, 300)
    with pytest.raises(UserError, match="asks for 4 segments"):
        check_data(cfg, {**manifest, "n_segments": 2}, 300)
    with pytest.raises(UserError, match="the tokenizer there has 301"):
        check_data(cfg, manifest, 301)
    with pytest.raises(UserError, match="data.vocab_size=300"):
        check_data(cfg, {**manifest, "vocab_size": 512}, 512)
