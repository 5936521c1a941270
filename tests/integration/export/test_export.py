"""`memtrain export` of a real 2-rank ZeRO-3 checkpoint, reloaded by plain transformers in a clean process."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard
from safetensors import safe_open

from pipeline.cli import main
from pipeline.config import ExperimentConfig
from pipeline.evaluate import EvalResult

from shared_run import TEXT, Exports, TrainedRun
from tiny import TINY

pytestmark = pytest.mark.slow


def segment_ppl(scored: dict) -> list[float]:
    return [math.exp(nll / tokens) for nll, tokens in zip(scored["segment_nll"], scored["segment_tokens"])]


def test_clean_process_could_not_import_memtrain(exports: Exports) -> None:
    assert exports.clean["project_importable"] is False
    assert {s["model_class"] for s in exports.clean["exports"].values()} == {"MemoryModelForCausalLM"}


def test_fp32_per_segment_perplexity_equals_memtrain_eval(exports: Exports, trained_run: TrainedRun) -> None:
    reported = EvalResult.from_json(trained_run.eval_json)
    scored = exports.clean["exports"][str(exports.fp32)]
    assert scored["dtype"] == "torch.float32"
    assert scored["segment_tokens"] == [row.tokens for row in reported.segments]
    assert segment_ppl(scored) == pytest.approx([row.ppl for row in reported.segments], rel=1e-4)


def test_bf16_export_loads_in_bf16_within_one_percent(exports: Exports) -> None:
    fp32, bf16 = (exports.clean["exports"][str(p)] for p in (exports.fp32, exports.bf16))
    assert bf16["dtype"] == "torch.bfloat16"
    total = lambda s: math.exp(sum(s["segment_nll"]) / sum(s["segment_tokens"]))  # noqa: E731
    assert total(bf16) == pytest.approx(total(fp32), rel=0.01)
    assert total(bf16) != total(fp32)  # the weights really were cast


def test_generate_reads_a_prompt_longer_than_one_segment(exports: Exports) -> None:
    segment_len = TINY["data"]["segment_len"]
    for scored in exports.clean["exports"].values():
        prompt, generated = scored["prompt"], scored["generated"]
        assert len(prompt) > segment_len
        assert generated[:len(prompt)] == prompt and len(prompt) < len(generated) <= len(prompt) + 6
        assert all(0 <= t < scored["vocab_size"] for t in generated)
        assert scored["default_max_new_tokens"] == ExperimentConfig().export.max_new_tokens  # generate()'s default


def test_tokenizer_is_the_training_tokenizer(exports: Exports, trained_run: TrainedRun) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(trained_run.output_dir / "tokenizer")
    for scored in exports.clean["exports"].values():
        assert scored["text_ids"] == reference(TEXT)["input_ids"]
        assert scored["tokenizer_len"] == len(reference) == scored["vocab_size"]


def test_folder_holds_sharded_weights_code_configs_and_card(exports: Exports, trained_run: TrainedRun) -> None:
    out = exports.fp32
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_memtrain.MemoryModelForCausalLM"
    assert (out / "modeling_memtrain.py").is_file() and (out / "configuration_memtrain.py").is_file()
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1  # export.max_shard_size is smaller than the model
    stored = {}
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            stored.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    assert set(stored) == set(weight_map)
    assert exports.clean["exports"][str(out)]["tied"]  # lm_head and the embedding are one tensor after loading
    embedding = [shape for name, shape in stored.items() if name.endswith("wte.weight")]
    assert len([shape for shape in stored.values() if shape == embedding[0]]) == 1  # ... and stored once

    manifest = json.loads((trained_run.output_dir / "data_manifest.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert generation[key] == manifest[key] == config[key]
    assert generation["max_new_tokens"] > 0

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"memory-rmt", "tiny"} <= set(card.data.tags)
    reported = EvalResult.from_json(trained_run.eval_json)
    assert card.data.eval_results[0].metric_value == pytest.approx(reported.ppl, abs=1e-4)
    assert "ZeRO stage 3" in card.text and "| World size | 2 ranks |" in card.text
    assert "](per_segment_perplexity.png)" in card.text and (out / "per_segment_perplexity.png").stat().st_size > 0
    assert EvalResult.from_json(out / "per_segment_perplexity.json") == reported
    assert sorted(p.name for p in out.parent.iterdir()) == ["bf16", "fp32", "hf_home"]  # no temp folders left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}


FAKE_TOKEN = "hf_FakeTokenForTheExportTestNeverSentAnywhere"


def test_push_uploads_the_folder_to_the_repo_branch_without_leaking_the_token(
        trained_run: TrainedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls: list[tuple[str, dict]] = []

    def record(name: str):
        def fake(self, *args, **kwargs):
            if name == "upload_folder":
                kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            calls.append((name, {"args": args, **kwargs}))
        return fake

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, record(name))
    out = tmp_path / "pushed"
    argv = ["export", "--checkpoint", str(trained_run.output_dir), "--out", str(out), "--push", "me/tiny-rmt"]
    assert main([*argv, "--revision", "step-4", "--private"]) == 0

    (create, repo), (branch, created), (upload, uploaded) = calls
    assert (create, branch, upload) == ("create_repo", "create_branch", "upload_folder")
    assert repo["args"] == ("me/tiny-rmt",) and repo["private"] is True and repo["exist_ok"] is True
    assert created["args"] == ("me/tiny-rmt",) and created["branch"] == "step-4" and created["exist_ok"] is True
    assert uploaded["repo_id"] == "me/tiny-rmt" and uploaded["revision"] == "step-4"
    assert Path(uploaded["folder_path"]) == out and uploaded["files"] == sorted(p.name for p in out.iterdir())
    assert {"README.md", "config.json", "generation_config.json", "tokenizer.json"} <= set(uploaded["files"])
    assert all("token" not in call for _, call in calls)  # huggingface_hub resolves it itself
    assert 'from_pretrained("me/tiny-rmt", trust_remote_code=True)' in (out / "README.md").read_text()

    calls.clear()
    assert main([*argv, "--force"]) == 0  # replaces the export; no branch, default visibility
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["private"] is None and calls[1][1]["revision"] is None

    captured = capsys.readouterr()
    seen = [captured.out, captured.err, caplog.text] + [p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()]
    assert not [text for text in seen if FAKE_TOKEN in text]


def error_line(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one error line of a failed export (DeepSpeed's progress bar may stand before it)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("memtrain export: error: ") and "Traceback" not in err, err
    return errors[0]


def test_missing_and_half_written_checkpoints_are_one_clear_line(
        trained_run: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert "not a memtrain checkpoint" in error_line(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)], capsys)

    # a save interrupted before memtrain_state.json sealed the tag
    run = tmp_path / "run"
    shutil.copytree(trained_run.output_dir, run, ignore=shutil.ignore_patterns("*.pt"))
    tag_dir = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    (tag_dir / "memtrain_state.json").unlink()
    assert "incomplete" in error_line(["export", "--checkpoint", str(tag_dir), "--out", str(out)], capsys)
    assert "no complete checkpoint" in error_line(["export", "--checkpoint", str(run), "--out", str(out)], capsys)

    # sealed, but one rank's shard is gone, or cut short
    shutil.rmtree(run)
    shutil.copytree(trained_run.output_dir, run)
    shards = sorted(tag_dir.glob("*_optim_states.pt"))
    shards[1].unlink()
    assert "half-written" in error_line(["export", "--checkpoint", str(run), "--out", str(out)], capsys)
    shutil.copy(trained_run.output_dir / tag_dir.relative_to(run) / shards[1].name, shards[1])
    shards[0].write_bytes(shards[0].read_bytes()[:1000])
    assert "half-written" in error_line(["export", "--checkpoint", str(run), "--out", str(out)], capsys)
    assert not out.exists()


def test_non_empty_out_is_refused_without_force(trained_run: TrainedRun, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = error_line(["export", "--checkpoint", str(trained_run.output_dir), "--out", str(out)], capsys)
    assert "not empty; pass --force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert "--push" in error_line(["export", "--checkpoint", str(trained_run.output_dir), "--out", str(tmp_path / "x"),
                                   "--push", "not a repo id//"], capsys)


def test_export_folder_is_uploaded_with_log_to_mlflow_and_a_bad_run_only_warns(
        exports: Exports, trained_run: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlflow import MlflowClient

    from pipeline.config import load_config
    from pipeline.export import Export, record_in_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("export", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    cfg = load_config(trained_run.config, [f"tracking.uri={uri}", "tracking.enabled=true", "export.log_to_mlflow=true"])

    record_in_mlflow(Export(folder=exports.fp32, step=4, cfg=cfg, mlflow_run_id=run_id))
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "export/step_00000004")}
    assert logged == {p.name for p in exports.fp32.iterdir()}

    record_in_mlflow(Export(folder=exports.fp32, step=4, cfg=cfg, mlflow_run_id="no-such-run"))
    assert "warning: not logged to MLflow run no-such-run" in capsys.readouterr().err
