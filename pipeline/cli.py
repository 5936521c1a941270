"""``memtrain``: the one console script. Parsers live here; each stage's code is imported lazily.

Every subcommand takes ``--config FILE.yaml`` plus ``--set a.b=c`` overrides where it reads the
experiment config, and turns a ``UserError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from pipeline import __version__
from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_DESCRIPTION = """\
Train with DeepSpeed. One process is one rank: under torchrun, the deepspeed launcher, srun or mpirun
each command is one rank; --nproc N starts N local ranks itself.

Auto-resume: when train.output_dir holds a checkpoint, training continues from the latest complete
one (weights, optimizer, RNG, data position and the MLflow run), on another world size too.

SIGUSR2 or SIGTERM (e.g. sbatch --signal=USR2@300, scontrol requeue): every rank saves a checkpoint
at the next step boundary and the command exits with code 85, which slurm/train.sbatch turns into a
requeue. Exit codes: 0 done, 2 a configuration or input error (one line on stderr), 85 preempted
(checkpoint saved, requeue me), 1 anything else."""
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

# subcommand -> "module:function"; the function takes the parsed args and returns an exit code.
HANDLERS = {
    "prep": "pipeline.prep:run_prep",
    "prep-merge": "pipeline.prep:run_merge",
    "train": "pipeline.train:run_train",
    "eval": "pipeline.evaluate:run_eval",
    "export": "pipeline.export:run_export",
    "submit": "pipeline.submit:run_submit",
    "demo": "pipeline.demo:run_demo",
}


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    parser.add_argument("--config", required=required and default is None, default=default,
                        metavar="FILE.yaml", help="experiment config (YAML)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-4 memory.kind=rmt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtrain", description="Train memory-augmented decoders (RMT, ARMT) on long books with DeepSpeed.")
    # the deepspeed launcher puts --local_rank=N before the subcommand; ranks are read from LOCAL_RANK/RANK
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"memtrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = commands.add_parser(
        "prep", help="books -> tokenizer -> sample shards",
        description="Books -> tokenizer -> sample shards in data.output_dir. In a SLURM job array every task "
                    "runs the same command with --shard-index $SLURM_ARRAY_TASK_ID --num-shards "
                    "$SLURM_ARRAY_TASK_COUNT: task 0 plans (reads every book once) and trains the tokenizer "
                    "(unless data.tokenizer is set), the other tasks wait for its plan.json (data.plan_wait_s), "
                    "each task writes its share of the shards; then `memtrain prep merge DIR` writes manifest.json.")
    prep_actions = prep.add_subparsers(dest="prep_action", metavar="merge")
    add_config_arguments(prep, required=False)
    prep.add_argument("--shard-index", type=int, default=None, help="this task's slice of the books (SLURM array)")
    prep.add_argument("--num-shards", type=int, default=None, help="how many slices the books are split into")
    merge = prep_actions.add_parser("merge", help="write the final manifest after a prep job array")
    merge.add_argument("dir", help="data.output_dir of the array")

    train = commands.add_parser("train", help="train with DeepSpeed (resumes from the latest checkpoint)",
                                description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(train)
    train.add_argument("--nproc", type=int, default=1, help="start N local ranks with torchrun")

    evaluate = commands.add_parser("eval", help="per-segment perplexity (or BABILong accuracy) of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="train.output_dir or one checkpoint folder in it")
    evaluate.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON")
    evaluate.add_argument("--task", choices=["ppl", "babilong"], default="ppl",
                          help="ppl: per-segment perplexity; babilong: QA accuracy against context length")
    evaluate.add_argument("--nproc", type=int, default=1,
                          help="evaluate on N local ZeRO-3 ranks (torchrun), built and loaded as training's are")
    add_config_arguments(evaluate, required=False)

    export = commands.add_parser("export", help="checkpoint -> Hugging Face folder (and Hub)")
    export.add_argument("--checkpoint", required=True, help="train.output_dir (its latest checkpoint) or one checkpoint folder")
    export.add_argument("--out", required=True, metavar="DIR", help="the Hugging Face folder to write")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="weights dtype (default: export.dtype)")
    export.add_argument("--lora", choices=["merged", "adapter"], default=None,
                        help="a model.lora run: adapters merged in, or beside the base in adapter/ (default: export.lora)")
    export.add_argument("--push", default=None, metavar="REPO_ID", help="upload to the Hugging Face Hub")
    export.add_argument("--revision", default=None, metavar="BRANCH", help="Hub branch to push to (default: main)")
    export.add_argument("--private", action="store_true", help="create the Hub repository private")
    export.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    export.add_argument("--all-checkpoints", action="store_true",
                        help="export every checkpoint of the run into OUT/step_XXXXXXXX; with --push, each to its own "
                             "Hub branch step-N (as HF's hub_strategy=all_checkpoints keeps every checkpoint)")

    submit = commands.add_parser("submit", help="render the slurm/ templates and sbatch them")
    add_config_arguments(submit)
    submit.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    submit.add_argument("--what", choices=["train", "prep", "all"], default="train",
                        help="the training job, the prep array (+ merge), or prep then train (default: train)")

    demo = commands.add_parser("demo", help="the whole pipeline on the built-in synthetic books")
    add_config_arguments(demo, default=str(DEMO_CONFIG))
    return parser


def resolve_handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    name = "prep-merge" if getattr(args, "prep_action", None) == "merge" else args.command
    module_name, func_name = HANDLERS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "prep" and args.prep_action is None and args.config is None:
        parser.error("memtrain prep needs --config FILE.yaml (or: memtrain prep merge DIR)")
    try:
        return int(resolve_handler(args)(args) or 0)
    except UserError as err:
        if not err.every_rank or os.environ.get("RANK", "0") == "0":
            print(f"memtrain {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"memtrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"memtrain {args.command}: error: no space left on the device{where}; what was complete before "
              "(checkpoints, shards, an earlier export) is untouched: free space and run it again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
