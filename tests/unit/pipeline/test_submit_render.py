"""Rendering the slurm/ templates (no cluster needed; tests/integration/slurm submits them for real)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.submit import SBATCH_LINE, SLURM_DIR, render, render_jobs, tasks_per_node


def sbatch_options(script: str) -> dict[str, str | None]:
    return {m.group(1): m.group(2) for m in map(SBATCH_LINE.match, script.splitlines()) if m}


def outside_header_and_settings(script: str) -> list[str]:
    lines, inside = [], False
    for line in script.splitlines():
        inside = inside or line.startswith("# >>> settings")
        if not inside and not line.startswith("#SBATCH"):
            lines.append(line)
        inside = inside and not line.startswith("# <<< settings")
    return lines


def test_render_sets_drops_and_appends_sbatch_options() -> None:
    template = "#!/bin/bash\n#SBATCH --nodes=1  # keep me\n#SBATCH --gpus-per-node=8\n#SBATCH --requeue\n\n" \
               "# >>> settings\nold\n# <<< settings\necho $CONFIG\n"
    out = render(template, {"nodes": "4", "gpus-per-node": None, "partition": "gpu"}, "# >>> settings\nnew\n# <<< settings")
    assert out == "#!/bin/bash\n#SBATCH --nodes=4  # keep me\n#SBATCH --requeue\n#SBATCH --partition=gpu\n\n" \
                  "# >>> settings\nnew\n# <<< settings\necho $CONFIG\n"


def test_template_without_settings_block_is_an_error() -> None:
    with pytest.raises(UserError, match="settings"):
        render("#!/bin/bash\n#SBATCH --nodes=1\n", {}, "")


def test_rendered_jobs_follow_the_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["slurm.nodes=3", "slurm.gpus_per_node=4", "slurm.partition=gpu", "slurm.account=lab",
                             "slurm.setup=['module load cuda', 'source venv/bin/activate']",
                             "slurm.prep_array_tasks=5", "tracking.uri=http://mlflow:5000"])
    jobs = render_jobs(cfg, "all", tmp_path / "c.yaml", ["train.lr=1e-4", "memory.kind=armt"], tmp_path)
    assert [(j.name, j.after) for j in jobs] == [("prep_array", None), ("prep_merge", "prep_array"), ("train", "prep_merge")]
    prep, merge, train = (j.script for j in jobs)
    options = sbatch_options(train)
    assert options["nodes"] == "3" and options["ntasks-per-node"] == "4" and options["gpus-per-node"] == "4"
    assert options["partition"] == "gpu" and options["account"] == "lab" and options["chdir"] == str(tmp_path)
    assert options["signal"] == "USR2@300" and "requeue" in options
    assert options["output"] == f"{tmp_path}/slurm-logs/%x-%j.out"
    assert "module load cuda\nsource venv/bin/activate\n" in train
    assert "export MLFLOW_TRACKING_URI=http://mlflow:5000" in train
    assert f"CONFIG={tmp_path}/c.yaml\nOVERRIDES=(--set train.lr=1e-4 memory.kind=armt)" in train
    assert sbatch_options(prep)["array"] == "0-4"
    assert f"DATA_DIR={tmp_path}/runs/demo/data\n" in merge
    # everything but the #SBATCH values and the settings block is the template, unchanged
    for job in jobs:
        template = (SLURM_DIR / f"{job.name}.sbatch").read_text()
        assert outside_header_and_settings(job.script) == outside_header_and_settings(template)
        subprocess.run(["bash", "-n"], input=job.script, text=True, check=True)


def test_cpu_only_tasks_and_one_task_per_gpu() -> None:
    assert tasks_per_node(load_config(None, ["slurm.gpus_per_node=0"])) == 1
    assert tasks_per_node(load_config(None, ["slurm.gpus_per_node=0", "slurm.tasks_per_node=3"])) == 3
    assert tasks_per_node(load_config(None, ["slurm.gpus_per_node=8"])) == 8
    with pytest.raises(UserError, match="one task per GPU"):
        tasks_per_node(load_config(None, ["slurm.gpus_per_node=8", "slurm.tasks_per_node=2"]))


def run_cli(*args: str, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True)


def test_no_sbatch_on_path_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("slurm:\n  nodes: 2\n")
    proc = run_cli("submit", "--config", str(config), path=str(tmp_path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "sbatch not found on PATH" in proc.stderr, proc.stderr
    # a dry run still prints the script (and skips the sbatch --test-only check)
    dry = run_cli("submit", "--config", str(config), "--dry-run", path=str(tmp_path))
    assert dry.returncode == 0 and dry.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=2\n" in dry.stdout
