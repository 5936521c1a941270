"""DeepSpeed checkpoints of a run: save with client state, keep the last K, find the latest
complete one, resume on another world size, and consolidate for eval and export.

Layout (``train.output_dir/checkpoints/``): one DeepSpeed tag dir per save (``step_00000100``),
DeepSpeed's ``latest`` file, and ``universal/`` for world-size conversions. A tag is complete once
``memtrain_state.json`` is in it: every rank has written its shards (``save_checkpoint`` ends with a
barrier), then rank 0 writes the state file, and only then points ``latest`` at the tag. A run
killed during a save therefore leaves ``latest`` on the previous complete tag, and the half-written
dir is deleted by the next successful save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_prep.atomic import is_disk_full, temporary, write_json, write_text
from pipeline.config import ExperimentConfig, load_config
from pipeline.errors import UserError
from pipeline.run_dir import RunDir, lock_held_by_parent, tag_for

if TYPE_CHECKING:
    from pipeline.models import MemoryModelForCausalLM

STATE_FILE = "memtrain_state.json"
STATE_SCHEMA = 1
LATEST_FILE = "latest"
UNIVERSAL_DIR = "universal"
POISONED_PREFIX = "poisoned-"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def is_complete(tag_dir: Path) -> bool:
    """Sealed (the state file is there) and holding the shards of every rank it was saved by."""
    return (tag_dir / STATE_FILE).is_file() and not missing_rank_files(tag_dir)


def missing_rank_files(tag_dir: Path) -> list[str]:
    """DeepSpeed's per-rank files (``*zero_pp_rank_R_*``) that rank 0 has and another rank lacks."""
    try:
        world_size = int(json.loads((tag_dir / STATE_FILE).read_text()).get("world_size", 1))
        names = {path.name for path in tag_dir.iterdir()}
    except (OSError, ValueError, TypeError, AttributeError):
        return []  # unreadable state: CheckpointState.read says so with one line
    rank0 = [name for name in names if "zero_pp_rank_0_" in name]
    return sorted(name.replace("zero_pp_rank_0_", f"zero_pp_rank_{rank}_") for name in rank0
                  for rank in range(1, world_size) if name.replace("zero_pp_rank_0_", f"zero_pp_rank_{rank}_") not in names)


class CheckpointState(BaseModel):
    """``memtrain_state.json``: every fact of a checkpoint besides DeepSpeed's own files, kept once.
    DeepSpeed's client state holds only what must be per rank (the RNG states). Rank 0 writes this
    file last; its presence makes the tag complete."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = STATE_SCHEMA
    step: int = Field(ge=0)
    tokens_seen: int = Field(ge=0)
    world_size: int = Field(ge=1)
    global_batch: int = Field(ge=1)  # samples per optimizer step over all ranks
    n_segments: int = Field(ge=1)  # the curriculum's at this step
    data_position: dict[str, Any]  # the training walk's position (pipeline.data: TrainBatches or LengthPools)
    mlflow_run_id: str | None
    reason: Literal["periodic", "final", "preempted"]

    @classmethod
    def read(cls, tag_dir: Path) -> "CheckpointState":
        """The validated state of a tag dir; a missing, torn or foreign file is one UserError line."""
        path = tag_dir / STATE_FILE
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise UserError(f"{path} is missing: the checkpoint is incomplete") from None
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "file"
            raise UserError(f"{path} is not a memtrain checkpoint state of schema {STATE_SCHEMA} "
                            f"({where}: {first['msg']}); it was written by another memtrain version") from None

    def write(self, tag_dir: Path) -> None:
        write_json(tag_dir / STATE_FILE, self.model_dump(mode="json"), indent=2)


def read_state(tag_dir: Path) -> dict[str, Any]:
    """The validated state as a plain dict (``CheckpointState.read`` for the typed one)."""
    return CheckpointState.read(tag_dir).model_dump()


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Complete tag dirs, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name) and is_complete(p)]
    return sorted(tags, key=lambda p: p.name)


def find_latest(ckpt_dir: Path) -> Path | None:
    """The tag dir ``latest`` names if it is complete, else the newest complete one (or None)."""
    latest = ckpt_dir / LATEST_FILE
    named = ckpt_dir / latest.read_text().strip() if latest.is_file() else None
    if named is not None and is_complete(named):
        return named
    tags = complete_tags(ckpt_dir)
    found = tags[-1] if tags else None
    if named is not None and (named / STATE_FILE).is_file():  # sealed, yet a rank's shard is gone
        warn_once(f"checkpoint {named} lacks {missing_rank_files(named)[0]}; using "
                  f"{found.name if found else 'none'} instead")
    return found


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A warning said once per job: once per process, by rank 0 only, and not by the ranks of
    ``--nproc``, whose launcher said it already (its preflight reads the same checkpoints)."""
    if message in _warned or os.environ.get("RANK", "0") != "0" or lock_held_by_parent():
        return
    _warned.add(message)
    print(f"memtrain: warning: {message}", file=sys.stderr)


def set_aside(tag_dir: Path) -> Path:
    """Rename a poisoned tag dir out of the ``step_*`` namespace: never resumed, evaluated or pruned."""
    target = tag_dir.with_name(f"{POISONED_PREFIX}{tag_dir.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tag_dir, target)
    return target


def save(engine: Any, ckpt_dir: Path, state: CheckpointState, keep_last: int) -> Path:
    """Collective: every rank writes its shards (and the RNG states of all ranks as client state);
    rank 0 then seals the tag with ``state`` and prunes old ones.

    Nothing here lets one rank act on a failure alone: the ranks first agree that the disk holds a
    checkpoint (``check_free_space``), and a save that still fails on any rank (a full disk midway,
    torch's "unexpected pos N vs M") is agreed on by all before rank 0 removes the unsealed tag; old
    tags are pruned only after the new one is sealed. A failure is then one UserError on every rank."""
    import deepspeed.comm as dist  # lazy: seconds of import, off the CLI dispatch path

    tag = tag_for(state.step)
    tag_dir = ckpt_dir / tag
    check_free_space(ckpt_dir, tag, needed_bytes(ckpt_dir, engine))
    rng = gather_rng_states()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"rng": rng}, save_latest=False)
        failure = None
    except (OSError, RuntimeError) as err:
        failure = err
        # In DeepSpeed 0.19.8 every collective of save_checkpoint comes before its first write except
        # the barrier it ends with, where the other ranks now wait: meet them there.
        dist.barrier()
    failures = agree(failure)
    if not failures and dist.get_rank() == 0:
        try:
            state.write(tag_dir)
            write_text(ckpt_dir / LATEST_FILE, tag)
        except OSError as err:
            failure = err
    failures = failures or agree(failure)
    if failures:
        if dist.get_rank() == 0:  # every rank is past its writes: nobody writes into what goes
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        raise save_failed(ckpt_dir, tag, failures, failure)
    if dist.get_rank() == 0:
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag_dir


def agree(failure: BaseException | None) -> dict[int, str]:
    """Collective: {rank: one line} of every rank whose ``failure`` is not None ({} when none is)."""
    import deepspeed.comm as dist  # lazy: seconds of import, off the CLI dispatch path

    mine = None if failure is None else (f"{'disk full' if is_disk_full(failure) else 'error'}: "
                                         f"{(str(failure).strip().splitlines() or [type(failure).__name__])[0]}")
    lines: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(lines, mine)
    return {rank: line for rank, line in enumerate(lines) if line is not None}


def save_failed(ckpt_dir: Path, tag: str, failures: dict[int, str], mine: BaseException | None) -> BaseException:
    """The exception every rank raises after a failed save: one line for a full disk; otherwise a rank
    that failed raises its own error, the others one line naming it."""
    if mine is not None and not is_disk_full(mine):
        return mine
    previous = find_latest(ckpt_dir)
    kept = f"the previous checkpoint ({previous.name}) stays usable" if previous else "no earlier checkpoint"
    ranks = ",".join(str(rank) for rank in failures)
    if all(line.startswith("disk full") for line in failures.values()):
        return UserError(f"no space left in {ckpt_dir} saving {tag} (rank {ranks}); {kept}: free space and rerun "
                         "to resume", every_rank=True)
    return UserError(f"saving {tag} in {ckpt_dir} failed on rank {ranks} "
                     f"({next(iter(failures.values()))}); {kept}", every_rank=True)


def needed_bytes(ckpt_dir: Path, engine: Any) -> int:
    """What the next checkpoint will take: the latest one's size, or for the first an estimate."""
    latest = find_latest(ckpt_dir) if ckpt_dir.is_dir() else None
    return tree_bytes(latest) if latest is not None else estimated_bytes(engine)


def tree_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` occupy on disk (allocated blocks, not apparent sizes)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            info = path.lstat()
        except OSError:  # pruned meanwhile
            continue
        if stat.S_ISREG(info.st_mode):
            total += max(info.st_blocks * 512, info.st_size)
    return total


def estimated_bytes(engine: Any) -> int:
    """A first checkpoint's size: every weight in its dtype, plus for each trainable one the fp32
    master copy and AdamW's two fp32 moments (ZeRO's optimizer state)."""
    total = 0
    for param in engine.module.parameters():
        numel = int(getattr(param, "ds_numel", param.numel()))
        total += numel * param.element_size() + (numel * 12 if param.requires_grad else 0)
    return total


def check_free_space(ckpt_dir: Path, tag: str, needed: int) -> None:
    """Collective, before any rank writes: every rank looks at the free space where it will write
    (on a node-local disk each sees its own); if any lacks ``needed`` bytes, all raise the same line."""
    import deepspeed.comm as dist  # lazy: seconds of import, off the CLI dispatch path

    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(ckpt_dir).free
    except OSError as err:
        if not is_disk_full(err):
            raise
        free = 0
    answers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(answers, (free, needed))
    short = [(rank, has, wants) for rank, (has, wants) in enumerate(answers) if has < wants]
    if short:
        _, free, needed = short[0]
        previous = find_latest(ckpt_dir)
        what = f"the size of {previous.name}" if previous else "estimated from the weights and optimizer state"
        kept = f"the previous checkpoint ({previous.name}) stays usable" if previous else "no checkpoint was written"
        raise UserError(f"no space left in {ckpt_dir} for {tag}: {mib(free)} free, it needs {mib(needed)} ({what}); "
                        f"{kept}: free space and rerun to resume", every_rank=True)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete tags; drop older ones and half-written leftovers."""
    keep = {p.name for p in complete_tags(ckpt_dir)[-keep_last:]}
    for path in ckpt_dir.iterdir():
        if path.is_dir() and TAG_PATTERN.match(path.name) and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
    universal = ckpt_dir / UNIVERSAL_DIR
    if universal.is_dir():
        for path in universal.iterdir():
            if path.is_dir() and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def universal_tag_dir(tag_dir: Path) -> Path:
    return tag_dir.parent / UNIVERSAL_DIR / tag_dir.name


def convert_to_universal(tag_dir: Path) -> Path:
    """DeepSpeed's universal checkpoint of ``tag_dir`` (made once; a temp dir renamed into place)."""
    target = universal_tag_dir(tag_dir)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(target)
    workers = str(max(1, min(8, len(os.sched_getaffinity(0)))))  # the cores this rank may use: a large model's shards take long
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--inject_missing_state",
           "--num_extract_workers", workers, "--num_merge_workers", workers]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed:\n{tail}")
    shutil.copy2(tag_dir / STATE_FILE, tmp / STATE_FILE)
    os.replace(tmp, target)
    write_text(target.parent / "latest_universal", target.name)
    return target


def resolve_tag_dir(path: str | Path) -> Path:
    """A run's train.output_dir (its latest complete checkpoint) or one tag dir -> the tag dir."""
    path = Path(path)
    if is_complete(path):
        return path
    run = RunDir.of(path)
    if run.checkpoints.is_dir():
        latest = find_latest(run.checkpoints)
        if latest is None:
            sealed = sorted(p for p in run.checkpoints.iterdir() if TAG_PATTERN.match(p.name) and (p / STATE_FILE).is_file())
            why = f" ({sealed[-1].name} lacks {missing_rank_files(sealed[-1])[0]}: half-written or damaged)" if sealed else ""
            raise UserError(f"no complete checkpoint in {run.checkpoints}{why}")
        return latest
    if TAG_PATTERN.match(path.name) and path.is_dir():
        missing = missing_rank_files(path)
        why = f"{missing[0]} is missing" if missing else f"no {STATE_FILE}: the save was interrupted"
        raise UserError(f"checkpoint {path} is incomplete ({why})")
    raise UserError(f"not a memtrain checkpoint: {path} (expected a train.output_dir or a step_XXXXXXXX dir)")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path} (is the checkpoint complete?)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{what} {path} is unreadable: {err}".splitlines()[0]) from None


def load_consolidated(path: str | Path) -> tuple[dict[str, Any], Any, Path]:
    """(full fp32 state dict, the run's ExperimentConfig, tag dir) for eval and export."""
    tag_dir = resolve_tag_dir(path)
    cfg = run_config(tag_dir)
    return consolidated_state_dict(tag_dir), cfg, tag_dir


def run_config(tag_dir: Path) -> ExperimentConfig:
    """The config.yaml of the run that saved ``tag_dir``."""
    config_path = RunDir.of_tag_dir(tag_dir).config
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing: {tag_dir} is not inside a memtrain train.output_dir")
    if not config_path.read_text().strip():
        raise UserError(f"{config_path} is empty: the run's config is lost, and defaults would build another model")
    return load_config(config_path)


def consolidated_state_dict(tag_dir: Path) -> dict[str, Any]:
    """Every rank's shards of ``tag_dir`` merged into one full fp32 state dict (DeepSpeed's own reader)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # lazy: DeepSpeed (seconds)

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (OSError, RuntimeError, ValueError, EOFError) as err:  # a rank's shard missing or cut short
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read the checkpoint {tag_dir} (damaged or half-written): {reason}") from None


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint and what describes it, without its weights: what every rank of a ZeRO-3 eval reads."""

    cfg: "ExperimentConfig"
    run_dir: Path  # its train.output_dir
    tag_dir: Path
    state: dict[str, Any]  # memtrain_state.json
    manifest: dict[str, Any]  # of the data it was trained on

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])


@dataclass(frozen=True)
class TrainedModel(CheckpointInfo):
    """A checkpoint's model with full weights (CPU, one process) and what describes it."""

    model: "MemoryModelForCausalLM" = field(kw_only=True)


def build_from_state_dict(cfg: "ExperimentConfig", manifest: dict[str, Any], state_dict: dict[str, Any],
                          model_config: Path | None = None) -> "MemoryModelForCausalLM":
    """The HF model of ``cfg`` holding exactly the checkpoint's weights (every key on both sides), built
    from the run's ``model_config`` file when there is one (model.pretrained's folder is then not read)."""
    from pipeline.models.build import build_model, saved_model_config  # lazy: transformers (seconds)

    saved = saved_model_config(model_config) if model_config is not None else None
    model = build_model(cfg, vocab_size=manifest["vocab_size"], bos_token_id=manifest["bos_token_id"],
                        eos_token_id=manifest["eos_token_id"], pad_token_id=manifest["pad_token_id"], saved=saved)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            "the checkpoint's weights do not match the model its config.yaml builds: "
            f"missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    return model.eval()


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """``train.output_dir`` (its latest checkpoint) or one tag dir -> its config, state and data manifest,
    checked against each other; the weights stay on disk."""
    tag_dir = resolve_tag_dir(path)
    cfg = run_config(tag_dir)
    run = RunDir.of_tag_dir(tag_dir)
    state = read_state(tag_dir)
    manifest = read_json(run.data_manifest, "data manifest")
    check_run_facts(cfg, manifest, state, run)
    return CheckpointInfo(cfg, run.root, tag_dir, state, manifest)


def load_trained_model(path: str | Path) -> TrainedModel:
    """``train.output_dir`` (its latest checkpoint) or one tag dir -> the model eval and export work on."""
    return with_weights(read_checkpoint(path))


def with_weights(info: CheckpointInfo) -> TrainedModel:
    """The checkpoint ``info`` describes, with its full model (every rank's shards merged, one process)."""
    state_dict = consolidated_state_dict(info.tag_dir)
    check_finite(state_dict, info.tag_dir)
    model = build_from_state_dict(info.cfg, info.manifest, state_dict, RunDir.of(info.run_dir).model_config)
    return TrainedModel(**vars(info), model=model)


def check_run_facts(cfg: "ExperimentConfig", manifest: dict[str, Any], state: dict[str, Any], run: RunDir) -> None:
    """The run's config.yaml must agree with the data manifest and the checkpoint state saved beside it
    (an edited or replaced config.yaml would otherwise build another model, silently)."""
    from pipeline.data import curriculum_segments  # lazy: torch (seconds)

    facts = [("data.segment_len", cfg.data.segment_len, "data manifest", manifest.get("segment_len")),
             ("data.n_segments", cfg.data.n_segments, "data manifest", manifest.get("n_segments"))]
    if "n_segments" in state:
        facts.append(("the curriculum's n_segments", curriculum_segments(cfg.train, int(state["step"]), cfg.data.n_segments),
                      "checkpoint state", state["n_segments"]))
    for key, mine, where, theirs in facts:
        if theirs is not None and mine != theirs:
            raise UserError(f"{run.config} does not belong to this run: {key}={mine} but the {where} "
                            f"says {theirs}")


def check_finite(state_dict: dict[str, Any], tag_dir: Path) -> None:
    """Refuse weights holding NaN or inf: evaluated they give 'ppl nan', exported a broken model."""
    import torch  # lazy: seconds of import, off the CLI dispatch path

    bad = [key for key, value in state_dict.items()
           if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise UserError(f"checkpoint {tag_dir} holds non-finite weights ({len(bad)} tensors, first {bad[0]}): "
                        "the training diverged; use an earlier checkpoint (checkpoints/step_XXXXXXXX)")


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's python/numpy/torch RNG states, indexed by rank (collective)."""
    import deepspeed.comm as dist  # lazy: seconds of import, off the CLI dispatch path
    import numpy as np
    import torch

    mine = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_rng_states(states: list[dict[str, Any]], rank: int, seed: int) -> None:
    """This rank's saved RNG states; a rank the checkpoint lacks (larger world) gets a fresh seed."""
    import numpy as np  # lazy: seconds of import, off the CLI dispatch path
    import torch

    if rank >= len(states):
        random.seed(seed + rank)
        np.random.seed(seed + rank)
        torch.manual_seed(seed + rank)
        return
    state = states[rank]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
