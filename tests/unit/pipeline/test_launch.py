import pytest

from pipeline.errors import UserError
from pipeline.launch import detect, first_host, setup, under_launcher


def test_torchrun_variables_win_over_slurm() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h0", "MASTER_PORT": "29600",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    got = detect(env)
    assert (got.rank, got.local_rank, got.world_size, got.master_addr, got.master_port) == (3, 1, 4, "h0", 29600)
    assert got.launcher == "torchrun" and not got.is_main


def test_srun_task_is_one_rank_with_port_from_job_id() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu7"}
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
    assert (got.rank, got.world_size, got.master_addr) == (0, 1, "127.0.0.1") and got.master_port > 0
    assert not under_launcher({}) and under_launcher({"RANK": "0", "WORLD_SIZE": "1"})


def test_inconsistent_rank_is_a_user_error() -> None:
    with pytest.raises(UserError, match="rank 4 of world size 2"):
        setup({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})


def test_the_deepspeed_launchers_local_rank_argument_is_accepted() -> None:
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["--local_rank=1", "train", "--config", "c.yaml"])
    assert args.command == "train" and args.config == "c.yaml"
