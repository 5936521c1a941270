"""``memtrain export``: a DeepSpeed checkpoint -> a Hugging Face model folder (and the Hub).

    checkpoint (any world size) --load_consolidated--> full fp32 state dict
        --> build_model + strict load --> save_pretrained (sharded safetensors, auto_map,
            modeling code) + tokenizer + generation_config.json + README.md model card

A ``model.lora`` run exports plain weights either way (``export.lora``, ``--lora``): ``merged``, the adapters merged
into the base layers; ``adapter``, the base layers as they were plus the PEFT adapter in ``adapter/``.

The folder is assembled in a temporary folder beside ``--out`` and renamed into place at the
end, so ``--out`` is either the previous content or a complete export, never half of one.
``--push`` uploads the finished folder with ``huggingface_hub``, which finds the token itself
(``HF_TOKEN`` or ``huggingface-cli login``); this module never reads or prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.atomic import is_disk_full
from pipeline.checkpoint import (TAG_PATTERN, complete_tags, load_trained_model, read_json, read_state,
                                 resolve_tag_dir)
from pipeline.config import ExperimentConfig
from pipeline.errors import UserError
from pipeline.eval_result import EvalResult
from pipeline.report import plot_segments
from pipeline.run_dir import RunDir, tag_for
from pipeline.tracking import log_to_checkpoint_run

if TYPE_CHECKING:
    from pipeline.model_card import CardEvaluation

CARD_TABLE = "per_segment_perplexity.json"
CARD_PLOT = "per_segment_perplexity.png"
ADAPTER_DIR = "adapter"  # an `export.lora: adapter` export's PEFT adapter


@dataclass(frozen=True)
class Export:
    """What one export produced: where, from which checkpoint step, with which config."""

    folder: Path
    step: int
    cfg: ExperimentConfig
    mlflow_run_id: str | None
    dtype: str = "fp32"
    name: str = ""  # the model's name on its card (the Hub repo id, or the folder's name)
    tag_dir: Path | None = None  # the checkpoint exported


def check_destination(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse a non-empty ``--out`` without ``--force``, and never let ``--out`` swallow the checkpoint."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; pass --force to replace it")
    target, source = out.resolve(), checkpoint.resolve()
    if target == source or target in source.parents:
        raise UserError(f"--out {out} holds the checkpoint {checkpoint}; export somewhere else")


def publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished ``staging`` folder to ``out`` with renames, replacing ``out`` only if allowed."""
    if not out.exists():
        os.replace(staging, out)
        return
    if any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; pass --force to replace it")
    previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.previous-", dir=out.parent))
    os.replace(out, previous / out.name)
    os.replace(staging, out)
    shutil.rmtree(previous)


def apply_umask(folder: Path) -> None:
    """Give the export the modes of ordinary files: mkdtemp makes the folder 0700 and the
    safetensors shards come out 0600, which hides a shared export from everyone else."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def zero_stage(train_dir: Path) -> int | None:
    ds_config = train_dir / "ds_config.json"
    if not ds_config.is_file():
        return None

    return read_json(ds_config, "DeepSpeed config").get("zero_optimization", {}).get("stage")


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str | None = None, force: bool = False,
                      model_name: str | None = None, lora: str | None = None) -> Export:
    """Write the HF folder of ``checkpoint`` (``train.output_dir`` or one tag folder) to ``out``."""
    import torch  # lazy: seconds of import, off the CLI dispatch path
    from transformers import GenerationConfig

    from pipeline.model_card import TrainingFacts, render_model_card  # lazy: huggingface_hub

    out = Path(out).absolute()  # "." has no name to stage beside
    check_destination(out, Path(checkpoint), force)
    trained = load_trained_model(checkpoint)
    model, cfg, train_dir, tag_dir, state, manifest = (trained.model, trained.cfg, trained.run_dir, trained.tag_dir,
                                                       trained.state, trained.manifest)
    tokenizer_dir = RunDir.of(train_dir).tokenizer
    if not tokenizer_dir.is_dir():
        raise UserError(f"tokenizer not found: {tokenizer_dir} (is the checkpoint folder complete?)")
    dtype = dtype or cfg.export.dtype
    if lora is not None and cfg.model.lora is None:
        raise UserError(f"--lora {lora}: the run at {train_dir} trained no LoRA adapters (model.lora is unset)")
    lora = lora or cfg.export.lora
    model.generation_config = GenerationConfig(
        bos_token_id=manifest["bos_token_id"], eos_token_id=manifest["eos_token_id"],
        pad_token_id=manifest["pad_token_id"], max_new_tokens=cfg.export.max_new_tokens,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        if cfg.model.lora is not None:
            model = without_adapters(model, lora, staging)
        if dtype == "bf16":
            model.to(torch.bfloat16)
        model.save_pretrained(staging, max_shard_size=cfg.export.max_shard_size)
        model.generation_config.save_pretrained(staging)
        for file in tokenizer_dir.iterdir():  # the training's own files, byte for byte
            shutil.copy2(file, staging / file.name)
        step = int(state["step"])
        facts = TrainingFacts(
            step=step, tokens_seen=int(state.get("tokens_seen", 0)), world_size=int(state["world_size"]),
            zero_stage=zero_stage(train_dir), n_params=model.num_parameters(), dtype=dtype,
            vocab_size=manifest["vocab_size"],
        )
        evaluation = copy_evaluation(train_dir, step, staging)
        card = render_model_card(cfg, model_name or out.name, facts, evaluation, babilong_rows(train_dir))
        (staging / "README.md").write_text(card)
        apply_umask(staging)
        publish(staging, out, force)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise UserError(f"no space left in {out.parent} writing the export; --out {out} is as it was: "
                            "free space and export again") from None
        raise
    return Export(folder=out, step=step, cfg=cfg, mlflow_run_id=state.get("mlflow_run_id"), dtype=dtype,
                  name=model_name or out.name, tag_dir=tag_dir.absolute())


def without_adapters(model: Any, lora: str, staging: Path) -> Any:
    """A model.lora run's model as plain weights: the adapters merged in (``merged``), or saved (fp32, before
    any cast) to ``staging/adapter`` and taken out (``adapter``)."""
    from pipeline.models.lora import remove_adapters, save_adapter  # lazy: peft (seconds), model.lora only

    if lora == "adapter":
        save_adapter(model, staging / ADAPTER_DIR)
    return remove_adapters(model, merge=lora == "merged")


def eval_file(train_dir: Path, step: int) -> Path | None:
    """``eval/step_XXXXXXXX.json`` of this step if there is one, else the newest one, else None."""
    folder = RunDir.of(train_dir).eval_dir
    exact = folder / f"{tag_for(step)}.json"
    if exact.is_file():
        return exact
    found = sorted(folder.glob("step_*.json"))
    return found[-1] if found else None


def babilong_rows(train_dir: Path) -> list[dict] | None:
    """The rows of the newest ``memtrain eval --task babilong`` of the run (for the card's model-index)."""
    found = sorted((train_dir / "eval").glob("babilong_step_*.json"))
    return json.loads(found[-1].read_text())["babilong"] if found else None


def copy_evaluation(train_dir: Path, step: int, staging: Path) -> "CardEvaluation | None":
    """Put the eval table (JSON) and plot next to the card and return what the card shows of them."""
    from pipeline.model_card import CardEvaluation  # lazy: huggingface_hub

    source = eval_file(train_dir, step)
    if source is None:
        return None
    result = EvalResult.from_json(source)
    shutil.copyfile(source, staging / CARD_TABLE)
    plot = source.with_suffix(".png")
    if plot.is_file():
        shutil.copyfile(plot, staging / CARD_PLOT)
    else:
        plot_segments(result, staging / CARD_PLOT)
    return CardEvaluation(
        step=int(source.stem.removeprefix("step_")), split=result.split, n_samples=result.n_samples,
        perplexity=result.ppl, segment_perplexity=tuple(row.ppl for row in result.segments),
        table_markdown=result.format_table(markdown=True), plot_file=CARD_PLOT,
    )


@dataclass(frozen=True)
class HubPush:
    """Where ``--push`` put an export."""

    repo_id: str
    revision: str  # the branch ("main" unless --revision)
    commit_url: str
    commit: str | None  # the commit's sha


def push_to_hub(folder: Path, repo_id: str, revision: str | None, private: bool, step: int) -> HubPush:
    """Upload ``folder`` to ``repo_id`` (on branch ``revision`` if given)."""
    from huggingface_hub import HfApi  # lazy: --push only
    from huggingface_hub.errors import HTTPError

    api = HfApi()  # resolves the token from HF_TOKEN or the stored login
    try:
        # private=None keeps the namespace's default visibility for a new repo
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message=f"memtrain export of step {step}")
    except (HTTPError, OSError) as err:  # OSError: no token found, unreadable folder
        raise UserError(f"push to {repo_id} failed (the export in {folder} is complete): "
                        f"{str(err).splitlines()[0]}") from None
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}/tree/{revision or 'main'}"
    return HubPush(repo_id, revision or "main", str(url), getattr(commit, "oid", None))


def record_in_mlflow(export: Export, hub: HubPush | None = None) -> None:
    """Record the export on the training's MLflow run, best effort (a failure only warns): tags
    ``export.step_XXXXXXXX.*`` (folder, checkpoint, dtype, Hub repo/revision/commit when pushed), the
    model card as an artifact, the whole folder too with ``export.log_to_mlflow``, and an MLflow 3
    external model (the weights stay in the folder and on the Hub) linked to the run, registered as
    ``export.register_as`` when set."""
    cfg, run_id = export.cfg, export.mlflow_run_id
    tag = tag_for(export.step)
    facts = {"folder": str(export.folder), "checkpoint": str(export.tag_dir),
             "checkpoint_step": str(export.step), "dtype": export.dtype}
    if hub is not None:
        facts.update(hub_repo=hub.repo_id, hub_revision=hub.revision, hub_url=hub.commit_url)
        if hub.commit:
            facts["hub_commit"] = hub.commit
    client = log_to_checkpoint_run(cfg, run_id, export.step, {},
                                   {f"export.{tag}.{key}": value for key, value in facts.items()},
                                   [export.folder / "README.md"], f"export/{tag}", what="export")
    if client is None:
        return
    try:
        if cfg.export.log_to_mlflow:
            client.log_artifacts(run_id, str(export.folder), artifact_path=f"export/{tag}")
        model = create_external_model(client, run_id, export.name,
                                      {f"memtrain.{key}": value for key, value in facts.items()})
        note = f"MLflow model {model.model_id}"
        if cfg.export.register_as:
            version = register(client, cfg.export.register_as, model, run_id)
            note += f", registered as {cfg.export.register_as} version {version}"
        print(f"memtrain export: recorded as {note}")
    except Exception as err:  # noqa: BLE001 - tracking must never fail an export that is already on disk
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        print(f"memtrain export: warning: not recorded as an MLflow model of run {run_id}: {type(err).__name__}: "
              f"{reason}", file=sys.stderr)


def create_external_model(client: Any, run_id: str, name: str, tags: dict[str, str]) -> Any:
    """What ``mlflow.create_external_model`` does, on ``client``'s store (the fluent call uses the
    process-wide tracking URI): a READY LoggedModel in the run's experiment whose weights live outside
    MLflow, with the placeholder MLmodel file the registry needs."""
    from mlflow.entities import LoggedModelStatus  # lazy: mlflow (seconds), only with tracking
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    experiment_id = client.get_run(run_id).info.experiment_id
    name = re.sub(r"[/:.%\"']", "-", name)  # "org/name" -> "org-name": characters MLflow refuses in a model name
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="memtrain",
                                       tags={**tags, MLFLOW_MODEL_IS_EXTERNAL: "true"})
    with tempfile.TemporaryDirectory() as tmp:
        get_external_mlflow_model_spec(model).save(str(Path(tmp) / MLMODEL_FILE_NAME))
        client.log_model_artifacts(model.model_id, tmp)
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def register(client: Any, name: str, model: Any, run_id: str) -> str:
    """A new version of the registered model ``name`` (created on first use) for ``model``; its number."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow

    try:
        client.create_registered_model(name)
    except MlflowException as err:  # registered by an earlier export
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # the model's artifact location, not its models:/ URI: a SQLite registry resolves that URI through the
    # process-wide tracking URI (the working directory's store), not this client's
    return client.create_model_version(name, source=model.artifact_location, run_id=run_id,
                                       model_id=model.model_id).version


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError  # lazy: --push only
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--push {repo_id!r}: {str(err).splitlines()[0]}") from None


def run_export(args: argparse.Namespace) -> int:
    if args.push:
        check_repo_id(args.push)  # before minutes of export, not after
    elif args.revision or args.private:
        raise UserError("--revision and --private only apply with --push REPO_ID")
    if not args.all_checkpoints:
        export_and_push(args, args.checkpoint, Path(args.out), args.revision)
        return 0
    if args.revision:
        raise UserError("--all-checkpoints pushes each checkpoint to a branch of its own (step-N); drop --revision")
    for tag_dir in all_checkpoints(args.checkpoint):
        export_and_push(args, tag_dir, Path(args.out) / tag_dir.name, f"step-{read_state(tag_dir)['step']}")
    return 0


def all_checkpoints(path: str | Path) -> list[Path]:
    """Every complete checkpoint of the run at ``path`` (its train.output_dir), oldest first."""
    if TAG_PATTERN.match(Path(path).name):
        raise UserError(f"--all-checkpoints takes the run's train.output_dir, not one checkpoint ({path})")
    tags = complete_tags(RunDir.of(path).checkpoints)
    return tags or [resolve_tag_dir(path)]  # none: resolve_tag_dir says why in one line


def export_and_push(args: argparse.Namespace, checkpoint: str | Path, out: Path, revision: str | None) -> Export:
    """One export (``--push``: then to ``revision``), recorded on the training's MLflow run either way."""
    export = export_checkpoint(checkpoint, out, dtype=args.dtype, force=args.force,
                               model_name=args.push or (Path(args.out).name if args.all_checkpoints else None),
                               lora=args.lora)
    print(f"exported step {export.step} to {export.folder}")
    hub = None
    try:
        if args.push:
            hub = push_to_hub(export.folder, args.push, revision, args.private, export.step)
            print(f"pushed to {hub.commit_url}")
    finally:  # a failed push leaves a complete export on disk: it is recorded either way
        record_in_mlflow(export, hub)
    return export
