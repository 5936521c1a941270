"""Resume on another world size: rank 0 makes DeepSpeed's universal checkpoint while the other ranks wait
on the checkpoint folder, not inside a collective.

``ds_to_universal`` over a large model's shards can take longer than the process group's timeout
(DeepSpeed's default 10 minutes, ``DEEPSPEED_TIMEOUT``), and a rank waiting in ``barrier()`` past it dies
with a gloo/NCCL timeout. So the other ranks poll the folder every rank reads anyway (the conversion
appears at once: a temp dir renamed into place) and meet rank 0 in a barrier only once it is there.

Rank 0 bumps ``<tag>.heartbeat`` next to it while it converts and leaves its error in ``<tag>.failed``
if it fails. A waiting rank stops with an error when rank 0 failed, or when the heartbeat has not moved
for ``HEARTBEAT_LOST_S`` by the waiting rank's own clock (nodes' clocks may differ): a rank 0 killed
mid-conversion (OOM, a node lost) does not leave the others waiting forever under a launcher that does
not end them (srun without --kill-on-bad-exit).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from data_prep.atomic import write_text
from pipeline import checkpoint

POLL_S = 1.0
HEARTBEAT_S = 10.0
HEARTBEAT_LOST_S = 300.0


def convert_or_wait(tag_dir: Path, is_main: bool, barrier: Callable[[], None]) -> Path:
    """The universal checkpoint of ``tag_dir`` on every rank: made by rank 0, awaited by the others (collective,
    but both barriers are quick)."""
    target = checkpoint.universal_tag_dir(tag_dir)
    failed, beat = _marker(target, "failed"), _marker(target, "heartbeat")
    if is_main:
        failed.unlink(missing_ok=True)
    barrier()  # no rank reads a failure left by an earlier job
    if is_main:
        _convert(tag_dir, failed, beat)
    else:
        wait_for(target, failed, beat)
    barrier()  # rank 0 has finished (latest_universal written)
    return target


def _marker(target: Path, kind: str) -> Path:
    return target.with_name(f"{target.name}.{kind}")


def _convert(tag_dir: Path, failed: Path, beat: Path) -> None:
    done = threading.Event()

    def bump() -> None:
        n = 0
        while not done.is_set():
            n += 1
            try:
                write_text(beat, str(n))
            except OSError:  # a full or flaky disk: the conversion itself will say so
                pass
            done.wait(HEARTBEAT_S)

    beat.parent.mkdir(parents=True, exist_ok=True)
    thread = threading.Thread(target=bump, name="universal-heartbeat", daemon=True)
    thread.start()
    try:
        checkpoint.convert_to_universal(tag_dir)
    except BaseException as err:
        write_text(failed, f"{type(err).__name__}: {err}")
        raise
    finally:
        done.set()
        thread.join()
        beat.unlink(missing_ok=True)


def wait_for(target: Path, failed: Path, beat: Path, lost_s: float = HEARTBEAT_LOST_S, poll_s: float = POLL_S) -> None:
    """Block until ``target`` exists; RuntimeError when rank 0 failed or its heartbeat stopped for ``lost_s``."""
    last, moved_at = None, time.monotonic()
    while not target.is_dir():
        if failed.exists():
            raise RuntimeError(f"rank 0 could not convert {target.name} to a universal checkpoint: {_read(failed)}")
        value, now = _read(beat), time.monotonic()
        if value != last:
            last, moved_at = value, now
        elif now - moved_at > lost_s:
            raise RuntimeError(f"rank 0's conversion of {target.name} to a universal checkpoint gave no sign of life "
                               f"for {lost_s:.0f} s ({beat}); was rank 0 killed?")
        time.sleep(poll_s)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
