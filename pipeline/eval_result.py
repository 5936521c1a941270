"""What one evaluation measured: per-segment NLL sums (``NllRow``), an ``EvalResult`` and its JSON, CSV and tables.

Plain data with no torch: ``pipeline.evaluate`` computes it, ``pipeline.report`` plots it, tracking,
export and the demo read it; ``pipeline.evaluate`` re-exports the names.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.atomic import replacing, write_text


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean NLL); nan when nothing was counted, inf past float range."""
    if tokens == 0:
        return math.nan
    try:
        return math.exp(nll_sum / tokens)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class NllRow:
    """NLL sums over one group of targets: a segment, or the target segment after h history segments."""

    nll_sum: float
    tokens: int
    recall_nll_sum: float = 0.0
    recall_tokens: int = 0

    @property
    def ppl(self) -> float:
        return perplexity(self.nll_sum, self.tokens)

    @property
    def recall_ppl(self) -> float:
        return perplexity(self.recall_nll_sum, self.recall_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"nll_sum": self.nll_sum, "tokens": self.tokens, "ppl": _finite_or_none(self.ppl),
                "recall_nll_sum": self.recall_nll_sum, "recall_tokens": self.recall_tokens,
                "recall_ppl": _finite_or_none(self.recall_ppl)}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "NllRow":
        return cls(float(row["nll_sum"]), int(row["tokens"]), float(row["recall_nll_sum"]), int(row["recall_tokens"]))

    @classmethod
    def combine(cls, rows: list["NllRow"]) -> "NllRow":
        """The sums over several groups (exact: sums of sums, never an average of perplexities)."""
        return cls(sum(r.nll_sum for r in rows), sum(r.tokens for r in rows),
                   sum(r.recall_nll_sum for r in rows), sum(r.recall_tokens for r in rows))


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: ``segments[k]`` is segment k, ``history[h]`` the target segment after h segments."""

    split: str
    n_samples: int
    segment_len: int
    segments: list[NllRow]
    history: list[NllRow] | None = None
    baseline: "EvalResult | None" = None  # the `none` run on the same samples

    @property
    def total(self) -> NllRow:
        return NllRow.combine(self.segments)

    @property
    def ppl(self) -> float:
        return self.total.ppl

    @property
    def recall_ppl(self) -> float:
        return self.total.recall_ppl

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split, "n_samples": self.n_samples, "segment_len": self.segment_len,
            "ppl": _finite_or_none(self.ppl), "recall_ppl": _finite_or_none(self.recall_ppl),
            "segments": [{"segment": k, **row.to_dict()} for k, row in enumerate(self.segments)],
            "history_target": None if self.history is None else
            [{"history": h, **row.to_dict()} for h, row in enumerate(self.history)],
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        history = data.get("history_target")
        return cls(
            split=data["split"], n_samples=int(data["n_samples"]), segment_len=int(data["segment_len"]),
            segments=[NllRow.from_dict(row) for row in data["segments"]],
            history=None if history is None else [NllRow.from_dict(row) for row in history],
            baseline=None if data.get("baseline") is None else cls.from_dict(data["baseline"]),
        )

    def to_json(self, path: str | Path) -> Path:
        return write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "EvalResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | Path) -> Path:
        """One tidy table: a row per (run, protocol, segment, history), ready for pandas or a sheet."""
        with replacing(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["run", "protocol", "segment", "history", "nll_sum", "tokens", "ppl",
                             "recall_nll_sum", "recall_tokens", "recall_ppl"])
            runs = [("model", self)] + ([("baseline", self.baseline)] if self.baseline else [])
            for name, result in runs:
                last = len(result.segments) - 1
                for k, row in enumerate(result.segments):
                    writer.writerow([name, "per_segment", k, k, *_csv_cells(row)])
                for h, row in enumerate(result.history or []):
                    writer.writerow([name, "history_target", last, h, *_csv_cells(row)])
        return Path(path)

    def format_table(self, markdown: bool = False) -> str:
        """segment | ppl | recall ppl [| baseline ppl | baseline recall ppl], then the history table."""
        recall = any(r.recall_tokens for r in self.segments)
        tables = [_table("segment", self.segments, self.baseline and self.baseline.segments, recall, markdown,
                         total=(self.total, self.baseline and self.baseline.total))]
        if self.history is not None:
            tables.append(_table("history", self.history, self.baseline and self.baseline.history, recall, markdown,
                                 label="target "))
        return "\n\n".join(tables)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: nothing counted is written as null."""
    return None if math.isnan(value) else value


def _csv_cells(row: NllRow) -> list[Any]:
    return [row.nll_sum, row.tokens, row.ppl, row.recall_nll_sum, row.recall_tokens, row.recall_ppl]


def _table(index: str, rows: list[NllRow], baseline: list[NllRow] | None, recall: bool, markdown: bool,
           total: tuple[NllRow, NllRow | None] | None = None, label: str = "") -> str:
    header = [index, f"{label}ppl"] + ([f"{label}recall ppl"] if recall else [])
    if baseline:
        header += [f"baseline {label}ppl"] + ([f"baseline {label}recall ppl"] if recall else [])

    def cells(name: str, row: NllRow, base: NllRow | None) -> list[str]:
        out = [name, _num(row.ppl)] + ([_num(row.recall_ppl)] if recall else [])
        if base is not None:
            out += [_num(base.ppl)] + ([_num(base.recall_ppl)] if recall else [])
        return out

    body = [cells(str(i), row, baseline[i] if baseline else None) for i, row in enumerate(rows)]
    if total is not None:
        body.append(cells("all", total[0], total[1] if baseline else None))
    if markdown:
        lines = [header, ["---:"] * len(header), *body]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header, *body])


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"
