"""Blocks by content address over HTTP (the bank server's /v1/blocks) and a real nginx cache in
front of it (deploy/edge/nginx.conf), used by devices through EdgeBank: immutable caching
headers, 304s, one upstream request per block for many devices, a tampered cache entry and a
dead cache never reaching the model.

Run: .venv/bin/python -m pytest -q tests/integration/test_edge_cache.py
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from membank.artifacts import iter_blocks, load_manifest
from services.model_client.bank_client import BankClient
from services.model_client.edge import EdgeBank
from testkit.edge import run_nginx
from testkit.net import free_port

pytestmark = pytest.mark.integration


def get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


@pytest.fixture
def served(lmdb_dir, start_bank_server, tiny_export):
    with start_bank_server(lmdb_dir, "--metrics-min-interval-s", "0") as (address, proc):
        with BankClient(address) as c:
            m = c.get_manifest("test")
        blocks = {(l, n): bytes(d) for l, n, d in iter_blocks(tiny_export, load_manifest(
            tiny_export))}
        yield address, proc.admin_address, m, blocks


def http_bytes_sent(admin: str) -> int:
    """Block bytes the bank server sent over HTTP (its /metrics, level "http")."""
    text = get(f"http://{admin}/metrics")[1].decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith('membank_block_bytes_sent_total{level="http"}'))


def test_a_block_by_content_address_is_immutable_and_checked(served):
    _, admin, m, blocks = served
    content = m.content_id(2, 1)
    url = f"http://{admin}/v1/blocks/test/{content}"
    status, body, headers = get(url)
    assert status == 200 and body == blocks[(2, 1)]
    assert headers["cache-control"] == "public, max-age=31536000, immutable"
    assert headers["etag"] == f'"{content}"'
    assert get(url, {"If-None-Match": f'"{content}"'})[0] == 304
    for bad, code in ((f"http://{admin}/v1/blocks/test/{'0' * 64}", 400),        # no algo
                      (f"http://{admin}/v1/blocks/-x/{content}", 400),            # not a name
                      (f"http://{admin}/v1/blocks/test/blake3-{'0' * 64}", 404),
                      (f"http://{admin}/v1/blocks/big/{content}", 404)):          # other bank
        status, body, _ = get(bad)
        assert status == code and "\n" not in json.loads(body)["detail"]


def test_a_read_token_guards_blocks_too(lmdb_dir, start_bank_server, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-read-token")
    with start_bank_server(lmdb_dir, "--auth-token-file", str(token)) as (address, proc):
        url = f"http://{proc.admin_address}/v1/blocks/test/blake3-{'0' * 64}"
        assert get(url)[0] == 401
        assert get(url, {"Authorization": "Bearer s3cret-read-token"})[0] == 404


def test_devices_behind_nginx_cost_the_bank_one_copy(served, tmp_path):
    address, admin, m, blocks = served
    path = m.path_blocks([1, 0])
    with run_nginx([admin], tmp_path) as edge:
        devices = [EdgeBank(BankClient(address), edge.url) for _ in range(5)]
        for d in devices:
            got = d.fetch("test", m.version, path, m)
            assert {b: bytes(v) for b, v in got.items()} == {b: blocks[b] for b in path}
            assert d.stats["edge_blocks"] == len(path) and d.stats["fallback_blocks"] == 0
        # the bank sent each block once; nginx served the other four devices itself
        assert http_bytes_sent(admin) == sum(len(blocks[b]) for b in path)
        log = edge.access_log()
        assert [c for _, c, _ in log].count("MISS") == len(path)
        assert [c for _, c, _ in log].count("HIT") == 4 * len(path)
        # a tampered cache entry: caught by the digest, fetched from the bank instead
        for f in edge.cache_dir.rglob("*"):
            if f.is_file():
                raw = bytearray(f.read_bytes())
                raw[-1] ^= 0xFF                   # the body's last byte
                f.write_bytes(bytes(raw))
        fresh = EdgeBank(BankClient(address), edge.url)
        got = fresh.fetch("test", m.version, path, m)
        assert {b: bytes(v) for b, v in got.items()} == {b: blocks[b] for b in path}
        assert fresh.stats["fallback_blocks"] == len(path) and fresh.stats["edge_blocks"] == 0
        for d in [*devices, fresh]:
            d.close()
    # the cache is gone: every block from the bank, none lost
    dead = EdgeBank(BankClient(address), f"http://127.0.0.1:{free_port()}", timeout_s=2)
    got = dead.fetch("test", m.version, path, m)
    assert {b: bytes(v) for b, v in got.items()} == {b: blocks[b] for b in path}
    assert dead.stats == {"edge_blocks": 0, "edge_bytes": 0, "fallback_blocks": len(path)}
    dead.close()


def test_edge_bank_receives_into_the_callers_buffers(served, tmp_path):
    address, admin, m, blocks = served
    b = m.path_blocks([0, 1])[1]
    with run_nginx([admin], tmp_path) as edge:
        bank = EdgeBank(BankClient(address), edge.url)
        buf = bytearray(m.block_nbytes(b[0]))
        got = bank.fetch("test", m.version, [b], m, out={b: buf})
        assert got[b] is buf and bytes(buf) == blocks[b]
        bank.close()


def test_the_config_template_renders_every_placeholder(tmp_path):
    from testkit.edge import render
    text = render(prefix=tmp_path, cache_dir=tmp_path / "c", listen="127.0.0.1:1",
                  upstreams=["10.0.0.1:8081", "10.0.0.2:8081"], token="t")
    assert "@" not in text
    assert "server 10.0.0.2:8081;" in text and 'Authorization "Bearer t"' in text
    assert Path(tmp_path / "c").name in text


@pytest.mark.slow
def test_edge_cache_benchmark_smoke(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO
    out = subprocess.run([sys.executable, "-m", "benchmarks.edge_cache", "--devices", "6",
                          "--prompts", "4", "--concurrency", "3", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    direct, edge = report["direct"], report["edge"]
    assert direct["prompts"] == edge["prompts"] == 24
    # behind the cache the bank sends each block once: its misses, never more than direct
    assert 0 < edge["bank_egress_bytes"] <= direct["bank_egress_bytes"]
    assert edge["nginx_misses"] > 0 and edge["nginx_hits"] + edge["nginx_misses"] > 0
    assert (tmp_path / "edge_cache.png").stat().st_size > 0


class _Recorder:
    """A local HTTP server that answers 404 to everything and records each request's
    Authorization header; `hang`: accept and never answer."""

    def __init__(self, hang: bool = False):
        import http.server
        import threading
        seen = self.auth = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.headers.get("Authorization"))
                if hang:
                    import time
                    time.sleep(5)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_edge_bank_sends_a_token_only_where_it_is_safe_and_skips_a_hung_cache(served):
    address, _, m, blocks = served
    path = m.path_blocks([1, 1])
    rec = _Recorder()
    try:
        for insecure, want in ((False, None), (True, "Bearer t0k")):
            bank = EdgeBank(BankClient(address), rec.url, token="t0k",
                            allow_insecure_token=insecure)
            got = bank.fetch("test", m.version, path, m)            # 404s: from the bank
            assert {b: bytes(v) for b, v in got.items()} == {b: blocks[b] for b in path}
            assert rec.auth[-1] == want                             # plaintext: no token
            bank.close()
    finally:
        rec.close()
    hung = _Recorder(hang=True)
    try:
        bank = EdgeBank(BankClient(address), hung.url, timeout_s=0.5, retry_after_s=60)
        got = bank.fetch("test", m.version, path, m)
        assert {b: bytes(v) for b, v in got.items()} == {b: blocks[b] for b in path}
        assert len(hung.auth) == 1                 # one timeout, then the bank for the rest
        bank.fetch("test", m.version, path, m)
        assert len(hung.auth) == 1 and bank.stats["fallback_blocks"] == 2 * len(path)
        bank.close()
    finally:
        hung.close()
    # a version stored by version has no content address a cache could serve: the bank
    versioned = m.model_copy(update={"block_store": "version"})
    never = EdgeBank(BankClient(address), f"http://127.0.0.1:{free_port()}")
    never.fetch("test", m.version, path[:1], versioned)
    assert never.stats["fallback_blocks"] == 1 and never._skip_until == 0.0
    never.close()
