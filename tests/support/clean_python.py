"""The one way tests load an export without the project: a fresh interpreter that cannot import it.

``run_without_project(code, *args, tmp=...)`` runs ``code`` (Python source; a script file's text)
with ``python -S``: site.py is skipped, so the .pth file of memtrain's editable install never puts
the repository on sys.path, and PYTHONPATH holds only site-packages (transformers, torch, ...).
The working directory is ``tmp`` (not the repository), Hugging Face caches live under it, the Hub
is offline, and stdin is closed so transformers' "run custom code? [y/N]" prompt gets EOF (= no).
The child prints one JSON object on its last stdout line; that object is returned. The child
should report whether ``import pipeline`` failed, so the test can assert it did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any


def clean_env(tmp: Path) -> dict[str, str]:
    """An environment whose python sees site-packages but not this project (nor its editable install)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "DS_"))}
    env.update(PYTHONPATH=sysconfig.get_paths()["purelib"], HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return env


def run_without_project(code: str, *args: str, tmp: Path, timeout: float = 600) -> Any:
    proc = subprocess.run([sys.executable, "-S", "-c", code, *args], cwd=tmp, capture_output=True, text=True,
                          env=clean_env(tmp), stdin=subprocess.DEVNULL, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
