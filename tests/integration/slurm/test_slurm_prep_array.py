"""``memtrain submit --what prep``: a 2-task job array plus the afterok merge job make the same data
set as one plain ``memtrain prep``."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.slow


def test_prep_array_and_merge_match_a_single_prep(slurm_cluster, make_config, reference_data, tmp_path) -> None:
    jobs = slurm_cluster.submit(make_config(), "prep")
    assert set(jobs) == {"prep_array", "prep_merge"}
    merged = slurm_cluster.wait(jobs["prep_merge"], timeout=240)
    logs = slurm_cluster.logs(tmp_path / "logs")
    assert merged == "COMPLETED", logs
    assert slurm_cluster.wait(jobs["prep_array"], timeout=10) == "COMPLETED", logs
    # two array tasks really ran, each on its slice, and the merge started after both ended
    for task in (0, 1):
        assert f"array task {task} of 2" in logs
    array_ends = re.findall(r"\bEndTime=(\S+)", slurm_cluster.run("scontrol", "show", "job", jobs["prep_array"]).stdout)
    assert len(array_ends) == 2 and slurm_cluster.job_field(jobs["prep_merge"], "StartTime") >= max(array_ends)

    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    reference = json.loads((reference_data / "manifest.json").read_text())
    assert manifest == reference
    for shard in reference["shards"]:
        assert (tmp_path / "data" / shard["path"]).read_bytes() == (reference_data / shard["path"]).read_bytes()
