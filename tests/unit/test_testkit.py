"""testkit/: the percentile rule and the relay's delay, stall and hold (loopback echo server).

Run: .venv/bin/python -m pytest -q tests/unit/test_testkit.py
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from testkit.net import Relay
from testkit.stats import median, percentile


def test_percentile_and_median():
    assert percentile([], 0.5) is None and median([]) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile(range(1, 101), 0.99) == 99 and percentile(range(1, 101), 1.0) == 100
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5
    with pytest.raises(ValueError):
        percentile([1.0], 99)


def echo_server() -> tuple[socket.socket, str]:
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return listener, f"127.0.0.1:{listener.getsockname()[1]}"


def round_trip(address: str, payload: bytes = b"ping") -> float:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        t0 = time.perf_counter()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += s.recv(1 << 16)
        assert got == payload
        return time.perf_counter() - t0


def test_relay_delay_stall_and_hold():
    listener, upstream = echo_server()
    with Relay(upstream) as plain:
        assert round_trip(plain.address) < 0.05 and plain.connections == 1
    with Relay(upstream, delay_s=0.05) as delayed:       # 50 ms each way
        assert 0.1 <= round_trip(delayed.address) < 0.5
    with Relay(upstream, stall_p=1.0, stall_s=0.1) as slow:
        assert 0.1 <= round_trip(slow.address) < 0.5 and slow.stalls >= 1
    with Relay(upstream, hold=True) as hung:
        threading.Timer(0.2, lambda: setattr(hung, "hold", False)).start()
        assert round_trip(hung.address) >= 0.2
    listener.close()
