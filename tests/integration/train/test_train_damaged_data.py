"""Every split a run reads is checked before any rank starts (issue 17, item 1 and 4): an empty or
missing val split, a damaged shard, an edited manifest and out-of-range token ids stop `memtrain
train --nproc 2` with one line naming the problem, instead of failing after the whole run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_support import tmpfs, write_config

import data_prep.verify
from pipeline.cli import main


@pytest.fixture()
def data(tiny_data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy)
    (copy / data_prep.verify.VERIFIED).unlink(missing_ok=True)  # verdicts of runs on the shared data
    return copy


def manifest_of(data: Path) -> dict:
    return json.loads((data / "manifest.json").read_text())


def edit_manifest(data: Path, **changes: object) -> None:
    (data / "manifest.json").write_text(json.dumps({**manifest_of(data), **changes}))


def shard(data: Path, split: str) -> Path:
    return data / next(s["path"] for s in manifest_of(data)["shards"] if s["split"] == split)


def train_error(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    config = write_config(tmp_path / "run.yaml", data, tmp_path / "out", None)
    assert main(["train", "--config", str(config), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before any rank (and before the run lock)
    return err


def flip_a_bit(path: Path, offset: int) -> None:
    payload = bytearray(path.read_bytes())
    payload[offset] ^= 0x01
    path.write_bytes(bytes(payload))


def test_an_empty_val_split_is_refused_at_start(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = manifest_of(data)
    edit_manifest(data, counts={**manifest["counts"], "val": 0},
                  shards=[s for s in manifest["shards"] if s["split"] != "val"])  # what data.val_fraction=0 makes
    assert "the val split in" in train_error(data, tmp_path, capsys)


def test_a_deleted_val_shard_is_named(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim = shard(data, "val")
    victim.unlink()
    err = train_error(data, tmp_path, capsys)
    assert f"shard {victim} is missing" in err


@pytest.mark.parametrize("split", ["train", "val"])
def test_one_flipped_bit_is_found_and_the_shard_named(split: str, data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    victim = shard(data, split)
    flip_a_bit(victim, victim.stat().st_size // 2)
    err = train_error(data, tmp_path, capsys)
    assert f"shard {victim} is damaged: its sha256 does not match" in err


def test_an_edited_n_segments_is_refused(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_manifest(data, n_segments=manifest_of(data)["n_segments"] + 4)
    assert "manifest.json is inconsistent" in train_error(data, tmp_path, capsys)


def test_token_ids_outside_the_vocabulary_are_refused(data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from data_prep.shards import file_sha256

    victim = shard(data, "val")
    with pa.memory_map(str(victim)) as source:
        table = pa.ipc.open_stream(source).read_all()
    ids = table.column("input_ids").combine_chunks()
    flat = pc.add(ids.flatten(), pa.scalar(10_000, pa.int32()))  # every id past the 320-token vocabulary
    table = table.set_column(0, "input_ids", pa.FixedSizeListArray.from_arrays(flat, ids.type.list_size))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    victim.write_bytes(sink.getvalue().to_pybytes())
    manifest = manifest_of(data)
    for record in manifest["shards"]:  # a consistent manifest: only the ids are wrong
        if data / record["path"] == victim:
            record.update(sha256=file_sha256(victim), bytes=victim.stat().st_size)
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert f"shard {victim} holds token id" in train_error(data, tmp_path, capsys)


def test_verdicts_are_recorded_so_a_second_start_hashes_nothing(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = manifest_of(data)
    hashed: list[Path] = []
    real = data_prep.verify.file_sha256
    monkeypatch.setattr(data_prep.verify, "file_sha256", lambda path: hashed.append(path) or real(path))
    data_prep.verify.verify_splits(data, manifest, ["train", "val"], manifest["vocab_size"])
    assert len(hashed) == len(manifest["shards"])
    hashed.clear()
    data_prep.verify.verify_splits(data, manifest, ["train", "val"], manifest["vocab_size"])
    assert hashed == []
    victim = shard(data, "val")
    victim.touch()  # a new mtime: verified again
    data_prep.verify.verify_splits(data, manifest, ["train", "val"], manifest["vocab_size"])
    assert hashed == [victim]


@pytest.mark.parametrize("output_dir, message", [
    (lambda data, tmp: data, "give the run a folder of its own"),  # run dir == data dir
    (lambda data, tmp: tmp / ("r" * 300), "has a name of 300 bytes"),
])
def test_unusable_run_folders_are_one_line(output_dir, message: str, data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "run.yaml", data, output_dir(data, tmp_path), None)
    assert main(["train", "--config", str(config), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_full_disk_at_prep_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tmpfs(tmp_path / "disk", "40k") as disk:
        config = write_config(tmp_path / "prep.yaml", disk / "data", tmp_path / "unused", None)
        code = main(["prep", "--config", str(config)])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("memtrain prep: error:")]
        assert code == 2 and len(errors) == 1 and f"no space left on the device writing {disk}" in errors[0], err
        assert not (disk / "data" / "manifest.json").exists()


def test_a_manifest_off_its_contract_is_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = manifest_of(data)
    manifest["shards"][0]["sha256"] = "not-a-digest"
    del manifest["tokenizer_hash"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    err = train_error(data, tmp_path, capsys)
    assert "manifest.json lacks tokenizer_hash" in err or "has a bad shards.0.sha256" in err
