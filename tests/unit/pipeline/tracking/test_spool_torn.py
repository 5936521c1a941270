"""A spool torn by a kill or a full disk never blocks the restart: whole records are kept, torn
lines skipped and reported (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.tracking import _Spool

HEADER = json.dumps({"run_id": "run1", "tracking_uri": "http://x"}) + "\n"
POINT = json.dumps({"kind": "metric", "key": "loss", "value": 1.0, "step": 3, "timestamp": 1}) + "\n"


@pytest.mark.parametrize("content, kept", [
    (b"", 0),  # killed before the header was written
    (HEADER[:12].encode(), 0),  # killed inside the header
    ((HEADER + POINT).encode() + b"\x00" * 64 + b"\n" + POINT.encode(), 2),  # a full disk's hole of NULs
    ((HEADER + POINT).encode() + b"\xff\xfe{torn\n" + POINT.encode(), 2),  # bytes that are not UTF-8
])
def test_a_torn_spool_keeps_its_whole_records(content: bytes, kept: int, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mlflow_spool.jsonl"
    path.write_bytes(content)
    spool = _Spool(path, "run1", "http://x")  # the restart
    leftover = spool.leftover or [r for p in tmp_path.glob("mlflow_spool.*.jsonl") for r in _Spool.read(p)[1]]
    assert len(leftover) == kept
    if content and kept:
        assert "torn line" in capsys.readouterr().err
