"""One real ``mlflow server`` on 127.0.0.1 for the whole test session (SQLite backend, proxied artifacts).

Tests may kill it and start it again (same database, same port) to play a server that goes away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ports import free_ports

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


class MlflowServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_ports()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> None:
        """Start it and wait for /health (~6 s on an idle 2-core machine; minutes when it is shared)."""
        log_path = self.root / "server.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log = log_path.open("a")
        # a session of its own, so kill() can end the server and the workers it forks by its PID
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log_path.read_text()[offset:][-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"mlflow server not ready after {timeout_s} s")

    def kill(self) -> None:
        """End the server and the workers it forked (its session), also after the server itself exited."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None


@pytest.fixture
def unused_port() -> int:
    return free_ports()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mlflow_server")
    server = MlflowServer(root)
    server.start()
    yield server
    server.kill()
