"""The demo's settings teach the memory what the baseline cannot know, within the demo's budget.

The whole claim of ``make demo`` at the model level: with configs/demo.yaml's data, model and
training settings (read from the file, so they cannot drift), an RMT trained for the demo's steps
predicts the places of segments 1.. that only memory can know, and the `none` baseline cannot.
Plain PyTorch in two processes (ZeRO-3 == plain PyTorch is tested elsewhere); ~3 min on 2 cores.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from plain_training import train_and_evaluate

from data_prep import prepare
from pipeline.config import load_config
from pipeline.evaluate import EvalResult, NllRow


def later_segments(result: dict) -> NllRow:
    return NllRow.combine(EvalResult.from_dict(result).segments[1:])


@pytest.mark.slow
def test_demo_settings_teach_memory_what_the_baseline_cannot_know(tmp_path: Path, repo_root: Path) -> None:
    config = str(repo_root / "configs" / "demo.yaml")
    overrides = [f"data.output_dir={tmp_path / 'data'}"]
    cfg = load_config(config, overrides)
    prepare(cfg)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        rmt, none = pool.map(train_and_evaluate, [config] * 2, [overrides, [*overrides, "memory.kind=none"]])
    rmt, none = later_segments(rmt), later_segments(none)
    print(f"segments 1..: recall ppl rmt {rmt.recall_ppl:.2f} none {none.recall_ppl:.2f}; ppl rmt {rmt.ppl:.3f} none {none.ppl:.3f}")
    assert rmt.recall_tokens == none.recall_tokens > 100
    chance = cfg.data.synthetic.places
    assert none.recall_ppl > chance / 2, f"without memory a place is a guess among {chance}: {none.recall_ppl:.2f}"
    assert rmt.recall_ppl < none.recall_ppl / 2, f"recall ppl rmt {rmt.recall_ppl:.2f} vs none {none.recall_ppl:.2f}"
    assert rmt.ppl < none.ppl, f"all tokens: rmt {rmt.ppl:.3f} vs none {none.ppl:.3f}"
