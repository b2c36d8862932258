"""services/bank_server/healthcheck.py against real bank servers (the Docker HEALTHCHECK)."""
from __future__ import annotations

import os
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


def probe_env(**settings: str) -> dict:
    """The container's environment: only the MEMBANK_SERVER_* given (as the server sees it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMBANK_SERVER_")}
    return {**env, **{f"MEMBANK_SERVER_{k.upper()}": v for k, v in settings.items()}}


def test_defaults_come_from_the_server_settings(bank_server):
    port = bank_server.rsplit(":", 1)[1]
    # the container's server listens on every address: the probe asks 127.0.0.1 on its port
    r = subprocess.run([sys.executable, "-m", "services.bank_server.healthcheck"], cwd=REPO,
                       capture_output=True, text=True, timeout=30,
                       env=probe_env(host="0.0.0.0", port=port))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "services.bank_server.healthcheck"], cwd=REPO,
                       capture_output=True, text=True, timeout=30,
                       env=probe_env(port="not-a-port"))
    assert r.returncode == 1 and r.stderr.startswith("healthcheck: bad MEMBANK_SERVER_* settings")


def test_tls_server_probed_over_tls_from_its_settings(lmdb_dir, start_bank_server, tmp_path):
    from tests.integration.test_api import self_signed
    cert, key = self_signed(tmp_path)
    with start_bank_server(lmdb_dir, "--tls-cert", str(cert), "--tls-key", str(key)) as (addr, _):
        port = addr.rsplit(":", 1)[1]
        env = probe_env(port=port, tls_cert=str(cert), tls_key=str(key))
        run = lambda *a: subprocess.run(  # noqa: E731
            [sys.executable, "-m", "services.bank_server.healthcheck", *a], cwd=REPO,
            capture_output=True, text=True, timeout=30, env=env)
        r = run()
        assert r.returncode == 0, r.stderr
        assert run("--tls-ca", str(cert), "--tls-server-name", "localhost").returncode == 0
        r = run("--no-tls", "--timeout", "1")            # plaintext to a TLS port: refused
        assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
        ok, reason = healthcheck.check(addr, timeout_s=1.0)   # the library: plaintext, no
        assert not ok
        ok, reason = healthcheck.check(addr, tls_ca=cert.read_bytes())
        assert ok, reason
