"""Config values that used to give a traceback or a silently empty result are one line (issue 17),
and a secret inside tracking.uri never reaches a saved or logged config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config, slurm_time_seconds
from pipeline.errors import UserError


@pytest.mark.parametrize("overrides, message", [
    (["train.betas=[1.5, 0.9]"], "AdamW betas must lie in [0, 1)"),
    (["data.val_fraction=0.6", "data.test_fraction=0.5"], "leaves no books to train on"),
    (["slurm.time=banana"], "slurm.time='banana' is not a SLURM time"),
    (["slurm.time=4", "slurm.signal_lead_s=300"], "slurm.time=4 is not longer than slurm.signal_lead_s=300"),
])
def test_bad_values_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_submit_dry_run_refuses_a_bad_slurm_time(capsys: pytest.CaptureFixture[str], repo_root: Path) -> None:
    code = main(["submit", "--config", str(repo_root / "configs" / "demo.yaml"), "--dry-run", "--set", "slurm.time=banana"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a SLURM time" in err


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("5:30", 330), ("02:00:00", 7200), ("1-12", 129600),
                                           ("2-00:30", 174600), ("0-00:00:59", 59)])
def test_slurm_time_formats(text: str, seconds: int) -> None:
    assert slurm_time_seconds(text) == seconds


@pytest.mark.parametrize("uri, shown", [("http://ann:s3cret@mlflow:5000", "http://ann:***@mlflow:5000"),
                                        ("https://t0ken@mlflow.example/", "https://***@mlflow.example/")])
def test_credentials_in_the_tracking_uri_are_masked(uri: str, shown: str, tmp_path: Path) -> None:
    cfg = load_config(None, [f"tracking.uri={uri}"])
    cfg.save(tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert yaml.safe_load(saved)["tracking"]["uri"] == shown and "s3cret" not in saved and "t0ken" not in saved
    assert cfg.flat()["tracking.uri"] == shown  # what MLflow gets as a param
    assert cfg.tracking.uri == uri  # the live config still connects with it
