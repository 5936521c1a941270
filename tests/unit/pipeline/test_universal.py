"""The ranks that wait for rank 0's universal conversion: on the folder, and never forever."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from data_prep.atomic import write_text
from pipeline import universal


def markers(tmp_path: Path) -> tuple[Path, Path, Path]:
    target = tmp_path / "universal" / "step_00000004"
    target.parent.mkdir()
    return target, target.with_name(target.name + ".failed"), target.with_name(target.name + ".heartbeat")


def test_returns_once_the_conversion_is_in_place_while_the_heartbeat_moves(tmp_path: Path) -> None:
    target, failed, beat = markers(tmp_path)

    def rank0() -> None:
        for n in range(6):  # beats 4x faster than lost_s, for longer than lost_s
            write_text(beat, str(n))
            time.sleep(0.05)
        target.mkdir()

    thread = threading.Thread(target=rank0)
    thread.start()
    universal.wait_for(target, failed, beat, lost_s=0.2, poll_s=0.01)
    thread.join()
    assert target.is_dir()


def test_rank0s_failure_reaches_the_waiting_ranks(tmp_path: Path) -> None:
    target, failed, beat = markers(tmp_path)
    write_text(failed, "RuntimeError: ds_to_universal exited 1")
    with pytest.raises(RuntimeError, match="rank 0 could not convert step_00000004.*exited 1"):
        universal.wait_for(target, failed, beat, lost_s=60, poll_s=0.01)


def test_a_silent_rank0_stops_the_wait(tmp_path: Path) -> None:
    target, failed, beat = markers(tmp_path)
    write_text(beat, "7")  # rank 0 beat once, then was killed
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no sign of life"):
        universal.wait_for(target, failed, beat, lost_s=0.3, poll_s=0.01)
    assert 0.3 <= time.monotonic() - started < 5


def test_a_failed_conversion_stops_both_ranks(tmp_path: Path) -> None:
    """Two ranks (threads) through convert_or_wait with DeepSpeed's real converter on a folder that is no
    checkpoint: rank 0 raises, leaves the error for rank 1, which raises too instead of waiting."""
    tag_dir = tmp_path / "checkpoints" / "step_00000004"
    tag_dir.mkdir(parents=True)
    barrier = threading.Barrier(2, timeout=120)
    errors: dict[int, BaseException] = {}

    def rank(r: int) -> None:
        try:
            universal.convert_or_wait(tag_dir, r == 0, barrier.wait)
        except BaseException as err:  # noqa: BLE001 - the test reads it
            errors[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert set(errors) == {0, 1}, errors
    assert "converting" in str(errors[0]) and "rank 0 could not convert" in str(errors[1])
    assert not (tag_dir.parent / "universal" / "step_00000004.heartbeat").exists()
