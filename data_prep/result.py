"""``PrepResult``: what one prep run (``data_prep.run`` or ``data_prep.babilong_prep``) returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PrepResult:
    data_dir: Path
    plan: dict[str, Any]
    manifest: dict[str, Any] | None  # None for an array task (merge writes it)
    records: list[dict[str, Any]]  # shards of this run (written or already good)
    written: int = 0
    tokens_encoded: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
