"""No single peer may deny service to others (issue 16): a hostile client, bound to 127.0.0.2,
against a real bank server subprocess, while a device on 127.0.0.1 keeps being served.

  connection slots   64 sockets sending a wrong token every half second (the defaults, auth
                     on): every refused request closes its connection, and one address holds at
                     most dataplane_max_connections_per_peer; the device still fetches
  refusals close     wrong token, no token, not JSON, the request rate limit: answered, closed
  slow readers       a client with a tiny receive buffer reading a few KB at a time is cut
                     once its answer is past send_timeout + size at the minimum rate, and the
                     LMDB read transaction its block send held is ended (the reader table)
  amplification      a block listed twice is INVALID_ARGUMENT on both transports; the byte
                     rate limit (per client, one budget over FetchBlocks and the data plane)
                     refuses a client whose bytes are spent, not another client

Run: .venv/bin/python -m pytest -q tests/integration/test_dataplane_limits.py
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time

import grpc
import pytest

from membank.artifacts import iter_blocks, load_manifest
from membank.dataplane import MAGIC, PREFIX
from membank.v1 import bank_pb2
from services.bank_server.ingest import ingest
from services.bank_server.store import acquire_env, release_env
from services.model_client.bank_client import BankClient, BankError
from services.model_client.dataplane_client import DataPlaneClient, dataplane_target
from tests.conftest import run_bank_server

pytestmark = pytest.mark.integration

ATTACKER = "127.0.0.2"                   # the hostile peer; the device connects from 127.0.0.1


def start(lmdb, log, *flags):
    return run_bank_server(lmdb, "--dataplane-port", "0", *flags, log_path=log)


def dp_addr(proc) -> tuple[str, int]:
    host, port = proc.dataplane_address.rsplit(":", 1)
    return host, int(port)


def attacker_socket(addr, *, rcvbuf: int | None = None, timeout: float = 10.0) -> socket.socket:
    """A connection to the data plane from ATTACKER (rcvbuf: SO_RCVBUF, set before connecting
    so that the window is small from the start)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.bind((ATTACKER, 0))
    s.connect(addr)
    return s


def request_frame(payload) -> bytes:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return PREFIX.pack(MAGIC, b"Q", len(body)) + body


def recv_exact(sock, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            part = sock.recv(n - len(buf))
        except ConnectionResetError:
            part = b""
        if not part:
            return None
        buf += part
    return bytes(buf)


def read_answer(sock):
    """([(header, body)], ("E"|"X", payload) or None when the connection closed)."""
    blocks = []
    while True:
        head = recv_exact(sock, PREFIX.size)
        if head is None:
            return blocks, None
        _, kind, n = PREFIX.unpack(head)
        payload = json.loads(recv_exact(sock, n))
        if kind == b"H":
            blocks.append((payload, recv_exact(sock, payload["nbytes"])))
            continue
        return blocks, (kind.decode(), payload)


def closed(sock) -> bool:
    """Whether the server closed the connection (EOF or reset), waiting up to the socket's
    timeout for it."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# -- connection slots ------------------------------------------------------------------------------
def test_one_peer_cannot_take_every_connection(lmdb_dir, tmp_path):
    """The defaults (64 connections), auth on: an attacker keeps 64 sockets sending a wrong
    token every half second. Each refusal closes its connection and the attacker's address
    holds at most 8, so the device still gets connections and fetches. (Before: every
    connection was kept after PERMISSION_DENIED, its idle clock restarted, and the 64 slots
    were the attacker's: the device got RESOURCE_EXHAUSTED.)"""
    (tmp_path / "t").write_text("r-token")
    with start(lmdb_dir, tmp_path / "log", "--auth-token-file", str(tmp_path / "t"),
               "--no-admin") as (address, proc):
        addr = dp_addr(proc)
        seen: dict[str, int] = {}
        stop = threading.Event()
        junk = request_frame({"bank": "test", "blocks": [[1, 0]], "token": "guess"})
        socks: list[socket.socket | None] = [None] * 64

        def attack_round() -> None:
            for i, s in enumerate(socks):
                if s is not None and eof(s):          # closed by the server: connect again
                    s.close()
                    s = socks[i] = None
                try:
                    if s is None:
                        s = socks[i] = attacker_socket(addr, timeout=5)
                    s.sendall(junk)
                    _, end = read_answer(s)
                except OSError:
                    end = None
                code = end[1]["code"] if end else "closed"
                seen[code] = seen.get(code, 0) + 1
                if end is None or code == "RESOURCE_EXHAUSTED":
                    s.close()
                    socks[i] = None

        def attack() -> None:
            while not stop.is_set():
                attack_round()
                stop.wait(0.5)

        attack_round()                     # all 64 sockets opened and refused once
        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        try:
            target = dataplane_target(address, proc.dataplane_address)
            with DataPlaneClient(target, timeout_s=10, token="r-token",
                                 allow_insecure_token=True) as device:
                m = device.get_manifest("test")
                for _ in range(6):
                    got = device.fetch("test", "v1", [(1, 0), (2, 1)], m)
                    assert len(got) == 2
                    time.sleep(0.25)
        finally:
            stop.set()
            attacker.join(30)
            for s in socks:
                if s is not None:
                    s.close()
        assert seen.get("PERMISSION_DENIED", 0) >= 8, seen
        assert seen.get("RESOURCE_EXHAUSTED", 0) >= 1, seen       # over its per-peer share


def test_a_device_refused_by_a_full_data_plane_is_served_over_grpc(lmdb_dir, tmp_path):
    """Every data plane slot taken (here 1, by one idle attacker socket; in the field, peers from
    many addresses): the device's fetch is refused RESOURCE_EXHAUSTED and asked again over the
    same server's gRPC, admitted separately, so the device still answers with memory."""
    with start(lmdb_dir, tmp_path / "log", "--dataplane-max-connections", "1",
               "--no-admin") as (address, proc):
        hog = attacker_socket(dp_addr(proc))
        try:
            target = dataplane_target(address, proc.dataplane_address)
            with DataPlaneClient(target, timeout_s=10, grpc_fallback=False) as device:
                m = device.get_manifest("test")
                with pytest.raises(BankError) as e:
                    device.fetch("test", "v1", [(1, 0), (2, 1)], m)
                assert e.value.code == "RESOURCE_EXHAUSTED"
            with DataPlaneClient(target, timeout_s=10) as device:
                got = device.fetch("test", "v1", [(1, 0), (2, 1)], m)
                assert sorted(got) == [(1, 0), (2, 1)] and device.fallbacks == 1
        finally:
            hog.close()

def eof(sock) -> bool:
    """Whether the server has closed `sock` (without waiting)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def test_per_peer_cap_message_and_refusals_close(lmdb_dir, tmp_path):
    """A third connection from one address (cap 2) is RESOURCE_EXHAUSTED naming the per-client
    limit, another address still connects; every refused request is answered and closed: no
    token, a wrong token, not JSON, a lone surrogate for a token, over the request rate."""
    (tmp_path / "t").write_text("r-token")
    with start(lmdb_dir, tmp_path / "log", "--auth-token-file", str(tmp_path / "t"),
               "--dataplane-max-connections-per-peer", "2", "--rate-limit-rps", "0.1",
               "--rate-limit-burst", "2", "--no-admin") as (address, proc):
        addr = dp_addr(proc)
        a, b = attacker_socket(addr), attacker_socket(addr)
        with attacker_socket(addr) as c:
            _, end = read_answer(c)
            assert end[0] == "X" and end[1]["code"] == "RESOURCE_EXHAUSTED"
            assert "per client" in end[1]["message"] and "limit 2" in end[1]["message"]
        a.close()
        b.close()
        # the server notices those two closes on its next idle poll (dataplane._POLL_S): until
        # then a new connection from this address is still over the cap
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with attacker_socket(addr) as s:     # refused at once, or accepted and silent
                if not select.select([s], [], [], 0.3)[0]:
                    break
                read_answer(s)
            time.sleep(0.05)
        for payload, code in (({"bank": "test", "blocks": [[1, 0]]}, "UNAUTHENTICATED"),
                              ({"bank": "test", "blocks": [[1, 0]], "token": "x"},
                               "PERMISSION_DENIED"),
                              (b"{not json", "INVALID_ARGUMENT"),
                              ({"bank": "test", "blocks": [[1, 0]], "token": "\ud800"},
                               "INVALID_ARGUMENT"),        # once INTERNAL, a traceback
                              ({"bank": "test", "blocks": [[1, 0]], "token": "r-token"},
                               "RESOURCE_EXHAUSTED")):      # the 2-request burst is spent
            with attacker_socket(addr) as s:
                s.sendall(request_frame(payload))
                blocks, end = read_answer(s)
                assert not blocks and end[0] == "X" and end[1]["code"] == code, end
                assert closed(s), code
        # the device, from another address, has its own budget and its own connections
        target = dataplane_target(address, proc.dataplane_address)
        with DataPlaneClient(target, timeout_s=10, token="r-token",
                             allow_insecure_token=True) as device:
            m = device.get_manifest("test")
            assert len(device.fetch("test", "v1", [(1, 1)], m)) == 1


# -- slow readers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_lmdb(wide_export, tmp_path_factory):
    path = tmp_path_factory.mktemp("limits-wide") / "bank.lmdb"
    ingest(wide_export, path, progress=False, map_size=1 << 30)
    return path


def active_readers(lmdb_path, pid: int) -> int:
    """Read transactions that process `pid` has open on the LMDB now (its reader table: an
    idle slot shows "-" for its transaction id). An open one pins the pages of its snapshot:
    ingest and gc cannot reuse them, and data.mdb grows."""
    env = acquire_env(lmdb_path, 1 << 30, readonly=True)
    try:
        lines = env.readers().splitlines()[1:]
    finally:
        release_env(env)
    return sum(1 for line in lines
               if line.split()[0] == str(pid) and line.split()[2] != "-")


def test_a_slow_reader_is_cut_and_its_read_transaction_ended(wide_lmdb, wide_export, tmp_path):
    """A client with a tiny receive window takes 4 KB every quarter second: bytes do flow, so
    no single send waits send_timeout_s for nothing. Its answer (8 blocks, 14.7 MB) has until
    send_timeout + size / min rate; then the connection is cut, and the LMDB read transaction
    that the block's zero-copy send held is ended. (Before: every partial send restarted the
    clock; the thread, the connection and the snapshot were held for as long as it read.)"""
    want = {n: bytes(d) for _, n, d in iter_blocks(wide_export, load_manifest(wide_export))}
    flags = ["--dataplane-send-timeout-s", "1", "--dataplane-min-send-rate-mb-s", "8",
             "--no-admin"]
    with start(wide_lmdb, tmp_path / "log", *flags) as (address, proc):
        addr = dp_addr(proc)
        s = attacker_socket(addr, rcvbuf=4096, timeout=5)
        s.sendall(request_frame({"bank": "wide", "blocks": [[1, i] for i in range(8)]}))
        got, held, cut = 0, 0, False
        give_up = time.monotonic() + 30        # ~1.2 s is the bound; far more before the fix
        while time.monotonic() < give_up:
            try:
                part = s.recv(4096)
            except ConnectionResetError:
                part = b""
            if not part:
                cut = True
                break
            got += len(part)
            held = max(held, active_readers(wide_lmdb, proc.pid))
            time.sleep(0.25)
        s.close()
        assert held >= 1                  # the observation works: the send held a snapshot
        assert cut, f"a slow reader still connected after {got} bytes"
        assert got < 8 * 1_843_200        # cut short of the whole answer
        for _ in range(50):               # the reader slot is idle again ("-")
            if active_readers(wide_lmdb, proc.pid) == 0:
                break
            time.sleep(0.1)
        assert active_readers(wide_lmdb, proc.pid) == 0
        # and a device still fetches the same blocks whole
        with DataPlaneClient(dataplane_target(address, proc.dataplane_address)) as device:
            m = device.get_manifest("wide")
            out = device.fetch("wide", "w1", [(1, i) for i in range(8)], m)
            assert all(bytes(out[(1, i)]) == want[i] for i in range(8))


# -- amplification ---------------------------------------------------------------------------------
def grpc_fetch(address: str, bank: str, blocks) -> tuple[grpc.StatusCode, str]:
    """FetchBlocks sent as it is (BankClient would refuse a repeated block itself)."""
    request = bank_pb2.FetchBlocksRequest(bank=bank, blocks=[bank_pb2.BlockId(level=l, node=n)
                                                             for l, n in blocks])
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream("/membank.v1.BankService/FetchBlocks",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=lambda b: b)
        try:
            for _ in call(request, timeout=30):
                pass
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_duplicates_and_the_byte_rate_limit_on_both_transports(lmdb_dir, tmp_path):
    """A request listing a block twice is INVALID_ARGUMENT on both transports (one 1 KB request
    could list a 27.5 MB block 64 times). The byte budget (0.1 MB/s, burst 4 MB: two 1.84 MB
    blocks, then 34 s to refill) is per client and one over both transports: the attacker's
    second fetch is refused, the device still fetches, and then its own gRPC fetch is refused
    too (its data plane fetch spent its budget)."""
    flags = ["--rate-limit-mb-s", "0.1", "--rate-limit-burst-mb", "4", "--no-admin"]
    with start(lmdb_dir, tmp_path / "log", *flags) as (address, proc):
        addr = dp_addr(proc)
        twice = [(1, 0), (3, 2), (1, 0)]
        with attacker_socket(addr) as s:
            s.sendall(request_frame({"bank": "big", "blocks": [list(b) for b in twice]}))
            blocks, end = read_answer(s)
            assert not blocks and end[0] == "X" and end[1]["code"] == "INVALID_ARGUMENT"
            assert "block (1, 0) is listed twice" in end[1]["message"]
        code, details = grpc_fetch(address, "big", twice)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "listed twice" in details
        pair = [[1, 0], [1, 1]]                                     # 3.7 MB
        with attacker_socket(addr) as s:
            s.sendall(request_frame({"bank": "big", "blocks": pair}))
            blocks, end = read_answer(s)
            assert end == ("E", {"blocks": 2}) and len(blocks) == 2
            s.sendall(request_frame({"bank": "big", "blocks": pair}))
            blocks, end = read_answer(s)
            assert not blocks and end[0] == "X" and end[1]["code"] == "RESOURCE_EXHAUSTED"
            assert "byte rate limit" in end[1]["message"] and "retry in" in end[1]["message"]
            assert closed(s)
        target = dataplane_target(address, proc.dataplane_address)
        with DataPlaneClient(target, timeout_s=10) as device:
            m = device.get_manifest("big")
            assert len(device.fetch("big", "b1", [(1, 0), (1, 1)], m)) == 2
        code, details = grpc_fetch(address, "big", pair)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "byte rate limit" in details
        with BankClient(address) as c:       # a manifest is not block bytes: not byte limited
            assert c.get_manifest("big").version == "b1"
