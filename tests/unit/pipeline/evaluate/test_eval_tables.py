"""EvalResult's files and table: JSON round trip, tidy CSV, the text/markdown table, the plot."""

from __future__ import annotations

import csv
import json
import math

import pytest
from matplotlib.image import imread

from pipeline.evaluate import EvalResult, NllRow, perplexity
from pipeline.report import save_eval


def result_with_everything() -> EvalResult:
    rows = [NllRow(300.0, 100, 40.0, 10), NllRow(250.0, 100, 20.0, 10), NllRow(210.0, 99, 0.0, 0)]
    history = [NllRow(260.0, 99, 30.0, 10), NllRow(230.0, 99, 10.0, 10), NllRow(210.0, 99, 0.0, 0)]
    base = [NllRow(300.0, 100, 40.0, 10), NllRow(301.0, 100, 41.0, 10), NllRow(299.0, 99, 0.0, 0)]
    return EvalResult("val", 4, 100, rows, history, baseline=EvalResult("val", 4, 100, base, base[::-1]))


def test_perplexity() -> None:
    assert perplexity(200.0, 100) == pytest.approx(math.e ** 2)
    assert math.isnan(perplexity(0.0, 0))
    assert perplexity(1e6, 1) == math.inf


def test_json_round_trip_is_strict_json(tmp_path) -> None:
    result = result_with_everything()
    path = result.to_json(tmp_path / "r.json")
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert data["segments"][2]["recall_ppl"] is None and data["segments"][1]["segment"] == 1
    assert data["ppl"] == pytest.approx(math.exp(760.0 / 299))
    assert EvalResult.from_json(path) == result


def test_csv_is_one_tidy_table(tmp_path) -> None:
    result = result_with_everything()
    with result.to_csv(tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 3
    model = [r for r in rows if r["run"] == "model" and r["protocol"] == "per_segment"]
    assert [int(r["segment"]) for r in model] == [0, 1, 2]
    for row, expected in zip(model, result.segments):
        assert float(row["ppl"]) == pytest.approx(math.exp(float(row["nll_sum"]) / int(row["tokens"])))
        assert float(row["ppl"]) == pytest.approx(expected.ppl)
    history = [r for r in rows if r["run"] == "baseline" and r["protocol"] == "history_target"]
    assert {r["segment"] for r in history} == {"2"} and [r["history"] for r in history] == ["0", "1", "2"]


def test_table_columns_follow_what_was_measured() -> None:
    result = result_with_everything()
    text = result.format_table()
    header = text.splitlines()[0].split()
    assert " ".join(header) == "segment ppl recall ppl baseline ppl baseline recall ppl"
    all_row = next(line for line in text.splitlines() if line.split()[0] == "all").split()
    assert all_row[1] == f"{result.ppl:.3f}" and all_row[3] == f"{result.baseline.ppl:.3f}"
    assert "history" in text and "target recall ppl" in text

    plain = EvalResult("val", 2, 100, [NllRow(300.0, 100), NllRow(200.0, 100)])
    lines = plain.format_table(markdown=True).splitlines()
    assert lines[0] == "| segment | ppl |" and lines[1] == "| ---: | ---: |"
    assert lines[2] == f"| 0 | {math.exp(3):.3f} |" and len(lines) == 5


def test_save_eval_writes_the_three_files_and_a_panel_per_curve(tmp_path) -> None:
    paths = save_eval(result_with_everything(), tmp_path / "eval", "step_00000010")
    assert [p.name for p in paths] == ["step_00000010.json", "step_00000010.csv", "step_00000010.png"]
    assert imread(paths[2]).shape[:2] == (400, 1500)  # ppl, recall ppl, history: three 500-px panels
    plain = save_eval(EvalResult("val", 2, 100, [NllRow(300.0, 100), NllRow(200.0, 100)]), tmp_path, "plain")
    assert imread(plain[2]).shape[:2] == (400, 500)
