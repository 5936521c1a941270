"""`memtrain demo` end to end with an even smaller config: every artifact a user is promised."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient
import pytest
from export_support import run_clean

from data_prep.manifest import read_manifest
from pipeline.demo import memory_effect
from pipeline.evaluate import EvalResult

CLEAN_LOAD = Path(__file__).parents[2] / "support" / "clean_load.py"
SMALLER = [
    "data.source=synthetic:12", "data.segment_len=32", "data.n_segments=4", "data.vocab_size=400",
    "data.val_fraction=0.25", "data.synthetic.words_per_book=900", "data.synthetic.min_recall_distance_segments=1",
    "model.hidden_size=32", "model.num_heads=2", "model.max_positions=64", "memory.num_tokens=4",
    "train.max_steps=4", "train.save_every=2", "train.micro_batch_size=2", "train.warmup_steps=1",
    "train.log_every=2", "eval.max_samples=8", "eval.batch_size=4", "export.max_shard_size=50KB",
]


@pytest.mark.slow
def test_demo_produces_every_artifact(tmp_path: Path, repo_root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--config", str(repo_root / "configs/demo.yaml"),
                           "--set", *SMALLER], cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    runs = tmp_path / "runs" / "demo"

    # shards
    manifest = read_manifest(runs / "data")
    assert manifest["counts"]["train"] > 0 and manifest["counts"]["val"] > 0
    assert all((runs / "data" / s["path"]).is_file() for s in manifest["shards"])

    # checkpoints of both runs, with their state
    for run in ("train", "train-none"):
        state = json.loads((runs / run / "checkpoints" / "step_00000004" / "memtrain_state.json").read_text())
        assert state["step"] == 4 and state["world_size"] == 2

    # the table at the end: both models, every segment, as in eval.json
    result = EvalResult.from_json(runs / "eval.json")
    assert result.baseline is not None and len(result.segments) == 4 == len(result.baseline.segments)
    final_table = out.split("Demo finished")[1]
    assert result.format_table() in final_table
    assert memory_effect(result) in final_table and "ppl" in memory_effect(result)
    plot = runs / "train" / "eval" / "step_00000004.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(plot.relative_to(tmp_path)) in final_table
    db = tmp_path / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in final_table

    # MLflow: two finished runs with per-segment series, the final curve and the plot
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")  # not mlflow.set_tracking_uri: no global state
    found = client.search_runs([client.get_experiment_by_name("memtrain-demo").experiment_id])
    assert sorted(r.data.params["memory.kind"] for r in found) == ["none", "rmt"]
    for run in found:
        assert run.info.status == "FINISHED"
        assert {"eval/ppl_seg_00", "eval/ppl_seg_03", "loss", "lr", "grad_norm"} <= set(run.data.metrics)
        curve = client.get_metric_history(run.info.run_id, "final/ppl_by_segment")
        assert [p.step for p in sorted(curve, key=lambda p: p.step)] == [0, 1, 2, 3]
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
        assert any(p.endswith(".png") for p in artifacts), artifacts

    # the export loads with plain transformers and scores the validation set like memtrain eval
    clean = run_clean(CLEAN_LOAD, str(runs / "data"), "val", "8", "4", "the key", str(runs / "export"), tmp=tmp_path)
    assert clean["project_importable"] is False
    scored = clean["exports"][str(runs / "export")]
    assert scored["segment_tokens"] == [row.tokens for row in result.segments]
    for nll, row in zip(scored["segment_nll"], result.segments):
        assert nll == pytest.approx(row.nll_sum, rel=1e-4)
    assert "=== 6/6 generate from the export" in out
