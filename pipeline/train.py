"""``memtrain train``: DeepSpeed training of a memory-augmented decoder, resumable and preemptible.

One process is one rank (torchrun, the deepspeed launcher, srun, or none); ``--nproc N`` starts N
local ranks first. Every rank runs the same loop: warmup+cosine LR, the curriculum's segment count,
one ``backward`` per micro-batch, DeepSpeed's step (clipping from ``train.grad_clip``), periodic
eval and checkpoints. A run whose output dir holds a checkpoint resumes from it exactly (weights,
optimizer, RNG states, data position; the schedule and curriculum are functions of the step), on
another world size through DeepSpeed's universal checkpoint. SIGUSR2/SIGTERM/SIGINT/SIGHUP: every rank saves
at the next step boundary and the process exits with EXIT_PREEMPTED, which sbatch turns into a requeue.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import yaml
from tokenizers import Tokenizer

from data_prep.atomic import write_bytes, write_text
from pipeline import allocator, checkpoint, launch
from pipeline.config import ExperimentConfig, config_from_args, load_config, separate_memory_groups
from pipeline.ds_config import batch_plan, json_precision, resolve_ds_config, zero_stage
from pipeline.engine import (
    ResumePoint, build_partitioned_model, leave_process_group, load_point, load_shards, local_weights_finite,
    start_engine)
from pipeline.errors import UserError
from pipeline.evaluate import evaluate_model
from pipeline.flops import Throughput
from pipeline.progress import Progress
from pipeline.report import save_eval
from pipeline.run_dir import LOCK_OWNER_ENV, RunDir, die_with_parent, lock_held_by_parent, tag_for
from pipeline.tracking import start_system_metrics, start_tracking, stop_system_metrics, system_metrics_node_ids

EXIT_PREEMPTED = launch.EXIT_PREEMPTED
NAME_MAX = 255  # bytes in one file name on Linux file systems


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc == 1:
        return train(cfg)
    if launch.under_launcher():
        raise UserError("--nproc starts local ranks itself; under torchrun/srun each command is already one rank")
    preflight(cfg, args.nproc)  # fail here, before any rank starts
    rank_argv = ["train", "--config", args.config, *(["--set", *args.overrides] if args.overrides else [])]
    with RunDir.of(cfg.train.output_dir).lock():  # held for the ranks, which die with this process
        os.environ[LOCK_OWNER_ENV] = str(os.getpid())
        try:
            return launch.run_local_ranks(args.nproc, rank_argv, on_cpu=not launch.has_gpu())
        finally:
            del os.environ[LOCK_OWNER_ENV]


@dataclass
class Preflight:
    ds_config: dict[str, Any]
    manifest: dict[str, Any]
    vocab_size: int


def preflight(cfg: ExperimentConfig, world_size: int) -> Preflight:
    """Every check that needs no rank: the DeepSpeed JSON against the world size, the shards against
    the model and the config, the output dir against this config. UserError on the first problem."""
    from data_prep.manifest import read_manifest  # lazy: pyarrow, torch: off the CLI dispatch path
    from data_prep.verify import verify_splits

    from pipeline.data import check_data, check_splits

    check_paths(cfg)
    ds_config = resolve_ds_config(cfg, world_size)
    manifest = read_manifest(cfg.data.output_dir)
    vocab_size = tokenizer_vocab_size(Path(cfg.data.output_dir) / "tokenizer", manifest["vocab_size"])
    check_data(cfg, manifest, vocab_size)
    check_splits(cfg, manifest, batch_plan(cfg.train, world_size).global_batch)
    verify_splits(cfg.data.output_dir, manifest, {"train", cfg.eval.split}, vocab_size)
    check_same_run(cfg, manifest)
    return Preflight(ds_config, manifest, vocab_size)


def check_paths(cfg: ExperimentConfig) -> None:
    """The run folder can be made and is neither the data folder nor inside it."""
    out, data = Path(cfg.train.output_dir).absolute(), Path(cfg.data.output_dir).absolute()
    too_long = [part for part in out.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise UserError(f"train.output_dir has a name of {len(os.fsencode(too_long[0]))} bytes "
                        f"({too_long[0][:40]}...); file systems allow {NAME_MAX}")
    out, data = out.resolve(), data.resolve()
    if out == data or data in out.parents:
        raise UserError(f"train.output_dir {cfg.train.output_dir} is (inside) data.output_dir {cfg.data.output_dir}; "
                        "give the run a folder of its own")


def tokenizer_vocab_size(tokenizer_dir: Path, expected: int) -> int:
    """len(tokenizer), read from tokenizer.json in a fraction of a second; transformers' AutoTokenizer
    (seconds to import) only confirms an unexpected answer or reads a folder without tokenizer.json."""
    if not tokenizer_dir.is_dir():
        raise UserError(f"tokenizer folder missing: {tokenizer_dir}")
    if (tokenizer_dir / "tokenizer.json").is_file():
        size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        if size == expected:
            return size
    from transformers import AutoTokenizer  # lazy: seconds of import, rarely needed (above)

    return len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))


def check_same_run(cfg: ExperimentConfig, manifest: dict[str, Any]) -> None:
    """An output dir with checkpoints is resumed: its model, memory and tokenizer must be this config's."""
    run = RunDir.of(cfg.train.output_dir)
    if checkpoint.find_latest(run.checkpoints) is None:
        return
    saved = load_config(run.config)
    for section in ("model", "memory"):
        before, now = getattr(saved, section).model_dump(), getattr(cfg, section).model_dump()
        changed = [f"{section}.{key}: {before[key]!r} -> {now[key]!r}" for key in now if before.get(key) != now[key]]
        if changed:
            raise UserError(f"train.output_dir {run.root} holds checkpoints of another model ({changed[0]}); "
                            "use a new train.output_dir")
    # the raw file: a run saved before the setting existed trained at 1, whatever today's default
    trained_at = float(yaml.safe_load(run.config.read_text()).get("train", {}).get("memory_lr_scale", 1.0))
    if cfg.memory.has_parameters and \
            separate_memory_groups(trained_at) != separate_memory_groups(cfg.train.memory_lr_scale):
        raise UserError(f"train.output_dir {run.root} trained with train.memory_lr_scale={trained_at:g}, and its "
                        f"optimizer state {'has no' if trained_at == 1.0 else 'has'} separate groups for the memory: "
                        f"resume with --set train.memory_lr_scale={trained_at:g}, or use a new train.output_dir")
    saved_manifest = json.loads(run.data_manifest.read_text())
    if saved_manifest.get("tokenizer_hash") != manifest.get("tokenizer_hash"):
        raise UserError(f"train.output_dir {run.root} was trained with another tokenizer than the one in {cfg.data.output_dir}")


class PreemptionFlag:
    """SIGUSR2, SIGTERM, SIGINT (Ctrl-C) and SIGHUP only raise a flag; the loop acts on it at a step
    boundary, on all ranks at once: save, end the MLflow run as KILLED, exit EXIT_PREEMPTED."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in launch.STOP_SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        self.raised = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_point(ckpt_dir: Path, world_size: int, is_main: bool) -> ResumePoint | None:
    """The latest complete checkpoint, ready to load on ``world_size`` ranks (collective; see ``engine.load_point``)."""
    tag_dir = checkpoint.find_latest(ckpt_dir)
    return None if tag_dir is None else load_point(tag_dir, world_size, is_main)


def train(cfg: ExperimentConfig) -> int:
    flag = PreemptionFlag()  # from the start: a signal during set-up stops the run after its first step
    if not launch.has_gpu():
        allocator.tune_this_process()  # a no-op for ranks that started with the set-up (--nproc)
    try:
        dist_env = launch.setup()
        checks = preflight(cfg, dist_env.world_size)
        warnings.filterwarnings("ignore", category=FutureWarning)  # thousands about all_gather_into_tensor
        import deepspeed  # lazy: seconds of import, off the CLI dispatch path
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel("WARNING")
        deepspeed.init_distributed(timeout=collective_timeout(cfg))
        with run_lock(cfg, dist_env):
            try:
                code = Trainer(cfg, dist_env, checks).run(flag)
            except UserError as err:
                if err.every_rank:  # all ranks stop here together: leave together, as after a good run
                    leave_process_group()
                raise
        leave_process_group()
        return code
    finally:
        flag.restore()


def collective_timeout(cfg: ExperimentConfig) -> timedelta:
    """train.dist_timeout_s, else DeepSpeed's own default (DEEPSPEED_TIMEOUT minutes)."""
    from deepspeed.constants import default_pg_timeout  # lazy: seconds of import, off the CLI dispatch path

    return default_pg_timeout if cfg.train.dist_timeout_s is None else timedelta(seconds=cfg.train.dist_timeout_s)


@contextmanager
def run_lock(cfg: ExperimentConfig, dist_env: launch.DistEnv) -> Iterator[None]:
    """The run folder's lock for this job (collective): a rank of ``--nproc`` dies with its launcher,
    which holds the lock; otherwise rank 0 takes it and every rank stops if it could not."""
    import deepspeed.comm as dist  # lazy: seconds of import, off the CLI dispatch path

    if lock_held_by_parent():
        die_with_parent()
        yield
        return
    lock, error = None, None
    if dist_env.is_main:
        try:
            lock = RunDir.of(cfg.train.output_dir).lock().acquire()
        except UserError as err:
            error = str(err)
    verdict: list[str | None] = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise UserError(verdict[0], every_rank=True)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class Trainer:
    """One rank's training run: set-up and resume in ``__init__``, then ``run``."""

    def __init__(self, cfg: ExperimentConfig, dist_env: launch.DistEnv, checks: Preflight) -> None:
        import deepspeed.comm as dist  # lazy: seconds of import, off the CLI dispatch path

        from pipeline.data import make_train_batches, open_train_split

        started = time.perf_counter()
        self.cfg, self.env, self.dist = cfg, dist_env, dist
        self.run_dir = RunDir.of(cfg.train.output_dir)
        self.ckpt_dir = self.run_dir.checkpoints
        self.plan = batch_plan(cfg.train, dist_env.world_size)
        self.resume = resume_point(self.ckpt_dir, dist_env.world_size, dist_env.is_main)
        self.ds_config = checks.ds_config if self.resume is None else self.resume.ds_config(checks.ds_config)
        if dist_env.is_main:
            self._write_run_files()
        dist.barrier()

        model, self._hf_ds_config = build_partitioned_model(cfg, checks, self.ds_config)
        if dist_env.is_main:  # eval and export rebuild this model from it, without model.pretrained's folder
            write_text(self.run_dir.model_config, model.config.to_json_string(use_diff=False))
        self.engine = start_engine(model, cfg, self.ds_config)

        self.step, self.tokens_seen, run_id, position = 0, 0, None, None
        resume_note = ""
        rng_states: list[dict[str, Any]] = []
        if self.resume is not None:
            state = checkpoint.CheckpointState.read(self.resume.tag_dir)
            if state.global_batch != self.plan.global_batch:
                resume_note = (f"; the checkpoint's global batch was {state.global_batch} on {state.world_size} "
                               f"rank(s), now {self.plan.global_batch}: set train.global_batch_size to keep it")
            rng_states = load_shards(self.engine, self.resume)["rng"]
            self.step, self.tokens_seen, run_id = state.step, state.tokens_seen, state.mlflow_run_id
            position = state.data_position
        self.batches = make_train_batches(open_train_split(cfg.data.output_dir), self.plan, dist_env.rank,
                                          cfg.data.segment_len, cfg.train.seed, position)
        self.tracker = start_tracking(cfg, self.ds_config, run_id=run_id, world_size=dist_env.world_size,
                                      rank=dist_env.rank)
        self.system_metrics = self._start_system_metrics()
        self.progress = Progress(self.run_dir.train_log, self.step, cfg.train.max_steps,
                                 cfg.train.log_every, enabled=dist_env.is_main)
        self.throughput, peak_note = Throughput.for_run(dist_env.world_size, cfg.train.peak_tflops,
                                                        json_precision(self.ds_config))
        self._eval_split: Any = None
        checkpoint.restore_rng_states(rng_states, dist_env.rank, cfg.train.seed)  # last: nothing may draw after it
        resumed = f", resumed from {self.resume.tag_dir.name}{resume_note}" if self.resume else ""
        self.progress.info(f"ready in {time.perf_counter() - started:.1f} s: world size {dist_env.world_size}, "
                           f"global batch {self.plan.global_batch} = {self.plan.micro} x {self.plan.accum} x "
                           f"{self.plan.world}, ZeRO stage {zero_stage(self.ds_config)}, {json_precision(self.ds_config)}, "
                           f"step {self.step}{resumed}; collectives time out after "
                           f"{collective_timeout(cfg).total_seconds():.0f} s; {peak_note}")

    def _write_run_files(self) -> None:
        """config.yaml, ds_config.json, the tokenizer and the data manifest: the run dir is self-contained."""
        run = self.run_dir
        self.cfg.save(run.config)
        write_text(run.ds_config, json.dumps(self.ds_config, indent=2))
        data_dir = Path(self.cfg.data.output_dir)
        shutil.copytree(data_dir / "tokenizer", run.tokenizer, dirs_exist_ok=True)
        write_bytes(run.data_manifest, (data_dir / "manifest.json").read_bytes())

    def run(self, flag: PreemptionFlag) -> int:
        status = "FAILED"
        try:
            code = self._loop(flag)
            status = "KILLED" if code == EXIT_PREEMPTED else "FINISHED"
            return code
        finally:
            self.progress.close()
            if self.system_metrics is not None:
                stop_system_metrics(self.system_metrics)
            self.tracker.finish(status)

    def _start_system_metrics(self) -> Any:
        """Collective: rank 0 shares its run and store, and local rank 0 of every node starts MLflow's
        system metrics monitor on that run (under a node id of its own when the job spans several)."""
        if not (self.cfg.tracking.enabled and self.cfg.tracking.system_metrics):
            return None
        import torch.distributed as torch_dist  # lazy: torch

        shared = [self.tracker.run_id, getattr(self.tracker, "tracking_uri", None)]
        self.dist.broadcast_object_list(shared, src=0)
        ranks: list[Any] = [None] * self.env.world_size
        torch_dist.all_gather_object(ranks, (socket.gethostname(), self.env.local_rank))
        node_ids = system_metrics_node_ids(ranks)
        if self.env.rank not in node_ids:
            return None
        return start_system_metrics(self.cfg, shared[0], shared[1], node_ids[self.env.rank])

    def _loop(self, flag: PreemptionFlag) -> int:
        import torch  # lazy: seconds of import, off the CLI dispatch path

        from pipeline.data import step_batches
        from pipeline.optim import set_lr

        cfg, plan, device = self.cfg, self.plan, self.engine.device
        if self.step >= cfg.train.max_steps:
            self.progress.info(f"already at train.max_steps={cfg.train.max_steps}: nothing to do")
        while self.step < cfg.train.max_steps:
            started = time.perf_counter()
            lr = set_lr(self.engine.optimizer, cfg.train, self.step)
            micros = step_batches(self.batches, cfg.train, self.step, cfg.data.n_segments, plan.accum)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro in micros:
                with self.throughput.forward():  # FLOPs counted in the first step only
                    loss = self.engine(input_ids=micro.input_ids.to(device), labels=micro.labels.to(device)).loss
                self.engine.backward(loss)  # one backward per micro-batch: all segments' losses are in it
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
                loss_sum += loss.detach().double()
            self.step += 1
            step_tokens = sum(micro.input_ids.numel() for micro in micros) * plan.world
            self.tokens_seen += step_tokens
            # one collective per step: the mean loss, whether any rank was asked to stop, and how many
            # ranks hold non-finite weights after the update
            shared = torch.stack([loss_sum, torch.tensor(float(flag.raised), dtype=torch.float64, device=device),
                                  torch.tensor(float(not local_weights_finite(self.engine)), dtype=torch.float64,
                                               device=device)])
            self.dist.all_reduce(shared)
            shared = shared.cpu()
            elapsed = time.perf_counter() - started
            metrics = {
                "loss": float(shared[0]) / (plan.world * plan.accum),
                "lr": lr,
                "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "samples_per_s": plan.global_batch / elapsed,
                "n_segments": float(max(micro.n_segments for micro in micros)),
                # tokens_per_s, tflops_per_s, mfu, peak_memory_gib
                **self.throughput.metrics(step_tokens // plan.world, step_tokens, elapsed),
            }
            self._stop_if_diverged(metrics["loss"], metrics["grad_norm"], weights_finite=bool(shared[2] == 0))
            self.tracker.log_metrics(metrics, step=self.step)
            self.progress.step(self.step, metrics)
            preempted, last = bool(shared[1] > 0), self.step == cfg.train.max_steps
            # save first: an eval that fails (a damaged split, a full disk) never costs the checkpoint
            if preempted or last or self.step % cfg.train.save_every == 0:
                self._save("preempted" if preempted else "final" if last else "periodic")
            if last or cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self._evaluate(final=last)
            if preempted:
                self.progress.info(f"preempted: checkpoint saved at step {self.step}; exiting with {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
        return 0

    def _stop_if_diverged(self, loss: float, grad_norm: float, weights_finite: bool) -> None:
        """Never save non-finite state. A non-finite loss at step N also condemns the checkpoint of step
        N-1 (its weights produced that loss): rank 0 sets it aside so that it never becomes ``latest``."""
        if math.isfinite(loss) and math.isfinite(grad_norm) and weights_finite:
            return
        what = (f"loss {loss}" if not math.isfinite(loss) else f"grad norm {grad_norm}" if not math.isfinite(grad_norm)
                else "non-finite weights after the update")
        note = ""
        suspect = self.run_dir.tag_dir(self.step - 1)
        if not math.isfinite(loss) and self.env.is_main and checkpoint.is_complete(suspect):
            note = f"; its weights came from checkpoint {suspect.name}, set aside as {checkpoint.set_aside(suspect).name}"
        self.dist.barrier()
        latest = checkpoint.find_latest(self.ckpt_dir)
        raise UserError(f"training diverged at step {self.step} ({what}){note}; nothing was saved from it, "
                        f"latest checkpoint: {latest.name if latest else 'none'}; lower train.lr or raise "
                        "train.warmup_steps", every_rank=True)

    def _evaluate(self, final: bool) -> None:
        """Collective: every rank evaluates its share; rank 0 writes eval/step_XXXXXXXX.* and logs them."""
        from data_prep.shards import open_split  # lazy: seconds of import, off the CLI dispatch path

        if self._eval_split is None:
            self._eval_split = open_split(self.cfg.data.output_dir, self.cfg.eval.split)
        result = evaluate_model(self.engine, self._eval_split, self.cfg, n_segments=self.cfg.data.n_segments)
        qa = self._answer_accuracy()
        if not self.env.is_main:
            return
        if qa:
            self.tracker.log_metrics({f"eval/babilong_{task}_tf_accuracy": acc for task, acc in qa.items()}, step=self.step)
            self.progress.info(f"eval at step {self.step}: teacher-forced answer accuracy "
                               + " ".join(f"{task} {acc:.3f}" for task, acc in qa.items()))
        files = save_eval(result, self.run_dir.eval_dir, tag_for(self.step))
        self.tracker.log_eval(result, step=self.step, files=files)
        if final:
            self.tracker.log_final_curve(result, files=files)
        self.progress.info(f"eval at step {self.step}: {self.cfg.eval.split} ppl {result.ppl:.3f}, by segment "
                           + " ".join(f"{row.ppl:.2f}" for row in result.segments))

    def _answer_accuracy(self) -> dict[str, float]:
        """Per-task answer accuracy on QA (babilong) data, {} on books. Collective, like the eval."""
        if "n_segments" not in self._eval_split.column_names:
            return {}
        from pipeline.babilong_qa import answer_accuracy_by_task  # lazy: torch; QA data only

        split = self._eval_split.with_format("numpy", columns=["input_ids", "recall_mask", "n_segments", "task"])
        return answer_accuracy_by_task(self.engine, split, self.cfg.data.segment_len, self.cfg.eval.batch_size,
                                       self.cfg.eval.max_samples)

    def _save(self, reason: str) -> None:
        from pipeline.data import curriculum_segments  # lazy: torch (via pipeline.data)

        state = checkpoint.CheckpointState(
            step=self.step, tokens_seen=self.tokens_seen, world_size=self.env.world_size,
            global_batch=self.plan.global_batch,
            n_segments=curriculum_segments(self.cfg.train, self.step, self.cfg.data.n_segments),
            data_position=self.batches.position.as_dict(), mlflow_run_id=self.tracker.run_id, reason=reason)
        tag_dir = checkpoint.save(self.engine, self.ckpt_dir, state, self.cfg.train.keep_last)
        self.progress.info(f"saved {tag_dir} ({reason})")
