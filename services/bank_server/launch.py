"""Start and stop bank server subprocesses: used by `make demo`, the tests and the local
cluster launcher (cluster.py). A development tool; production runs on docker-compose or
Kubernetes.

    with run_bank_server(Path("runs/demo/lmdb")) as (address, proc):
        ...  # address is "127.0.0.1:PORT", bound on a free port chosen by the kernel
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# the one line the server prints to stdout once bound (services/bank_server/server.py)
LISTENING = "membank bank_server listening on "
# printed before it when the admin HTTP server runs
ADMIN = "membank bank_server admin on "
# printed before it when the data plane runs (--dataplane-port)
DATAPLANE = "membank bank_server dataplane on "


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for processes that cannot take port 0,
    such as redis-server; the OS may reuse it, but rarely does at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM (graceful: in-flight fetches drain), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def run_bank_server(lmdb: Path, *extra: str, log_path: Path | None = None, timeout: float = 60.0,
                    cwd: Path | None = None):
    """Start `python -m services.bank_server.server` on port 0; yield (address, proc) once it
    listens; stop it on exit. Extra flags are passed through (e.g. "--redis-url", URL).
    The admin HTTP server gets a free port too: `proc.admin_address` ("host:port", None with
    --no-admin); so does the data plane when the flags ask for it ("--dataplane-port", "0"):
    `proc.dataplane_address` ("host:port", else None)."""
    cmd = [sys.executable, "-m", "services.bank_server.server", "--lmdb", str(lmdb), "--port", "0",
           "--admin-port", "0", *extra]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    # unbuffered pipe: a line read leaves nothing in a Python buffer that select() cannot see
    # (the server prints two lines at once)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=log, bufsize=0,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + timeout
        line = b""
        proc.admin_address = proc.dataplane_address = None
        while not line.startswith(LISTENING.encode()):
            if line.startswith(ADMIN.encode()):
                proc.admin_address = line.decode().strip()[len(ADMIN):]
            if line.startswith(DATAPLANE.encode()):
                proc.dataplane_address = line.decode().strip()[len(DATAPLANE):]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or proc.poll() is not None:
                raise RuntimeError(f"bank server did not start (exit code {proc.poll()}); "
                                   f"log: {log_path}")
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if ready:
                line = proc.stdout.readline()
        yield line.decode().strip()[len(LISTENING):], proc
    finally:
        stop(proc)
        proc.stdout.close()
        if log_path:
            log.close()
