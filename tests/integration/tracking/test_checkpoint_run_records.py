"""What `memtrain eval` and `memtrain export` record on the MLflow run that trained the checkpoint,
seen through a real ``mlflow server`` (a copy of the session's trained run, reattached to a run there)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.evaluate import EvalResult
from pipeline.run_dir import tag_for

from ports import free_ports
from processes import memtrain, process_env
from shared_run import TrainedRun

pytestmark = pytest.mark.slow


def run_on_server(trained_run: TrainedRun, root: Path, uri: str) -> tuple[Path, str]:
    """A copy of the trained run whose config and checkpoint state point at a new run on ``uri``."""
    run = root / "train"
    shutil.copytree(trained_run.output_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["tracking"].update(enabled=True, uri=uri)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"records-{root.name}")).info.run_id
    client.set_terminated(run_id)
    for state_file in (run / "checkpoints").glob("step_*/memtrain_state.json"):
        state = json.loads(state_file.read_text())
        state_file.write_text(json.dumps({**state, "mlflow_run_id": run_id}))
    return run, run_id


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_eval_after_training_logs_its_table_to_the_checkpoints_run(
        trained_run: TrainedRun, mlflow_server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, run_id = run_on_server(trained_run, tmp_path, mlflow_server.uri)
    step = json.loads(next((run / "checkpoints").glob("step_*/memtrain_state.json")).read_text())["step"]
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--json", str(out),
                 "--set", f"eval.baseline={trained_run.baseline_dir}"]) == 0
    assert f"logged to MLflow run {run_id}" in capsys.readouterr().out
    result = EvalResult.from_json(out)

    client = MlflowClient(mlflow_server.uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"  # reattached for the eval, left as training ended it
    assert history(client, run_id, "checkpoint_eval/ppl") == [(step, pytest.approx(result.ppl))]
    for k, (row, base) in enumerate(zip(result.segments, result.baseline.segments, strict=True)):
        assert history(client, run_id, f"checkpoint_eval/ppl_seg_{k:02d}") == [(step, pytest.approx(row.ppl))]
        recall = [(step, pytest.approx(row.recall_ppl))] if math.isfinite(row.recall_ppl) else []  # none in segment 0
        assert history(client, run_id, f"checkpoint_eval/recall_ppl_seg_{k:02d}") == recall
        assert history(client, run_id, f"checkpoint_eval/baseline_ppl_seg_{k:02d}") == [(step, pytest.approx(base.ppl))]
    tag = tag_for(step)
    assert logged.data.tags["checkpoint_eval.last_step"] == str(step)
    assert f"baseline {trained_run.baseline_dir}" in logged.data.tags[f"checkpoint_eval.{tag}"]
    names = {Path(a.path).name for a in client.list_artifacts(run_id, f"checkpoint_eval/{tag}")}
    assert {f"{tag}.json", f"{tag}.csv", f"{tag}.png", "eval.json"} == names
    table = client.download_artifacts(run_id, f"checkpoint_eval/{tag}/{tag}.json", str(tmp_path / "dl"))
    assert EvalResult.from_json(table) == result


def test_export_records_itself_on_the_run_with_the_hub_commit_card_and_a_registered_model(
        trained_run: TrainedRun, mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from huggingface_hub import CommitInfo, HfApi

    run, run_id = run_on_server(trained_run, tmp_path, mlflow_server.uri)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["export"]["register_as"] = f"tiny-rmt-{tmp_path.name}"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.setenv("HF_TOKEN", "hf_FakeTokenNeverSent")
    # the Hub upload is the one faked call
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "create_branch", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: CommitInfo(
        commit_url=f"https://huggingface.co/me/tiny-rmt/commit/{'ab' * 20}", commit_message="m",
        commit_description="", oid="ab" * 20))
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--dtype", "bf16",
                 "--push", "me/tiny-rmt", "--revision", "step-4"]) == 0
    assert "registered as" in capsys.readouterr().out

    client = MlflowClient(mlflow_server.uri)
    step = json.loads(next((run / "checkpoints").glob("step_*/memtrain_state.json")).read_text())["step"]
    prefix = f"export.{tag_for(step)}."
    tags = {key.removeprefix(prefix): value for key, value in client.get_run(run_id).data.tags.items()
            if key.startswith(prefix)}
    assert tags == {"folder": str(out), "checkpoint": str(run / "checkpoints" / tag_for(step)),
                    "checkpoint_step": str(step), "dtype": "bf16",
                    "hub_repo": "me/tiny-rmt", "hub_revision": "step-4", "hub_commit": "ab" * 20,
                    "hub_url": f"https://huggingface.co/me/tiny-rmt/commit/{'ab' * 20}"}
    card = client.download_artifacts(run_id, f"export/{tag_for(step)}/README.md", str(tmp_path / "dl"))
    assert Path(card).read_text() == (out / "README.md").read_text()

    experiment = client.get_run(run_id).info.experiment_id
    (model,) = client.search_logged_models([experiment])
    assert (model.name, model.source_run_id, model.status) == ("me-tiny-rmt", run_id, "READY")
    assert model.tags["memtrain.hub_commit"] == "ab" * 20 and model.tags["memtrain.folder"] == str(out)
    (version,) = client.search_model_versions(f"name='{config['export']['register_as']}'")
    assert model.model_id in version.source and version.run_id == run_id



@pytest.fixture(scope="module")
def resumed_run(trained_run: TrainedRun, mlflow_server, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the trained run resumed for 2 more steps on 2 ZeRO-3 ranks, logging to the server:
    (run folder, run id, the new steps, memtrain's stderr)."""
    run, run_id = run_on_server(trained_run, tmp_path_factory.mktemp("resumed"), mlflow_server.uri)
    start = json.loads(next((run / "checkpoints").glob("step_*/memtrain_state.json")).read_text())["step"]
    steps = list(range(start + 1, start + 3))
    proc = memtrain("train", "--nproc", "2", "--config", str(run / "config.yaml"), "--set", f"train.output_dir={run}",
                    f"train.max_steps={steps[-1]}", "train.peak_tflops=0.001", "train.log_every=1",
                    "tracking.system_metrics_interval_s=0.2")
    return run, run_id, steps, proc.stderr


def test_resumed_training_logs_throughput_mfu_and_system_metrics(resumed_run, mlflow_server) -> None:
    """FLOPs are counted again at the first step of every process (here a resume on 2 ZeRO-3 ranks),
    MFU is logged against train.peak_tflops (a CPU has no built-in peak), and MLflow's own system
    metrics monitor runs on local rank 0."""
    run, run_id, steps, stderr = resumed_run
    assert "peak 0.001 TFLOP/s per device (train.peak_tflops, fp32)" in stderr

    client = MlflowClient(mlflow_server.uri)
    tokens = dict(history(client, run_id, "tokens_per_s"))
    tflops = dict(history(client, run_id, "tflops_per_s"))
    mfu = dict(history(client, run_id, "mfu"))
    memory = dict(history(client, run_id, "peak_memory_gib"))
    assert sorted(tokens) == sorted(tflops) == sorted(mfu) == sorted(memory) == steps
    for step in steps:
        assert tflops[step] > 0 and mfu[step] == pytest.approx(tflops[step] / 0.001)
        assert 0.1 < memory[step] < 64  # GiB of a rank's peak RSS
    assert f"mfu {100 * mfu[steps[-1]]:.1f}%" in (run / "logs" / "train.log").read_text()

    # MLflow's system metrics, from one monitor (local rank 0 of the one node: no node prefix, no step twice)
    cpu = [step for step, _ in history(client, run_id, "system/cpu_utilization_percentage")]
    assert cpu and len(cpu) == len(set(cpu))
    assert "system/system_memory_usage_megabytes" in client.get_run(run_id).data.metrics


def test_each_node_logs_its_own_system_metrics(trained_run: TrainedRun, mlflow_server, tmp_path: Path) -> None:
    """Two torchrun "nodes" of one rank each on this machine: both ranks are local rank 0 of their node,
    so each runs a system metrics monitor, under a node id of its own (the host name is the same for
    both here, so the node's index is added); one monitor would miss a node, two under one name would
    write one metric twice."""
    run, run_id = run_on_server(trained_run, tmp_path, mlflow_server.uri)
    step = json.loads(next((run / "checkpoints").glob("step_*/memtrain_state.json")).read_text())["step"]
    port = free_ports()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "pipeline.cli", "train", "--config", str(run / "config.yaml"), "--set", f"train.output_dir={run}",
         f"train.max_steps={step + 1}", "tracking.system_metrics_interval_s=0.2"],
        env=process_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)

    metrics = MlflowClient(mlflow_server.uri).get_run(run_id).data.metrics
    host = socket.gethostname()
    for node in (0, 1):
        assert f"system/{host}-{node}/cpu_utilization_percentage" in metrics, sorted(metrics)
    assert not [key for key in metrics if key.startswith("system/") and key.count("/") == 1], sorted(metrics)


def test_all_checkpoints_go_to_a_hub_branch_each_and_are_recorded(
        resumed_run, mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    from huggingface_hub import HfApi

    run, run_id, steps, _ = resumed_run
    token = "hf_FakeTokenOfTheAllCheckpointsTest"
    monkeypatch.setenv("HF_TOKEN", token)
    calls: list[tuple[str, dict]] = []
    for name in ("create_repo", "create_branch", "upload_folder"):  # the Hub upload is the one faked call
        monkeypatch.setattr(HfApi, name, lambda self, *a, _name=name, **k: calls.append((_name, k)))
    out = tmp_path / "exports"
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--all-checkpoints", "--push", "me/tiny"]) == 0

    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(tags) == 2 and tags[-1] == tag_for(steps[-1])  # train.keep_last=2: the resumed-from one and the last
    assert sorted(p.name for p in out.iterdir()) == tags
    uploads = [k for name, k in calls if name == "upload_folder"]
    assert [(Path(k["folder_path"]).name, k["revision"]) for k in uploads] == [
        (tag, f"step-{int(tag.removeprefix('step_'))}") for tag in tags]
    assert [k["branch"] for name, k in calls if name == "create_branch"] == [u["revision"] for u in uploads]
    client_tags = MlflowClient(mlflow_server.uri).get_run(run_id).data.tags
    for tag in tags:
        assert client_tags[f"export.{tag}.hub_revision"] == f"step-{int(tag.removeprefix('step_'))}"
        assert client_tags[f"export.{tag}.folder"] == str(out / tag)
    captured = capsys.readouterr()
    assert not [text for text in (captured.out, captured.err, caplog.text, *client_tags.values()) if token in text]
    assert "--all-checkpoints takes the run's train.output_dir" in error_of(
        ["export", "--checkpoint", str(run / "checkpoints" / tags[0]), "--out", str(tmp_path / "x"), "--all-checkpoints"],
        capsys)


def error_of(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err
