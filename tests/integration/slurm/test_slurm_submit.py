"""``memtrain submit`` against the real cluster: rendered scripts that sbatch accepts, and bad
slurm sections that come back as one clear line."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("what", ["train", "prep"])
def test_dry_run_output_passes_sbatch_test_only(slurm_cluster, make_config, what) -> None:
    config = make_config()
    proc = slurm_cluster.memtrain("submit", "--config", str(config), "--what", what, "--dry-run",
                                  "--set", "train.max_steps=7")
    assert proc.returncode == 0, proc.stderr
    scripts = ["#!" + part for part in proc.stdout.split("#!")[1:]]
    assert len(scripts) == (1 if what == "train" else 2)
    for script in scripts:
        checked = slurm_cluster.run("sbatch", "--test-only", input_text=script)
        assert checked.returncode == 0 and "to start at" in checked.stderr, (script, checked.stderr)
    if what == "train":
        (script,) = scripts
        assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
        assert "--gpus-per-node" not in script  # gpus_per_node: 0 -> CPU tasks
        assert f"CONFIG={config}\n" in script and "OVERRIDES=(--set train.max_steps=7)" in script
    # a dry run submits nothing
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""


@pytest.mark.parametrize(("overrides", "expected"), [
    (["slurm.nodes=0"], "slurm.nodes: Input should be greater than or equal to 1"),
    (["slurm.partition=no-such-partition"], "invalid partition specified: no-such-partition"),
    (["slurm.nodes=3"], "Requested node configuration is not available"),  # the cluster has 2
    (["slurm.gpus_per_node=2", "slurm.tasks_per_node=null"], "Invalid generic resource"),  # and no GPUs
    (["slurm.time=soon"], "slurm.time='soon' is not a SLURM time"),  # refused by the config, before sbatch
])
def test_bad_slurm_section_is_one_clear_line(slurm_cluster, make_config, overrides, expected) -> None:
    proc = slurm_cluster.memtrain("submit", "--config", str(make_config()), "--set", *overrides)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected.lower() in proc.stderr.lower(), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "" and slurm_cluster.run("squeue", "-h").stdout.strip() == ""

