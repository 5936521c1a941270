"""Exact per-segment perplexity of a memory model, in one process or across ZeRO-3 ranks.

Segment k's numbers are the model's own: the predictions made from segment k's positions
(targets k*L+1 .. (k+1)*L), summed over every sample before dividing, so
``ppl_k = exp(sum NLL / sum tokens)``, never an average of per-batch averages. Recall numbers are
the same sums over the targets whose ``recall_mask`` is 1 (facts only memory can predict).

The history+target protocol (``eval.history_target``) scores only the last segment of each
sample, fed with h = 0 .. n-1 previous segments: the target segment's perplexity as a function
of how much history the model has read. At h = n-1 it is the last row of the per-segment table.

Under ZeRO-3 every forward gathers parameters collectively, so every rank must make the same
forward calls: rank r takes samples r, r+world, ... and pads its share to ceil(n/world) with a
copy of a sample whose targets are all masked (weight zero). Sums are all-reduced at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import launch
from pipeline.checkpoint import CheckpointInfo, load_trained_model, read_checkpoint, universal_tag_dir, with_weights
from pipeline.config import ExperimentConfig, apply_overrides, build_config, load_config
from pipeline.ds_config import at_world_size, json_precision
from pipeline.engine import (all_weights_finite, build_partitioned_model, leave_process_group, load_point, load_shards,
                             start_engine)
from pipeline.errors import UserError
from pipeline.eval_result import EvalResult, NllRow, perplexity  # noqa: F401  (perplexity: part of this module's API)
from pipeline.report import save_eval
from pipeline.run_dir import RunDir, tag_for
from pipeline.tracking import checkpoint_eval_metrics, log_to_checkpoint_run

if TYPE_CHECKING:
    import datasets
    import torch

COLUMNS = ("input_ids", "loss_mask", "recall_mask")


# --- computing it -------------------------------------------------------------------------------


def evaluate_model(model: "torch.nn.Module", dataset: "datasets.Dataset", cfg: ExperimentConfig,
                   n_segments: int | None = None) -> EvalResult:
    """Per-segment NLL sums of ``model`` over the first ``eval.max_samples`` samples of ``dataset``.

    ``model`` is a MemoryModelForCausalLM or a DeepSpeed engine around one; ``n_segments`` limits
    every sample to its first n segments (default: all). Call it on every rank when
    torch.distributed is initialised; every rank gets the same result.
    """
    import torch  # lazy: seconds of import, off the CLI dispatch path
    import torch.distributed as dist

    seg_len = cfg.data.segment_len
    if len(dataset) == 0:
        raise UserError(f"the {cfg.eval.split} split holds no samples to evaluate")
    sample_segments = len(dataset[0]["input_ids"]) // seg_len
    n = sample_segments if n_segments is None else n_segments
    if not 1 <= n <= sample_segments:
        raise ValueError(f"n_segments={n_segments}: samples hold {sample_segments} segments of {seg_len} tokens")
    n_samples = min(cfg.eval.max_samples, len(dataset))
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    # (first, last) segment of each window: the whole sample, then the history+target windows.
    windows = [(0, n)] + ([(n - 1 - h, n) for h in range(n)] if cfg.eval.history_target else [])
    sums = [torch.zeros(4, last - first, dtype=torch.float64) for first, last in windows]
    rows = dataset.with_format("torch", columns=list(COLUMNS))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for indices, weights in _rank_batches(n_samples, rank, world, cfg.eval.batch_size):
                batch = rows[indices]
                for window_sums, (first, last) in zip(sums, windows):
                    window_sums += _window_sums(model, batch, weights, first * seg_len, last * seg_len, seg_len)
    finally:
        model.train(was_training)

    flat = torch.cat([s.flatten() for s in sums])
    if distributed:
        flat = flat.to(_device_of(model))
        dist.all_reduce(flat)
        flat = flat.cpu()
    sums = [part.view(4, -1) for part in flat.split([s.numel() for s in sums])]
    history = [_nll_rows(s[:, -1:])[0] for s in sums[1:]] if cfg.eval.history_target else None
    return EvalResult(split=cfg.eval.split, n_samples=n_samples, segment_len=seg_len,
                      segments=_nll_rows(sums[0]), history=history)


def _nll_rows(sums: "torch.Tensor") -> list[NllRow]:
    return [NllRow(float(s[0]), round(float(s[1])), float(s[2]), round(float(s[3]))) for s in sums.T]


def _rank_batches(n_samples: int, rank: int, world: int, batch_size: int) -> list[tuple[list[int], "torch.Tensor"]]:
    """This rank's samples in batches, padded so every rank makes the same calls with the same shapes."""
    import torch  # lazy: seconds of import, off the CLI dispatch path

    mine = list(range(rank, n_samples, world))
    share = -(-n_samples // world)
    padded = mine + [mine[0] if mine else 0] * (share - len(mine))
    real = torch.arange(share) < len(mine)
    return [(padded[i:i + batch_size], real[i:i + batch_size]) for i in range(0, share, batch_size)]


def _window_sums(model: "torch.nn.Module", batch: dict[str, "torch.Tensor"], weights: "torch.Tensor",
                 start: int, end: int, seg_len: int) -> "torch.Tensor":
    """[4, n_window_segments] float64: NLL sum, tokens, recall NLL sum, recall tokens per segment."""
    import torch  # lazy: seconds of import, off the CLI dispatch path

    ids = batch["input_ids"][:, start:end].long()
    counted = batch["loss_mask"][:, start:end].bool() & weights[:, None]
    counted[:, 0] = False  # the window's first token has nothing before it to be predicted from
    recall = counted & batch["recall_mask"][:, start:end].bool()
    device = _device_of(model)
    out = model(input_ids=ids.to(device), labels=ids.masked_fill(~counted, -100).to(device), return_token_nll=True)

    n_window = (end - start) // seg_len
    segment_of_target = (torch.arange(end - start) - 1).clamp(min=0) // seg_len  # target t comes from position t-1
    token_nll = out.token_nll.detach().double().cpu()
    recall_nll = torch.zeros(n_window, dtype=torch.float64).index_add_(0, segment_of_target, (token_nll * recall).sum(0))
    recall_tokens = torch.zeros(n_window, dtype=torch.float64).index_add_(0, segment_of_target, recall.sum(0).double())
    return torch.stack([out.segment_nll.detach().double().cpu(), out.segment_tokens.detach().double().cpu(),
                        recall_nll, recall_tokens])


def _device_of(model: "torch.nn.Module") -> "torch.device":
    device = getattr(model, "device", None)  # DeepSpeedEngine and PreTrainedModel both have one
    return device if device is not None else next(model.parameters()).device


# --- memtrain eval ------------------------------------------------------------------------------


def eval_config(checkpoint_cfg: ExperimentConfig, config_file: str | None, overrides: list[str]) -> ExperimentConfig:
    """The checkpoint's config with the eval section of ``config_file`` and ``--set eval.*`` (and
    ``data.output_dir``, for a run evaluated elsewhere than it was trained) applied."""
    _require_eval_keys(overrides)
    tree = checkpoint_cfg.model_dump(mode="json")
    if config_file is not None:
        tree["eval"] = load_config(config_file).eval.model_dump(mode="json")
    return build_config(apply_overrides(tree, overrides))


def run_eval(args: argparse.Namespace) -> int:
    """``memtrain eval --checkpoint DIR [--json OUT] [--nproc N]``: print the per-segment table, save it
    beside the run. One process by default; ``--nproc N`` (or a launcher: torchrun, srun) evaluates on
    ZeRO-3 ranks built and loaded the way training builds and resumes them (``pipeline.engine``)."""
    nproc, task = getattr(args, "nproc", 1), getattr(args, "task", "ppl")  # callers in Python may omit them
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    _require_eval_keys(args.overrides)  # before the (slow) checkpoint loads
    on_ranks = nproc > 1 or launch.under_launcher()
    if on_ranks and task == "babilong":
        raise UserError("--task babilong runs in one process (drop --nproc, start it without torchrun/srun): "
                        "its greedy generation stops at another step on each rank, which ZeRO-3's collective "
                        "forwards cannot follow")
    if nproc > 1:
        if launch.under_launcher():
            raise UserError("--nproc starts local ranks itself; under torchrun/srun each command is already one rank")
        return _start_ranks(args, nproc)
    if on_ranks:
        return _eval_on_this_rank(args)
    if task == "babilong":
        from pipeline.babilong_eval import run_babilong_eval  # lazy: --task babilong only

        run = load_trained_model(args.checkpoint)
        return run_babilong_eval(args, run, eval_config(run.cfg, args.config, args.overrides))
    inputs = eval_inputs(args, read_checkpoint(args.checkpoint))
    result = _checked(evaluate_model(_consolidated(inputs.run), inputs.dataset, inputs.cfg), inputs, every_rank=False)
    if inputs.baseline is not None:
        base = evaluate_model(_consolidated(inputs.baseline), inputs.dataset, inputs.baseline_cfg, len(result.segments))
        result = replace(result, baseline=base)
    report(args, inputs, result)
    return 0


@dataclass(frozen=True)
class EvalInputs:
    """Everything ``memtrain eval`` scores, checked, before any weights are read."""

    run: CheckpointInfo
    cfg: ExperimentConfig  # the run's config with the eval section of this command
    baseline: CheckpointInfo | None  # eval.baseline's checkpoint
    dataset: "datasets.Dataset"  # the eval.split of data.output_dir

    @property
    def baseline_cfg(self) -> ExperimentConfig:
        """The baseline's own model under this command's eval section (same samples, same protocol)."""
        assert self.baseline is not None
        return self.baseline.cfg.model_copy(update={"eval": self.cfg.eval})


def eval_inputs(args: argparse.Namespace, run: CheckpointInfo) -> EvalInputs:
    """The eval config, the baseline and the split, each checked against the checkpoint (UserError on the first problem)."""
    from data_prep.manifest import read_manifest  # lazy: pyarrow (via data_prep's readers), off the CLI dispatch path
    from data_prep.shards import open_split
    from data_prep.verify import verify_splits

    cfg = eval_config(run.cfg, args.config, args.overrides)
    if cfg.eval.baseline and not Path(cfg.eval.baseline).exists():
        raise UserError(f"eval.baseline {cfg.eval.baseline} does not exist (from the run's config or --set); "
                        "point it at the baseline's train.output_dir, or skip it with --set eval.baseline=null")
    baseline = read_checkpoint(cfg.eval.baseline) if cfg.eval.baseline else None
    if not Path(cfg.data.output_dir, "manifest.json").is_file():
        raise UserError(f"the run's data.output_dir {cfg.data.output_dir} holds no shards seen from {Path.cwd()}; "
                        "pass --set data.output_dir=DIR (the folder memtrain prep wrote)")
    data_manifest = read_manifest(cfg.data.output_dir)
    others = {f"the data in {cfg.data.output_dir}": data_manifest}
    if baseline:
        others[f"eval.baseline {cfg.eval.baseline}"] = baseline.manifest
    for what, other in others.items():
        if not _same_tokens(other, run.manifest):
            raise UserError(f"{what} has another tokenizer or segment length than the checkpoint {args.checkpoint}")
    verify_splits(cfg.data.output_dir, data_manifest, [cfg.eval.split], run.manifest["vocab_size"])
    return EvalInputs(run, cfg, baseline, open_split(cfg.data.output_dir, cfg.eval.split))


def _consolidated(checkpoint: CheckpointInfo) -> "torch.nn.Module":
    """One process: the checkpoint's full model, consolidated, where and in the precision it trained."""
    return place_like_training(with_weights(checkpoint).model, checkpoint.run_dir)


def _checked(result: EvalResult, inputs: EvalInputs, every_rank: bool) -> EvalResult:
    if not math.isfinite(result.ppl):
        raise UserError(f"{inputs.run.tag_dir} gives perplexity {result.ppl} on the {inputs.cfg.eval.split} split: "
                        "the model is unusable (diverged); evaluate an earlier checkpoint", every_rank=every_rank)
    return result


def report(args: argparse.Namespace, inputs: EvalInputs, result: EvalResult) -> None:
    """The table on stdout, ``--json``, the files beside the run and the MLflow record (one process: rank 0)."""
    run, cfg = inputs.run, inputs.cfg
    print(f"{run.run_dir} step {run.step}: {result.n_samples} {cfg.eval.split} samples, "
          f"{len(result.segments)} segments of {result.segment_len} tokens, ppl {result.ppl:.3f}")
    print(result.format_table())
    saved = [result.to_json(args.json)] if args.json else []
    try:
        saved += save_eval(result, RunDir.of(run.run_dir).eval_dir, tag_for(run.step))
    except OSError as err:  # a read-only (shared, archived) run folder: the table above and --json suffice
        print(f"not saved beside the run ({run.run_dir} is not writable: {err.strerror})", file=sys.stderr)
    if saved:
        print("wrote " + ", ".join(str(p) for p in saved))
    log_checkpoint_eval(run, cfg, result, saved)


# --- memtrain eval across ranks -----------------------------------------------------------------


def _start_ranks(args: argparse.Namespace, nproc: int) -> int:
    """``--nproc N``: every check here first (one line, before any rank starts), then N local ranks
    (torchrun), each given the resolved checkpoint folder so that all score the same one."""
    inputs = eval_inputs(args, read_checkpoint(args.checkpoint))
    for checkpoint in filter(None, (inputs.run, inputs.baseline)):
        check_loadable_on(checkpoint, nproc)
    rank_argv = ["eval", "--checkpoint", str(inputs.run.tag_dir), *(["--json", args.json] if args.json else []),
                 *(["--config", args.config] if args.config else []),
                 *(["--set", *args.overrides] if args.overrides else [])]
    return launch.run_local_ranks(nproc, rank_argv, on_cpu=not launch.has_gpu())


def check_loadable_on(checkpoint: CheckpointInfo, world_size: int) -> None:
    """A checkpoint saved on another world size loads through DeepSpeed's universal conversion, which
    rank 0 writes into its checkpoints folder: refuse early where it cannot."""
    saved_on = int(checkpoint.state["world_size"])
    folder = checkpoint.tag_dir.parent
    if not RunDir.of(checkpoint.run_dir).ds_config.is_file():
        raise UserError(f"{checkpoint.run_dir} has no ds_config.json to build its ZeRO-3 ranks from; "
                        "evaluate it in one process (without --nproc or a launcher)")
    if saved_on != world_size and not universal_tag_dir(checkpoint.tag_dir).is_dir() and not os.access(folder, os.W_OK):
        raise UserError(f"{checkpoint.tag_dir} was saved on {saved_on} rank(s); on {world_size} it needs DeepSpeed's "
                        f"universal conversion, written into {folder}, which is not writable: use --nproc "
                        f"{saved_on}, or evaluate a copy of the run")


def _eval_on_this_rank(args: argparse.Namespace) -> int:
    """One rank of a ZeRO-3 eval (under ``--nproc``, torchrun or srun): every rank checks, builds and
    scores its share; the sums are all-reduced, and rank 0 alone reports (after the ranks have left
    the process group, so that nothing it writes can leave a peer waiting)."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # thousands about all_gather_into_tensor
    dist_env = launch.setup()
    import deepspeed  # lazy: seconds of import, off the CLI dispatch path
    import deepspeed.comm as dist
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")
    deepspeed.init_distributed()
    try:
        inputs, problem = eval_inputs(args, read_checkpoint(args.checkpoint)), None
        for checkpoint in filter(None, (inputs.run, inputs.baseline)):
            check_loadable_on(checkpoint, dist_env.world_size)
    except UserError as err:
        problem = str(err)
    # agreed before any rank exits: a rank leaving first would let the launcher end rank 0 before it says why
    problems: list[str | None] = [None] * dist_env.world_size
    dist.all_gather_object(problems, problem)
    if any(problems):
        leave_process_group()
        raise UserError(next(p for p in problems if p), every_rank=True)
    try:
        result = _checked(_evaluate_sharded(inputs.run, inputs.cfg, inputs.dataset, dist_env), inputs, every_rank=True)
        if inputs.baseline is not None:
            base = _evaluate_sharded(inputs.baseline, inputs.baseline_cfg, inputs.dataset, dist_env,
                                     len(result.segments))
            result = replace(result, baseline=base)
    except UserError as err:
        if err.every_rank:  # all ranks stop here together: leave together (a lone failure is the launcher's to end)
            leave_process_group()
        raise
    leave_process_group()
    if dist_env.is_main:
        report(args, inputs, result)
    return 0


def _evaluate_sharded(checkpoint: CheckpointInfo, cfg: ExperimentConfig, dataset: "datasets.Dataset",
                      dist_env: launch.DistEnv, n_segments: int | None = None) -> EvalResult:
    """``evaluate_model`` on this rank's ZeRO-3 engine of ``checkpoint`` (collective)."""
    from pipeline.models.build import saved_model_config  # lazy: transformers (seconds)

    run_dir = RunDir.of(checkpoint.run_dir)
    ds_config = at_world_size(json.loads(run_dir.ds_config.read_text()), dist_env.world_size)
    point = load_point(checkpoint.tag_dir, dist_env.world_size, dist_env.is_main)
    ds_config = point.ds_config(ds_config)
    # _hf_ds_config: transformers' ZeRO-3 switch, alive (a local) while the engine is built and used
    model, _hf_ds_config = build_partitioned_model(checkpoint.cfg, checkpoint, ds_config,
                                                   saved_model_config(run_dir.model_config))
    engine = start_engine(model, checkpoint.cfg, ds_config)
    load_shards(engine, point)
    if not all_weights_finite(engine):
        raise UserError(f"checkpoint {checkpoint.tag_dir} holds non-finite weights: the training diverged; use an "
                        "earlier checkpoint (checkpoints/step_XXXXXXXX)", every_rank=True)
    return evaluate_model(engine, dataset, cfg, n_segments)


def log_checkpoint_eval(run: Any, cfg: ExperimentConfig, result: EvalResult, files: list[Path]) -> None:
    """The table of ``memtrain eval`` on the MLflow run that trained the checkpoint: ``checkpoint_eval/*``
    at the checkpoint's step (the baseline's as ``checkpoint_eval/baseline_*``), a tag saying what was
    scored, and the files under ``checkpoint_eval/step_XXXXXXXX``. Best effort, like all tracking."""
    tag = tag_for(run.step)
    summary = f"{result.split} split, {result.n_samples} samples, {len(result.segments)} segments of {result.segment_len}"
    if result.baseline is not None:
        summary += f"; baseline {cfg.eval.baseline}"
    log_to_checkpoint_run(cfg, run.state.get("mlflow_run_id"), run.step, checkpoint_eval_metrics(result),
                          {f"checkpoint_eval.{tag}": summary, "checkpoint_eval.last_step": str(run.step)},
                          files, f"checkpoint_eval/{tag}", what="eval")


def place_like_training(model: "torch.nn.Module", run_dir: Path) -> "torch.nn.Module":
    """The model on the GPU when there is one, in the precision its run trained in (its ds_config.json),
    so ``memtrain eval`` scores what training's own eval scored."""
    import torch  # lazy: seconds of import, off the CLI dispatch path

    ds_file = run_dir / "ds_config.json"
    precision = json_precision(json.loads(ds_file.read_text())) if ds_file.is_file() else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return model.to(device="cuda" if launch.has_gpu() else "cpu", dtype=dtype)


def _require_eval_keys(overrides: list[str]) -> None:
    outside = [item for item in overrides if not item.strip().startswith(("eval.", "data.output_dir="))]
    if outside:
        raise UserError(f"memtrain eval only changes eval.* keys and data.output_dir (the checkpoint fixes the "
                        f"rest); got {outside[0]!r}")


def _same_tokens(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two data manifests cut text into the same tokens and segments."""
    return (a.get("tokenizer_hash"), a.get("segment_len")) == (b.get("tokenizer_hash"), b.get("segment_len"))
