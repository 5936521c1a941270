"""Ranks started by a real ``mpirun`` (OpenMPI) read their place in the job from its variables
instead of each becoming rank 0 of 1. ~3 s. Needs openmpi-bin (apt)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from processes import REPO_ROOT, process_env

# each rank writes its own file: mpirun's forwarding of several ranks' stdout may interleave lines
PROBE = ("import sys; from pathlib import Path; from pipeline.launch import setup; d = setup(); "
         "Path(sys.argv[1], str(d.rank)).write_text(f'{d.rank} {d.local_rank} {d.world_size} {d.master_addr} {d.launcher}')")


def test_mpirun_ranks_get_their_real_rank_and_world_size(tmp_path) -> None:
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: apt-get install openmpi-bin"
    root_ok = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}
    proc = subprocess.run([mpirun, "--oversubscribe", "-np", "3", sys.executable, "-c", PROBE, str(tmp_path)],
                          cwd=REPO_ROOT, env=process_env(**root_ok), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(path.read_text().split() for path in tmp_path.iterdir())
    assert ranks == [[str(r), str(r), "3", "127.0.0.1", "mpi"] for r in range(3)]
