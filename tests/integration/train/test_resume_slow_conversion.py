"""Resume on another world size when the universal conversion outlasts the process group's timeout.

A 1-rank checkpoint resumed on 2 ranks: rank 0 runs DeepSpeed's ds_to_universal while rank 1 waits. Here
the process group's timeout is short (``train.dist_timeout_s``) and the conversion is made to take longer than that (a ``sitecustomize`` on the ranks' PYTHONPATH sleeps
in the ds_to_universal process only, as a large model's conversion would take): a rank waiting in a
collective barrier dies with gloo's timeout; one waiting on the folder resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from processes import tail
from train_support import run_train, write_config

from pipeline.checkpoint import find_latest, read_state

pytestmark = pytest.mark.slow

TIMEOUT_S = 30  # train.dist_timeout_s: far above any wait in a tiny 2-rank run, also on a loaded machine
SLOW_S = TIMEOUT_S + 15

SLOW_CONVERSION = """
import sys, time
if "deepspeed.checkpoint.ds_to_universal" in sys.orig_argv:
    start = time.time()
    time.sleep(SLOW_S)
    with open(MARKER, "a") as f:
        f.write("slept %.0f\\n" % (time.time() - start))
"""


def test_resume_on_two_ranks_survives_a_conversion_longer_than_the_pg_timeout(
        train_root: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = train_root / "slow-universal"
    config = write_config(train_root / "slow-universal.yaml", tiny_data, out, None)
    log = train_root / "slow-universal.log"
    assert run_train(config, "--set", "train.max_steps=4", log=log) == 0, tail(log)  # 1 rank
    assert read_state(find_latest(out / "checkpoints"))["world_size"] == 1

    hooks = train_root / "slow-conversion-hooks"
    hooks.mkdir()
    marker = train_root / "slow-conversion.txt"
    (hooks / "sitecustomize.py").write_text(SLOW_CONVERSION.replace("SLOW_S", str(SLOW_S)).replace("MARKER", repr(str(marker))))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])]))
    code = run_train(config, "--nproc", "2", "--set", "train.max_steps=8", f"train.dist_timeout_s={TIMEOUT_S}",
                     log=log, timeout=600)
    assert code == 0, tail(log)
    assert marker.read_text().startswith("slept "), "the conversion was not slowed down"
    assert int(marker.read_text().split()[1]) >= SLOW_S
    universal = out / "checkpoints" / "universal"
    assert (universal / "step_00000004").is_dir()
    assert not list(universal.glob("*.heartbeat")) and not list(universal.glob("*.failed"))
    final = read_state(find_latest(out / "checkpoints"))
    assert final["step"] == 8 and final["world_size"] == 2
    train_log = (out / "logs" / "train.log").read_text()
    assert "resumed from step_00000004" in train_log and f"collectives time out after {TIMEOUT_S} s" in train_log
