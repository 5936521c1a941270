"""On real text no one here wrote, memory must not hurt: rmt against none on the KJV books.

configs/kjv.yaml's data and model (the King James Bible from the Debian package bible-kjv, one
document per book), fewer steps; rmt with memtrain's defaults and the `none` baseline train the
same batches in two plain-PyTorch processes (the trainer's loop, tests/support/plain_training.py)
and are scored on the same validation samples.

What is asserted is "no worse than none" with room (3% in segment 0, 2% after it), not "better":
at this CPU budget the measured gain of the default write over none is ~1% (README, "Memory on real
text"), too close to a platform's noise to assert. The paper-faithful write at 128-token segments
is 23% worse, so this still catches the failure the test exists for.
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
def test_rmt_is_no_worse_than_none_on_real_text(tmp_path: Path, repo_root: Path) -> None:
    config = str(repo_root / "configs" / "kjv.yaml")
    write_books(tmp_path / "books")
    overrides = [f"data.source={tmp_path / 'books'}", f"data.output_dir={tmp_path / 'data'}",
                 f"train.max_steps={STEPS}", "train.global_batch_size=8"]
    prepare(load_config(config, overrides))
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        rmt, none = map(EvalResult.from_dict,
                        pool.map(train_and_evaluate, [config] * 2, [overrides, [*overrides, "memory.kind=none"]]))
    first = rmt.segments[0].ppl, none.segments[0].ppl
    later = NllRow.combine(rmt.segments[1:]).ppl, NllRow.combine(none.segments[1:]).ppl
    assert first[0] < 1.03 * first[1], f"segment 0: rmt {first[0]:.1f} vs none {first[1]:.1f}"
    assert later[0] < 1.02 * later[1], f"segments 1..: rmt {later[0]:.1f} vs none {later[1]:.1f}"
