"""The block data plane: block bodies over a small framed TCP protocol, beside the gRPC API.

gRPC stays the control plane (GetManifest, Route, Publish, health, reflection) and keeps its
FetchBlocks RPC; this serves the same fetches over plain TCP, because Python gRPC itself is
the ceiling for multi-MB bodies on a small machine (BENCHMARKS.md, "Fetch"). Storage systems
do the same (HDFS data transfer, Redis' own protocol). It is on when `dataplane_port` is set
(settings.py; 0 = a free port, printed as `membank bank_server dataplane on HOST:PORT`);
server.py starts and drains it.

Protocol, limits and bad input: proto/membank/v1/dataplane.md; the frames and the request's
parsing are membank/dataplane.py, shared with the device's client. Every fetch is checked and
planned by fetchplan.py, as FetchBlocks is: the same codes and messages. Block bodies go from
the LMDB memory map to the socket (sendmsg of the zero-copy buffer inside the read transaction:
no copy in user space). Metrics: requests by final code as method "DataPlaneFetch", and every
block sent, in metrics.py's families.

Threads, not asyncio: one thread per connection with blocking sockets (a blocking send of a
27.5 MB buffer is one system call), at most `dataplane_max_connections` of them and at most
`dataplane_max_connections_per_peer` from one client address, plus one accept thread. No peer
may deny service to others: every refused request (an error frame) closes its connection, so
junk never keeps a slot or restarts an idle clock; an answer must be sent within
`dataplane_send_timeout_s` + its size at `dataplane_min_send_rate_mb_s` (each block too), so a
slow reader holds a thread and a block's LMDB read transaction for a bounded time; fetches are
charged to the client's byte budget (fetchplan.admit_bytes) as well as its request budget.
What a request costs before its first byte is sent is most of what a small
block's fetch pays beyond raw TCP (benchmarks/dataplane_latency.py), so that path is kept
short: a request is usually read in one receive (no select, no setsockopt per request: the
socket's receive timeout is the drain poll), and a request asked before is answered from its
prepared plan and frames while the store is unchanged (`_prepare`). SIGTERM (server.py ->
`stop(grace)`): no new connections, idle connections closed, a request being answered
finishes within the grace, then every socket is shut.

    server = DataPlaneServer(settings, store, blocks, metrics=metrics, limiter=limiter,
                             auth_token=..., admin_token=..., ssl_context=...)
    port = server.start()
    ...
    server.stop(grace=5.0)
Run its tests: .venv/bin/python -m pytest -q tests/integration/test_dataplane.py
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from typing import NamedTuple

from membank.dataplane import (
    END,
    ERROR,
    HEADER,
    PREFIX,
    REQUEST,
    DataPlaneRequest,
    close_quietly,
    frame,
    parse_prefix,
    parse_request,
    timeval,
)
from membank.fetch import FetchError
from services.bank_server.fetchplan import FetchPlan, admit_bytes, plan_fetch, read_block
from services.bank_server.peers import LocalSlots
from services.bank_server.security import RateLimiter, token_matches
from services.bank_server.store import BlockStore, LMDBStore, StoreUnavailable

log = logging.getLogger("membank.bank_server.dataplane")

METHOD = "DataPlaneFetch"           # the metrics' method label
_POLL_S = 0.25                       # idle connections look at the drain flag this often
_RECV_BYTES = 4096                   # a connection's receive buffer (a request is ~150 bytes)
_TIMEOUTS = (socket.timeout, BlockingIOError, TimeoutError)   # a receive timeout's faces
_PLANS_MAX = 4096                    # prepared requests remembered (_prepare); then forget all
_TLS_PIECE = 1 << 20                 # TLS sends in pieces, each bounded by the send deadline


class _Conn:
    """One client connection, its receive buffer, and whether it is answering a request now
    (drain needs to know)."""

    __slots__ = ("sock", "peer", "host", "busy", "thread", "buf", "pending", "sndtimeo")

    def __init__(self, sock: socket.socket, peer):
        self.sock, self.peer, self.busy, self.thread = sock, peer, False, None
        self.host = peer[0]      # the client's address: per-peer limits count by it
        self.sndtimeo = 0.0      # SO_SNDTIMEO when _send shortened it (0: the setting's)
        # a request usually arrives whole in one receive into this; a bigger one grows it
        self.buf = bytearray(_RECV_BYTES)
        self.pending = b""       # bytes that came after the last request frame (a next frame)

    def shut(self) -> None:
        """Wake and end whatever the connection's thread is blocked on (any thread may call)."""
        try:   # socket.socket's own shutdown also for an SSLSocket: no TLS close_notify here
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass


class _Prepared(NamedTuple):
    """A checked request's plan and its frames, good while the store's generation holds."""
    generation: int
    plan: FetchPlan
    heads: list[bytes]        # each block's header frame, in request order
    end: bytes                # the end frame


class DataPlaneServer:
    def __init__(self, settings, store: LMDBStore, blocks: BlockStore, *, metrics=None,
                 limiter: RateLimiter | None = None, byte_limiter: RateLimiter | None = None,
                 auth_token: str | None = None, admin_token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, slots=None):
        """`settings`: BankServerSettings (dataplane_*, max_request_bytes,
        max_blocks_per_request, shard_id, host). Tokens: the read token (None: auth off) and the
        admin token (accepted too). `limiter` (requests/s) and `byte_limiter` (block bytes/s):
        the gRPC server's, so a client's budgets are one over both transports. `slots`: the
        connection caps (peers.py): this process's own by default, a shard's shared table in
        a data-plane worker (workers.py)."""
        self.s = settings
        self.store, self.blocks = store, blocks
        self.metrics = metrics
        self.limiter = limiter
        self.byte_limiter = byte_limiter
        self.tokens = tuple(t for t in (auth_token, admin_token) if t) if auth_token else ()
        self.ssl_context = ssl_context
        self.port: int | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self.slots = slots or LocalSlots(settings.dataplane_max_connections,
                                         settings.dataplane_max_connections_per_peer)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)     # notified when a connection ends
        self._draining = False
        self._plans: dict[tuple, _Prepared] = {}       # see _prepare

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, listener: socket.socket | None = None) -> int:
        """Bind and start accepting; the bound port (the OS's pick when dataplane_port is 0).
        `listener`: accept on this bound socket instead (a worker: the one its server bound)."""
        self._listener = listener if listener is not None else bind(self.s)
        self._listener.settimeout(_POLL_S)   # the accept loop sees stop() within this
        self.port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name="dataplane-accept")
        self._accept_thread.start()
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        """Graceful drain: refuse new connections, close idle ones, let a request being answered
        finish within `grace` seconds, then shut every socket. Blocking (run it off the loop)."""
        with self._lock:
            self._draining = True
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        deadline = time.monotonic() + grace
        with self._lock:
            while self._conns and time.monotonic() < deadline:
                self._idle.wait(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            left = list(self._conns)
        if left:
            log.warning("data plane: %d connection(s) still busy after %.1f s; closing them",
                        len(left), grace)
        for c in left:
            c.shut()
        for c in left:
            if c.thread is not None:
                c.thread.join(1.0)
        log.info("data plane stopped")

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # -- accepting --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                if self._draining:
                    return
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as e:      # EMFILE and the like: do not spin, do not die
                if not self._draining:  # (a shared listener shut by the server: draining)
                    log.warning("data plane accept failed: %s", e)
                time.sleep(0.05)
                continue
            sock.settimeout(None)
            try:
                full = self.slots.acquire(peer[0])
            except OSError as e:      # the shared table's lock failed: refuse, keep accepting
                log.warning("data plane: connection slots unavailable: %s", e)
                self._refuse(sock, "connection slots unavailable")
                continue
            with self._lock:
                draining = self._draining
                if not full and not draining:
                    conn = _Conn(sock, peer)
                    self._conns.add(conn)
            if full or draining:
                if not full:
                    self.slots.release(peer[0])
                self._refuse(sock, full)
                continue
            conn.thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                           name=f"dataplane-{peer[1]}")
            try:
                conn.thread.start()
            except RuntimeError as e:  # no thread to be had: this connection only is refused
                log.warning("data plane: cannot start a connection thread: %s", e)
                with self._lock:
                    self._conns.discard(conn)
                    self._idle.notify_all()
                self.slots.release(peer[0])
                self._refuse(sock, "server busy")

    def _refuse(self, sock: socket.socket, full: str) -> None:
        """Over a connection limit: say so (plain TCP; a TLS client just sees the close)."""
        try:
            if full and self.ssl_context is None:
                sock.settimeout(1.0)
                sock.sendall(frame(ERROR, {"code": "RESOURCE_EXHAUSTED",
                                           "message": f"{full}; retry later"}))
        except OSError:
            pass
        finally:
            close_quietly(sock)

    # -- one connection ---------------------------------------------------------------------
    def _serve(self, conn: _Conn) -> None:
        try:
            sock = conn.sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.s.dataplane_sndbuf_kb:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                self.s.dataplane_sndbuf_kb << 10)
            # the kernel bounds every blocking send: a client that takes nothing for this
            # long is dropped; one that takes bytes too slowly is dropped by the answer's
            # send deadline (_answer, _send: the minimum rate)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            timeval(self.s.dataplane_send_timeout_s))
            # ... and every blocking receive ends within _POLL_S, for good: a thread waiting
            # for a request looks at the drain flag and its idle and request clocks that often,
            # with no select and no setsockopt per request (_read_request)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(_POLL_S))
            if self.ssl_context is not None:
                sock.settimeout(self.s.dataplane_request_timeout_s)   # the handshake, too
                sock = conn.sock = self.ssl_context.wrap_socket(sock, server_side=True)
            while True:
                try:
                    payload = self._read_request(conn)
                except FetchError as e:      # framing broken: answer, then close
                    self._count(e.code, 0.0)
                    _send_error(conn.sock, e, self.s.dataplane_send_timeout_s)
                    _linger_close(conn.sock)
                    return
                if payload is None or not self._answer(conn, payload):
                    return
                with self._lock:
                    conn.busy = False
                    if self._draining:
                        return
        except (OSError, ssl.SSLError) as e:
            log.debug("data plane connection %s ended: %s", conn.peer, e)
        except Exception:          # a bug must end one connection, never the server
            log.exception("data plane connection %s failed", conn.peer)
        finally:
            close_quietly(conn.sock)
            self.slots.release(conn.host)
            with self._lock:
                self._conns.discard(conn)
                self._idle.notify_all()

    def _read_request(self, conn: _Conn) -> bytes | None:
        """The next request frame's payload, or None when the connection is to end quietly:
        the client closed it between requests, sent nothing for idle_timeout_s, or the server
        drains. FetchError when the frame is bad or not whole within request_timeout_s
        (slowloris bound). Usually one system call: the first receive takes the whole frame."""
        sock, tls = conn.sock, self.ssl_context is not None
        if tls:
            sock.settimeout(_POLL_S)     # as SO_RCVTIMEO for plain sockets (_serve)
        got = len(conn.pending)
        if got:                          # a frame that came right after the last one
            conn.buf[:got], conn.pending = conn.pending, b""
        idle_until = time.monotonic() + self.s.dataplane_idle_timeout_s
        while not got:
            if self._draining:           # a plain read; the locked check below settles races
                return None
            try:
                got = sock.recv_into(conn.buf)
            except _TIMEOUTS:            # a _POLL_S tick with nothing received
                if time.monotonic() >= idle_until:
                    return None
                continue
            if not got:                  # closed between requests: not an error
                return None
        with self._lock:
            if self._draining:
                return None
            conn.busy = True
        deadline = time.monotonic() + self.s.dataplane_request_timeout_s
        got = _fill(conn, got, PREFIX.size, deadline)
        _, n = parse_prefix(conn.buf, self.s.max_request_bytes, kind=REQUEST)
        end = PREFIX.size + n
        got = _fill(conn, got, end, deadline)
        if got > end:
            conn.pending = bytes(conn.buf[end:got])
        return bytes(conn.buf[PREFIX.size:end])

    def _answer(self, conn: _Conn, payload: bytes) -> bool:
        """Answer one request; False when the connection must be closed: a send failed or
        was too slow, or the request was refused (an error frame). Closing after every refusal
        means a refused request (a wrong token, junk, the rate limit) never keeps a
        connection's slot or restarts its idle clock: each try costs the client a new
        connection, within its per-peer cap. The device's client drops a connection after any
        error anyway."""
        sock = conn.sock
        t0 = time.perf_counter()
        code = "OK"
        sent_any = False
        if self.metrics is not None:
            self.metrics.rpc_started()
        try:
            req = parse_request(payload)
            self._admit(conn, req)
            deadline = None
            if req.deadline_ms is not None:
                deadline = time.monotonic() + req.deadline_ms / 1e3
                if req.deadline_ms <= 0:
                    raise FetchError("DEADLINE_EXCEEDED", "deadline exceeded before the fetch")
            prepared = self._prepare(req)
            plan = prepared.plan
            admit_bytes(self.byte_limiter, f"peer:{conn.host}", plan)
            last = len(plan.blocks) - 1
            # bytes must flow: the whole answer by send_timeout + its size at the minimum rate,
            # and each block by send_timeout + its own size at that rate (so one block's read
            # transaction, which pins LMDB's pages, never lasts longer than that either)
            rate = self.s.dataplane_min_send_rate_mb_s * 1e6
            grace = self.s.dataplane_send_timeout_s
            start = time.monotonic()
            total = 0
            for b in plan.blocks:
                if deadline is not None and time.monotonic() >= deadline:
                    raise FetchError("DEADLINE_EXCEEDED", "deadline exceeded while sending")
                tb = time.perf_counter()
                total += b.expect.nbytes
                now = time.monotonic()
                until = min(start + grace + total / rate, now + grace + b.expect.nbytes / rate)
                if deadline is not None:
                    until = min(until, deadline)
                with read_block(self.blocks, self.store, plan.manifest, b) as buf:
                    # the end frame rides with the last body: one system call, no extra packet
                    sent_any = True
                    self._send(conn, prepared.heads[b.index], buf,
                               prepared.end if b.index == last else b"", until)
                if self.metrics is not None:
                    self.metrics.block_sent(b.level, b.expect.nbytes, time.perf_counter() - tb)
            return True
        except FetchError as e:
            code = e.code
            _send_error(sock, e, self.s.dataplane_send_timeout_s)
            _linger_close(sock)
            return False
        except (socket.timeout, BlockingIOError, TimeoutError) as e:
            code = "DEADLINE_EXCEEDED"
            log.info("data plane: %s did not take the answer in time (%s); closing", conn.peer, e)
            _reset_on_close(sock)
            return False
        except (OSError, ssl.SSLError):
            code = "CANCELLED"      # the client went away mid-answer
            return False
        except Exception:
            code = "INTERNAL"
            log.exception("data plane request from %s failed", conn.peer)
            if not sent_any:
                _send_error(sock, FetchError("INTERNAL", "internal error"), 1.0)
            return False
        finally:
            if self.metrics is not None:
                self.metrics.rpc_done(METHOD, code, time.perf_counter() - t0)

    def _prepare(self, req: DataPlaneRequest) -> _Prepared:
        """The request checked and planned (fetchplan.plan_fetch), with its frames encoded.

        Reused for the same (bank, version, blocks, encoding) while the store's generation
        (LMDB's last committed transaction) is unchanged: a plan depends only on the current
        version and the manifests, which change only by a commit (ingest, publish, gc, in any
        process). Devices fetch the same paths again and again, so most requests skip the
        planning and the JSON of their headers. A refused request is never remembered."""
        key = (req.bank, req.version, req.blocks, req.encoding)
        try:
            generation = self.store.generation()   # before planning: a plan is never older
        except StoreUnavailable as e:              # a grown map this process could not adopt
            raise FetchError("UNAVAILABLE", str(e)) from None
        prepared = self._plans.get(key)
        if prepared is not None and prepared.generation == generation:
            return prepared
        plan = plan_fetch(self.store, req.bank, req.version, req.blocks,
                          max_blocks_per_request=self.s.max_blocks_per_request,
                          shard_id=self.s.shard_id, encoding=req.encoding)
        prepared = _Prepared(generation, plan,
                             [frame(HEADER, {"index": b.index, **b.header._asdict()})
                              for b in plan.blocks],
                             frame(END, {"blocks": len(plan.blocks)}))
        with self._lock:
            if len(self._plans) >= _PLANS_MAX:     # bounded: forget all, plan again as asked
                self._plans.clear()
            self._plans[key] = prepared
        return prepared

    def _admit(self, conn: _Conn, req: DataPlaneRequest) -> None:
        """Rate limit (first, so token guessing is limited too), then auth: as security.py."""
        if self.limiter is not None:
            wait = self.limiter.take(f"peer:{conn.host}")
            if wait > 0:
                raise FetchError("RESOURCE_EXHAUSTED",
                                 f"rate limit exceeded ({self.limiter.rate:g} requests/s per "
                                 f"client, burst {self.limiter.burst:g}); retry in {wait:.2f} s")
        if self.tokens:
            if req.token is None:
                raise FetchError("UNAUTHENTICATED", "missing token (the request's \"token\" "
                                                    "field)")
            if req.token == "":
                raise FetchError("UNAUTHENTICATED", "empty token")
            if not any(token_matches(req.token, t) for t in self.tokens):
                raise FetchError("PERMISSION_DENIED", "token not valid for this method")

    def _send(self, conn: _Conn, head: bytes, body, tail: bytes, until: float) -> None:
        """head + body + tail, body straight from its buffer (no copy in user space), all of it
        by `until` (monotonic): socket.timeout when the client takes it slower than that."""
        sock = conn.sock
        body = memoryview(body).cast("B")
        if isinstance(sock, ssl.SSLSocket):   # TLS encrypts (copies) anyway: plain sendall
            for part in (head, body, tail):
                for i in range(0, len(part), _TLS_PIECE):
                    # a timeout per call, never past `until`: sendall would restart it per record
                    sock.settimeout(self._left(until))
                    sock.sendall(part[i:i + _TLS_PIECE])
            return
        if conn.sndtimeo:                     # shortened by a slow answer before: restore it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            timeval(self.s.dataplane_send_timeout_s))
            conn.sndtimeo = 0.0
        # blocking sendmsg: the kernel sends it all in one call unless SO_SNDTIMEO passes
        # (then a partial count, or EAGAIN: BlockingIOError). The fast path is that one call;
        # only a slow client, on a partial send, gets SO_SNDTIMEO cut to the time left
        parts = [memoryview(head), body] + ([memoryview(tail)] if tail else [])
        while parts:
            n = sock.sendmsg(parts)
            while parts and n >= parts[0].nbytes:
                n -= parts[0].nbytes
                parts.pop(0)
            if parts:
                parts[0] = parts[0][n:]
                left = self._left(until)
                if left < self.s.dataplane_send_timeout_s:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(left))
                    conn.sndtimeo = left

    def _left(self, until: float) -> float:
        """Seconds to `until`, at most send_timeout_s; socket.timeout when none are left."""
        left = until - time.monotonic()
        if left <= 0:
            raise socket.timeout("too slow: the answer's send deadline passed")
        return min(left, self.s.dataplane_send_timeout_s)

    def _count(self, code: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.rpc_started()
            self.metrics.rpc_done(METHOD, code, seconds)


# -- socket helpers ----------------------------------------------------------------------------
def bind(settings) -> socket.socket:
    """The data plane's listening socket on settings.host:dataplane_port. Not SO_REUSEPORT: a
    second server on the same port fails here instead of sharing it (a shard's workers share
    this one socket, inherited: workers.py)."""
    host = settings.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, settings.dataplane_port), family=family, backlog=128)


def _fill(conn: _Conn, got: int, need: int, deadline: float) -> int:
    """Receive into conn.buf until it holds at least `need` bytes (growing it to fit); the
    count it holds. FetchError DEADLINE_EXCEEDED past `deadline`; ConnectionError when the
    client closes inside the frame. Each receive ends within _POLL_S (SO_RCVTIMEO or the TLS
    socket's timeout), so the deadline is looked at that often."""
    if need > len(conn.buf):
        conn.buf.extend(bytes(need - len(conn.buf)))
    while got < need:
        if time.monotonic() >= deadline:
            raise FetchError("DEADLINE_EXCEEDED", "request not received in time")
        try:
            k = conn.sock.recv_into(memoryview(conn.buf)[got:])
        except _TIMEOUTS:
            continue
        if not k:
            raise ConnectionError("connection closed inside a request frame")
        got += k
    return got


def _send_error(sock, e: FetchError, timeout: float) -> None:
    """An error frame; a client that cannot take it is dropped by the caller's close."""
    try:
        sock.settimeout(timeout)
        sock.sendall(frame(ERROR, {"code": e.code, "message": e.message}))
        sock.settimeout(None)
    except (OSError, ssl.SSLError):
        pass


def _reset_on_close(sock) -> None:
    """Make the coming close a reset: what is still queued for a client too slow to take it
    is dropped now, not trickled out by the kernel after the close."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _linger_close(sock) -> None:
    """Close after an error frame so that the client can still read it: stop sending, read
    (and drop) what it still sends for a moment, then close (closing with unread input would
    reset the connection and could discard the frame before the client reads it)."""
    try:
        sock.settimeout(0.5)
        socket.socket.shutdown(sock, socket.SHUT_WR)
        deadline = time.monotonic() + 0.5
        drained = 0
        while time.monotonic() < deadline and drained < (1 << 20):
            data = sock.recv(1 << 16)
            if not data:
                break
            drained += len(data)
    except (OSError, ssl.SSLError, ValueError):
        pass
