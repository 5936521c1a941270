"""The export of the shared 2-rank ZeRO-3 run used as a Hub model is: transformers' text-generation
pipeline with the usual sampling flags and lm-evaluation-harness' HFLM, in a process that cannot
import memtrain (tests/support/hf_tools.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from clean_python import run_without_project
from shared_run import TrainedRun
from tiny import TINY

from pipeline.cli import main
from pipeline.evaluate import EvalResult

pytestmark = pytest.mark.slow

HF_TOOLS = Path(__file__).parents[2] / "support" / "hf_tools.py"


@pytest.fixture(scope="module")
def used(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hf_tools")
    export = root / "export"
    assert main(["export", "--checkpoint", str(trained_run.output_dir), "--out", str(export)]) == 0
    work = root / "work"
    work.mkdir()
    return run_without_project(HF_TOOLS.read_text(), str(export), str(trained_run.data_dir), "val",
                               str(TINY["eval"]["max_samples"]), str(work), tmp=root)


def test_the_text_generation_pipeline_samples_with_top_p_and_repetition_penalty(used: dict) -> None:
    assert used["project_importable"] is False
    texts = used["pipeline"]["texts"]
    assert len(texts) == 2 and all(t.startswith("The key was in the") for t in texts)
    assert texts[0] != texts[1]  # two samples of 40 tokens
    assert "model of type" not in used["pipeline"]["log"]


def test_generation_stops_at_a_stop_string(used: dict) -> None:
    free, stopped, stop = used["pipeline"]["free"], used["pipeline"]["stopped"], used["pipeline"]["stop"]
    assert free.startswith(stopped) and len(stopped) < len(free)
    assert stopped.endswith(stop)  # greedy: the same text, cut where the word was written


def test_lm_eval_loglikelihood_agrees_with_memtrain_eval(used: dict, trained_run: TrainedRun) -> None:
    reported = EvalResult.from_json(trained_run.eval_json)
    scored = used["loglikelihood"]
    assert all(scored["round_trip"])  # the JSONL text is the samples' tokens
    assert len(scored["per_sample"]) == reported.n_samples
    ppl = math.exp(-sum(scored["per_sample"]) / reported.total.tokens)
    assert ppl == pytest.approx(reported.ppl, rel=1e-4)


def test_lm_eval_rolling_perplexity_is_finite(used: dict) -> None:
    perplexity = used["perplexity"]
    assert 1 < perplexity["byte_perplexity"] < perplexity["word_perplexity"] < math.inf
