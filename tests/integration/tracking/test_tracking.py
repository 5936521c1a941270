"""pipeline.tracking against a real ``mlflow server`` (and the default local SQLite store)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import ExperimentConfig, load_config
from pipeline.errors import UserError
from pipeline.evaluate import EvalResult, NllRow
from pipeline.report import save_eval
from pipeline.tracking import SPOOL_NAME, Tracker, run_params, start_tracking
from pipeline.tracking import main as tracking_main

pytestmark = pytest.mark.slow
SPOOL_JOB = Path(__file__).with_name("spool_job.py")


def make_cfg(out: Path, uri: str | None, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"train.output_dir={out}", "tracking.experiment=tests", "tracking.flush_timeout_s=180",
                              *([f"tracking.uri={uri}"] if uri else []), *extra])


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def three_segments() -> EvalResult:
    rows = [NllRow(300.0, 100, 40.0, 10), NllRow(250.0, 100, 20.0, 10), NllRow(220.0, 99, 5.0, 10)]
    base = [NllRow(300.0, 100, 40.0, 10), NllRow(301.0, 100, 41.0, 10), NllRow(299.0, 99, 42.0, 10)]
    return EvalResult("val", 4, 100, rows, baseline=EvalResult("val", 4, 100, base))


def test_params_series_final_curve_and_plot(mlflow_server, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "out", mlflow_server.uri)
    ds_config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "train_micro_batch_size_per_gpu": 4}
    tracker = start_tracking(cfg, ds_config=ds_config, world_size=2, rank=0)
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 5.0 - step, "train/lr": 1e-3 * step}, step)
    result = three_segments()
    tracker.log_eval(result, step=5)
    tracker.log_final_curve(result, save_eval(result, tmp_path / "eval", "final"))
    tracker.finish()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    expected_params = {key: str(value) for key, value in run_params(cfg, ds_config).items()}
    assert run.data.params == expected_params and run.data.params["ds.zero_optimization.stage"] == "3"
    assert run.data.tags["world_size"] == "2" and run.data.tags["memory.kind"] == cfg.memory.kind
    assert history(client, tracker.run_id, "train/loss") == [(s, 5.0 - s) for s in range(1, 6)]
    for k, row in enumerate(result.segments):
        assert history(client, tracker.run_id, f"eval/ppl_seg_{k:02d}") == [(5, pytest.approx(row.ppl))]
        assert history(client, tracker.run_id, f"eval/recall_ppl_seg_{k:02d}") == [(5, pytest.approx(row.recall_ppl))]
    assert history(client, tracker.run_id, "eval/ppl") == [(5, pytest.approx(result.ppl))]
    for key, rows, field in [("final/ppl_by_segment", result.segments, "ppl"),
                             ("final/recall_ppl_by_segment", result.segments, "recall_ppl"),
                             ("final/baseline_ppl_by_segment", result.baseline.segments, "ppl")]:
        assert history(client, tracker.run_id, key) == [(k, pytest.approx(getattr(r, field))) for k, r in enumerate(rows)]

    assert {a.path for a in client.list_artifacts(tracker.run_id, "config")} == {"config/config.yaml",
                                                                                "config/ds_config.json"}
    assert {a.path for a in client.list_artifacts(tracker.run_id, "final")} == {
        "final/final.json", "final/final.csv", "final/final.png"}
    png = Path(client.download_artifacts(tracker.run_id, "final/final.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvalResult.from_json(client.download_artifacts(tracker.run_id, "final/final.json", str(tmp_path / "dl"))) == result
    assert not (tmp_path / "out" / SPOOL_NAME).exists()


def test_server_killed_and_restarted_mid_run(mlflow_server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Nothing is lost while the server is down: the live run catches up when it is back, a run
    that finishes meanwhile leaves a spool that upload-spool sends, and the spool of a job killed
    meanwhile is sent by the job that resumes it."""
    uri = mlflow_server.uri
    crashing = subprocess.Popen([sys.executable, str(SPOOL_JOB), str(tmp_path / "crashing"), uri, "12"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live = start_tracking(make_cfg(tmp_path / "live", uri), world_size=1, rank=0)
    finishing = start_tracking(make_cfg(tmp_path / "finishing", uri, "tracking.flush_timeout_s=0"), rank=0)
    for step in range(1, 11):
        live.log_metrics({"train/loss": 1.0 / step}, step)
    crashing_run = crashing.stdout.readline().strip()
    assert crashing_run, crashing.stderr.read()

    mlflow_server.kill()
    for step in range(11, 31):
        live.log_metrics({"train/loss": 1.0 / step}, step)
    for step in range(1, 13):
        finishing.log_metrics({"train/loss": 1.0 / step}, step)
    finishing.finish()
    spool = tmp_path / "finishing" / SPOOL_NAME
    assert f"upload-spool {spool}" in capsys.readouterr().err
    crashing.communicate("go\n", timeout=120)
    assert crashing.returncode == 9
    assert all(f'"step": {step},' in (tmp_path / "live" / SPOOL_NAME).read_text() for step in range(11, 31))

    mlflow_server.start()
    for step in range(31, 41):
        live.log_metrics({"train/loss": 1.0 / step}, step)
    live.finish()
    client = MlflowClient(uri)
    assert history(client, live.run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 41)]
    assert client.get_run(live.run_id).info.status == "FINISHED"
    assert not (tmp_path / "live" / SPOOL_NAME).exists()

    assert tracking_main(["upload-spool", str(spool)]) == 0
    assert history(client, finishing.run_id, "train/loss") == [(s, 1.0 / s) for s in range(1, 13)]
    assert client.get_run(finishing.run_id).info.status == "FINISHED"
    assert not spool.exists()

    # the killed job is requeued: it resumes from its checkpoint of step 8 and replays steps 9..12
    resumed = start_tracking(make_cfg(tmp_path / "crashing", uri), run_id=crashing_run, world_size=1, rank=0)
    for step in range(9, 16):
        resumed.log_metrics({"train/loss": 1.0 / step}, step)
    resumed.finish()
    assert history(client, crashing_run, "train/loss") == [(s, 1.0 / s) for s in range(1, 16)]


def test_reattach_logs_each_step_once(mlflow_server, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "out", mlflow_server.uri)
    first = start_tracking(cfg, world_size=2, rank=0)
    for step in range(1, 9):  # m = 8
        first.log_metrics({"train/loss": 10.0 - step, "train/grad_norm": float(step)}, step)
    first.finish("KILLED")

    resumed = start_tracking(cfg, run_id=first.run_id, world_size=1, rank=0)
    assert isinstance(resumed, Tracker) and resumed.run_id == first.run_id
    for step in range(1, 11):  # the checkpoint was older than the last logged step: 1..8 are replayed
        resumed.log_metrics({"train/loss": 10.0 - step, "train/grad_norm": float(step)}, step)
    resumed.finish()

    client = MlflowClient(mlflow_server.uri)
    assert history(client, first.run_id, "train/loss") == [(s, 10.0 - s) for s in range(1, 11)]
    assert history(client, first.run_id, "train/grad_norm") == [(s, float(s)) for s in range(1, 11)]
    assert resumed.skipped == 16
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "1"


def test_unreachable_server_at_start_is_one_clear_line(unused_port: int, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{unused_port}"
    cfg = make_cfg(tmp_path / "out", uri, "tracking.connect_timeout_s=1")
    with pytest.raises(UserError) as err:
        start_tracking(cfg, rank=0)
    message = str(err.value)
    assert "\n" not in message and uri in message and "unreachable" in message
    assert start_tracking(cfg, rank=1).run_id is None  # other ranks never talk to the server


def test_credentials_in_the_uri_reach_the_server_and_no_message_or_param(mlflow_server, unused_port: int,
                                                                          tmp_path: Path) -> None:
    tracker = start_tracking(make_cfg(tmp_path / "out", mlflow_server.uri.replace("http://", "http://ann:s3cret@")),
                             rank=0)  # basic auth in the URI, which this server ignores
    tracker.log_metrics({"train/loss": 1.0}, 1)
    tracker.finish()
    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    assert history(MlflowClient(mlflow_server.uri), tracker.run_id, "train/loss") == [(1, 1.0)]
    assert "s3cret" not in repr(run.data.params) and "s3cret" not in repr(run.data.tags)
    assert run.data.params["tracking.uri"].startswith("http://ann:***@")

    cfg = make_cfg(tmp_path / "out", f"http://ann:s3cret@127.0.0.1:{unused_port}", "tracking.connect_timeout_s=1")
    with pytest.raises(UserError) as err:
        start_tracking(cfg, rank=0)
    message = str(err.value)
    assert f"http://ann:***@127.0.0.1:{unused_port} is unreachable" in message and "s3cret" not in message
    assert "refused" in message  # the port's answer, not a host name made of the credentials


def test_default_store_is_sqlite_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = start_tracking(make_cfg(tmp_path / "out", None), rank=0)
    assert tracker.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": float(step)}, step)
    tracker.finish()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert history(client, tracker.run_id, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_new_runs_get_start_run_tags_a_folder_name_and_the_mlflow_env(mlflow_server, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    client = MlflowClient(mlflow_server.uri)
    base = [f"tracking.uri={mlflow_server.uri}", "tracking.flush_timeout_s=180"]

    def start(out: str, *extra: str, run_id: str | None = None) -> str:
        tracker = start_tracking(load_config(None, [f"train.output_dir={tmp_path / out}", *base, *extra]),
                                 run_id=run_id, rank=0)
        tracker.finish()
        return tracker.run_id

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env-name")
    run = client.get_run(start("rmt-2k"))
    assert run.info.run_name == "rmt-2k"
    assert run.data.tags["mlflow.user"] == getpass.getuser() and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"]
    assert client.get_experiment(run.info.experiment_id).name == "from-env-name"
    # the config's own experiment beats the variables; MLFLOW_EXPERIMENT_ID beats the name
    explicit = client.get_run(start("b", "tracking.experiment=from-config", "tracking.run_name=named"))
    assert client.get_experiment(explicit.info.experiment_id).name == "from-config"
    assert explicit.info.run_name == "named"
    by_id = client.create_experiment("from-env-id")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", by_id)
    assert client.get_run(start("c")).info.experiment_id == by_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "999999")
    with pytest.raises(UserError, match="MLFLOW_EXPERIMENT_ID=999999 names no experiment"):
        start("d")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    # MLFLOW_RUN_ID reattaches; a checkpoint's run id comes first
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert start("e") == run.info.run_id
    assert start("f", run_id=explicit.info.run_id) == explicit.info.run_id
