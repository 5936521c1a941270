import subprocess
import sys

from pipeline.cli import build_parser


def test_every_subcommand_has_help() -> None:
    for command in ["prep", "train", "eval", "export", "submit", "demo"]:
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", command, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert out.startswith("usage: memtrain " + command)


def test_prep_merge_parses() -> None:
    args = build_parser().parse_args(["prep", "merge", "some/dir"])
    assert args.prep_action == "merge" and args.dir == "some/dir"


def test_user_error_is_one_line_and_exit_2(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "prep", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "config file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_flag_has_help_and_version_prints() -> None:
    import argparse

    from pipeline import __version__

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("memtrain", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, (name, action.option_strings)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"memtrain {__version__}"


def test_train_help_documents_resume_signals_and_exit_85() -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for words in ["Auto-resume", "SIGUSR2", "SIGTERM", "85", "srun", "mpirun"]:
        assert words in out, words
