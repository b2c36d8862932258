"""A shard whose data plane runs in worker processes (--workers, services/bank_server/workers.py),
against real server subprocesses:

  the same verified bytes as gRPC, from every worker; metrics of all workers in one /metrics
  and /v1/stats; per-client connection caps and request / byte budgets hold for the shard as a
  whole (a per-process count would admit more); a killed worker is started again and the data
  plane keeps serving; a second server cannot take the port; SIGTERM drains and leaves no
  worker and no shared files behind.

Run: .venv/bin/python -m pytest -q tests/integration/test_shard_workers.py
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.model_client.bank_client import BankClient, BankError
from services.model_client.dataplane_client import DataPlaneClient, dataplane_target
from tests.conftest import run_bank_server
from tests.integration.test_api import self_signed
from tests.integration.test_dataplane_limits import (
    attacker_socket,
    dp_addr,
    read_answer,
    request_frame,
)

pytestmark = pytest.mark.integration

WORKERS = ("--dataplane-port", "0", "--workers", "2")


def children(pid: int) -> list[int]:
    """The server's worker processes (its child processes)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout.split()
    return sorted(int(x) for x in out)


def stats(proc) -> dict:
    with urllib.request.urlopen(f"http://{proc.admin_address}/v1/stats", timeout=5) as r:
        return json.loads(r.read())


def metric(proc, line_start: str) -> float:
    with urllib.request.urlopen(f"http://{proc.admin_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line_start)]
    assert len(values) == 1, (line_start, values)
    return values[0]


def refused_at_once(sock) -> dict | None:
    """The error frame a refused connection gets at once; None when it was accepted (silent)."""
    if not select.select([sock], [], [], 0.5)[0]:
        return None
    _, end = read_answer(sock)
    return end[1]


def test_every_worker_serves_the_same_verified_bytes_and_metrics_add_up(lmdb_dir, tmp_path):
    with run_bank_server(lmdb_dir, *WORKERS, "--metrics-min-interval-s", "0",
                         log_path=tmp_path / "log") as (address, proc):
        assert len(children(proc.pid)) == 2
        target = dataplane_target(address, proc.dataplane_address)
        with BankClient(address) as g:
            m = g.get_manifest("big")
            ids = list(m.blocks())
            want = {k: bytes(v) for k, v in g.fetch("big", "", ids, m).items()}
        # a new connection per fetch: the kernel spreads them over the workers
        n = 12
        for _ in range(n):
            with DataPlaneClient(target, timeout_s=10) as c:
                got = c.fetch("big", "", ids, m)
                assert {k: bytes(v) for k, v in got.items()} == want
        s = stats(proc)
        assert s["rpcs"]["DataPlaneFetch"]["OK"] == n
        assert s["rpcs"]["FetchBlocks"]["OK"] == 1             # the server process's own
        level1 = sum(1 for lv, _ in ids if lv == 1)
        assert s["fetch_by_level"]["1"]["blocks"] == (n + 1) * level1
        assert s["fetch_by_level"]["1"]["p50_ms"] > 0
        assert metric(proc, 'membank_rpc_total{code="OK",method="DataPlaneFetch"}') == n
        assert metric(proc, "membank_rpc_in_flight ") == 0


def test_connection_caps_hold_for_the_shard_as_a_whole(lmdb_dir, tmp_path):
    """Cap 3 per client and 5 in all, two workers: exactly 3 of 8 connections from one address
    are kept (per worker, up to 6 could be), and a second address gets the other 2."""
    with run_bank_server(lmdb_dir, *WORKERS, "--dataplane-max-connections-per-peer", "3",
                         "--dataplane-max-connections", "5", "--no-admin",
                         log_path=tmp_path / "log") as (_, proc):
        addr = dp_addr(proc)
        socks = [attacker_socket(addr) for _ in range(8)]
        answers = [refused_at_once(s) for s in socks]
        kept = [s for s, a in zip(socks, answers) if a is None]
        refusals = [a for a in answers if a is not None]
        assert len(kept) == 3
        assert all(a["code"] == "RESOURCE_EXHAUSTED" and "per client" in a["message"]
                   for a in refusals)
        others = []
        for _ in range(3):
            s = socket.create_connection(addr, timeout=10)
            others.append((s, refused_at_once(s)))
        assert [a is None for _, a in others] == [True, True, False]
        assert "limit 5" in others[2][1]["message"]
        for s in socks + [s for s, _ in others]:
            s.close()


def test_request_budget_is_one_per_client_across_workers_and_grpc(lmdb_dir, tmp_path):
    """A burst of 4 requests per client (no refill to speak of): 4 admitted in all, over new
    connections (spread over both workers) and gRPC together."""
    with run_bank_server(lmdb_dir, *WORKERS, "--rate-limit-rps", "0.001", "--rate-limit-burst",
                         "4", "--no-admin", log_path=tmp_path / "log") as (address, proc):
        addr = dp_addr(proc)
        codes = []
        for _ in range(5):
            with attacker_socket(addr) as s:
                s.sendall(request_frame({"bank": "test", "blocks": [[1, 0]]}))
                blocks, end = read_answer(s)
                codes.append("OK" if blocks else end[1]["code"])
        assert codes == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"]
        # 127.0.0.1 has its own budget: 4 more, the first over gRPC
        with BankClient(address) as g:
            m = g.get_manifest("test")          # 1
        target = dataplane_target(address, proc.dataplane_address)
        ok = 0
        for _ in range(4):
            try:
                with DataPlaneClient(target, timeout_s=10) as c:
                    c.fetch("test", "v1", [(1, 0)], m)
                    ok += 1
            except Exception as e:              # noqa: BLE001 - counted below
                assert "rate limit" in str(e)
        assert ok == 3


def test_a_killed_worker_is_replaced_and_the_port_stays_served(lmdb_dir, tmp_path):
    with run_bank_server(lmdb_dir, *WORKERS, "--no-admin",
                         log_path=tmp_path / "log") as (address, proc):
        before = children(proc.pid)
        os.kill(before[0], signal.SIGKILL)
        target = dataplane_target(address, proc.dataplane_address)
        with BankClient(address) as g:
            m = g.get_manifest("test")
        for _ in range(6):            # the other worker answers meanwhile
            with DataPlaneClient(target, timeout_s=10) as c:
                assert len(c.fetch("test", "v1", [(1, 0)], m)) == 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = children(proc.pid)
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2 and before[0] not in now and before[1] in now
        assert "starting it again" in (tmp_path / "log").read_text()


def test_second_server_cannot_take_the_port_and_sigterm_leaves_nothing(lmdb_dir, tmp_path):
    with run_bank_server(lmdb_dir, *WORKERS, "--no-admin",
                         log_path=tmp_path / "log") as (address, proc):
        port = dp_addr(proc)[1]
        workers = children(proc.pid)
        second = subprocess.run(
            [sys.executable, "-m", "services.bank_server.server", "--lmdb", str(lmdb_dir),
             "--port", "0", "--no-admin", "--dataplane-port", str(port), "--workers", "2"],
            capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "could not bind the data plane port" in second.stderr
        room = next(a for a in (Path(f"/proc/{workers[0]}/cmdline").read_bytes().split(b"\0"))
                    if b"membank-shard-" in a).decode()
        assert Path(room).is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/status").read_text().find("zombie") >= 0
        assert not Path(room).exists()


def test_workers_serve_with_the_servers_tls_and_tokens(lmdb_dir, tmp_path):
    """Settings reach the workers whole (tokens included, never on a command line)."""
    cert, key = self_signed(tmp_path)
    (tmp_path / "read").write_text("r-token")
    with run_bank_server(lmdb_dir, *WORKERS, "--tls-cert", str(cert), "--tls-key", str(key),
                         "--auth-token-file", str(tmp_path / "read"), "--no-admin",
                         log_path=tmp_path / "log") as (address, proc):
        for pid in children(proc.pid):
            assert b"r-token" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        target = f"localhost:{address.rsplit(':', 1)[1]}+{dp_addr(proc)[1]}"
        for _ in range(4):                      # new connections: both workers answer
            with DataPlaneClient(target, tls_ca=cert, token="r-token") as c:
                m = c.get_manifest("test")
                assert len(c.fetch("test", "v1", list(m.blocks()), m)) == len(list(m.blocks()))
            with DataPlaneClient(target, tls_ca=cert, token="wrong") as c, \
                    pytest.raises(BankError) as e:
                c.fetch("test", "v1", [(1, 0)], m)
            assert e.value.code == "PERMISSION_DENIED"
