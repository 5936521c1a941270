"""The files of one evaluation: the per-segment perplexity plot (PNG) and its JSON and CSV tables.

The plot is drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas), so it never touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
from pathlib import Path
from data_prep.atomic import replacing
from pipeline.eval_result import EvalResult, NllRow


def save_eval(result: EvalResult, folder: str | Path, stem: str) -> list[Path]:
    """Write ``stem.json``, ``stem.csv`` and ``stem.png`` into ``folder``; returns their paths."""
    folder = Path(folder)
    return [result.to_json(folder / f"{stem}.json"), result.to_csv(folder / f"{stem}.csv"),
            plot_segments(result, folder / f"{stem}.png")]


def plot_segments(result: EvalResult, path: str | Path) -> Path:
    """ppl and recall ppl against segment index (model and baseline), and the history+target curve."""
    from matplotlib.figure import Figure  # lazy: matplotlib costs a second; only plotting needs it
    from matplotlib.ticker import MaxNLocator

    base = result.baseline
    panels: list[tuple[str, str, list[NllRow], list[NllRow] | None, str]] = [
        ("perplexity by segment", "segment", result.segments, base and base.segments, "ppl")]
    if any(row.recall_tokens for row in result.segments):
        panels.append(("recall-token perplexity by segment", "segment", result.segments,
                       base and base.segments, "recall_ppl"))
    if result.history is not None:
        panels.append(("last segment given h segments of history", "history segments h", result.history,
                       base and base.history, "ppl"))

    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for ax, (title, xlabel, rows, base_rows, field) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        curves = [("model", "o", "-", [getattr(r, field) for r in rows])]
        if base_rows:
            curves.append(("baseline", "s", "--", [getattr(r, field) for r in base_rows]))
        for label, marker, linestyle, values in curves:
            ax.plot(range(len(values)), values, marker=marker, linestyle=linestyle, label=label)
        finite = [v for *_, values in curves for v in values if math.isfinite(v)]
        wide = bool(finite) and max(finite) > 10 * min(finite)  # log scale only when it spans a decade
        ax.set(title=title, xlabel=xlabel, ylabel=field.replace("_", " "), yscale="log" if wide else "linear",
               xlim=(-0.5, len(rows) - 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result.split} split, {result.n_samples} samples, {result.segment_len}-token segments")

    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
