"""A full disk at checkpoint save, on real 2-rank ZeRO-3 runs writing to a real small tmpfs: one line
and exit 2 on every rank, the previous checkpoint untouched and resumed once there is room again.

Two ways to fill it: no room for a checkpoint before the save (every rank checks the free space
first, together), and a disk that fills during the save (the bytes check passes, the inodes run out
after the save's first file), where the ranks agree on the failure before anything is removed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from train_support import fill, run_train, tmpfs, write_config

from pipeline.checkpoint import find_latest, is_complete, read_state

pytestmark = pytest.mark.slow

CHECKPOINT_BYTES = 400 * 1024  # a step_* folder of the tiny model on 2 ranks: ~385 KB


def train_until(config: Path, max_steps: int, log: Path) -> tuple[int, str]:
    """(exit code, what this run added to ``log``)."""
    offset = log.stat().st_size if log.exists() else 0
    code = run_train(config, "--nproc", "2", "--set", f"train.max_steps={max_steps}", log=log)
    return code, log.read_bytes()[offset:].decode(errors="replace")


def the_one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("memtrain train:")]
    assert len(lines) == 1 and "Traceback" not in output and "unexpected pos" not in output, output[-4000:]
    return lines[0]


def files_of(tag_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(tag_dir.iterdir())}


def trained_to_step_4(disk: Path, tiny_data: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(config, log, checkpoints folder) of a 2-rank run on ``disk`` trained to its step-4 checkpoint."""
    out = disk / "run"
    config = write_config(tmp_path / "run.yaml", tiny_data, out, None)
    log = tmp_path / "train.log"
    code, output = train_until(config, 4, log)
    assert code == 0, output[-4000:]
    return config, log, out / "checkpoints"


def assert_resumes_from_step_4(config: Path, ckpt_dir: Path, log: Path) -> None:
    code, output = train_until(config, 8, log)
    assert code == 0, output[-4000:]
    assert "resumed from step_00000004" in output
    latest = find_latest(ckpt_dir)
    assert latest.name == "step_00000008" and read_state(latest)["step"] == 8
    assert all(is_complete(tag) for tag in ckpt_dir.glob("step_*"))  # nothing half-written left


def test_no_room_for_a_checkpoint_is_one_line_before_any_rank_writes(tiny_data: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        config, log, ckpt_dir = trained_to_step_4(disk, tiny_data, tmp_path)
        step_4 = ckpt_dir / "step_00000004"
        before = files_of(step_4)
        assert sum(len(data) for data in before.values()) < CHECKPOINT_BYTES

        filler = fill(disk, leave=CHECKPOINT_BYTES // 3)  # room for the run's small files, not for a checkpoint
        code, output = train_until(config, 8, log)
        assert code == 2, output[-4000:]
        line = the_one_line(output)
        assert line.startswith(f"memtrain train: error: no space left in {ckpt_dir} for step_00000008: "), line
        assert "it needs" in line and "(the size of step_00000004)" in line and "stays usable" in line, line
        assert not (ckpt_dir / "step_00000008").exists()  # no rank wrote
        assert find_latest(ckpt_dir) == step_4 and files_of(step_4) == before

        shutil.rmtree(filler)
        assert_resumes_from_step_4(config, ckpt_dir, log)


def test_a_disk_that_fills_during_a_save_is_one_line_and_leaves_nothing_half_written(
        tiny_data: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "8m", inodes=512) as disk:
        config, log, ckpt_dir = trained_to_step_4(disk, tiny_data, tmp_path)
        step_4 = ckpt_dir / "step_00000004"
        before = files_of(step_4)

        # megabytes free, so the free-space check passes; two inodes: the new tag folder and one of
        # the four shard files, so one rank's torch.save fails midway while the other may succeed
        filler = fill(disk, leave=4 * CHECKPOINT_BYTES, leave_inodes=2)
        code, output = train_until(config, 8, log)
        assert code == 2, output[-4000:]
        line = the_one_line(output)
        assert line.startswith(f"memtrain train: error: no space left in {ckpt_dir} saving step_00000008 (rank "), line
        assert "the previous checkpoint (step_00000004) stays usable" in line, line
        assert not (ckpt_dir / "step_00000008").exists()  # removed once every rank had stopped writing
        assert find_latest(ckpt_dir) == step_4 and files_of(step_4) == before

        shutil.rmtree(filler)
        assert_resumes_from_step_4(config, ckpt_dir, log)
