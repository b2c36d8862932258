"""Loopback networking for tests and benchmarks: a free port, and one TCP relay that injects
the faults they need between a client and a server.

    port = free_port()
    relay = Relay("127.0.0.1:50051", stall_p=1.0, stall_s=0.2)   # a uniformly slow server
    client = BankClient(relay.address)
    relay.hold = True                                             # now a hung one
    relay.close()

Used by the Redis breaker tests (a hung / slow Redis), the hedging benchmark and failover tests
(a slow replica) and the emulated links of benchmarks/linkemu.py (a fixed delay each way).
"""
from __future__ import annotations

import collections
import random
import socket
import threading
import time

from services.bank_server.launch import free_port

__all__ = ["Relay", "free_port"]


class Relay:
    """A TCP relay from a free port on `listen_host` to `upstream` ("host:port").

      delay_s           every chunk, both ways, is forwarded `delay_s` after it arrived: a
                        reader timestamps, a writer releases, so order and throughput are kept
                        and the round trip grows by 2 delay_s (fixed at construction)
      rate_mbit         each direction paced to this rate (0: unpaced): a chunk leaves when the
                        one before it has had its bytes' time on the wire, so a relay per device
                        is that device's own link (benchmarks/fleet.py); the relay buffers what
                        the sender writes ahead (its TCP sees no back-pressure)
      stall_p, stall_s  each server -> client chunk is held `stall_s` with probability `stall_p`
      hold              while True, server -> client chunks wait (a hung server, or, seen from
                        the server, a client that stops reading)
      source_host       the address the upstream connections are made from (e.g. "127.0.0.2":
                        a second loopback peer, so per-peer limits see another client than
                        the tests' 127.0.0.1); None: the kernel's choice
    `stall_p`, `stall_s` and `hold` may change while it runs. Chunks are up to `chunk_bytes`
    (a stall per chunk: the chunk size sets how slow a stalled stream is). Counters:
    `connections`, `chunks` (server -> client), `stalls`. The end of a stream is passed on as
    a half-close after the bytes before it; both sockets close when both ways have ended.
    """

    def __init__(self, upstream: str, *, listen_host: str = "127.0.0.1", delay_s: float = 0.0,
                 rate_mbit: float = 0.0,
                 stall_p: float = 0.0, stall_s: float = 0.0, hold: bool = False,
                 chunk_bytes: int = 1 << 16, seed: int = 0, source_host: str | None = None):
        self.upstream, self.delay_s, self.chunk_bytes = upstream, delay_s, chunk_bytes
        self.rate_mbit = rate_mbit
        # the relay's own address towards the upstream (e.g. "127.0.0.2": the server then sees
        # the client behind it as another peer than 127.0.0.1, for per-client limits)
        self.source = (source_host, 0) if source_host else None
        self.stall_p, self.stall_s, self.hold = stall_p, stall_s, hold
        self.rng = random.Random(seed)
        self.connections = self.chunks = self.stalls = 0
        self.bytes_down = 0          # bytes relayed server -> client
        self.listener = socket.create_server((listen_host, 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"{listen_host}:{self.port}"
        self.closed = False
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            host, port = self.upstream.rsplit(":", 1)
            try:
                server = socket.create_connection((host, int(port)), timeout=10,
                                                  source_address=self.source)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self.closed:
                    client.close(), server.close()
                    return
                self._socks.update((client, server))
                self.connections += 1
            ended = [0]

            def done(c=client, s=server, ended=ended) -> None:
                with self._lock:
                    ended[0] += 1
                    if ended[0] == 2:     # both ways finished: release the sockets
                        for x in (c, s):
                            self._socks.discard(x)
                            x.close()
            _Pipe(self, client, server, False, done)
            _Pipe(self, server, client, True, done)

    def _before_reply(self) -> None:
        """Server -> client: the hold and the stalls, before a chunk is sent on."""
        while self.hold and not self.closed:
            time.sleep(0.01)
        self.chunks += 1
        if self.stall_p and self.rng.random() < self.stall_p:
            self.stalls += 1
            time.sleep(self.stall_s)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            socks, self._socks = list(self._socks), set()
        self.listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Pipe:
    """One direction of one connection. Without a delay, one thread reads and sends; with one,
    a reader queues (arrival + delay, chunk) and a writer sends each when due, so the reader
    never waits for the writer."""

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, reply: bool,
                 done) -> None:
        self.relay, self.src, self.dst, self.reply, self.done = relay, src, dst, reply, done
        self.free_at = 0.0          # when the paced link has sent the chunk before (monotonic)
        if relay.delay_s > 0 or relay.rate_mbit > 0:
            self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
            self.cv = threading.Condition()
            threading.Thread(target=self._read, daemon=True).start()
            threading.Thread(target=self._write, daemon=True).start()
        else:
            threading.Thread(target=self._pump, daemon=True).start()

    def _send(self, data: bytes | None) -> None:
        if data is None:     # end of stream, after the bytes before it
            self.dst.shutdown(socket.SHUT_WR)
            return
        if self.reply:
            self.relay._before_reply()
            self.relay.bytes_down += len(data)
        self.dst.sendall(data)

    def _pump(self) -> None:
        try:
            while data := self.src.recv(self.relay.chunk_bytes):
                self._send(data)
            self._send(None)
        except OSError:
            self._abort()
        self.done()

    def _read(self) -> None:
        try:
            while data := self.src.recv(self.relay.chunk_bytes):
                self._put(data)
        except OSError:
            pass
        self._put(None)

    def _put(self, data: bytes | None) -> None:
        with self.cv:
            self.queue.append((time.monotonic() + self.relay.delay_s, data))
            self.cv.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.queue:
                        self.cv.wait()
                    due, data = self.queue.popleft()
                if self.relay.rate_mbit > 0 and data is not None:
                    # its last bit arrives once the link is free and has carried it
                    due = max(due, self.free_at) + len(data) * 8 / (self.relay.rate_mbit * 1e6)
                    self.free_at = due
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._send(data)
                if data is None:
                    break
        except OSError:
            self._abort()
        self.done()

    def _abort(self) -> None:
        for s in (self.src, self.dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
