"""The export lands with renames: --out is the old content or a complete export, never a mix."""

import pytest

from pipeline.errors import UserError
from pipeline.export import check_destination, publish


def staged(tmp_path, name="staging"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_publish_creates_and_replaces_only_with_force(tmp_path) -> None:
    out = tmp_path / "out"
    publish(staged(tmp_path, "a"), out, force=False)
    assert (out / "config.json").is_file()
    (out / "old.bin").write_text("stale")
    with pytest.raises(UserError, match="not empty; pass --force"):
        publish(staged(tmp_path, "b"), out, force=False)
    assert (out / "old.bin").is_file()
    publish(tmp_path / "b", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # staging and previous content are gone


def test_empty_out_folder_is_filled_without_force(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    check_destination(out, tmp_path / "ckpt", force=False)
    publish(staged(tmp_path), out, force=False)
    assert (out / "config.json").is_file()


def test_destination_refusals(tmp_path) -> None:
    ckpt = tmp_path / "run" / "train"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text("x")
    with pytest.raises(UserError, match="holds the checkpoint"):
        check_destination(tmp_path / "run", ckpt, force=True)
    with pytest.raises(UserError, match="holds the checkpoint"):
        check_destination(ckpt, ckpt, force=True)
    with pytest.raises(UserError, match="not empty"):
        check_destination(ckpt, tmp_path / "elsewhere", force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        check_destination(tmp_path / "file", ckpt, force=True)
