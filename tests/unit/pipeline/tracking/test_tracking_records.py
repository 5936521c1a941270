"""The tracker's pure parts: which ranks track, metric names, request grouping, the spool format."""

from __future__ import annotations

import math
from collections import deque

import pytest

from pipeline.config import load_config
from pipeline.evaluate import EvalResult, NllRow
from pipeline.tracking import (
    METRICS_PER_REQUEST, NullTracker, _next_batch, _Spool, eval_metrics, final_curves, start_tracking,
    system_metrics_node_ids,
)


def test_only_rank_zero_of_an_enabled_config_tracks() -> None:
    cfg = load_config(None, ["tracking.uri=http://127.0.0.1:9"])  # nothing listens there: never contacted
    assert type(start_tracking(cfg, rank=1)) is NullTracker
    assert type(start_tracking(load_config(None, ["tracking.enabled=false"]), rank=0)) is NullTracker


def test_metric_names() -> None:
    rows = [NllRow(300.0, 100, 40.0, 10), NllRow(250.0, 100)]
    result = EvalResult("val", 4, 100, rows, history=rows[::-1], baseline=EvalResult("val", 4, 100, rows))
    metrics = eval_metrics(result)
    assert set(metrics) == {"eval/ppl", "eval/recall_ppl", "eval/ppl_seg_00", "eval/ppl_seg_01", "eval/recall_ppl_seg_00",
                            "eval/target_ppl_hist_00", "eval/target_ppl_hist_01"}  # nothing for 0 recall tokens
    assert metrics["eval/ppl_seg_01"] == math.exp(2.5)
    curves = final_curves(result)
    assert curves["final/ppl_by_segment"] == [math.exp(3), math.exp(2.5)]
    assert len(curves["final/baseline_recall_ppl_by_segment"]) == 2 and "final/target_ppl_by_history" in curves


def test_requests_group_metric_points_and_send_anything_else_alone() -> None:
    metric = {"kind": "metric", "key": "loss", "value": 1.0, "step": 1, "timestamp": 0}
    artifact = {"kind": "artifact", "path": "/x.png", "artifact_path": None}
    pending = deque([metric] * (METRICS_PER_REQUEST + 5) + [artifact, metric])
    assert len(_next_batch(pending)) == METRICS_PER_REQUEST
    for _ in range(METRICS_PER_REQUEST):
        pending.popleft()
    assert len(_next_batch(pending)) == 5
    for _ in range(5):
        pending.popleft()
    assert _next_batch(pending) == [artifact]


def test_spool_keeps_a_header_and_drops_a_torn_last_line(tmp_path) -> None:
    spool = _Spool(tmp_path / "spool.jsonl", "run1", "http://x")
    spool.append([{"kind": "metric", "key": "loss", "value": math.nan, "step": 3, "timestamp": 1}])
    with spool.path.open("a") as f:
        f.write('{"kind": "metr')  # killed in the middle of a write
    header, records = _Spool.read(spool.path)
    assert header == {"run_id": "run1", "tracking_uri": "http://x"}
    assert len(records) == 1 and math.isnan(records[0]["value"])

    reopened = _Spool(spool.path, "run1", "http://x")  # the job that resumes the run
    assert len(reopened.leftover) == 1
    reopened.append([{"kind": "metric", "key": "loss", "value": 2.0, "step": 4, "timestamp": 2}])
    assert [r["step"] for r in _Spool.read(spool.path)[1]] == [3, 4]
    reopened.clear()
    assert _Spool.read(spool.path) == (header, [])


def test_one_system_metrics_monitor_per_node_each_under_its_own_name() -> None:
    assert system_metrics_node_ids([("a", 0), ("a", 1)]) == {0: None}  # one node: plain system/... names
    # ranks interleaved across nodes (an MPI round-robin placement): the monitors run on the local ranks 0
    assert system_metrics_node_ids([("a", 0), ("b", 0), ("a", 1), ("b", 1)]) == {0: "a", 1: "b"}
    # nodes that share a host name (containers, torchrun "nodes" on one machine) get their index too
    assert system_metrics_node_ids([("c", 0), ("c", 1), ("c", 0), ("c", 1)]) == {0: "c-0", 2: "c-1"}
    assert system_metrics_node_ids([("a", 0), ("a", 0), ("b", 0)]) == {0: "a-0", 1: "a-1", 2: "b-2"}


def test_the_gpu_system_metrics_monitor_has_its_library() -> None:
    """MLflow's system metrics log GPUs only where pynvml (nvidia-ml-py, a memtrain dependency) imports;
    without it MLflow skips them with a debug line, which a cluster user never sees. Here, without a
    GPU, the monitor gets as far as NVML itself."""
    import torch
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    if torch.cuda.is_available():
        assert GPUMonitor().num_gpus == torch.cuda.device_count()
    else:
        with pytest.raises(RuntimeError, match="NVML"):  # not ImportError: the library is there
            GPUMonitor()
