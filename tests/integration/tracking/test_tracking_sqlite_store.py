"""A new SQLite tracking store used by two trainings at once (rmt and its baseline side by side):
MLflow's schema migration races without a lock and breaks the store for good (issue 17, item 5).
Real processes, a real store; the artifacts land beside it, not in the working directory."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.errors import UserError
from pipeline.tracking import connect

pytestmark = pytest.mark.slow  # two interpreters importing mlflow: ~40 s on 2 loaded cores

FIRST_USE = """
import sys, time
from pipeline.config import build_config
from pipeline.tracking import start_tracking
db, out, go = sys.argv[1], sys.argv[2], float(sys.argv[3])
cfg = build_config({"train": {"output_dir": out}, "tracking": {"uri": f"sqlite:///{db}", "experiment": "race"}})
while time.time() < go:  # both processes reach MLflow's migration together
    time.sleep(0.001)
tracker = start_tracking(cfg, rank=0)
tracker.log_metrics({"loss": 1.0}, 1)
(artifact := __import__("pathlib").Path(out) / "note.txt").write_text("hi")
tracker.log_artifact(artifact)
tracker.finish()
print(tracker.run_id)
"""


def test_two_first_users_of_a_new_sqlite_store(tmp_path: Path) -> None:
    store, work = tmp_path / "store", tmp_path / "work"
    store.mkdir()
    work.mkdir()
    db = store / "mlflow.db"
    go = time.time() + 10  # both interpreters have imported mlflow by then on a loaded 2-core machine
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(db), str(tmp_path / f"out{i}"), str(go)],
                              cwd=work, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [proc.communicate(timeout=180) for proc in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    run_ids = [out.strip().splitlines()[-1] for out, _ in results]
    client = MlflowClient(f"sqlite:///{db}")
    for run_id in run_ids:
        assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0]
        assert client.get_run(run_id).info.artifact_uri.startswith((store / "mlruns").as_uri())
        assert "note.txt" in [a.path for a in client.list_artifacts(run_id)]
    assert not (work / "mlruns").exists()  # nothing in the working directory


def test_a_half_migrated_store_gets_a_hint_that_repairs_it(tmp_path: Path) -> None:
    """An interrupted first migration leaves alembic's temporary table behind; the next user gets one
    line naming it, and doing what the line says gives a working store."""
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:  # what a killed batch migration leaves: its copy of the tags table
        conn.execute("CREATE TABLE _alembic_tmp_tags (key VARCHAR(250), value VARCHAR(5000), run_uuid VARCHAR(32))")
    uri = f"sqlite:///{db}"
    with pytest.raises(UserError) as refused:
        connect(uri, timeout_s=5)
    message = str(refused.value)
    assert "\n" not in message and "half-migrated" in message
    assert "drop its leftover table _alembic_tmp_tags" in message and f"mlflow db upgrade {uri}" in message

    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE _alembic_tmp_tags")
    subprocess.run([str(Path(sys.executable).with_name("mlflow")), "db", "upgrade", uri], check=True,
                   capture_output=True)
    client, _ = connect(uri, timeout_s=5)
    experiment = client.create_experiment("repaired")
    assert client.get_run(client.create_run(experiment).info.run_id).info.status == "RUNNING"
