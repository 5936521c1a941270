"""Who am I in the job: rank, world size and rendezvous address from torchrun, the deepspeed
launcher, ``srun``, or nothing at all; and ``--nproc N`` as an in-process torchrun.

Precedence: an explicit ``RANK``/``WORLD_SIZE`` (torchrun, the deepspeed launcher, or a user)
wins; then an MPI launcher (``mpirun``/``mpiexec`` of OpenMPI, MPICH/Intel MPI, MVAPICH2, PMIx),
read from the variables it sets for every process; then ``srun`` (``SLURM_PROCID``/``SLURM_LOCALID``/
``SLURM_STEP_NUM_TASKS``); otherwise this is a single process and gets rank 0 of 1 on 127.0.0.1
with a free port. MPI comes before SLURM because ``mpirun`` inside an sbatch script passes the batch
script's ``SLURM_PROCID=0`` to every process. The batch script itself (``--ntasks`` > 1, no ``srun``)
is refused: it would be rank 0 of N and wait for peers that never start.

Under MPI the rendezvous is torch's env:// one: ``MASTER_ADDR`` is 127.0.0.1 when every rank runs
on this node, and must be exported otherwise; ``MASTER_PORT`` defaults to 29500.

Under ``srun`` every task is one rank. The master is the first host of the job's node list
(``scontrol show hostnames``) and the port is derived from the job id, so that two jobs sharing a
node do not collide; an exported ``MASTER_ADDR``/``MASTER_PORT`` overrides either.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import psutil

from pipeline import allocator
from pipeline.errors import UserError

EXIT_PREEMPTED = 85  # "checkpoint saved, please requeue"; pipeline.train re-exports it
# Save at the next step boundary and exit EXIT_PREEMPTED: SLURM's warning, a kill, Ctrl-C, a closed terminal.
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PORT_BASE, PORT_SPAN = 20000, 20000  # srun: MASTER_PORT = PORT_BASE + job_id % PORT_SPAN


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (also the deepspeed launcher), "mpi", "srun" or "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Write the variables torch.distributed's env:// rendezvous reads."""
        os.environ.update(
            RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
            MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
        )


# (rank, size, local rank, local size) variables of each MPI family, as its launcher exports them
MPI_VARIABLES = {
    "OpenMPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MVAPICH2": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    "MPICH": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}
MPI_RANK_ONLY = ("PMIX_RANK",)  # PMIx alone does not say the world size


def under_launcher(environ: Mapping[str, str] = os.environ) -> bool:
    """True when some launcher made this process one rank of a job."""
    return detect(environ).launcher != "none"


def detect(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read this process's place in the job from the environment (nothing is exported)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=_int(environ, "RANK"), local_rank=_int(environ, "LOCAL_RANK", 0),
            world_size=_int(environ, "WORLD_SIZE"),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(environ, "MASTER_PORT", 29500), launcher="torchrun",
        )
    mpi = _mpi(environ)
    if mpi is not None:
        return mpi
    ntasks = _slurm_ntasks(environ)
    if "SLURM_PROCID" in environ and ntasks is not None:
        job_id = environ.get("SLURM_JOB_ID", "0")
        port = environ.get("MASTER_PORT") or str(PORT_BASE + int(job_id) % PORT_SPAN if job_id.isdigit() else 29500)
        return DistEnv(
            rank=_int(environ, "SLURM_PROCID"), local_rank=_int(environ, "SLURM_LOCALID", 0),
            world_size=ntasks,
            master_addr=environ.get("MASTER_ADDR") or slurm_master(environ),
            master_port=int(port), launcher="srun",
        )
    # port 0: the one rank's store binds a port the kernel picks at that moment. A port picked here
    # and bound seconds later (after DeepSpeed's import) could meanwhile go to another process.
    return DistEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=0, launcher="none")


def _mpi(environ: Mapping[str, str]) -> DistEnv | None:
    for family, (rank, size, local_rank, local_size) in MPI_VARIABLES.items():
        if rank in environ and size in environ:
            world = _int(environ, size)
            if environ.get("SLURM_STEP_NUM_TASKS") == str(world):
                return None  # srun started these ranks itself (--mpi=pmi2/pmix): its variables say it all
            single_node = _int(environ, local_size, -1) == world
            master = environ.get("MASTER_ADDR") or ("127.0.0.1" if single_node else None)
            if master is None:
                raise UserError(f"{family} launcher with ranks on several nodes: export MASTER_ADDR (the host of "
                                "rank 0) and MASTER_PORT to every rank, e.g. mpirun -x MASTER_ADDR -x MASTER_PORT")
            return DistEnv(rank=_int(environ, rank), local_rank=_int(environ, local_rank, 0), world_size=world,
                           master_addr=master, master_port=_int(environ, "MASTER_PORT", 29500), launcher="mpi")
    found = [name for name in MPI_RANK_ONLY if name in environ]
    if found:
        raise UserError(f"an MPI launcher set {found[0]} but no world size this can read; launch with torchrun or "
                        "srun, or export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    return None


def setup(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Detect this rank and export the env:// variables for ``deepspeed.init_distributed``."""
    dist_env = detect(environ)
    if dist_env.world_size < 1 or not 0 <= dist_env.rank < dist_env.world_size:
        raise UserError(f"inconsistent launcher environment: rank {dist_env.rank} of world size {dist_env.world_size}")
    dist_env.export()
    return dist_env


def slurm_master(environ: Mapping[str, str]) -> str:
    """First host of the job's node list: ``scontrol show hostnames``, or, where scontrol cannot
    answer (no slurm.conf on this host), the first entry of the compressed list itself."""
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("running under srun but SLURM_JOB_NODELIST is not set; export MASTER_ADDR")
    if shutil.which("scontrol") is not None:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts[0]
    return first_host(nodelist)


def first_host(nodelist: str) -> str:
    """``gpu[07-09,12]-ib,cpu1`` -> ``gpu07-ib`` (Slurm's compressed host list, first entry)."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    if match is None or not match.group(0):
        raise UserError(f"cannot read the SLURM node list {nodelist!r}; export MASTER_ADDR")
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return f"{prefix}{first}{suffix}"


def _slurm_ntasks(environ: Mapping[str, str]) -> int | None:
    """The task count of this srun step; None outside one. In the batch script itself (no
    ``SLURM_STEP_NUM_TASKS``) a job of several tasks is refused: only srun starts the other ranks."""
    value = environ.get("SLURM_STEP_NUM_TASKS")
    if value is None and "SLURM_JOB_ID" in environ:
        job_tasks = environ.get("SLURM_NTASKS", "1")
        if job_tasks.isdigit() and int(job_tasks) > 1:
            raise UserError(f"this is the batch script of SLURM job {environ['SLURM_JOB_ID']} with {job_tasks} tasks, "
                            "not one of them: start training with `srun memtrain train ...`")
        return None
    return int(value) if value and value.isdigit() else None


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"launcher variable {key}={value!r} is not an integer") from None


def has_gpu() -> bool:
    """A CUDA device this process may use (``DS_ACCELERATOR=cpu`` says no, as it does to DeepSpeed)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return False
    import torch  # lazy: seconds of import; DS_ACCELERATOR=cpu never needs it

    return torch.cuda.is_available()


def run_local_ranks(nproc: int, argv: Sequence[str], on_cpu: bool) -> int:
    """``torchrun --standalone --nproc_per_node N -m pipeline.cli ARGV`` run in this process.

    torchrun's own code path (``torch.distributed.run.run``), so that the ranks'
    exit codes come back: when they all stop with EXIT_PREEMPTED that is this command's code too.
    STOP_SIGNALS sent to this process (SIGUSR2, SIGTERM, Ctrl-C's SIGINT, SIGHUP) are forwarded to
    the ranks, which save and exit; torchrun itself only handles SIGQUIT (it kills the ranks).
    CPU ranks start with one OpenMP thread and the allocator set-up of ``pipeline.allocator``.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # lazy: torch (seconds), --nproc only
    from torch.distributed.run import parse_args, run

    if on_cpu:
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ.update(allocator.cpu_rank_environment())  # read when each rank's process starts
    torchrun_args = parse_args([
        "--standalone", f"--nproc_per_node={nproc}", "--signals-to-handle=SIGQUIT",
        "-m", "pipeline.cli", *argv,
    ])
    previous = {sig: signal.signal(sig, _forward_to_children) for sig in STOP_SIGNALS}
    try:
        run(torchrun_args)
        return 0
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        if EXIT_PREEMPTED in codes and codes <= {EXIT_PREEMPTED, *(-sig for sig in STOP_SIGNALS)}:
            return EXIT_PREEMPTED
        if UserError.exit_code in codes and codes <= {UserError.exit_code, -signal.SIGTERM, -signal.SIGKILL}:
            return UserError.exit_code  # a user error, which the ranks already printed (the others torchrun ended)
        print(f"memtrain {argv[0]}: rank(s) failed with exit code(s) {sorted(codes)}; see the output above",
              file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _forward_to_children(signum: int, frame: object) -> None:
    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
