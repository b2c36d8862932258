"""DataPlaneClient: BankClient's face, with block bodies over the bank server's raw-TCP data plane.

    with DataPlaneClient("127.0.0.1:50051+50052") as client:     # HOST:GRPC_PORT+DATAPLANE_PORT
        manifest = client.get_manifest("demo")                 # gRPC, as BankClient
        blocks = client.fetch("demo", manifest.version, manifest.path_blocks(path), manifest)

    # the sharded fetcher, every shard over its data plane
    ShardedFetcher({"s0": "10.0.0.1:50051+50052", "s1": "10.0.0.2:50051+50052"}, policy,
                   client_factory=dataplane_factory(token=T, timeout_s=policy.attempt_timeout_s))

Target syntax: "HOST:GRPC_PORT+DATAPLANE_PORT" (IPv6: "[::1]:50051+50052"): one string, so
that it fits anywhere a BankClient address goes (ShardedFetcher's targets, a factory's argument,
the device's `--bank`); services/model_client/targets.py `make_client` picks this client for
such a target and BankClient for a plain "HOST:PORT".
The server prints both ports at start (`membank bank_server listening on ...` and `... dataplane
on ...`, services/bank_server/server.py); `dataplane_target(grpc_address, dataplane_port)`
builds one. `get_manifest`, `route` and `health` go to gRPC (a BankClient on HOST:GRPC_PORT);
only `fetch` uses the data plane (protocol: proto/membank/v1/dataplane.md, spoken through
membank/dataplane.py as the server does).

`fetch` has BankClient.fetch's signature and guarantees: one request for every block; each
block received straight into its buffer (`out[(level, node)]`, a buffer or a Scatter of pieces,
else one new bytearray) with
`recv_into`, hashed piece by piece while the next piece arrives, and returned only when its
header agrees with the MANIFEST and its bytes hash to the manifest's checksum; otherwise
BlockIntegrityError. An error frame raises BankError with that gRPC status code (except
RESOURCE_EXHAUSTED, which is first asked again over gRPC: `grpc_fallback`); a connection
that fails raises UNAVAILABLE, a passed deadline DEADLINE_EXCEEDED, `cancel()` of the object
given to `on_call` (it shuts the socket, from any thread) CANCELLED: the codes ShardedFetcher
acts on. Connections are pooled per client (at most `max_idle` kept open; one per concurrent
fetch) and dropped after any error; a pooled connection the server had closed is retried once
on a fresh one.

Security, as BankClient: `token=` goes in every request (auth on: UNAUTHENTICATED without it),
`tls_ca=` (PEM path or bytes, or True for the system roots) makes both gRPC and the data plane
TLS, checking the server certificate (`tls_server_name` overrides the name checked).
Run its tests: .venv/bin/python -m pytest -q tests/integration/test_dataplane.py
"""
from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from membank import quant
from membank.blocks import hasher
from membank.dataplane import END, ERROR, HEADER, REQUEST, close_quietly, frame, read_frame, timeval
from membank.fetch import FetchError, check_fetch
from membank.manifest import Manifest
from services.model_client.bank import CODES, BankError, BlockIntegrityError, destination
from services.model_client.bank_client import BankClient, tls_for_token

# receive (MSG_WAITALL) and hash a block in pieces. A small piece frees socket buffer sooner,
# so the server's copy into the socket overlaps this side's copy out of it (one large receive
# serialises the two), but each piece is a trip through Python, which concurrent fetches of one
# process pay under one GIL. So: small pieces while a fetch is alone in the process, large ones
# when several run at once. Measured (BENCHMARKS.md, "Fetch"): 32 KiB best for one client,
# 512 KiB-1 MiB for eight.
PIECE_ALONE = 32 << 10
PIECE_BUSY = 512 << 10
REARM_S = 0.002                          # a socket timeout is set again once this old
# the receive buffer of a data plane connection. A fixed large buffer (Linux doubles it and caps
# it at net.core.rmem_max) lets the shard put a whole multi-MB block in flight at once, where
# the kernel's autotuning starts small and grows per connection; measured faster at every
# block size for one client (BENCHMARKS.md, "Fetch": benchmarks/dataplane_tuning.py, rcvbuf)
RCVBUF = 4 << 20
_PLANS_MAX = 1024                        # fetch plans a client remembers (_plan); then forget all


def parse_target(target: str) -> tuple[str, str, int]:
    """"HOST:GRPC_PORT+DP_PORT" -> ("HOST:GRPC_PORT", HOST, DP_PORT); ValueError otherwise."""
    grpc_target, plus, dp = target.rpartition("+")
    host, colon, port = grpc_target.rpartition(":")
    if not (plus and colon and host and port.isdigit() and dp.isdigit()
            and 0 < int(dp) < 65536):
        raise ValueError(f"a data plane target is HOST:GRPC_PORT+DATAPLANE_PORT "
                         f"(e.g. 127.0.0.1:50051+50052), not {target!r}")
    return grpc_target, host.strip("[]"), int(dp)


def dataplane_target(grpc_address: str, dataplane: int | str) -> str:
    """The target of a server from its two printed addresses (or the data plane's port)."""
    port = int(str(dataplane).rsplit(":", 1)[-1])
    return f"{grpc_address}+{port}"


def dataplane_factory(*, token: str | None = None, tls_ca=None, tls_server_name: str | None = None,
                      timeout_s: float = 10.0, max_idle: int = 8,
                      rcvbuf: int | None = None,
                      allow_insecure_token: bool = False) -> Callable[[str], "DataPlaneClient"]:
    """A `client_factory` for ShardedFetcher: target -> DataPlaneClient with these settings."""
    def make(target: str) -> DataPlaneClient:
        return DataPlaneClient(target, timeout_s, token=token, tls_ca=tls_ca,
                               tls_server_name=tls_server_name, max_idle=max_idle,
                               rcvbuf=rcvbuf, allow_insecure_token=allow_insecure_token)
    return make


class DataPlaneCall:
    """What `on_call` gets: `cancel()` shuts the fetch's socket, so the fetch stops at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.cancelled = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.cancelled:
                _shut(sock)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._sock is not None:
                _shut(self._sock)


class _Counter:
    """Fetches in flight in this process (all clients): picks the receive piece size."""

    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self, k: int) -> None:
        with self._lock:
            self.value += k


_in_flight = _Counter()


class _Deadline:
    """One exchange's deadline (monotonic seconds) and when it armed each socket timeout
    (receive, send) on the exchange's socket (see DataPlaneClient._timeout)."""

    __slots__ = ("at", "armed")

    def __init__(self, at: float):
        self.at = at
        self.armed: list[float | None] = [None, None]


class _ServerError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class _Stale(Exception):
    """A pooled connection was closed by the server before it answered (retry once)."""


class DataPlaneClient:
    def __init__(self, target: str, timeout_s: float = 10.0, *, token: str | None = None,
                 tls_ca: str | Path | bytes | bool | None = None,
                 tls_server_name: str | None = None, max_idle: int = 8,
                 rcvbuf: int | None = None, bank_client: BankClient | None = None,
                 grpc_fallback: bool = True, allow_insecure_token: bool = False):
        """`target`: "HOST:GRPC_PORT+DATAPLANE_PORT". `timeout_s`: the default deadline of a
        call. `max_idle`: pooled connections kept open. `rcvbuf`: SO_RCVBUF of data plane
        connections in bytes (None: RCVBUF; 0: the kernel's autotuning). `bank_client`: the
        gRPC client for everything but fetch (default: a BankClient on HOST:GRPC_PORT with the
        same settings). `grpc_fallback`: a fetch the data plane refuses with
        RESOURCE_EXHAUSTED (its connection slots taken, e.g. by other peers) is asked of the
        same server over gRPC within the same deadline, so a device is not left without
        memory while gRPC, admitted separately, can serve it (counted in `fallbacks`).
        `allow_insecure_token`: send `token` without TLS (BankClient's `tls_for_token`: by
        default a token with no CA means TLS with the system roots)."""
        self.target = target
        tls_ca = tls_for_token(tls_ca, token, allow_insecure_token)
        self.grpc_target, self.host, self.port = parse_target(target)
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self.rcvbuf = RCVBUF if rcvbuf is None else rcvbuf
        self._token = token
        self._tls = _client_context(tls_ca)
        self._server_hostname = tls_server_name or self.host
        self.grpc = bank_client or BankClient(self.grpc_target, timeout_s, token=token,
                                              tls_ca=tls_ca, tls_server_name=tls_server_name,
                                              allow_insecure_token=allow_insecure_token)
        self._idle: list[socket.socket] = []
        self._plans: dict[tuple, _Plan] = {}       # see _plan
        self._lock = threading.Lock()
        self._closed = False
        self.grpc_fallback = grpc_fallback
        self.fallbacks = 0

    # -- control: gRPC ------------------------------------------------------------------------
    def get_manifest(self, bank: str, version: str = "", *,
                     timeout_s: float | None = None) -> Manifest:
        return self.grpc.get_manifest(bank, version, timeout_s=timeout_s)

    def route(self, bank: str, embedding, version: str = ""):
        return self.grpc.route(bank, embedding, version)

    def health(self, timeout_s: float = 1.0) -> bool:
        """gRPC health of the server (the data plane runs in the same process)."""
        return self.grpc.health(timeout_s)

    # -- blocks: the data plane ----------------------------------------------------------------
    def fetch(self, bank: str, version: str, blocks: list[tuple[int, int]],
              manifest: Manifest, *, out: dict | None = None, timeout_s: float | None = None,
              on_call=None, encoding: str = "") -> dict[tuple[int, int], bytearray]:
        """Fetch `blocks` [(level, node), ...] of bank/version in one request, verified.

        As BankClient.fetch: `manifest` is what is trusted ("" version = the manifest's);
        `out` maps (level, node) to a writable buffer of the block's size or a Scatter
        (services/model_client/bank.py), received into directly and returned (its content is
        undefined after an error); `timeout_s` overrides
        the deadline; `on_call(call)` gets an object whose `cancel()` stops this fetch
        (BankError CANCELLED). `encoding`: "" / "native" or "int8" (membank/quant.py), as
        BankClient's. As BankClient, arguments the manifest refuses (membank/fetch.py
        check_fetch) raise BankError with the server's code and message before any request.
        """
        version = version or manifest.version
        if bank != manifest.bank or version != manifest.version:
            raise ValueError(f"manifest is {manifest.bank}/{manifest.version}, "
                             f"not {bank}/{version}")
        encoding = quant.normalize(encoding)            # ValueError for an unknown name
        try:
            plan = self._plan(manifest, blocks, encoding)   # check_fetch, once per plan
        except FetchError as e:
            raise BankError(e.code, e.message) from None
        views = _out_views(plan, out)                       # ValueError before any I/O
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        call = DataPlaneCall()
        if on_call is not None:
            on_call(call)
        _in_flight.add(1)
        try:
            return self._fetch(plan, views, deadline, call)
        except BankError as e:
            remaining = deadline - time.monotonic()
            if (e.code != "RESOURCE_EXHAUSTED" or not self.grpc_fallback or call.cancelled
                    or remaining <= 0):
                raise
            self.fallbacks += 1
            return self.grpc.fetch(bank, version, blocks, manifest, out=out,
                                   timeout_s=remaining, on_call=on_call, encoding=encoding)
        finally:
            _in_flight.add(-1)

    def _plan(self, manifest: Manifest, blocks, encoding: str) -> "_Plan":
        """The request's fixed part and what its answer must be, made once per (manifest,
        blocks, encoding) and reused: a device asks for the same paths again and again."""
        ids = tuple((int(level), int(node)) for level, node in blocks)
        key = (id(manifest), ids, encoding)
        plan = self._plans.get(key)
        if plan is None or plan.manifest is not manifest:    # `is`: an id may be reused
            plan = _Plan(manifest, ids, encoding, self._token)
            with self._lock:
                if len(self._plans) >= _PLANS_MAX:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def _fetch(self, plan: "_Plan", views, deadline: float, call: DataPlaneCall) -> dict:
        """The request on a pooled (or, once the pooled one proves stale, a new) connection."""
        for attempt in (0, 1):
            sock, reused = self._connect(deadline, call)
            try:
                result = self._exchange(sock, plan, views, _Deadline(deadline), reused)
            except _Stale:
                close_quietly(sock)
                if call.cancelled:
                    raise BankError("CANCELLED", "fetch cancelled") from None
                if attempt == 0:
                    continue            # the server closed an idle connection: a fresh one
                raise BankError("UNAVAILABLE",
                                f"data plane {self.host}:{self.port} closed the connection")
            except _ServerError as e:
                close_quietly(sock)
                # a name outside gRPC's is the server's bug, not a code to act on
                raise BankError(e.code if e.code in CODES else "UNKNOWN", e.message) from None
            except (BankError, ValueError):
                close_quietly(sock)
                raise
            except (OSError, ssl.SSLError, EOFError) as e:
                close_quietly(sock)
                raise self._transport_error(e, call, deadline) from None
            self._release(sock)
            return result
        raise AssertionError("unreachable")

    # -- one request on one connection -----------------------------------------------------------
    def _exchange(self, sock, plan: "_Plan", views, deadline: _Deadline, reused: bool) -> dict:
        body = plan.request_json(max(0.0, (deadline.at - time.monotonic()) * 1e3))
        try:
            self._send(sock, frame(REQUEST, body), deadline)
            kind, payload = self._read_frame(sock, deadline)
        except (EOFError, ConnectionResetError, BrokenPipeError):
            if reused:      # closed by the server while pooled (idle timeout, restart)
                raise _Stale() from None
            raise
        result: dict = {}
        for i, (level, node) in enumerate(plan.ids):
            if i:
                kind, payload = self._read_frame(sock, deadline)
            if kind == ERROR:
                raise _ServerError(*_error_fields(payload))
            if kind != HEADER:
                raise BlockIntegrityError(f"unexpected frame {kind!r} where the header of block "
                                          f"({level}, {node}) belongs")
            plan.check_header(i, payload)
            dest = views[i] or destination(None, plan.nbytes[i], (level, node))
            algo, want = plan.checks[i]
            if self._recv_body(sock, dest.pieces, deadline, algo) != want:
                raise BlockIntegrityError(f"block ({level}, {node}) fails its manifest {algo} "
                                          f"hash")
            result[(level, node)] = dest.result
        kind, payload = self._read_frame(sock, deadline)
        if kind == ERROR:
            raise _ServerError(*_error_fields(payload))
        if kind != END or (payload != plan.end and _json(payload).get("blocks") != len(plan.ids)):
            raise BlockIntegrityError(f"unexpected frame {kind!r} after {len(plan.ids)} blocks "
                                      f"(expected the end frame)")
        return result

    def _recv_body(self, sock, views: list[memoryview], deadline: _Deadline, algo: str) -> str:
        """Receive a block into `views` in order (a Scatter's pieces), filling each exactly,
        hashing (with `algo`) each received step as it completes; the digest."""
        step = PIECE_ALONE if _in_flight.value <= 1 else PIECE_BUSY
        h = hasher(algo)
        # MSG_WAITALL: one system call per whole step (plain sockets; TLS reads records)
        flags = 0 if self._tls else socket.MSG_WAITALL
        for view in views:
            n, got, hashed = view.nbytes, 0, 0
            while got < n:
                self._timeout(sock, deadline)
                k = sock.recv_into(view[got:], min(step, n - got), flags)
                if k == 0:
                    raise EOFError("connection closed inside a block")
                got += k
                if got - hashed >= step or got == n:
                    h.update(view[hashed:got])
                    hashed = got
        return h.hexdigest()

    def _read_frame(self, sock, deadline: _Deadline) -> tuple[bytes, bytes]:
        try:
            return read_frame(lambda n: self._recv_exact(sock, n, deadline))
        except FetchError as e:          # a bad magic or an oversized frame
            raise BlockIntegrityError(f"{e.message}; is {self.host}:{self.port} the data plane "
                                      f"port?") from None

    def _recv_exact(self, sock, n: int, deadline: _Deadline) -> bytes:
        # MSG_WAITALL: one system call for the whole frame (plain sockets); a shorter answer
        # means the deadline's timeout fired part-way, or the server closed the connection
        flags = 0 if self._tls else socket.MSG_WAITALL
        self._timeout(sock, deadline)
        data = sock.recv(n, flags)
        if len(data) == n:
            return data
        parts, got = [data], len(data)
        while got < n:
            if not parts[-1]:
                raise EOFError("connection closed")
            self._timeout(sock, deadline)
            parts.append(sock.recv(n - got, flags))
            got += len(parts[-1])
        return b"".join(parts)

    def _send(self, sock, data: bytes, deadline: _Deadline) -> None:
        if not self._tls:
            # a request (~150 bytes) almost always fits the empty send buffer at once: try
            # without blocking first, and arm the send timeout only for what is left
            try:
                sent = sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            data = data[sent:]
            if not data:
                return
        self._timeout(sock, deadline, send=True)
        sock.sendall(data)

    def _timeout(self, sock, deadline: _Deadline, send: bool = False) -> None:
        """Bound the next blocking call by the deadline. Plain sockets stay blocking (a
        MSG_WAITALL receive is one call) with the kernel's SO_RCVTIMEO / SO_SNDTIMEO, set to
        the time left and set again only once that setting is REARM_S old (so a fetch makes
        one or two setsockopt calls, not one per receive, and a blocking call ends at most
        REARM_S after the deadline); TLS sockets use Python's timeout."""
        now = time.monotonic()
        left = deadline.at - now
        if left <= 0:
            raise socket.timeout("deadline passed")
        if self._tls:
            sock.settimeout(left)
            return
        armed = deadline.armed[send]
        if armed is None or now - armed >= REARM_S:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO if send else socket.SO_RCVTIMEO,
                            timeval(left))
            deadline.armed[send] = now

    # -- connections ---------------------------------------------------------------------------
    def _connect(self, deadline: float, call: DataPlaneCall) -> tuple[socket.socket, bool]:
        """A pooled connection (reused=True) or a new one; BankError when none can be had."""
        while True:
            with self._lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                break
            # readable while idle = the server closed it (or sent junk): not reusable
            try:
                if not select.select([sock], [], [], 0)[0]:
                    call.attach(sock)
                    return sock, True
            except (OSError, ValueError):
                pass
            close_quietly(sock)
        left = deadline - time.monotonic()
        if left <= 0:
            raise BankError("DEADLINE_EXCEEDED", "deadline passed before connecting")
        try:
            sock = socket.create_connection((self.host, self.port), timeout=left)
        except socket.timeout:
            raise BankError("DEADLINE_EXCEEDED",
                            f"connecting to the data plane {self.host}:{self.port} "
                            f"timed out") from None
        except OSError as e:
            raise BankError("UNAVAILABLE",
                            f"data plane {self.host}:{self.port} unreachable: {e}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            if self._tls is not None:
                # cancellable during the handshake too: a stalled server (e.g. docker pause)
                # accepts the connection in its kernel but never answers the ClientHello, and
                # a hedged fetch must not hold its thread until the deadline (wrap_socket
                # detaches `sock`: the wrapped one is what cancel() must shut)
                sock = self._tls.wrap_socket(sock, server_hostname=self._server_hostname,
                                             do_handshake_on_connect=False)
                call.attach(sock)
                sock.do_handshake()
            else:
                sock.settimeout(None)      # blocking; deadlines via SO_RCVTIMEO (_timeout)
        except socket.timeout:
            close_quietly(sock)
            raise BankError("DEADLINE_EXCEEDED", "TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as e:
            close_quietly(sock)
            if call.cancelled:
                raise BankError("CANCELLED", "fetch cancelled") from None
            raise BankError("UNAVAILABLE",
                            f"data plane {self.host}:{self.port}: TLS failed: {e}") from None
        call.attach(sock)
        return sock, False

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(sock)
                return
        close_quietly(sock)

    def _transport_error(self, e: BaseException, call: DataPlaneCall, deadline: float) -> BankError:
        if call.cancelled:
            return BankError("CANCELLED", "fetch cancelled")
        if isinstance(e, (socket.timeout, BlockingIOError, ssl.SSLWantReadError,
                          ssl.SSLWantWriteError)) or time.monotonic() >= deadline:
            return BankError("DEADLINE_EXCEEDED",
                             f"data plane fetch from {self.host}:{self.port}: deadline exceeded")
        return BankError("UNAVAILABLE",
                         f"data plane {self.host}:{self.port}: {e or type(e).__name__}")

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            close_quietly(s)
        self.grpc.close()

    def __enter__(self) -> "DataPlaneClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- helpers -------------------------------------------------------------------------------------
class _Plan:
    """One fetch's fixed part, made once per (manifest, blocks, encoding) by
    DataPlaneClient._plan: the request's JSON but for its deadline, and what every block's
    header, size and hash must be (the manifest's word, never the server's: the signed digest,
    or the xxh3 checksum of a manifest without digests). FetchError when the manifest refuses
    the fetch (membank/fetch.py check_fetch)."""

    __slots__ = ("manifest", "ids", "nbytes", "checks", "wants", "request", "end", "seen")

    def __init__(self, manifest: Manifest, ids: tuple, encoding: str, token: str | None):
        check_fetch(manifest, ids, encoding)
        self.manifest, self.ids = manifest, ids
        self.wants = [manifest.block_header(level, node, encoding) for level, node in ids]
        self.nbytes = [w.nbytes for w in self.wants]
        self.checks = [manifest.block_check(level, node, encoding) for level, node in ids]
        request = {"bank": manifest.bank, "version": manifest.version,
                   "blocks": [list(b) for b in ids], "encoding": encoding}
        if token:
            request["token"] = token
        # '"bank":...}': the deadline goes in front of it per request (request_json)
        self.request = json.dumps(request, separators=(",", ":")).encode()[1:]
        self.end = json.dumps({"blocks": len(ids)}, separators=(",", ":")).encode()
        # per block: the last header payload that passed check_header (the same bytes pass
        # again without parsing them); a race between fetches only means one parses again
        self.seen = [None] * len(ids)

    def request_json(self, deadline_ms: float) -> bytes:
        return b'{"deadline_ms":%.3f,' % deadline_ms + self.request

    def check_header(self, i: int, payload: bytes) -> None:
        """BlockIntegrityError unless the header of block i agrees with the manifest."""
        if payload == self.seen[i]:
            return
        level, node = self.ids[i]
        h = _json(payload)
        if h.get("index") != i:
            raise BlockIntegrityError(f"block index {h.get('index')!r} where {i} "
                                      f"({level}, {node}) was expected")
        want = self.wants[i]
        shape = h.get("shape")
        got = (h.get("level"), h.get("node"), h.get("version"), h.get("checksum"),
               h.get("nbytes"), h.get("dtype"), tuple(shape) if isinstance(shape, list) else shape)
        if got != want:
            raise BlockIntegrityError(f"block ({level}, {node}) header {got} does not match "
                                      f"the manifest {tuple(want)}")
        self.seen[i] = payload


def _out_views(plan: _Plan, out: dict | None) -> list:
    """Per requested block: the caller's destination as a Scatter, or None (ValueError for a
    destination of the wrong size)."""
    views: list = [None] * len(plan.ids)
    if not out:
        return views
    for i, key in enumerate(plan.ids):
        dest = out.get(key)
        if dest is not None:
            views[i] = destination(dest, plan.nbytes[i], key)
    return views


def _json(payload: bytes) -> dict:
    try:
        obj = json.loads(payload)
    except ValueError:
        raise BlockIntegrityError("malformed frame from the data plane (not JSON)") from None
    if not isinstance(obj, dict):
        raise BlockIntegrityError("malformed frame from the data plane (not an object)")
    return obj


def _error_fields(payload: bytes) -> tuple[str, str]:
    obj = _json(payload)
    return str(obj.get("code", "UNKNOWN")), str(obj.get("message", ""))


def _client_context(tls_ca) -> ssl.SSLContext | None:
    if tls_ca is None or tls_ca is False:
        return None
    if tls_ca is True:
        return ssl.create_default_context()
    if isinstance(tls_ca, bytes):
        return ssl.create_default_context(cadata=tls_ca.decode())
    return ssl.create_default_context(cafile=str(tls_ca))


def _shut(sock) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass

