"""evaluate_model on 2 ZeRO-3 ranks (torchrun, gloo) gives the numbers of one plain process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from pipeline.config import load_config
from pipeline.evaluate import EvalResult, evaluate_model
from pipeline.models import build_model

TOKEN_IDS = {"vocab_size": 53, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
SEGMENT_LEN, N_SEGMENTS, N_SAMPLES = 8, 3, 7
# 7 samples on 2 ranks in batches of 2: rank 1 pads its share, and the history windows add calls.
OVERRIDES = [f"data.segment_len={SEGMENT_LEN}", f"data.n_segments={N_SEGMENTS}", "memory.kind=rmt",
             "memory.num_tokens=2", "model.hidden_size=16", "model.num_heads=2", "model.num_layers=2",
             "model.max_positions=32", "eval.batch_size=2", f"eval.max_samples={N_SAMPLES}",
             "eval.history_target=true"]


def split(n: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    length = SEGMENT_LEN * N_SEGMENTS
    loss_mask = torch.ones(n, length, dtype=torch.int8)
    loss_mask[3, -6:] = 0
    return datasets.Dataset.from_dict({
        "input_ids": torch.randint(3, TOKEN_IDS["vocab_size"], (n, length), generator=g).int().tolist(),
        "loss_mask": loss_mask.tolist(),
        "recall_mask": (torch.rand(n, length, generator=g) < 0.3).to(torch.int8).tolist(),
    })


def close(a: EvalResult, b: EvalResult) -> bool:
    rows = lambda r: [(x.nll_sum, x.tokens, x.recall_nll_sum, x.recall_tokens) for x in r.segments + r.history]  # noqa: E731
    return all(ta == tb and ra == rb and na == pytest.approx(nb, rel=1e-5) and qa == pytest.approx(qb, rel=1e-5)
               for (na, ta, qa, ra), (nb, tb, qb, rb) in zip(rows(a), rows(b)))


@pytest.mark.slow
def test_two_zero3_ranks_equal_one_process(tmp_path: Path, repo_root: Path) -> None:
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg, **TOKEN_IDS)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    data = split(N_SAMPLES + 2)
    data.save_to_disk(tmp_path / "val")
    expected = evaluate_model(model, data, cfg)

    job = {"overrides": OVERRIDES, "token_ids": TOKEN_IDS, "state": str(tmp_path / "state.pt"),
           "data": str(tmp_path / "val"), "out": str(tmp_path)}
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("zero3_eval_rank.py")), str(tmp_path / "job.json")],
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    results = [tmp_path / f"rank{r}.json" for r in range(2)]
    assert all(p.is_file() for p in results), done.stderr[-4000:]
    for path in results:
        got = EvalResult.from_json(path)
        assert got.n_samples == N_SAMPLES and len(got.history) == N_SEGMENTS
        assert close(got, expected), (got.to_dict(), expected.to_dict())
