"""evaluate_model against a float64 recomputation from the model's own full-vocabulary logits."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from eval_support import N_SEGMENTS, SEGMENT_LEN, as_dataset, eval_config, split_rows, tiny_model

from pipeline.errors import UserError
from pipeline.evaluate import _rank_batches, eval_config as eval_config_of_checkpoint, evaluate_model, run_eval


def reference(model: torch.nn.Module, rows: dict, n_samples: int, first: int, last: int) -> torch.Tensor:
    """[4, last - first] float64 (NLL sum, tokens, recall NLL sum, recall tokens) of each segment of the
    window [first, last), from log_softmax over the logits, one sample at a time."""
    out = torch.zeros(4, last - first, dtype=torch.float64)
    window = slice(first * SEGMENT_LEN, last * SEGMENT_LEN)
    for i in range(n_samples):
        ids = torch.tensor(rows["input_ids"][i])[window]
        loss_mask, recall = (torch.tensor(rows[c][i])[window] for c in ("loss_mask", "recall_mask"))
        with torch.no_grad():
            logp = model.eval()(input_ids=ids[None].long()).logits[0].double().log_softmax(-1)
        for t in range(1, len(ids)):  # target t is predicted at position t-1, which lies in segment (t-1)//L
            if loss_mask[t]:
                nll, k = -float(logp[t - 1, ids[t]]), (t - 1) // SEGMENT_LEN
                out[:2, k] += torch.tensor([nll, 1.0], dtype=torch.float64)
                if recall[t]:
                    out[2:, k] += torch.tensor([nll, 1.0], dtype=torch.float64)
    return out


def as_tensor(rows) -> torch.Tensor:
    return torch.tensor([[r.nll_sum, r.tokens, r.recall_nll_sum, r.recall_tokens] for r in rows], dtype=torch.float64).T


def test_sums_match_a_float64_recomputation_and_train_mode_is_restored() -> None:
    cfg = eval_config("eval.history_target=true")
    model, rows = tiny_model(cfg), split_rows()
    model.train()
    result = evaluate_model(model, as_dataset(rows), cfg)
    assert model.training

    expected = reference(model, rows, 5, 0, N_SEGMENTS)
    assert result.n_samples == 5 and len(result.segments) == N_SEGMENTS
    got = as_tensor(result.segments)
    assert torch.equal(got[[1, 3]], expected[[1, 3]])
    torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], rtol=1e-6, atol=0)
    assert result.ppl == pytest.approx(math.exp(expected[0].sum() / expected[1].sum()), rel=1e-6)
    assert result.segments[1].recall_ppl == pytest.approx(math.exp(expected[2, 1] / expected[3, 1]), rel=1e-6)

    history = as_tensor(result.history)
    for h in range(N_SEGMENTS):
        target = reference(model, rows, 5, N_SEGMENTS - 1 - h, N_SEGMENTS)[:, -1]
        assert torch.equal(history[[1, 3], h], target[[1, 3]])
        torch.testing.assert_close(history[[0, 2], h], target[[0, 2]], rtol=1e-6, atol=0)
    torch.testing.assert_close(history[:, -1], got[:, -1], rtol=1e-6, atol=0)  # h = n-1 is the whole sample


def test_recall_counts_exactly_the_marked_targets() -> None:
    cfg = eval_config("eval.max_samples=100")
    rows = split_rows()
    result = evaluate_model(tiny_model(cfg), as_dataset(rows), cfg)
    assert result.n_samples == 7
    expected = [0] * N_SEGMENTS
    for recall, loss_mask in zip(rows["recall_mask"], rows["loss_mask"]):
        for t in range(1, len(recall)):  # never position 0 (nothing predicts it), never padding
            expected[(t - 1) // SEGMENT_LEN] += recall[t] and loss_mask[t]
    assert [r.recall_tokens for r in result.segments] == expected

    rows["recall_mask"] = [[0] * len(r) for r in rows["recall_mask"]]  # a non-synthetic source
    plain = evaluate_model(tiny_model(cfg), as_dataset(rows), cfg)
    assert all(r.recall_tokens == 0 and math.isnan(r.recall_ppl) for r in plain.segments)
    assert [r.nll_sum for r in plain.segments] == pytest.approx([r.nll_sum for r in result.segments], rel=1e-6)


def test_n_segments_scores_the_first_segments_only() -> None:
    cfg = eval_config()
    model, rows = tiny_model(cfg), split_rows()
    result = evaluate_model(model, as_dataset(rows), cfg, n_segments=2)
    torch.testing.assert_close(as_tensor(result.segments), reference(model, rows, 5, 0, 2), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="n_segments=4"):
        evaluate_model(model, as_dataset(rows), cfg, n_segments=4)
    with pytest.raises(UserError, match="no samples"):
        evaluate_model(model, as_dataset(rows).select([]), cfg)


@pytest.mark.parametrize("n_samples,world,batch_size", [(5, 2, 2), (7, 3, 2), (1, 2, 4), (8, 2, 4), (3, 4, 1)])
def test_every_rank_makes_the_same_calls_and_each_sample_counts_once(n_samples: int, world: int,
                                                                     batch_size: int) -> None:
    plans = [_rank_batches(n_samples, rank, world, batch_size) for rank in range(world)]
    shapes = [[len(indices) for indices, _ in plan] for plan in plans]
    assert all(s == shapes[0] for s in shapes)
    counted = sorted(i for plan in plans for indices, real in plan for i, r in zip(indices, real.tolist()) if r)
    assert counted == list(range(n_samples))


def test_eval_changes_only_eval_keys(tmp_path) -> None:
    trained = eval_config("train.lr=0.01")
    (tmp_path / "eval.yaml").write_text("eval:\n  max_samples: 9\ntrain:\n  lr: 0.5\n")
    cfg = eval_config_of_checkpoint(trained, str(tmp_path / "eval.yaml"), ["eval.batch_size=2"])
    assert (cfg.eval.max_samples, cfg.eval.batch_size, cfg.train.lr) == (9, 2, 0.01)
    with pytest.raises(UserError, match="only changes eval"):
        eval_config_of_checkpoint(trained, None, ["train.lr=1"])
    with pytest.raises(UserError, match="did you mean"):
        eval_config_of_checkpoint(trained, None, ["eval.max_sample=1"])
    with pytest.raises(UserError, match="only changes eval"):  # said before any checkpoint is looked at
        run_eval(argparse.Namespace(checkpoint=str(tmp_path / "none"), json=None, config=None,
                                    overrides=["eval.max_samples=2", "data.segment_len=4"]))


def test_nproc_is_checked_and_babilong_stays_in_one_process(tmp_path) -> None:
    """Both said before any checkpoint is looked at (the checkpoint here does not exist)."""
    args = dict(checkpoint=str(tmp_path / "none"), json=None, config=None, overrides=[])
    with pytest.raises(UserError, match="--nproc must be >= 1, got 0"):
        run_eval(argparse.Namespace(**args, nproc=0, task="ppl"))
    with pytest.raises(UserError, match="--task babilong runs in one process"):
        run_eval(argparse.Namespace(**args, nproc=2, task="babilong"))


def test_history_does_not_matter_to_a_model_without_memory() -> None:
    cfg = eval_config("memory.kind=none", "eval.history_target=true")
    result = evaluate_model(tiny_model(cfg), as_dataset(split_rows()), cfg)
    last = result.segments[-1]
    for row in result.history:
        assert (row.tokens, row.recall_tokens) == (last.tokens, last.recall_tokens)
        assert row.nll_sum == pytest.approx(last.nll_sum, rel=1e-6)
