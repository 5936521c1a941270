"""Free TCP ports for the servers tests start (mlflow server, slurmctld, slurmd), race-free under xdist.

A port found with ``bind(("127.0.0.1", 0))`` and closed is bound again only seconds later, by the
server; meanwhile the kernel hands that same just-freed port to the next ``bind(0)`` caller, e.g. a
process of the other xdist worker. So these ports come from below the kernel's ephemeral range
(``ip_local_port_range``, which bind(0) never leaves) and below the range memtrain's srun ranks use
(``launch.PORT_BASE``), from a slice of their own per xdist worker.
"""

from __future__ import annotations

import os
import random
import socket

from pipeline.launch import PORT_BASE

FIRST_PORT = 10000
WORKER_SLICES = 4  # gw0..gw3 each draw from their own quarter; more workers share slices modulo 4


def _worker_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    width = (PORT_BASE - FIRST_PORT) // WORKER_SLICES
    start = FIRST_PORT + (int(worker) % WORKER_SLICES if worker.isdigit() else 0) * width
    return range(start, start + width)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1) -> int:
    """First of ``count`` consecutive ports that nothing on 127.0.0.1 is bound to now."""
    ports = _worker_slice()
    for _ in range(200):
        first = random.randrange(ports.start, ports.stop - count)
        if all(_bindable(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports in {ports}")
