import json
from pathlib import Path

import pytest

from pipeline.checkpoint import STATE_FILE, find_latest, prune, resolve_tag_dir, tag_for
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.optim import lr_at


def make_tag(ckpt: Path, step: int, complete: bool = True) -> Path:
    tag_dir = ckpt / tag_for(step)
    tag_dir.mkdir(parents=True)
    for rank in (0, 1):
        (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag_dir / STATE_FILE).write_text(json.dumps({"step": step, "world_size": 2}))
    return tag_dir


def test_a_checkpoint_missing_a_rank_shard_falls_back_to_the_previous(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "run" / "checkpoints"
    good = make_tag(ckpt, 100)
    damaged = make_tag(ckpt, 200)
    (damaged / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()  # lost from a node-local disk
    (ckpt / "latest").write_text(tag_for(200))
    assert find_latest(ckpt) == good
    assert "lacks zero_pp_rank_1_mp_rank_00_model_states.pt; using step_00000100" in capsys.readouterr().err
    with pytest.raises(UserError, match="zero_pp_rank_1_mp_rank_00_model_states.pt is missing"):
        resolve_tag_dir(damaged)


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints"
    good = make_tag(ckpt, 100)
    make_tag(ckpt, 200, complete=False)  # killed during the save
    (ckpt / "latest").write_text(tag_for(100))
    assert find_latest(ckpt) == good
    (ckpt / "latest").write_text(tag_for(200))  # even if `latest` names it
    assert find_latest(ckpt) == good
    assert resolve_tag_dir(tmp_path / "run") == good
    with pytest.raises(UserError, match="incomplete"):
        resolve_tag_dir(ckpt / tag_for(200))
    with pytest.raises(UserError, match="not a memtrain checkpoint"):
        resolve_tag_dir(tmp_path)


def test_prune_keeps_the_last_complete_tags_and_drops_leftovers(tmp_path: Path) -> None:
    for step in (100, 200, 300):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 250, complete=False)
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(200), tag_for(300)]


def test_lr_warms_up_then_follows_a_cosine_to_min_lr() -> None:
    train = load_config(overrides=["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=10",
                                   "train.max_steps=110"]).train
    assert lr_at(train, 0) == pytest.approx(1e-4) and lr_at(train, 9) == pytest.approx(1e-3)
    assert lr_at(train, 60) == pytest.approx(5.5e-4) and lr_at(train, 110) == pytest.approx(1e-4)
    lrs = [lr_at(train, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
