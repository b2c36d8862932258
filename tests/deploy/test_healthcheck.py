"""services/bank_server/healthcheck.py against real bank servers (the Docker HEALTHCHECK)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.bank_server import healthcheck

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def run_probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.bank_server.healthcheck", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


def test_serving_server_exits_0(bank_server):
    assert run_probe("--addr", bank_server).returncode == 0
    # the whole-server status ("") is SERVING too
    assert run_probe("--addr", bank_server, "--service", "").returncode == 0


def test_unknown_service_exits_1(bank_server):
    ok, reason = healthcheck.check(bank_server, "no.such.Service")
    assert not ok and "NOT_FOUND" in reason
    r = run_probe("--addr", bank_server, "--service", "no.such.Service")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_nothing_listening_exits_1_within_timeout(free_port):
    start = time.monotonic()
    r = run_probe("--addr", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
    assert time.monotonic() - start < 20   # interpreter start-up + a 1 s deadline


def test_stopped_server_exits_1(lmdb_dir, start_bank_server):
    with start_bank_server(lmdb_dir) as (address, proc):
        assert healthcheck.check(address) == (True, "SERVING")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        ok, _ = healthcheck.check(address, timeout_s=1.0)
        assert not ok
