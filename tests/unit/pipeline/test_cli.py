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
