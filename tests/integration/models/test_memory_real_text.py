"""On real text no one here wrote, memory must help: rmt against none on the KJV books.

configs/kjv.yaml (the King James Bible from the Debian package bible-kjv, one document per book,
6 segments of 128 tokens, 300 steps: the README's table); rmt and the `none` baseline train with
the defaults (the auto curriculum included) on the same batches in two plain-PyTorch processes (the
trainer's loop, tests/support/plain_training.py) and are scored on the same validation samples.

Asserted: rmt is no worse than none in segment 0 (2% room; measured 5.0% better) and better after
it (measured 4.7% better; 2.3% and 2.2% before train.memory_lr_scale defaulted to 0.1). Both models start from the same seed and see the same batches, so what
another CPU's kernels change is the last digits, not percents (README, the thread/kernel matrix
under `make test`). Without the curriculum rmt is 12% worse than none in every segment: the failure
this test is for. With eval.history_target, none's last segment scores the same after any history
(nothing flows between its segments); how much rmt's own memory adds (~1% at this budget) is
reported in the README, not asserted: too small for a margin.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from plain_training import train_and_evaluate

from data_prep import prepare
from data_prep.kjv import write_books
from pipeline.config import load_config
from pipeline.evaluate import EvalResult, NllRow

STEPS = 300  # configs/kjv.yaml's own budget: the setting measured in the README


@pytest.mark.slow
def test_rmt_beats_none_on_real_text(tmp_path: Path, repo_root: Path) -> None:
    config = str(repo_root / "configs" / "kjv.yaml")
    write_books(tmp_path / "books")
    overrides = [f"data.source={tmp_path / 'books'}", f"data.output_dir={tmp_path / 'data'}",
                 f"train.max_steps={STEPS}", "train.global_batch_size=8", "eval.history_target=true"]
    prepare(load_config(config, overrides))
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        rmt, none = map(EvalResult.from_dict,
                        pool.map(train_and_evaluate, [config] * 2, [overrides, [*overrides, "memory.kind=none"]]))
    first = rmt.segments[0].ppl, none.segments[0].ppl
    later = NllRow.combine(rmt.segments[1:]).ppl, NllRow.combine(none.segments[1:]).ppl
    print(f"ppl segment 0: rmt {first[0]:.2f} none {first[1]:.2f}; segments 1..: rmt {later[0]:.2f} none {later[1]:.2f}")
    assert first[0] < 1.02 * first[1], f"segment 0: rmt {first[0]:.2f} vs none {first[1]:.2f}"
    assert later[0] < later[1], f"segments 1..: rmt {later[0]:.2f} vs none {later[1]:.2f}"
    assert none.history[0].ppl == pytest.approx(none.history[-1].ppl, rel=1e-4)
