"""The admin HTTP API under hostile peers (issue 16, point 4): a real bank server subprocess (or,
for /metrics, a real uvicorn on a real socket in this process); the attacker connects from
127.0.0.2 and the honest client from 127.0.0.1, because the limits are per peer.

Run: .venv/bin/python -m pytest -q tests/integration/test_admin_limits.py
"""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from services.bank_server.admin import AdminServer, bind, create_app
from services.bank_server.metrics import ServerMetrics
from services.bank_server.readiness import Readiness
from tests.conftest import run_bank_server

pytestmark = pytest.mark.integration

READ_TOKEN, ADMIN_TOKEN = "read-token-123", "admin-token-456"
ATTACKER, HONEST = "127.0.0.2", "127.0.0.1"


def request(admin: str, path: str, *, method: str = "GET", body: bytes | None = None,
            token: str | None = None, source: str = HONEST,
            headers: dict | None = None) -> tuple[int, bytes, dict]:
    """(status, body, headers) of one request from `source`."""
    host, port = admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if body is not None:
            h.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def connect(admin: str, source: str = ATTACKER) -> socket.socket:
    host, port = admin.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    return s


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` s pass)."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def write_tokens(tmp: Path) -> list[str]:
    (tmp / "read.token").write_text(READ_TOKEN)
    (tmp / "admin.token").write_text(ADMIN_TOKEN)
    return ["--auth-token-file", str(tmp / "read.token"),
            "--admin-token-file", str(tmp / "admin.token")]


@pytest.fixture(scope="module")
def secured(lmdb_dir, tmp_path_factory):
    """A server with read and admin tokens and small, test-sized limits: admin address."""
    tmp = tmp_path_factory.mktemp("admin_limits")
    flags = [*write_tokens(tmp), "--admin-max-connections-per-peer", "4",
             "--admin-request-timeout-s", "1", "--admin-max-body-bytes", "2048",
             "--admin-auth-fail-rps", "0.01", "--admin-auth-fail-burst", "5"]
    with run_bank_server(lmdb_dir, *flags, log_path=tmp / "server.log") as (_, proc):
        deadline = time.monotonic() + 20
        while (request(proc.admin_address, "/readyz")[0] != 200
               and time.monotonic() < deadline):
            time.sleep(0.05)
        yield proc.admin_address


def test_publish_refuses_without_a_token_before_reading_the_body(secured):
    # bad JSON and no token: 401 (FastAPI would have parsed the body first and said 422)
    assert request(secured, "/v1/publish", method="POST", body=b'{"bank": ',
                   source="127.0.0.3")[0] == 401
    # a 100 MB body declared, 5 bytes sent: the 401 comes at once, the rest is never awaited
    with connect(secured, source="127.0.0.3") as s:
        s.sendall(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n{\"ban")
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 401") and b"connection: close" in answer.lower()


def test_a_body_over_the_cap_is_413_and_read_no_further(secured):
    with connect(secured, source=HONEST) as s:   # declared too big: refused before any byte
        s.sendall(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + ADMIN_TOKEN.encode() +
                  b"\r\nContent-Length: 100000000\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 413")
    with connect(secured, source=HONEST) as s:   # chunked, no length: cut at the cap
        s.sendall(b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + ADMIN_TOKEN.encode() +
                  b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.sendall(b"1000\r\n" + b" " * 4096 + b"\r\n")
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 413") and b"over 2048 bytes" in answer
    # within the cap, the body is parsed as before
    status, raw, _ = request(secured, "/v1/publish", method="POST", body=b'{"bank": "test"}',
                             token=ADMIN_TOKEN)
    assert status == 422 and "version" in json.loads(raw)["detail"][0]["loc"]


def test_failed_tokens_are_rate_limited_per_peer(secured):
    codes = [request(secured, "/v1/manifest/test", token=f"guess-{i}", source=ATTACKER)[0]
             for i in range(8)]
    assert codes[:5] == [403] * 5 and set(codes[5:]) == {429}
    status, raw, headers = request(secured, "/v1/manifest/test", token=READ_TOKEN,
                                   source=ATTACKER)
    assert status == 429 and int(headers["retry-after"]) >= 1   # even the right token: no oracle
    assert "too many failed authentications" in json.loads(raw)["detail"]
    # the honest peer is not affected
    assert request(secured, "/v1/manifest/test", token=READ_TOKEN, source=HONEST)[0] == 200
    assert request(secured, "/healthz", source=ATTACKER)[0] == 200     # open routes stay open


def test_readyz_without_a_token_says_only_ready(secured):
    status, raw, _ = request(secured, "/readyz", source="127.0.0.4")
    assert status == 200 and json.loads(raw) == {"ready": True}
    status, raw, _ = request(secured, "/readyz", token=READ_TOKEN, source="127.0.0.4")
    detail = json.loads(raw)
    assert status == 200 and detail["banks"] == {"test": "v1", "big": "b1"}
    assert request(secured, "/readyz", token="wrong", source="127.0.0.4")[0] == 403


def test_slow_and_piled_up_connections_are_bounded_per_peer(secured):
    # the attacker opens its 4 allowed connections and sends a request head a byte at a time
    held = [connect(secured) for _ in range(4)]
    try:
        for s in held:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.2)   # let the server register them before the fifth arrives
        with connect(secured) as fifth:   # one more from the same peer: 503 at once
            answer = read_all(fifth)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
        # meanwhile the honest peer is served
        assert request(secured, "/healthz", source=HONEST)[0] == 200
        assert request(secured, "/v1/manifest/test", token=READ_TOKEN)[0] == 200
        # and each slow request is cut off (408) once its time is up, however it trickles
        for s in held:
            s.sendall(b"H")
        answers = [read_all(s) for s in held]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    finally:
        for s in held:
            s.close()
    assert request(secured, "/healthz", source=ATTACKER)[0] == 200   # its slots came back


# -- /metrics off the event loop (in this process: a tier whose stats block on demand) ---------
class SlowTier:
    """A storage tier whose stats() blocks until released, like mincore over a big file or a
    Redis INFO to a slow Redis."""

    def __init__(self):
        self.release, self.calls = threading.Event(), 0

    def stats(self) -> dict:
        self.calls += 1
        self.release.wait(30)
        return {"tier": "slow", "hits": 1}


class NoBanks:
    def banks(self):
        return []


@pytest.fixture
def slow_metrics_server():
    tier = SlowTier()
    app = create_app(store=NoBanks(), metrics=ServerMetrics(tier_sources=lambda: [tier]),
                     readiness=Readiness(NoBanks(), None), publish=None,
                     metrics_min_interval_s=60)
    loop = asyncio.new_event_loop()
    sock = bind("127.0.0.1", 0)
    server = AdminServer(app)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(sock), loop).result(10)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}", tier
    finally:
        tier.release.set()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_metrics_collection_never_blocks_the_event_loop(slow_metrics_server):
    admin, tier = slow_metrics_server
    scrapes: list[bytes] = []

    def scrape() -> None:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=30) as r:
            scrapes.append(r.read())

    first = [threading.Thread(target=scrape) for _ in range(3)]
    for t in first:
        t.start()
    deadline = time.monotonic() + 10
    while tier.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tier.calls == 1
    # a collection is stuck in the tier; the loop still answers
    assert request(admin, "/healthz")[0] == 200
    tier.release.set()
    for t in first:
        t.join(30)
    for _ in range(3):   # within the minimum interval: the same collection again
        scrape()
    assert len(scrapes) == 6 and all(b'membank_tier_hits{tier="slow"} 1.0' in s for s in scrapes)
    assert tier.calls == 1   # three concurrent scrapes and three later ones: one collection
