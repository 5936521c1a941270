from pathlib import Path

import pytest
import yaml

from pipeline.config import ExperimentConfig, load_config
from pipeline.errors import UserError


def test_demo_config_loads(repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs" / "demo.yaml")
    assert cfg.memory.kind == "rmt"
    assert cfg.data.sample_len == cfg.data.segment_len * cfg.data.n_segments


def test_overrides_are_typed_and_nested(repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs" / "demo.yaml",
                      ["train.lr=3e-4", "memory.kind=armt", "train.curriculum=[{from_step: 0, n_segments: 2}]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.memory.kind == "armt"
    assert cfg.train.curriculum[0].n_segments == 2


def test_unknown_key_gets_did_you_mean() -> None:
    with pytest.raises(UserError, match=r"unknown config key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=10"])


def test_unknown_section_gets_did_you_mean() -> None:
    with pytest.raises(UserError, match=r"did you mean 'memory'"):
        load_config(None, ["memroy.kind=rmt"])


def test_bad_value_names_the_key() -> None:
    with pytest.raises(UserError, match=r"memory.kind"):
        load_config(None, ["memory.kind=lstm"])


def test_override_into_a_value_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(UserError, match="is a value"):
        load_config(path, ["train.lr.x=1"])


def test_malformed_override() -> None:
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["train.lr"])


def test_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)


def test_curriculum_beyond_sample_is_rejected() -> None:
    with pytest.raises(UserError, match="curriculum"):
        load_config(None, ["data.n_segments=4", "train.curriculum=[{from_step: 0, n_segments: 8}]"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["memory.num_tokens=4"])
    cfg.save(tmp_path / "config.yaml")
    again = ExperimentConfig.model_validate(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert cfg.flat()["memory.num_tokens"] == 4
