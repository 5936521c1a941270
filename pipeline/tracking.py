"""MLflow tracking of a training run: rank 0 logs, every other rank holds a no-op tracker.

Start: ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default local store
(``sqlite:///mlflow.db`` in the working directory). A run id from the checkpoint reattaches to
that run (resume, requeue), else ``MLFLOW_RUN_ID`` does; an HTTP server that does not answer within
``tracking.connect_timeout_s`` is a UserError. A new run goes to ``tracking.experiment`` when the
config sets it, else to ``MLFLOW_EXPERIMENT_ID`` / ``MLFLOW_EXPERIMENT_NAME``, else to "memtrain"
(the variables HF's and Composer's MLflow integrations read); it is named ``tracking.run_name`` or
the basename of ``train.output_dir``, and carries the user/source tags ``mlflow.start_run`` sets.

Delivery never blocks or fails training and never loses a point. Every record (metric point,
artifact, final status) is appended to a spool file in ``train.output_dir`` and queued in
memory; a background thread sends the queue in order and retries with backoff while the server
is away. The spool is cut back to its header whenever the queue is empty, so it holds at most
what the server may not have yet. If the server is still away when ``finish`` gives up, the
spool stays and ``python -m pipeline.tracking upload-spool FILE`` sends it later; a job that
reattaches to the run sends it first.

Exactly once: a point keeps the timestamp it was logged with, so sending it twice is harmless
(MLflow's SQL stores key a point by key, step, timestamp and value), and a point at or below
the last step the run already holds for its key is skipped: a resumed job replays the steps
after its checkpoint, with identical values.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline.config import ExperimentConfig, flatten, mask_credentials
from pipeline.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.eval_result import EvalResult

SPOOL_NAME = "mlflow_spool.jsonl"
MAX_PARAM_LENGTH = 6000  # MLflow 3's limit on a param value
METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
PARAMS_PER_REQUEST = 100
MAX_BACKOFF_S = 5.0


def start_tracking(cfg: ExperimentConfig, ds_config: dict[str, Any] | None = None, run_id: str | None = None,
                   world_size: int = 1, rank: int | None = None) -> "NullTracker":
    """A live ``Tracker`` on rank 0 (``rank`` defaults to $RANK), a ``NullTracker`` elsewhere or when disabled."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    return Tracker(cfg, ds_config, run_id, world_size)


class NullTracker:
    """What ranks other than 0 hold: the tracker's interface, doing nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_eval(self, result: "EvalResult", step: int, files: Sequence[Path] = ()) -> None:
        pass

    def log_final_curve(self, result: "EvalResult", files: Sequence[Path] = ()) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class Tracker(NullTracker):
    """Rank 0's MLflow run. Every ``log_*`` call returns at once; see the module docstring."""

    def __init__(self, cfg: ExperimentConfig, ds_config: dict[str, Any] | None, run_id: str | None,
                 world_size: int) -> None:
        self._flush_timeout_s = cfg.tracking.flush_timeout_s
        self._client, self.tracking_uri = connect(cfg.tracking.uri, cfg.tracking.connect_timeout_s)
        try:
            run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
            run = self._reattach(run_id) if run_id else self._create_run(cfg)
            self.run_id: str = run.info.run_id
            self._log_run_facts(run, cfg, ds_config, world_size)
        except Exception as err:  # noqa: BLE001 - any failure of the store at start is the user's to fix
            raise UserError(_scrub(f"MLflow at {self.tracking_uri}: {_first_line(err)}", self.tracking_uri)) from None
        # key -> highest step queued; a resumed run starts from what the server holds.
        self._last_step = {m.key: m.step for m in run.data.to_proto().metrics}
        self.skipped = 0  # points dropped because their step was already logged

        self._pending: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._given_up = False
        self.spool = _Spool(Path(cfg.train.output_dir) / SPOOL_NAME, self.run_id, self.tracking_uri)
        self._enqueue(self._filter_new(self.spool.leftover), spool=False)
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._sender.start()

    # --- the public interface ---

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue one point per key at ``step``; a step at or below the key's last one is skipped."""
        self._log_points((key, value, step) for key, value in metrics.items())

    def log_eval(self, result: "EvalResult", step: int, files: Sequence[Path] = ()) -> None:
        """``eval/ppl_seg_XX`` and ``eval/recall_ppl_seg_XX`` series and ``eval/ppl`` at the training step."""
        self.log_metrics(eval_metrics(result), step)
        for path in files:
            self.log_artifact(path, "eval")

    def log_final_curve(self, result: "EvalResult", files: Sequence[Path] = ()) -> None:
        """Each curve as one metric with step = segment index (or history length): MLflow draws ppl vs segment."""
        self._log_points((key, value, index) for key, values in final_curves(result).items()
                         for index, value in enumerate(values) if not math.isnan(value))
        for path in files:
            self.log_artifact(path, "final")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file that stays on disk (it is sent from there, possibly later)."""
        self._enqueue([{"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path}])

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED, KILLED), waiting at most ``tracking.flush_timeout_s`` to deliver."""
        self._enqueue([{"kind": "status", "status": status, "timestamp": _now_ms()}])
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._sender.join(self._flush_timeout_s)
        with self._cond:
            left = len(self._pending)
            self._given_up = left > 0  # the sender stops: from here on the spool file is the user's
            self._cond.notify_all()
        if left == 0:
            self.spool.remove()
            return
        _warn(f"{left} records not delivered to {mask_credentials(self.tracking_uri)}; they are kept in {self.spool.path}. "
              f"Upload them later with: {sys.executable} -m pipeline.tracking upload-spool {self.spool.path}")

    # --- starting ---

    def _create_run(self, cfg: ExperimentConfig) -> Any:
        from mlflow.tracking.context.registry import resolve_tags  # lazy: mlflow (seconds)

        return self._client.create_run(experiment_id(self._client, cfg), run_name=run_name(cfg), tags=resolve_tags())

    def _reattach(self, run_id: str) -> Any:
        run = self._client.get_run(run_id)
        self._client.update_run(run_id, status="RUNNING")
        return run

    def _log_run_facts(self, run: Any, cfg: ExperimentConfig, ds_config: dict[str, Any] | None,
                       world_size: int) -> None:
        """Params (config + DeepSpeed JSON), tags and the two config files as artifacts."""
        from mlflow.entities import Param, RunTag  # lazy: mlflow (seconds)

        params = {key: str(value)[:MAX_PARAM_LENGTH] for key, value in run_params(cfg, ds_config).items()}
        held = run.data.params
        changed = sorted(key for key in params if key in held and held[key] != params[key])
        if changed:
            _warn(f"config changed since run {self.run_id} started; MLflow keeps the first values of: "
                  + ", ".join(changed))
        new = [Param(key, value) for key, value in params.items() if key not in held]
        for i in range(0, len(new), PARAMS_PER_REQUEST):
            self._client.log_batch(self.run_id, params=new[i:i + PARAMS_PER_REQUEST])
        tags = run_tags(cfg, world_size)
        self._client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
        self._client.log_text(self.run_id, cfg.to_yaml(), "config/config.yaml")
        if ds_config is not None:
            self._client.log_dict(self.run_id, ds_config, "config/ds_config.json")

    # --- the queue ---

    def _log_points(self, points: Iterable[tuple[str, float, int]]) -> None:
        now = _now_ms()
        self._enqueue(self._filter_new({"kind": "metric", "key": key, "value": float(value), "step": int(step),
                                        "timestamp": now} for key, value, step in points))

    def _filter_new(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop metric points at or below the last step queued for their key; keep the rest in order."""
        kept = []
        for record in records:
            if record["kind"] == "metric":
                if record["step"] <= self._last_step.get(record["key"], -math.inf):
                    self.skipped += 1
                    continue
                self._last_step[record["key"]] = record["step"]
            elif record["kind"] == "status":
                continue  # a previous job's end; this job sets its own
            kept.append(record)
        return kept

    def _enqueue(self, records: list[dict[str, Any]], spool: bool = True) -> None:
        if not records:
            return
        with self._cond:
            if spool:
                self.spool.append(records)  # best effort: the records are in memory either way
            self._pending.extend(records)
            self._cond.notify_all()

    def _send_loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending or self._given_up:
                    return
                batch = _next_batch(self._pending)
            try:
                deliver(self._client, self.run_id, batch)
            except Exception as err:  # noqa: BLE001 - nothing the store raises may reach training
                if not _is_transient(err):
                    _warn(f"dropped {len(batch)} records the server refused: {_first_line(err)}")
                else:
                    failures += 1
                    if failures == 1:
                        _warn(_scrub(f"{self.tracking_uri} is not answering ({_first_line(err)}); "
                                     f"buffering in memory and {self.spool.path}, retrying", self.tracking_uri))
                    with self._cond:
                        self._cond.wait_for(lambda: self._given_up, timeout=min(MAX_BACKOFF_S, 0.25 * 2 ** failures))
                    continue
            if failures:
                _warn(f"{mask_credentials(self.tracking_uri)} is back after {failures} failed attempts; sending the backlog")
                failures = 0
            with self._cond:
                if self._given_up:
                    return
                for _ in batch:
                    self._pending.popleft()
                if not self._pending:
                    self.spool.clear()


def _quick_http_requests() -> None:
    """The sender retries by itself; MLflow's own retries would hold its thread for minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def system_metrics_node_ids(ranks: Sequence[tuple[str, int]]) -> dict[int, str | None]:
    """The node id each node's system metrics monitor logs under, by the global rank that runs it
    (local rank 0), from every rank's ``(host name, local rank)``: None on one node (plain
    ``system/...`` names); else the host name, with the node's index added where nodes share a host
    name (containers, or several torchrun "nodes" on one machine) so that no two monitors write one
    metric."""
    leaders = [rank for rank, (_, local_rank) in enumerate(ranks) if local_rank == 0]
    if len(leaders) == 1:
        return {leaders[0]: None}
    hosts = [ranks[rank][0] for rank in leaders]
    unique = len(set(hosts)) == len(hosts)
    return {rank: host if unique else f"{host}-{index}" for index, (rank, host) in enumerate(zip(leaders, hosts))}


def start_system_metrics(cfg: ExperimentConfig, run_id: str | None, tracking_uri: str | None,
                         node_id: str | None) -> Any:
    """MLflow's own ``SystemMetricsMonitor`` on ``run_id`` (call it on local rank 0 of each node; its
    metrics are ``system/<node_id>/...`` when ``node_id`` is set), continuing the run's system steps
    after a resume. None when disabled or when it cannot start (one warning: never a reason to stop)."""
    if not (cfg.tracking.enabled and cfg.tracking.system_metrics and run_id and tracking_uri):
        return None
    _quick_http_requests()
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # lazy: mlflow (seconds)

        monitor = SystemMetricsMonitor(run_id, sampling_interval=cfg.tracking.system_metrics_interval_s,
                                       resume_logging=True, node_id=node_id, tracking_uri=tracking_uri)
        monitor.start()
    except Exception as err:  # noqa: BLE001 - system metrics are a nicety
        _warn(f"system metrics not logged: {type(err).__name__}: {_scrub(_first_line(err), tracking_uri)}")
        return None
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Stop the monitor, then log one last sample with what it gathered since its last point: MLflow's
    own loop logs only after a whole interval, so a job shorter than one would have none at all."""
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # noqa: BLE001 - system metrics are a nicety
        _warn(f"last system metrics sample not logged: {type(err).__name__}: {_first_line(err)[:200]}")


def connect(uri: str | None, timeout_s: float) -> tuple["MlflowClient", str]:
    """An MlflowClient for ``uri`` (or MLflow's own default) and the URI it resolved to."""
    _quick_http_requests()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri and uri.startswith(("http://", "https://")):
        wait_for_server(uri, timeout_s)
    import mlflow  # lazy: mlflow costs seconds; disabled tracking never loads it
    from mlflow import MlflowClient

    resolved = uri or mlflow.get_tracking_uri()
    db = sqlite_path(resolved)
    try:
        if db is None:
            client = MlflowClient(tracking_uri=uri)
        else:
            # MLflow's default artifact root is ./mlruns of the working directory; keep them by the store
            os.environ["_MLFLOW_SERVER_ARTIFACT_ROOT"] = (db.parent / "mlruns").resolve().as_uri()
            with _exclusive(db.with_name(db.name + ".lock")):  # two first users race in the schema migration
                client = MlflowClient(tracking_uri=resolved)
        return client, client.tracking_uri
    except Exception as err:  # noqa: BLE001 - a bad store URI is the user's to fix
        leftover = re.search(r"\b_alembic_tmp_\w+", str(err)) if db is not None else None
        hint = "" if leftover is None else (
            f"; the store {db} was left half-migrated by an interrupted first use: delete it if it holds no runs, "
            f"else back it up, drop its leftover table {leftover[0]} and run `mlflow db upgrade {resolved}`")
        raise UserError(_scrub(f"MLflow tracking URI {uri or resolved!r}: {_first_line(err)}{hint}", resolved)) from None


def _scrub(message: str, uri: str) -> str:
    """``message`` with the credentials of ``uri`` masked wherever it quotes the URI."""
    return message.replace(uri, mask_credentials(uri) or uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other store)."""
    prefix = "sqlite:///"
    return Path(unquote(uri[len(prefix):])) if uri.startswith(prefix) and uri != prefix + ":memory:" else None


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """A blocking ``flock`` on ``path`` (released when the block ends, or its process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def wait_for_server(uri: str, timeout_s: float) -> None:
    """Return once anything answers HTTP at ``uri`` (``/health``), or raise a one-line UserError."""
    # user:password@ in the URI is MLflow's basic auth; urllib would take it for part of the host name
    parts = urlsplit(uri)
    health = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + "/health", "", ""))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(health, timeout=max(0.1, min(2.0, timeout_s))):
                return
        except urllib.error.HTTPError:
            return  # it answered, maybe without a /health route: that is a server
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if time.monotonic() >= deadline:
                raise UserError(f"MLflow tracking server {mask_credentials(uri)} is unreachable ({reason}) after {timeout_s:g} s; "
                                "start it, fix tracking.uri / MLFLOW_TRACKING_URI, "
                                "or set tracking.enabled=false") from None
            time.sleep(0.25)


def experiment_id(client: "MlflowClient", cfg: ExperimentConfig) -> str:
    """The id of the experiment a new run goes to (created by name when missing); see the module docstring."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow (seconds)

    given_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if given_id and "experiment" not in cfg.tracking.model_fields_set:
        try:
            return client.get_experiment(given_id).experiment_id
        except MlflowException:
            raise UserError(f"MLFLOW_EXPERIMENT_ID={given_id} names no experiment at {client.tracking_uri}") from None
    name = cfg.tracking.experiment
    if "experiment" not in cfg.tracking.model_fields_set:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another job
        return client.get_experiment_by_name(name).experiment_id


def run_name(cfg: ExperimentConfig) -> str:
    """``tracking.run_name``, else the run folder's name: two runs of one experiment are told apart."""
    return cfg.tracking.run_name or Path(cfg.train.output_dir).resolve().name


def run_params(cfg: ExperimentConfig, ds_config: dict[str, Any] | None) -> dict[str, Any]:
    """The flattened config plus the flattened DeepSpeed JSON under ``ds.``."""
    return {**cfg.flat(), **flatten(ds_config or {}, "ds.")}


def run_tags(cfg: ExperimentConfig, world_size: int) -> dict[str, str]:
    tags = {"world_size": str(world_size), "memory.kind": cfg.memory.kind}
    sha = _git_sha()
    if sha:
        tags["mlflow.source.git.commit"] = sha
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def eval_metrics(result: "EvalResult") -> dict[str, float]:
    """The metrics of one periodic eval (nothing for a quantity with no counted targets)."""
    metrics = {"eval/ppl": result.ppl, "eval/recall_ppl": result.recall_ppl}
    for k, row in enumerate(result.segments):
        metrics[f"eval/ppl_seg_{k:02d}"] = row.ppl
        metrics[f"eval/recall_ppl_seg_{k:02d}"] = row.recall_ppl
    for h, row in enumerate(result.history or []):
        metrics[f"eval/target_ppl_hist_{h:02d}"] = row.ppl
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


def final_curves(result: "EvalResult") -> dict[str, list[float]]:
    """Curves indexed by segment (or history length), each to be logged as one metric with step = index."""
    curves = {"final/ppl_by_segment": [r.ppl for r in result.segments],
              "final/recall_ppl_by_segment": [r.recall_ppl for r in result.segments]}
    if result.history is not None:
        curves["final/target_ppl_by_history"] = [r.ppl for r in result.history]
    if result.baseline is not None:
        curves["final/baseline_ppl_by_segment"] = [r.ppl for r in result.baseline.segments]
        curves["final/baseline_recall_ppl_by_segment"] = [r.recall_ppl for r in result.baseline.segments]
    return curves


def checkpoint_eval_metrics(result: "EvalResult") -> dict[str, float]:
    """``memtrain eval``'s metrics for the checkpoint's run: the periodic eval's series under
    ``checkpoint_eval/`` and the baseline's, both at the checkpoint's step."""
    metrics = {key.replace("eval/", "checkpoint_eval/", 1): value for key, value in eval_metrics(result).items()}
    if result.baseline is not None:
        metrics.update({key.replace("eval/", "checkpoint_eval/baseline_", 1): value
                        for key, value in eval_metrics(result.baseline).items()})
    return metrics


def log_to_checkpoint_run(cfg: ExperimentConfig, run_id: str | None, step: int, metrics: dict[str, float],
                          tags: dict[str, str], files: Sequence[Path], artifact_path: str,
                          what: str) -> "MlflowClient | None":
    """Log an evaluation or export made after training to the MLflow run that produced the checkpoint
    (``run_id`` from its state): metrics at the checkpoint's ``step``, tags, files under ``artifact_path``.
    Best effort: nothing to do without tracking or a run id; any failure is one warning line (the
    results are on disk already). The client when everything arrived, else None."""
    if not (cfg.tracking.enabled and run_id):
        return None
    from mlflow.entities import Metric, RunTag  # lazy: mlflow (seconds)

    try:
        client, uri = connect(cfg.tracking.uri, cfg.tracking.connect_timeout_s)
        now = _now_ms()
        points = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for i in range(0, max(len(points), 1), METRICS_PER_REQUEST):
            client.log_batch(run_id, metrics=points[i:i + METRICS_PER_REQUEST],
                             tags=[RunTag(key, value) for key, value in tags.items()] if i == 0 else [])
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path)
    except Exception as err:  # noqa: BLE001 - a store away or a run gone never fails what is already written
        reason = _scrub(_first_line(err), cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
        print(f"memtrain {what}: warning: not logged to MLflow run {run_id}: {type(err).__name__}: {reason[:200]}",
              file=sys.stderr)
        return None
    print(f"memtrain {what}: logged to MLflow run {run_id} at {mask_credentials(uri)}")
    return client


def deliver(client: "MlflowClient", run_id: str, records: list[dict[str, Any]]) -> None:
    """Send records that ``_next_batch`` grouped: metric points, or one artifact, or one status."""
    from mlflow.entities import Metric  # lazy: mlflow (seconds)

    first = records[0]
    if first["kind"] == "metric":
        client.log_batch(run_id, metrics=[Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in records])
    elif first["kind"] == "artifact":
        if Path(first["path"]).is_file():
            client.log_artifact(run_id, first["path"], first["artifact_path"])
        else:
            _warn(f"artifact {first['path']} is gone; not uploaded")
    else:
        client.set_terminated(run_id, first["status"], end_time=first["timestamp"])


def upload_spool(path: str | Path, tracking_uri: str | None = None) -> int:
    """Send what a spool file holds to its run (points the run already has are skipped); remove it after."""
    path = Path(path)
    header, records = _Spool.read(path)
    client, uri = connect(tracking_uri or header["tracking_uri"], timeout_s=10.0)
    run = client.get_run(header["run_id"])
    last_step = {m.key: m.step for m in run.data.to_proto().metrics}
    records = [r for r in records if r["kind"] != "metric" or r["step"] > last_step.get(r["key"], -math.inf)]
    pending = deque(records)
    while pending:
        batch = _next_batch(pending)
        deliver(client, header["run_id"], batch)
        for _ in batch:
            pending.popleft()
    path.unlink()
    print(f"uploaded {len(records)} records of {path} to run {header['run_id']} at {mask_credentials(uri)}")
    return len(records)


class _Spool:
    """The append-only JSONL file of records not yet known to be delivered: a header line, then records."""

    def __init__(self, path: Path, run_id: str, tracking_uri: str) -> None:
        self.path = path
        self.leftover: list[dict[str, Any]] = []
        if path.is_file() and not path.stat().st_size:
            path.unlink()  # killed before its header was written: nothing in it
        if path.is_file():
            header, records = self.read(path)
            if header.get("run_id") == run_id:
                self.leftover = records
            else:  # another run's: keep it aside, it can still be uploaded
                aside = path.with_name(f"mlflow_spool.{header.get('run_id', 'unknown')}.jsonl")
                path.replace(aside)
                _warn(f"found the spool of another run; moved it to {aside}. Upload it with: "
                      f"{sys.executable} -m pipeline.tracking upload-spool {aside}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")
        if self._file.tell() == 0:
            self._file.write(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}) + "\n")
        elif not path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # end a line torn by a kill, so the next record starts clean
        self._file.flush()
        self._header_bytes = len(path.read_bytes().split(b"\n", 1)[0]) + 1

    def append(self, records: list[dict[str, Any]]) -> None:
        try:
            self._file.write("".join(json.dumps(r) + "\n" for r in records))
            self._file.flush()
        except OSError as err:  # a full disk must not stop training; memory still holds the records
            _warn(f"could not write {self.path}: {err}")

    def clear(self) -> None:
        try:
            self._file.truncate(self._header_bytes)
        except OSError as err:
            _warn(f"could not truncate {self.path}: {err}")

    def remove(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    @staticmethod
    def read(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(header, records): every whole record; torn lines (a kill or a full disk mid-write: their
        points were never acknowledged to the caller) are skipped and reported, never fatal."""
        lines = path.read_bytes().decode(errors="replace").splitlines()
        if not lines:
            raise UserError(f"{path} is empty; not a memtrain MLflow spool")
        parsed = [_json_or_none(line) for line in lines]
        header = parsed[0] if isinstance(parsed[0], dict) and "run_id" in parsed[0] else {}
        records = [r for r in parsed[1:] if isinstance(r, dict) and "kind" in r]
        torn = len(lines) - len(records) - (1 if header else 0)
        if torn:
            _warn(f"{path}: kept {len(records)} records, skipped {torn} torn line(s)"
                  + ("" if header else " (its header among them: the run it belongs to is unknown)"))
        return header, records


def _json_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _next_batch(pending: deque[dict[str, Any]]) -> list[dict[str, Any]]:
    """The head of the queue: consecutive metric points (up to one request's worth), else one record."""
    if pending[0]["kind"] != "metric":
        return [pending[0]]
    batch = []
    for record in pending:
        if record["kind"] != "metric" or len(batch) == METRICS_PER_REQUEST:
            break
        batch.append(record)
    return batch


def _is_transient(err: Exception) -> bool:
    """Worth retrying: anything but the server saying the request itself is invalid."""
    return getattr(err, "error_code", None) != "INVALID_PARAMETER_VALUE"


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _warn(message: str) -> None:
    print(f"mlflow: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload-spool", help="send a spool file left by a run that lost its server")
    upload.add_argument("file")
    upload.add_argument("--tracking-uri", default=None, help="default: the URI recorded in the spool")
    args = parser.parse_args(argv)
    try:
        upload_spool(args.file, args.tracking_uri)
    except Exception as err:  # noqa: BLE001 - one line, the spool stays for the next try
        print(f"upload-spool: error: {_first_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
