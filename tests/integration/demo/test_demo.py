"""`memtrain demo` end to end with tiny settings: every artifact a user is promised.

The demo run is the session's shared trained run (tests/support/shared_run.py): its stdout and
outputs are checked here, its export's clean-process scores come from the shared ``exports``.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from shared_run import Exports, TrainedRun
from tiny import TINY

from data_prep.manifest import read_manifest
from pipeline.demo import memory_effect
from pipeline.evaluate import EvalResult

STEPS = TINY["train"]["max_steps"]


@pytest.mark.slow
def test_demo_produces_every_artifact(trained_run: TrainedRun, exports: Exports) -> None:
    out, runs = trained_run.stdout, trained_run.output_dir.parent

    # shards
    manifest = read_manifest(trained_run.data_dir)
    assert manifest["counts"]["train"] > 0 and manifest["counts"]["val"] > 0
    assert all((trained_run.data_dir / s["path"]).is_file() for s in manifest["shards"])

    # checkpoints of both runs, with their state
    for run in (trained_run.output_dir, trained_run.baseline_dir):
        state = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "memtrain_state.json").read_text())
        assert state["step"] == STEPS and state["world_size"] == 2

    # the table at the end: both models, every segment, as in eval.json
    result = EvalResult.from_json(trained_run.eval_json)
    n_segments = TINY["data"]["n_segments"]
    assert result.baseline is not None and len(result.segments) == n_segments == len(result.baseline.segments)
    final_table = out.split("Demo finished")[1]
    assert result.format_table() in final_table
    assert memory_effect(result) in final_table and "ppl" in memory_effect(result)
    plot = trained_run.output_dir / "eval" / f"step_{STEPS:08d}.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(plot.relative_to(trained_run.cwd)) in final_table
    assert f"mlflow ui --backend-store-uri sqlite:///{trained_run.tracking_db}" in final_table
    assert runs == trained_run.cwd / "runs" / "demo"  # where a user finds them

    # MLflow: two finished runs with per-segment series, the final curve and the plot
    client = MlflowClient(tracking_uri=f"sqlite:///{trained_run.tracking_db}")  # no process-global state
    found = client.search_runs([client.get_experiment_by_name("memtrain-demo").experiment_id])
    assert sorted(r.data.params["memory.kind"] for r in found) == ["none", "rmt"]
    last = f"eval/ppl_seg_{n_segments - 1:02d}"
    for run in found:
        assert run.info.status == "FINISHED"
        assert {"eval/ppl_seg_00", last, "loss", "lr", "grad_norm"} <= set(run.data.metrics)
        curve = client.get_metric_history(run.info.run_id, "final/ppl_by_segment")
        assert [p.step for p in sorted(curve, key=lambda p: p.step)] == list(range(n_segments))
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
        assert any(p.endswith(".png") for p in artifacts), artifacts
        # throughput at every step, FLOPs counted with torch's flop counter; no MFU: a CPU has no built-in peak
        for key in ("tokens_per_s", "tflops_per_s", "peak_memory_gib"):
            points = client.get_metric_history(run.info.run_id, key)
            assert sorted(p.step for p in points) == list(range(1, STEPS + 1)) and min(p.value for p in points) > 0
        assert "mfu" not in run.data.metrics
        # MLflow's system metrics: a last sample even though each run is shorter than one 10 s interval
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    # the demo's eval and export are on the rmt run too
    (rmt,) = [run for run in found if run.data.params["memory.kind"] == "rmt"]
    assert client.get_metric_history(rmt.info.run_id, "checkpoint_eval/ppl")[0].step == STEPS
    assert [m.value for m in client.get_metric_history(rmt.info.run_id, f"checkpoint_eval/baseline_ppl_seg_{n_segments - 1:02d}")] \
        == [pytest.approx(result.baseline.segments[-1].ppl)]
    models = client.search_logged_models([rmt.info.experiment_id])
    assert str(trained_run.export_dir) in {m.tags.get("memtrain.folder") for m in models if m.source_run_id == rmt.info.run_id}

    # the export loads with plain transformers and scores the validation set like memtrain eval
    assert exports.clean["project_importable"] is False
    scored = exports.clean["exports"][str(trained_run.export_dir)]
    assert scored["segment_tokens"] == [row.tokens for row in result.segments]
    for nll, row in zip(scored["segment_nll"], result.segments):
        assert nll == pytest.approx(row.nll_sum, rel=1e-4)
    assert "=== 6/6 generate from the export" in out
