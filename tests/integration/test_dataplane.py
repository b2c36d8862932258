"""The raw-TCP block data plane (services/bank_server/dataplane.py) of a real bank server
subprocess, driven by DataPlaneClient and by raw frames.

  same bytes as gRPC FetchBlocks, preallocated buffers, keep-alive connections, metrics
  every bad input of README's table that applies to it, as an error frame with gRPC's code
  auth, TLS, connection limit, slowloris / idle timeouts, stale pooled connections
  a corrupt block on disk -> DATA_LOSS, never sent; a block of another shard -> FAILED_PRECONDITION
  hypothesis: random requests and random bytes -> only documented codes, the server still serves
  ShardedFetcher over DataPlaneClient: failover to a replica, a hedge that wins
  SIGTERM: an in-flight fetch finishes whole, idle and new connections are closed

Run: .venv/bin/python -m pytest -q tests/integration/test_dataplane.py
"""
from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
import time
import urllib.request

import grpc
import lmdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from membank.artifacts import iter_blocks, load_manifest
from membank.dataplane import MAGIC, PREFIX
from services.bank_server.gc import gc
from services.bank_server.ingest import ingest
from services.model_client import dataplane_client
from services.model_client.bank_client import BankClient, BankError, BlockIntegrityError
from services.model_client.dataplane_client import (
    DataPlaneClient,
    dataplane_factory,
    dataplane_target,
)
from services.model_client.fetcher import FetchPolicy, ShardedFetcher
from testkit.exports import synthetic_export
from testkit.net import Relay
from tests.conftest import run_bank_server
from tests.integration.test_api import self_signed

pytestmark = pytest.mark.integration

C = grpc.StatusCode
# every code a data plane client may get for bad input (README "Bad input")
DOCUMENTED = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "DATA_LOSS",
              "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED", "DEADLINE_EXCEEDED"}
DP = ("--dataplane-port", "0")


# -- servers -----------------------------------------------------------------------------------
class Server:
    def __init__(self, address, proc):
        self.address, self.proc = address, proc
        self.dp = proc.dataplane_address                 # "host:port" of the data plane
        self.target = dataplane_target(address, self.dp)
        host, port = self.dp.rsplit(":", 1)
        self.dp_addr = (host, int(port))


def start(lmdb, log, *flags):
    return run_bank_server(lmdb, *DP, *flags, log_path=log)


@pytest.fixture(scope="module")
def server(lmdb_dir, tmp_path_factory):
    """The data plane over both test banks, short request timeout (the random bytes tests)."""
    log = tmp_path_factory.mktemp("dp") / "server.log"
    with start(lmdb_dir, log, "--dataplane-request-timeout-s", "2") as (address, proc):
        yield Server(address, proc)


@pytest.fixture(scope="module")
def exported(tiny_export, big_export):
    out = {}
    for bank, export in (("test", tiny_export), ("big", big_export)):
        m = load_manifest(export)
        out.update({(bank, l, n): bytes(d) for l, n, d in iter_blocks(export, m)})
    return out


@pytest.fixture
def client(server):
    with DataPlaneClient(server.target, timeout_s=10) as c:
        yield c


# -- raw frames ----------------------------------------------------------------------------------
def request_frame(payload, *, kind=b"Q", magic=MAGIC) -> bytes:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return PREFIX.pack(magic, kind, len(body)) + body


def recv_exact(sock, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), 1 << 20))
        if not part:
            return None
        buf += part
    return bytes(buf)


def read_answer(sock) -> tuple[list[tuple[dict, bytes]], tuple[str, dict] | None]:
    """Frames of one answer: ([(header, body) per block], ("E"|"X", payload) or None on EOF)."""
    blocks = []
    while True:
        head = recv_exact(sock, PREFIX.size)
        if head is None:
            return blocks, None
        magic, kind, n = PREFIX.unpack(head)
        assert magic == MAGIC and n <= 64 << 10, (magic, kind, n)
        payload = json.loads(recv_exact(sock, n))
        if kind == b"H":
            body = recv_exact(sock, payload["nbytes"])
            assert body is not None, "connection closed inside a block"
            blocks.append((payload, body))
            continue
        assert kind in (b"E", b"X"), kind
        return blocks, (kind.decode(), payload)


def exchange(server, payload, *, timeout=10.0, **kw):
    """One request on a fresh connection: (blocks, end) as read_answer."""
    with socket.create_connection(server.dp_addr, timeout=timeout) as s:
        s.sendall(request_frame(payload, **kw))
        return read_answer(s)


def error_of(answer) -> tuple[str, str]:
    blocks, end = answer
    assert end is not None and end[0] == "X", answer
    return end[1]["code"], end[1]["message"]


def stats(server_proc) -> dict:
    with urllib.request.urlopen(f"http://{server_proc.admin_address}/v1/stats", timeout=5) as r:
        return json.loads(r.read())


# -- the happy path ------------------------------------------------------------------------------
def test_fetch_equals_grpc_byte_for_byte(server, client, exported):
    with BankClient(server.address) as grpc_client:
        for bank in ("test", "big"):
            m = client.get_manifest(bank)
            ids = list(m.blocks())
            via_dp = client.fetch(bank, "", ids, m)
            via_grpc = grpc_client.fetch(bank, "", ids, m)
            assert list(via_dp) == ids
            assert {k: bytes(v) for k, v in via_dp.items()} == \
                {k: bytes(v) for k, v in via_grpc.items()} == \
                {(l, n): exported[(bank, l, n)] for l, n in ids}
    assert client.health()
    # counted in the server's metrics, beside the gRPC RPCs
    s = stats(server.proc)
    assert s["rpcs"]["DataPlaneFetch"]["OK"] >= 2
    assert s["fetch_by_level"]["1"]["bytes"] > 0


def test_preallocated_out_buffers_are_filled_and_returned(client, exported):
    m = client.get_manifest("big")
    n1, n3 = m.block_nbytes(1), m.block_nbytes(3)
    a, b = bytearray(n1), np.zeros(n3, dtype=np.uint8)
    out = {(1, 1): a, (3, 5): b}
    got = client.fetch("big", "b1", [(1, 1), (3, 5), (3, 2)], m, out=out)
    assert got[(1, 1)] is a and got[(3, 5)] is b            # the caller's own objects
    assert bytes(a) == exported[("big", 1, 1)] and b.tobytes() == exported[("big", 3, 5)]
    assert bytes(got[(3, 2)]) == exported[("big", 3, 2)]    # not in out: a new buffer
    for bad in (bytearray(n1 - 1), bytes(n1), memoryview(bytes(n1))):
        with pytest.raises(ValueError, match="writable"):
            client.fetch("big", "b1", [(1, 1)], m, out={(1, 1): bad})
    # nothing was sent for those: the connection is still good
    assert bytes(client.fetch("big", "b1", [(1, 0)], m)[(1, 0)]) == exported[("big", 1, 0)]


def test_piece_sizes_alone_and_busy_give_the_same_verified_bytes(client, exported, monkeypatch):
    """A block is received in small pieces while its fetch is alone in the process and in large
    ones while others run: tiny pieces (many per block, a piece boundary inside every block)
    and concurrent fetches both give the exact bytes, and the in-flight count returns to 0,
    also after a refused fetch."""
    monkeypatch.setattr(dataplane_client, "PIECE_ALONE", 4096 + 7)
    monkeypatch.setattr(dataplane_client, "PIECE_BUSY", 65536 + 3)
    m = client.get_manifest("big")
    ids = list(m.blocks())
    got = client.fetch("big", "b1", ids, m)
    assert all(bytes(got[k]) == exported[("big", *k)] for k in ids)
    errors, results = [], []

    def worker():
        with DataPlaneClient(client.target) as c:
            try:
                results.append(c.fetch("big", "b1", ids, m))
            except Exception as e:     # reported below
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert all(bytes(r[k]) == exported[("big", *k)] for r in results for k in ids)
    with pytest.raises(BankError):
        client.fetch("big", "no-such-version", [(1, 0)],
                     m.model_copy(update={"version": "no-such-version"}))
    assert dataplane_client._in_flight.value == 0


def test_many_requests_per_connection(server, client, exported):
    m = client.get_manifest("test")
    ports = set()
    for i in range(12):
        level, node = (1 + i % 2, i % 2)
        got = client.fetch("test", "v1", [(level, node)], m)
        assert bytes(got[(level, node)]) == exported[("test", level, node)]
        assert len(client._idle) == 1
        ports.add(client._idle[0].getsockname()[1])
    assert len(ports) == 1                                   # one connection, kept alive
    # raw: three requests in turn on one socket; a refused one is answered and then the
    # connection is closed (a refusal never keeps a connection: issue 16)
    with socket.create_connection(server.dp_addr, timeout=10) as s:
        for payload, code in (({"bank": "test", "blocks": [[2, 3], [1, 0]]}, None),
                              ({"bank": "big", "version": "b1", "blocks": [[3, 7]]}, None),
                              ({"bank": "test", "blocks": [[9, 0]]}, "INVALID_ARGUMENT")):
            s.sendall(request_frame(payload))
            blocks, end = read_answer(s)
            if code:
                assert end[0] == "X" and end[1]["code"] == code and not blocks
                assert s.recv(1) == b""
                continue
            assert end == ("E", {"blocks": len(payload["blocks"])})
            for (h, body), (level, node) in zip(blocks, payload["blocks"]):
                assert (h["level"], h["node"]) == (level, node)
                assert body == exported[(payload["bank"], level, node)]


def test_frames_in_pieces_back_to_back_or_large_are_read_whole(server, exported):
    """A request frame is read whole however it arrives: byte by byte, two frames in one send
    (answered in turn), or larger than the connection's first receive buffer (4 KiB)."""
    one = request_frame({"bank": "test", "blocks": [[1, 0]]})
    two = request_frame({"bank": "test", "blocks": [[2, 3]]})
    large = request_frame({"bank": "test", "blocks": [[1, 1]], "padding": "x" * 20_000})
    with socket.create_connection(server.dp_addr, timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(one)):
            s.sendall(one[i:i + 1])
            time.sleep(0.002)
        answers = [read_answer(s)]
        s.sendall(one + two)
        answers += [read_answer(s), read_answer(s)]
        s.sendall(large)
        answers.append(read_answer(s))
    for (blocks, end), (level, node) in zip(answers, [(1, 0), (1, 0), (2, 3), (1, 1)]):
        assert end == ("E", {"blocks": 1}), end
        assert (blocks[0][0]["level"], blocks[0][0]["node"]) == (level, node)
        assert blocks[0][1] == exported[("test", level, node)]


def test_a_huge_integer_deadline_means_no_deadline(server, exported):
    """JSON integers are unbounded: a 401-digit deadline_ms is clamped (it once overflowed the
    float conversion and answered INTERNAL)."""
    for deadline in (10 ** 400, -(10 ** 400)):
        blocks, end = exchange(server, {"bank": "test", "blocks": [[1, 0]],
                                        "deadline_ms": deadline})
        if deadline > 0:
            assert end == ("E", {"blocks": 1}) and blocks[0][1] == exported[("test", 1, 0)]
        else:
            assert error_of((blocks, end))[0] == "DEADLINE_EXCEEDED"


def test_a_publish_or_gc_by_another_writer_is_seen_by_the_next_request(lmdb_dir, tiny_export,
                                                                        tmp_path):
    """The data plane plans a request once and reuses the plan while the store is unchanged
    (dataplane._prepare): a version published, or collected, by another writer while a
    connection is open is what that connection's next request gets."""
    copy = tmp_path / "bank.lmdb"
    shutil.copytree(lmdb_dir, copy)
    m1 = load_manifest(tiny_export)
    export2 = tmp_path / "v2"
    m2 = synthetic_export(export2, bank="test", version="v2", dtype=m1.dtype, d_model=m1.d_model,
                          mem_layers=m1.mem_layers, branching=m1.branching, ranks=m1.ranks, seed=1)
    v2 = {(l, n): bytes(d) for l, n, d in iter_blocks(export2, m2)}
    v1 = exported_block(tiny_export, m1, 1, 0)
    assert v2[(1, 0)] != v1

    def ask(s, **fields):
        s.sendall(request_frame({"bank": "test", "blocks": [[1, 0]], **fields}))
        return read_answer(s)

    with start(copy, tmp_path / "log", "--no-admin") as (address, proc), \
            socket.create_connection(Server(address, proc).dp_addr, timeout=10) as s:
        for _ in range(2):                                   # planned, then reused
            blocks, end = ask(s)
            assert blocks[0][0]["version"] == "v1" and end[0] == "E"
            assert blocks[0][1] == v1
        assert ask(s, version="v1")[1][0] == "E"              # v1 by name, planned too
        ingest(export2, copy, progress=False, map_size=1 << 30)      # publishes v2
        blocks, end = ask(s)
        assert (blocks[0][0]["version"], end[0]) == ("v2", "E")
        assert blocks[0][1] == v2[(1, 0)]
        gc(copy, "test", keep=0, map_size=1 << 30)           # v1 collected
        assert ask(s)[0][0][1] == v2[(1, 0)]
        code, message = error_of(ask(s, version="v1"))       # (then the connection closes)
        assert code == "NOT_FOUND" and "unknown version 'v1'" in message


def exported_block(export, manifest, level: int, node: int) -> bytes:
    return next(bytes(d) for l, n, d in iter_blocks(export, manifest) if (l, n) == (level, node))


def test_cancel_from_another_thread_stops_the_fetch(server):
    relay = Relay(server.dp, stall_p=1.0, stall_s=0.2)      # ~64 KiB per 0.2 s: a long fetch
    calls = []
    try:
        with DataPlaneClient(f"{server.address}+{relay.address.rsplit(':', 1)[1]}",
                             timeout_s=60) as c:
            m = c.get_manifest("big")
            timer = threading.Timer(0.5, lambda: calls[0].cancel())
            timer.start()
            with pytest.raises(BankError) as e:
                c.fetch("big", "", [(1, 0), (1, 1)], m, on_call=calls.append)
            timer.join()
            assert e.value.code == "CANCELLED" and c._idle == []     # that socket is gone
    finally:
        relay.close()


def test_cancel_during_the_tls_handshake_of_a_stalled_server(server, client, tmp_path):
    """A paused server (docker pause) accepts connections in its kernel and answers nothing:
    a hedged fetch's cancel must end the TLS handshake at once, not at the deadline."""
    cert, _ = self_signed(tmp_path)
    m = client.get_manifest("test")
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(8)                       # never accept()ed: the kernel completes the connect
    calls = []
    try:
        with DataPlaneClient(f"127.0.0.1:1+{stalled.getsockname()[1]}", tls_ca=cert,
                             token="t", timeout_s=30) as c:
            timer = threading.Timer(0.3, lambda: calls[0].cancel())
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(BankError) as e:
                c.fetch("test", "v1", [(1, 0)], m, on_call=calls.append)
            timer.join()
            assert e.value.code == "CANCELLED" and time.monotonic() - t0 < 5
    finally:
        stalled.close()


# -- bad input: README's table -----------------------------------------------------------------
ROWS = [
    # (row, request payload, code, words in the message)
    ("empty bank name", {"bank": "", "blocks": [[1, 0]]}, "INVALID_ARGUMENT", "empty bank"),
    ("bank name with bad characters", {"bank": "a/../b", "blocks": [[1, 0]]}, "INVALID_ARGUMENT",
     "invalid bank name"),
    ("bank name over 128 characters", {"bank": "x" * 129, "blocks": [[1, 0]]},
     "INVALID_ARGUMENT", "invalid bank name"),
    ("unknown bank", {"bank": "nope", "blocks": [[1, 0]]}, "NOT_FOUND", "unknown bank"),
    ("unknown version", {"bank": "test", "version": "v9", "blocks": [[1, 0]]}, "NOT_FOUND",
     "unknown version"),
    ("no blocks", {"bank": "test", "blocks": []}, "INVALID_ARGUMENT", "no blocks"),
    ("no blocks field", {"bank": "test"}, "INVALID_ARGUMENT", "no blocks"),
    ("65 blocks (limit 64)", {"bank": "test", "blocks": [[1, 0]] * 65}, "INVALID_ARGUMENT",
     "at most 64"),
    ("a block listed twice", {"bank": "test", "blocks": [[1, 0], [2, 1], [1, 0]]},
     "INVALID_ARGUMENT", "block (1, 0) is listed twice"),
    ("a lone surrogate in the token", {"bank": "test", "blocks": [[1, 0]], "token": "\ud800"},
     "INVALID_ARGUMENT", "'token' is not valid Unicode"),
    ("a lone surrogate in the version", {"bank": "test", "version": "v\udfff",
                                         "blocks": [[1, 0]]},
     "INVALID_ARGUMENT", "'version' is not valid Unicode"),
    ("level 0", {"bank": "test", "blocks": [[0, 0]]}, "INVALID_ARGUMENT", "level 0"),
    ("level beyond the depth", {"bank": "test", "blocks": [[3, 0]]}, "INVALID_ARGUMENT",
     "level 3"),
    ("level 2**70", {"bank": "test", "blocks": [[2 ** 70, 0]]}, "INVALID_ARGUMENT", "level"),
    ("level without blocks (r = 0)", {"bank": "big", "blocks": [[2, 0]]}, "INVALID_ARGUMENT",
     "has no blocks"),
    ("node >= k^level", {"bank": "test", "blocks": [[2, 4]]}, "NOT_FOUND", "no node 4"),
    ("negative node", {"bank": "test", "blocks": [[1, -1]]}, "NOT_FOUND", "no node -1"),
    ("node 2**64-1", {"bank": "test", "blocks": [[1, 2 ** 64 - 1]]}, "NOT_FOUND", "no node"),
    ("a bad id after good ones: nothing sent", {"bank": "test", "blocks": [[1, 0], [2, 9]]},
     "NOT_FOUND", "no node 9"),
    ("version of 600 characters", {"bank": "test", "version": "v" * 600, "blocks": [[1, 0]]},
     "NOT_FOUND", "unknown version"),
    ("unknown encoding", {"bank": "test", "blocks": [[1, 0]], "encoding": "int4"},
     "INVALID_ARGUMENT", "unknown encoding"),
    ("deadline already passed", {"bank": "test", "blocks": [[1, 0]], "deadline_ms": 0},
     "DEADLINE_EXCEEDED", "deadline"),
    ("not JSON", b"{bank: test}", "INVALID_ARGUMENT", "malformed request: not JSON"),
    ("not UTF-8", b"\xff\xfe\x00", "INVALID_ARGUMENT", "malformed request: not JSON"),
    ("JSON but not an object", b"[1, 2, 3]", "INVALID_ARGUMENT", "a JSON object expected"),
    ("blocks of the wrong type", {"bank": "test", "blocks": [["1", "0"]]}, "INVALID_ARGUMENT",
     "[level, node] integer pairs"),
    ("bank of the wrong type", {"bank": ["test"], "blocks": [[1, 0]]}, "INVALID_ARGUMENT",
     "'bank' must be a string"),
]


@pytest.mark.parametrize("name, payload, code, words", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_row(server, name, payload, code, words):
    blocks, end = exchange(server, payload)
    assert end is not None and end[0] == "X", (name, end)
    assert end[1]["code"] == code and words in end[1]["message"], (name, end)
    assert blocks == []                   # an error never follows a partly sent answer


@pytest.mark.parametrize("name, frame_kw, code, words", [
    ("bad magic", {"magic": b"HTTP"}, "INVALID_ARGUMENT", "magic"),
    ("not a request frame", {"kind": b"H"}, "INVALID_ARGUMENT", "not a request"),
], ids=["bad magic", "not a request frame"])
def test_broken_framing_is_answered_then_closed(server, name, frame_kw, code, words):
    with socket.create_connection(server.dp_addr, timeout=10) as s:
        s.sendall(request_frame({"bank": "test", "blocks": [[1, 0]]}, **frame_kw))
        assert error_of(read_answer(s))[0] == code
        assert s.recv(1) == b""               # and the connection is closed


def test_oversized_request_is_refused_unread(server):
    with socket.create_connection(server.dp_addr, timeout=10) as s:
        s.sendall(PREFIX.pack(MAGIC, b"Q", (64 << 10) + 1))   # announces 64 KiB + 1, sends none
        code, message = error_of(read_answer(s))
        assert code == "RESOURCE_EXHAUSTED" and "at most 65536" in message
        assert s.recv(1) == b""
    # an HTTP request at the data plane port
    with socket.create_connection(server.dp_addr, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert error_of(read_answer(s))[0] == "INVALID_ARGUMENT"


def test_client_errors_carry_grpc_codes(client):
    m = client.get_manifest("test")
    for blocks, code in (([(2, 4)], C.NOT_FOUND), ([(0, 0)], C.INVALID_ARGUMENT),
                         ([(1, 0)] * 65, C.INVALID_ARGUMENT)):
        with pytest.raises(BankError) as e:
            client.fetch("test", "v1", blocks, m)
        assert e.value.code == code.name and not isinstance(e.value, BlockIntegrityError)
    with pytest.raises(BankError) as e:
        client.fetch("test", "v1", [(1, 0)], m, timeout_s=-1)
    assert e.value.code == "DEADLINE_EXCEEDED"
    assert len(client.fetch("test", "v1", [(1, 0)], m)) == 1


def test_a_block_not_matching_the_manifest_is_never_returned(server, client, lmdb_dir):
    """The client trusts its manifest, not the server: a manifest whose checksum differs
    from what the server holds (e.g. another ingest of the same version) -> integrity error."""
    m = client.get_manifest("test")
    sums = [list(level) for level in m.checksums]
    sums[1][2] = "0" * 16
    lying = m.model_copy(update={"checksums": sums})
    buf = bytearray(m.block_nbytes(2))
    with pytest.raises(BlockIntegrityError, match=r"block \(2, 2\)"):
        client.fetch("test", "v1", [(2, 2)], lying, out={(2, 2): buf})
    assert len(client.fetch("test", "v1", [(2, 2)], m)) == 1     # a fresh connection works


# -- corrupt block on disk, wrong shard ------------------------------------------------------------
@pytest.fixture(scope="module")
def shard0(tiny_export, tmp_path_factory):
    """Shard s0 of 3 (replication 1, placement level 2) with one of its blocks corrupted."""
    root = tmp_path_factory.mktemp("dp-shard")
    path = root / "s0.lmdb"
    m = ingest(tiny_export, path, shard_id="s0", shards=["s0", "s1", "s2"], replication=1,
               placement_level=2, progress=False, map_size=1 << 30)
    mine = [b for b in m.blocks() if "s0" in m.owners(*b) and b[0] == 2]
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        key = m.storage_key(*mine[0])
        bad = bytearray(txn.get(key))
        bad[100] ^= 0xFF
        txn.put(key, bytes(bad))
    env.close()
    with start(path, root / "log", "--shard-id", "s0", "--no-admin") as (address, proc):
        yield Server(address, proc), m, mine[0]


def test_corrupt_block_is_data_loss_and_never_sent(shard0, exported):
    srv, m, corrupt = shard0
    blocks, end = exchange(srv, {"bank": "test", "blocks": [[1, 0], list(corrupt)]})
    # the good block first, whole; then DATA_LOSS instead of the corrupt one: never a byte of it
    assert [(h["level"], h["node"]) for h, _ in blocks] == [(1, 0)]
    assert blocks[0][1] == exported[("test", 1, 0)]
    assert end[0] == "X" and end[1]["code"] == "DATA_LOSS"
    assert f"block ({corrupt[0]}, {corrupt[1]})" in end[1]["message"]
    with DataPlaneClient(srv.target) as c:
        with pytest.raises(BankError) as e:
            c.fetch("test", "v1", [(1, 0), corrupt], m)
        assert e.value.code == "DATA_LOSS" and not isinstance(e.value, BlockIntegrityError)
        assert bytes(c.fetch("test", "v1", [(1, 1)], m)[(1, 1)]) == exported[("test", 1, 1)]


def test_block_of_another_shard_is_failed_precondition_naming_the_owner(shard0):
    srv, m, _ = shard0
    theirs = next(b for b in m.blocks() if "s0" not in m.owners(*b))
    with DataPlaneClient(srv.target) as c, pytest.raises(BankError) as e:
        c.fetch("test", "v1", [(1, 0), theirs], m)
    assert e.value.code == "FAILED_PRECONDITION"
    assert f"shard {m.owners(*theirs)[0]}" in e.value.message and "(s0)" in e.value.message


# -- auth and TLS ----------------------------------------------------------------------------------
def test_auth_and_tls(lmdb_dir, tmp_path, exported):
    cert, key = self_signed(tmp_path)
    (tmp_path / "read").write_text("r-token")
    (tmp_path / "admin").write_text("a-token")
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file",
             str(tmp_path / "read"), "--admin-token-file", str(tmp_path / "admin"), "--no-admin"]
    with start(lmdb_dir, tmp_path / "log", *flags) as (address, proc):
        grpc_port, dp_port = address.rsplit(":", 1)[1], proc.dataplane_address.rsplit(":", 1)[1]
        target = f"localhost:{grpc_port}+{dp_port}"
        with DataPlaneClient(target, tls_ca=cert, token="r-token") as c:
            m = c.get_manifest("test")
            got = c.fetch("test", "v1", list(m.blocks()), m)
            assert all(bytes(v) == exported[("test", *k)] for k, v in got.items())
        with DataPlaneClient(target, tls_ca=cert, token="a-token") as c:      # admin works too
            assert len(c.fetch("test", "v1", [(1, 0)], m)) == 1
        for token, code in ((None, C.UNAUTHENTICATED), ("wrong", C.PERMISSION_DENIED),
                            ("r-token-but-longer", C.PERMISSION_DENIED)):
            with DataPlaneClient(target, tls_ca=cert, token=token) as c, \
                    pytest.raises(BankError) as e:
                c.fetch("test", "v1", [(1, 0)], m)
            assert e.value.code == code.name, e.value
        # a client that does not trust the certificate, and a plaintext client, get nowhere
        with DataPlaneClient(target, tls_ca=True, token="r-token", timeout_s=3) as c, \
                pytest.raises(BankError) as e:
            c.fetch("test", "v1", [(1, 0)], m)
        assert e.value.code == "UNAVAILABLE"
        host, port = proc.dataplane_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(request_frame({"bank": "test", "blocks": [[1, 0]], "token": "r-token"}))
            try:
                data = s.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            assert not data.startswith(MAGIC)               # never a frame in the clear
        with DataPlaneClient(target, tls_ca=cert, token="r-token") as c:   # still serving
            assert len(c.fetch("test", "v1", [(1, 0)], m)) == 1


# -- limits: connections, slowloris, idle, stale pooled connections --------------------------------
def test_connection_limit_slowloris_idle_and_stale_connections(lmdb_dir, tmp_path, exported,
                                                                monkeypatch):
    flags = ["--dataplane-max-connections", "2", "--dataplane-max-connections-per-peer", "2",
             "--dataplane-request-timeout-s", "1", "--dataplane-idle-timeout-s", "1", "--no-admin"]
    with start(lmdb_dir, tmp_path / "log", *flags) as (address, proc):
        srv = Server(address, proc)
        a = socket.create_connection(srv.dp_addr, timeout=10)
        b = socket.create_connection(srv.dp_addr, timeout=10)
        # slowloris on `a`: half a prefix, then nothing -> DEADLINE_EXCEEDED, closed
        a.sendall(MAGIC[:3])
        # a third connection is over the limit
        with socket.create_connection(srv.dp_addr, timeout=10) as c:
            code, message = error_of(read_answer(c))
            assert code == "RESOURCE_EXHAUSTED" and "limit 2" in message
        assert error_of(read_answer(a))[0] == "DEADLINE_EXCEEDED"
        assert a.recv(1) == b""
        # `b` sent nothing: closed after the idle timeout, without a frame
        assert b.recv(1) == b""
        a.close()
        b.close()
        # room again; a pooled connection the server closed (idle timeout) is not reused
        with DataPlaneClient(srv.target, timeout_s=10) as client:
            m = client.get_manifest("test")
            assert len(client.fetch("test", "v1", [(2, 1)], m)) == 1
            stale = client._idle[0]
            time.sleep(1.6)
            got = client.fetch("test", "v1", [(2, 1)], m)
            assert bytes(got[(2, 1)]) == exported[("test", 2, 1)]
            assert client._idle and client._idle[0] is not stale
            # the same when the closed connection still looks usable (the pre-use check
            # misses it): the request fails on it before any answer and goes out again
            stale = client._idle[0]
            time.sleep(1.6)
            monkeypatch.setattr(dataplane_client.select, "select", lambda r, w, x, t: ([], [], []))
            got = client.fetch("test", "v1", [(1, 1)], m)
            assert bytes(got[(1, 1)]) == exported[("test", 1, 1)]
            assert client._idle[0] is not stale


# -- hypothesis: random requests and random bytes ------------------------------------------------
# text with every code point, lone surrogates (category Cs) often: JSON's "\ud800" escapes
# decode to them, and hypothesis' default text never makes one
# (st.text drops surrogates from any alphabet: the string is joined from characters)
any_text = st.lists(st.characters() | st.characters(categories=["Cs"]),
                    max_size=20).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
    | st.integers(-(10 ** 400), 10 ** 400) | st.floats(allow_nan=False)
    | st.text(max_size=20) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
ids = st.one_of(st.integers(-2, 4), st.integers(-2 ** 64, 2 ** 64))
block_lists = st.one_of(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9)).map(list), max_size=6),
    st.lists(st.lists(ids, min_size=0, max_size=3), max_size=70),
    json_values)
requests = st.fixed_dictionaries(
    {"bank": st.one_of(st.sampled_from(["test", "big", "", "nope"]), st.text(max_size=140),
                       any_text, json_values),
     "blocks": block_lists},
    optional={"version": st.one_of(st.sampled_from(["", "v1", "b1", "v2"]), st.text(max_size=80),
                                   any_text, json_values),
              "encoding": st.one_of(st.just(""), st.text(max_size=10), any_text, json_values),
              "token": st.one_of(st.text(max_size=10), any_text, json_values),
              "deadline_ms": st.one_of(st.floats(0, 1e4), json_values),
              "extra": json_values})
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def check_answer(server, blocks, end, asked=None):
    if end is None:                 # closed: only after framing errors, never mid-block
        return
    kind, payload = end
    if kind == "X":
        assert payload["code"] in DOCUMENTED, payload
        assert "Traceback" not in payload["message"] and "Exception" not in payload["message"]
    else:
        assert payload == {"blocks": len(blocks)}
    for h, body in blocks:
        assert len(body) == h["nbytes"]


@SETTINGS
@given(request=requests)
def test_random_requests(server, request):
    try:
        payload = json.dumps(request).encode()
    except (ValueError, OverflowError):
        return
    blocks, end = exchange(server, payload)
    assert end is not None, "a whole, well-framed request always gets an answer"
    check_answer(server, blocks, end)


@SETTINGS
@given(fields=st.fixed_dictionaries(
    {"bank": st.sampled_from(["test", "big"]), "blocks": st.just([[1, 0]])},
    optional={"version": st.sampled_from(["", "v1", "b1"]) | any_text,
              "encoding": st.just("") | any_text, "token": any_text}))
def test_random_strings_in_a_well_formed_request(server, fields):
    """Random text (lone surrogates often) where a request's strings go: a key, a name, a token
    (a "\ud800" version once answered INTERNAL with a traceback in the log)."""
    blocks, end = exchange(server, json.dumps(fields).encode())
    assert end is not None
    check_answer(server, blocks, end)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=512),
                     st.binary(max_size=256).map(lambda b: PREFIX.pack(MAGIC, b"Q", len(b)) + b)))
def test_random_bytes(server, raw):
    with socket.create_connection(server.dp_addr, timeout=10) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)     # the server sees the end instead of waiting for more
        blocks, end = read_answer(s)
    check_answer(server, blocks, end)


def test_server_healthy_after_the_storm(server, exported):
    """Runs after the property tests (file order): the shared server still serves correctly."""
    assert server.proc.poll() is None
    with DataPlaneClient(server.target) as c:
        assert c.health()
        m = c.get_manifest("big")
        got = c.fetch("big", "", list(m.blocks()), m)
        assert all(bytes(v) == exported[("big", *k)] for k, v in got.items())


# -- the sharded fetcher over the data plane -------------------------------------------------------
@pytest.fixture(scope="module")
def replicas(tiny_export, tmp_path_factory):
    """Shards s0, s1 with replication 2 (every block on both), each with a data plane."""
    root = tmp_path_factory.mktemp("dp-replicas")
    cms, servers = {}, {}
    for s in ("s0", "s1"):
        ingest(tiny_export, root / s, shard_id=s, shards=["s0", "s1"], replication=2,
               placement_level=1, progress=False, map_size=1 << 30)
        cms[s] = start(root / s, root / f"{s}.log", "--shard-id", s, "--no-admin")
        servers[s] = Server(*cms[s].__enter__())
    yield servers
    for cm in cms.values():
        cm.__exit__(None, None, None)


def test_sharded_fetcher_hedges_over_the_data_plane(replicas, exported):
    ids = [(1, 0), (2, 1)]                                   # one placement group
    with BankClient(replicas["s0"].address) as c:
        m = c.get_manifest("test")
    slow = m.owners(*ids[-1])[0]          # the replica asked first: its data plane is slow
    relay = Relay(replicas[slow].dp, stall_p=1.0, stall_s=0.4)
    targets = {s: r.target for s, r in replicas.items()}
    targets[slow] = f"{replicas[slow].address}+{relay.address.rsplit(':', 1)[1]}"
    policy = FetchPolicy(deadline_s=10, hedge_initial_s=0.05, hedge_min_samples=1000)
    try:
        with ShardedFetcher(targets, policy, client_factory=dataplane_factory(timeout_s=5)) as f:
            assert f.plan(m, ids)[0].replicas[0] == slow
            got = f.fetch("test", "v1", ids, m)
            assert {k: bytes(v) for k, v in got.items()} == {b: exported[("test", *b)] for b in ids}
            st_ = f.stats()
            assert st_["hedges"] >= 1 and st_["hedge_wins"] >= 1 and st_["cancelled"] >= 1
    finally:
        relay.close()


def test_sharded_fetcher_fails_over_when_a_shard_dies(tiny_export, tmp_path, exported):
    root = tmp_path
    for s in ("s0", "s1"):
        ingest(tiny_export, root / s, shard_id=s, shards=["s0", "s1"], replication=2,
               placement_level=1, progress=False, map_size=1 << 30)
    with start(root / "s0", root / "s0.log", "--shard-id", "s0", "--no-admin") as (a0, p0), \
            start(root / "s1", root / "s1.log", "--shard-id", "s1", "--no-admin") as (a1, p1):
        targets = {"s0": Server(a0, p0).target, "s1": Server(a1, p1).target}
        policy = FetchPolicy(deadline_s=10, hedge=False, backoff_s=0.01)
        with ShardedFetcher(targets, policy, client_factory=dataplane_factory(timeout_s=5)) as f:
            m = f.get_manifest("test")
            ids = [(1, 1), (2, 2)]
            assert len(f.fetch("test", "v1", ids, m)) == 2     # both shards have pooled conns
            first = f.plan(m, ids)[0].replicas[0]
            (p0 if first == "s0" else p1).kill()                # SIGKILL the first replica
            (p0 if first == "s0" else p1).wait()
            got = f.fetch("test", "v1", ids, m)
            assert {k: bytes(v) for k, v in got.items()} == {b: exported[("test", *b)] for b in ids}
            st_ = f.stats()
            assert st_["errors"].get("UNAVAILABLE", 0) >= 1 and st_["failovers"] >= 1


# -- SIGTERM ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide(wide_export, tmp_path_factory):
    """(LMDB holding bank "wide": 32 distinct 1.76 MiB level-1 blocks, {node: bytes})."""
    path = tmp_path_factory.mktemp("dp-wide") / "bank.lmdb"
    ingest(wide_export, path, progress=False, map_size=1 << 30)
    m = load_manifest(wide_export)
    return path, {n: bytes(d) for _, n, d in iter_blocks(wide_export, m)}


@pytest.mark.parametrize("workers", ["1", "2"])     # 2: in worker processes (workers.py)
def test_sigterm_drains_an_in_flight_fetch(wide, tmp_path, workers):
    wide_lmdb, want = wide
    n_blocks = 24                          # 42 MiB of level-1 "wide" blocks: far over any buffer
    with start(wide_lmdb, tmp_path / "log", "--shutdown-grace-s", "20", "--workers", workers,
               "--no-admin") as (address, proc):
        srv = Server(address, proc)
        idle = socket.create_connection(srv.dp_addr, timeout=10)      # kept alive, idle
        idle.sendall(request_frame({"bank": "wide", "blocks": [[1, 0]]}))
        assert read_answer(idle)[1][0] == "E"
        busy = socket.create_connection(srv.dp_addr, timeout=30)
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        busy.sendall(request_frame({"bank": "wide",
                                    "blocks": [[1, i] for i in range(n_blocks)]}))
        first = recv_exact(busy, PREFIX.size)                      # the answer has begun
        assert first[:4] == MAGIC
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None                                 # still draining
        assert idle.recv(1) == b""                                 # idle connection: closed
        idle.close()
        try:                                                       # new ones: refused / closed
            with socket.create_connection(srv.dp_addr, timeout=5) as s:
                s.sendall(request_frame({"bank": "wide", "blocks": [[1, 0]]}))
                assert read_answer(s) == ([], None)
        except (ConnectionRefusedError, ConnectionResetError):
            pass
        # read the rest slowly: the in-flight answer arrives whole and intact
        rest = bytearray(first)
        while True:
            part = busy.recv(256 << 10)
            if not part:
                break
            rest += part
            time.sleep(0.002)
        busy.close()
        got, off = [], 0
        while off < len(rest):
            magic, kind, n = PREFIX.unpack_from(rest, off)
            payload = json.loads(rest[off + PREFIX.size:off + PREFIX.size + n])
            off += PREFIX.size + n
            if kind == b"H":
                got.append((payload, bytes(rest[off:off + payload["nbytes"]])))
                off += payload["nbytes"]
            else:
                assert (kind, payload) == (b"E", {"blocks": n_blocks}) and off == len(rest)
        assert len(got) == n_blocks
        assert all(body == want[i] for i, (_, body) in enumerate(got))
        assert proc.wait(20) == 0
