"""``memtrain submit``: render the slurm/ templates from the config's ``slurm`` section and sbatch them.

The templates are plain sbatch scripts a user can also submit by hand. Rendering changes only
two things in them: the values of the ``#SBATCH`` lines (a line whose option the config leaves
unset is dropped, an option the template lacks is appended) and the block between
``# >>> settings`` and ``# <<< settings`` (environment set-up lines, config path, ``--set``
overrides). Everything else (srun, the preemption/requeue logic) stays as the user reads it.

Jobs: ``--what train`` (one training job), ``prep`` (a job array of ``memtrain prep`` slices and
a merge job that waits for it with afterok), ``all`` (both; training waits for the merge).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExperimentConfig, config_from_args
from pipeline.errors import UserError

SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"
SBATCH_LINE = re.compile(r"^#SBATCH\s+--([\w-]+)(?:[=\s](\S+))?(.*)$")
SETTINGS_BLOCK = re.compile(r"^# >>> settings.*?^# <<< settings$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Job:
    """One rendered script; ``after`` names the job it waits for (afterok)."""

    name: str
    script: str
    after: str | None = None


def tasks_per_node(cfg: ExperimentConfig) -> int:
    slurm = cfg.slurm
    if slurm.gpus_per_node == 0:
        return slurm.tasks_per_node or 1
    if slurm.tasks_per_node not in (None, slurm.gpus_per_node):
        raise UserError(f"slurm.tasks_per_node={slurm.tasks_per_node} but training runs one task per GPU "
                        f"(slurm.gpus_per_node={slurm.gpus_per_node}); drop tasks_per_node")
    return slurm.gpus_per_node


def sbatch_options(cfg: ExperimentConfig, job: str, workdir: Path) -> dict[str, str | None]:
    """The #SBATCH options of one job; None removes the template's line."""
    slurm = cfg.slurm
    log_dir = workdir / slurm.log_dir
    common: dict[str, str | None] = {
        "partition": slurm.partition, "account": slurm.account, "time": slurm.time,
        "chdir": str(workdir),
    }
    if job == "train":
        return {
            "job-name": slurm.job_name, "nodes": str(slurm.nodes),
            "ntasks-per-node": str(tasks_per_node(cfg)),
            "gpus-per-node": str(slurm.gpus_per_node) if slurm.gpus_per_node else None,
            "cpus-per-task": str(slurm.cpus_per_task), "signal": f"USR2@{slurm.signal_lead_s}",
            "output": f"{log_dir}/%x-%j.out", **common,
        }
    if job == "prep_array":
        return {
            "job-name": f"{slurm.job_name}-prep", "array": f"0-{slurm.prep_array_tasks - 1}",
            "cpus-per-task": str(slurm.cpus_per_task), "output": f"{log_dir}/%x-%A_%a.out", **common,
        }
    return {"job-name": f"{slurm.job_name}-prep-merge", "output": f"{log_dir}/%x-%j.out", **common}


def settings_block(cfg: ExperimentConfig, job: str, config_path: Path, overrides: list[str], workdir: Path) -> str:
    lines = ["# >>> settings (rendered by memtrain submit from the config's slurm section)"]
    lines += cfg.slurm.setup or ["# slurm.setup is empty: the job runs in the environment sbatch was called from"]
    if cfg.tracking.uri:
        lines.append(f"export MLFLOW_TRACKING_URI={shlex.quote(cfg.tracking.uri)}")
    if job == "prep_merge":
        lines.append(f"DATA_DIR={shlex.quote(str(workdir / cfg.data.output_dir))}")
    else:
        lines.append(f"CONFIG={shlex.quote(str(config_path))}")
        lines.append("OVERRIDES=(" + (" ".join(["--set", *map(shlex.quote, overrides)]) if overrides else "") + ")")
    return "\n".join([*lines, "# <<< settings"])


def render(template: str, options: dict[str, str | None], settings: str) -> str:
    """Put ``options`` into the template's #SBATCH lines and ``settings`` into its settings block."""
    out: list[str] = []
    pending = dict(options)
    last_sbatch = -1
    for line in template.splitlines():
        match = SBATCH_LINE.match(line)
        if match and match.group(1) in pending:
            value = pending.pop(match.group(1))
            if value is None:
                continue
            line = f"#SBATCH --{match.group(1)}={value}{match.group(3)}"
        if match:
            last_sbatch = len(out)
        out.append(line)
    extra = [f"#SBATCH --{key}={value}" for key, value in pending.items() if value is not None]
    out[last_sbatch + 1:last_sbatch + 1] = extra
    text = "\n".join(out) + "\n"
    if not SETTINGS_BLOCK.search(text):
        raise UserError("slurm template has no '# >>> settings' ... '# <<< settings' block")
    return SETTINGS_BLOCK.sub(lambda _: settings, text, count=1)


def render_jobs(cfg: ExperimentConfig, what: str, config_path: Path, overrides: list[str],
                workdir: Path) -> list[Job]:
    """The scripts to submit, in submission order."""
    names = {"train": ["train"], "prep": ["prep_array", "prep_merge"]}.get(what, ["prep_array", "prep_merge", "train"])
    jobs = []
    for i, name in enumerate(names):
        template = (SLURM_DIR / f"{name}.sbatch").read_text()
        script = render(template, sbatch_options(cfg, name, workdir),
                        settings_block(cfg, name, config_path, overrides, workdir))
        jobs.append(Job(name, script, after=names[i - 1] if i else None))
    return jobs


def sbatch(job: Job, *flags: str) -> str:
    """Run ``sbatch FLAGS`` on the job's script (stdin); return its output, or raise with sbatch's reason."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found on PATH: run memtrain submit on a SLURM login node (or use --dry-run)")
    proc = subprocess.run(["sbatch", *flags], input=job.script, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [ln.split("error:", 1)[1].strip() for ln in proc.stderr.splitlines() if "error:" in ln]
        reason = errors[-1] if errors else (proc.stderr.strip() or f"exit code {proc.returncode}")
        raise UserError(f"sbatch {' '.join(flags)} refused the {job.name} script: {reason}")
    return proc.stdout.strip() or proc.stderr.strip().removeprefix("sbatch: ")


def run_submit(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    workdir = Path.cwd()
    jobs = render_jobs(cfg, args.what, Path(args.config).resolve(), list(args.overrides), workdir)
    if args.dry_run:
        for job in jobs:
            after = f"--dependency=afterok:<{job.after} job id> " if job.after else ""
            print(f"# ---- {job.name}: sbatch {after}<this script>", file=sys.stderr, flush=True)
            print(job.script, end="", flush=True)
        if shutil.which("sbatch") is None:
            print("# sbatch is not on PATH: the scripts were not checked with sbatch --test-only", file=sys.stderr)
            return 0
    for job in jobs:  # all of them first, so that a bad section submits nothing
        print(f"# {job.name}: sbatch --test-only OK: {sbatch(job, '--test-only')}", file=sys.stderr)
    if args.dry_run:
        return 0
    (workdir / cfg.slurm.log_dir).mkdir(parents=True, exist_ok=True)
    job_ids: dict[str, str] = {}
    for job in jobs:
        flags = ["--parsable"] + ([f"--dependency=afterok:{job_ids[job.after]}"] if job.after else [])
        job_ids[job.name] = sbatch(job, *flags).split(";")[0]  # --parsable: "id" or "id;cluster"
        after = f" (afterok:{job_ids[job.after]})" if job.after else ""
        print(f"{job.name}: {job_ids[job.name]}{after}", flush=True)
    return 0
