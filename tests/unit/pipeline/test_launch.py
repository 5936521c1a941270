import subprocess
import sys

import pytest
from processes import process_env

from pipeline.errors import UserError
from pipeline.launch import detect, first_host, setup, under_launcher


def test_torchrun_variables_win_over_slurm() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h0", "MASTER_PORT": "29600",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    got = detect(env)
    assert (got.rank, got.local_rank, got.world_size, got.master_addr, got.master_port) == (3, 1, 4, "h0", 29600)
    assert got.launcher == "torchrun" and not got.is_main


def test_srun_task_is_one_rank_with_port_from_job_id() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu7"}
    got = detect(env)
    assert (got.rank, got.local_rank, got.world_size, got.master_addr) == (5, 1, 8, "gpu7")
    assert got.launcher == "srun"
    other_job = detect({**env, "SLURM_JOB_ID": "4243"})
    assert other_job.master_port != got.master_port
    assert detect({**env, "MASTER_PORT": "1234", "MASTER_ADDR": "x"}).master_port == 1234
    assert detect({**env, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}).world_size == 2


def test_first_host_of_compressed_node_lists() -> None:
    assert first_host("gpu[07-09,12]-ib,cpu1") == "gpu07-ib"
    assert first_host("node3,node1") == "node3"
    assert first_host("n[4]") == "n4"


def test_no_launcher_is_rank_zero_of_one_on_a_free_port() -> None:
    got = detect({})
    assert (got.rank, got.world_size, got.master_addr, got.master_port) == (0, 1, "127.0.0.1", 0)
    assert not under_launcher({}) and under_launcher({"RANK": "0", "WORLD_SIZE": "1"})


def test_a_single_rank_binds_its_port_when_its_store_starts() -> None:
    """Port 0 reaches torch's env:// rendezvous, whose store binds the port the kernel picks then."""
    code = """
import torch, torch.distributed as dist
from pipeline.launch import setup
setup({})
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
store = dist.distributed_c10d._get_default_store()
while not hasattr(store, "port"):
    store = store.underlying_store
print(dist.get_world_size(), total.item(), store.port)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=process_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    world, total, port = out.stdout.split()
    assert (world, total) == ("1", "1.0") and int(port) > 0


def test_inconsistent_rank_is_a_user_error() -> None:
    with pytest.raises(UserError, match="rank 4 of world size 2"):
        setup({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})


def test_the_deepspeed_launchers_local_rank_argument_is_accepted() -> None:
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["--local_rank=1", "train", "--config", "c.yaml"])
    assert args.command == "train" and args.config == "c.yaml"


# what the launchers export to each process (OpenMPI 4.1 mpirun, MPICH 4 hydra mpiexec)
OPENMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "3"}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "3", "PMI_FD": "6"}


def test_mpirun_ranks_are_read_even_inside_an_sbatch_script() -> None:
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}
    got = detect({**OPENMPI, **batch, "MASTER_ADDR": "n1"})
    assert (got.rank, got.local_rank, got.world_size, got.master_addr, got.launcher) == (3, 1, 4, "n1", "mpi")
    with pytest.raises(UserError, match="several nodes: export MASTER_ADDR"):
        detect(OPENMPI)
    local = detect(MPICH)  # every rank on this node: the rendezvous is local
    assert (local.rank, local.world_size, local.master_addr, local.master_port) == (2, 3, "127.0.0.1", 29500)


def test_pmix_without_a_world_size_is_refused() -> None:
    with pytest.raises(UserError, match="PMIX_RANK but no world size"):
        detect({"PMIX_RANK": "1", "PMIX_NAMESPACE": "x"})


def test_srun_with_an_mpi_plugin_stays_srun() -> None:
    env = {**MPICH, "PMI_RANK": "1", "PMI_SIZE": "2", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1"}
    del env["MPI_LOCALNRANKS"]
    assert detect(env).launcher == "srun" and detect(env).rank == 1


def test_batch_script_of_a_multi_task_job_is_refused_with_srun_hint() -> None:
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1"}
    with pytest.raises(UserError, match="use|srun memtrain train"):
        detect(batch)
    assert detect({**batch, "SLURM_NTASKS": "1"}).launcher == "none"

