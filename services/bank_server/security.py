"""One gRPC server interceptor for auth, per-client rate limits and per-RPC metrics.

    interceptor = GuardInterceptor(auth_token="r", admin_token="a", limiter=RateLimiter(20, 50),
                                   metrics=metrics)
    grpc.aio.server(interceptors=[interceptor], ...)

Auth (metadata `authorization: Bearer TOKEN`, compared in constant time):
  - health checks (`grpc.health.v1.Health`) never need a token: probes cannot send one;
  - `membank.v1.BankAdmin/*` needs the admin token; with none configured they are all refused;
  - everything else (BankService, reflection) needs the read token when one is configured
    (the admin token is accepted too);
  missing or malformed metadata -> UNAUTHENTICATED, a wrong token -> PERMISSION_DENIED.
Rate limit: a token bucket per client (its IP, or its token with key="token"); an empty bucket
answers RESOURCE_EXHAUSTED saying when to retry. Checked before auth, so refused attempts
count too (token guessing is rate limited). Health checks are not limited.
Admission (admission.py): after the rate limit and auth, every non-health RPC takes a slot
(at most `max_rpcs` in all, `max_rpcs_per_peer` per client IP) until its handler returns; a
`Health/Watch` stream takes a watch slot (fewer, per client IP too) and ends with OK after
`watch_max_s` (a watcher then watches again); `Health/Check` takes none and always answers.
Refused: RESOURCE_EXHAUSTED with a one-line reason.
Metrics: every non-health RPC is counted by final status code (aborts, cancellations and
deadlines included) and timed; see metrics.py.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import ssl
import threading
import time
from collections import OrderedDict
from typing import Literal

import grpc

# what a write raises once the call ended under it (grpc.aio has no public name for it)
from grpc._cython.cygrpc import ExecuteBatchError as _ExecuteBatchError

from services.bank_server.admission import Admission

HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_WATCH = HEALTH_PREFIX + "Watch"
ADMIN_PREFIX = "/membank.v1.BankAdmin/"


def bearer(metadata) -> str | None:
    """The token of `authorization: Bearer TOKEN`, "" if the value is malformed, None if absent."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def token_matches(presented: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(presented.encode(), expected.encode())


def peer_host(peer: str) -> str:
    """"ipv4:1.2.3.4:5678" -> "1.2.3.4", "ipv6:[::1]:5678" -> "::1"; anything else as it is."""
    kind, _, rest = (peer or "").partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    return peer or "?"


class RateLimiter:
    """Token buckets keyed by client: `rate` units/s sustained, `burst` at once. A unit is one
    request (the request limiter: `take(key)`) or one byte (the byte limiter of block fetches:
    `take(key, nbytes)`, services/bank_server/fetchplan.py `admit_bytes`).

    A take of `cost` units is admitted once the bucket holds min(cost, burst) (so a cost over
    the burst is not refused forever) and then takes the whole cost: the bucket may go below
    zero, and the client waits until it has refilled, so the sustained rate holds for any mix
    of costs. At most `max_clients` buckets are kept (least recently seen dropped first: a
    dropped client starts again with a full bucket, which only ever errs towards admitting).
    """

    def __init__(self, rate: float, burst: float, max_clients: int = 10_000):
        self.rate, self.burst, self.max_clients = float(rate), float(burst), max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, t)
        self._lock = threading.Lock()

    def take(self, key: str, cost: float = 1.0, *, now: float | None = None) -> float:
        """0.0 if `cost` units are admitted (and counted), else seconds until they would be."""
        now = time.monotonic() if now is None else now
        need = min(float(cost), self.burst)
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= need:
                tokens -= cost
            else:
                wait = (need - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, auth_token: str | None = None, admin_token: str | None = None,
                 limiter: RateLimiter | None = None, limit_key: Literal["peer", "token"] = "peer",
                 metrics=None, admission: Admission | None = None,
                 watch_max_s: float | None = None):
        self.auth_token = auth_token or None
        self.admin_token = admin_token or None
        self.limiter = limiter
        self.limit_key = limit_key
        self.metrics = metrics
        self.admission = admission      # None: no slots (tests of auth alone)
        self.watch_max_s = watch_max_s  # None: Watch streams last as long as the client wants

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler   # unknown methods: grpc's UNIMPLEMENTED
        if method.startswith(HEALTH_PREFIX):
            # health needs no token and is never rate limited (probes); Check takes no slot,
            # Watch a watch slot and a lifetime (admission.py)
            if method == HEALTH_WATCH and handler.unary_stream is not None:
                return grpc.unary_stream_rpc_method_handler(
                    _watch(handler.unary_stream, self),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        denial = self._authorize(method, token)
        return _wrap(handler, _Guard(self, method.rsplit("/", 1)[-1], denial, token))

    def _authorize(self, method: str, token: str | None) -> tuple[grpc.StatusCode, str] | None:
        if method.startswith(ADMIN_PREFIX):
            if self.admin_token is None:
                return (grpc.StatusCode.PERMISSION_DENIED,
                        "admin RPCs are disabled on this server (no admin token configured)")
            expected = (self.admin_token,)
        elif self.auth_token is not None:
            expected = (self.auth_token, self.admin_token)
        else:
            return None
        if token is None:
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "missing `authorization: Bearer <token>` metadata")
        if token == "":
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "authorization metadata must be `Bearer <token>`")
        if not any(token_matches(token, e) for e in expected):
            return grpc.StatusCode.PERMISSION_DENIED, "token not valid for this method"
        return None


class _Guard:
    """Per-RPC state: admission (auth, rate limit) and the metrics record."""

    __slots__ = ("owner", "name", "denial", "token", "t0", "release")

    def __init__(self, owner: GuardInterceptor, name: str, denial, token):
        self.owner, self.name, self.denial, self.token = owner, name, denial, token
        self.release = None

    async def admit(self, context) -> None:
        self.t0 = time.perf_counter()
        if self.owner.metrics is not None:
            self.owner.metrics.rpc_started()
        limiter = self.owner.limiter
        if limiter is not None:
            key = (f"token:{self.token}" if self.owner.limit_key == "token" and self.token
                   else f"peer:{peer_host(context.peer())}")
            wait = limiter.take(key)
            if wait > 0:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"rate limit exceeded ({limiter.rate:g} requests/s per client,"
                                    f" burst {limiter.burst:g}); retry in {wait:.2f} s")
        # after the rate limit, so that guessing tokens is rate limited too
        if self.denial is not None:
            await context.abort(*self.denial)
        admission = self.owner.admission
        if admission is not None:
            peer = peer_host(context.peer())
            self.release = admission.acquire("rpc", peer)
            if self.release is None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    admission.refusal("rpc", peer))

    def done(self, context, exc: BaseException | None) -> None:
        if self.release is not None:
            self.release()
            self.release = None
        if self.owner.metrics is None:
            return
        code = _final_code(context, exc)
        self.owner.metrics.rpc_done(self.name, code, time.perf_counter() - self.t0)


def _final_code(context, exc: BaseException | None) -> str:
    code = _code_name(context)
    if exc is None or isinstance(exc, grpc.aio.AbortError) or code not in (None, "OK"):
        return code or "OK"      # returned, aborted, or chose a status before it was stopped
    # stopped by the call's end: cancelled by grpc (a task cancel, or a write that failed
    # because the client went away or its deadline passed)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, _ExecuteBatchError)):
        remaining = context.time_remaining()
        return ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0
                else "CANCELLED")
    return "UNKNOWN"


def _code_name(context) -> str | None:
    """The status code the handler set or aborted with, by name; None when none was."""
    try:
        code = context.code()
    except Exception:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if code is not None:
        try:   # some grpc versions keep the raw integer
            return next(c.name for c in grpc.StatusCode if c.value[0] == int(code))
        except (StopIteration, TypeError, ValueError):
            pass
    return None


def _wrap(handler: grpc.RpcMethodHandler, guard: _Guard) -> grpc.RpcMethodHandler:
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, guard), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary, guard), **kw)
    if handler.unary_stream:
        if inspect.iscoroutinefunction(handler.unary_stream):   # writes with context.write
            return grpc.unary_stream_rpc_method_handler(
                _unary(handler.unary_stream, guard), **kw)
        return grpc.unary_stream_rpc_method_handler(_stream(handler.unary_stream, guard), **kw)
    return grpc.stream_stream_rpc_method_handler(_stream(handler.stream_stream, guard), **kw)


def _unary(inner, guard: _Guard):
    async def behavior(request, context):
        exc = None
        try:
            await guard.admit(context)
            result = inner(request, context)
            return (await result) if inspect.isawaitable(result) else result
        except BaseException as e:
            exc = e
            raise
        finally:
            guard.done(context, exc)
    return behavior


def _stream(inner, guard: _Guard):
    async def behavior(request, context):
        exc = None
        result = None
        try:
            await guard.admit(context)
            result = inner(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):   # a handler that writes with context.write
                await result
            else:
                for item in result:
                    yield item
        except BaseException as e:
            exc = e
            raise
        finally:
            if inspect.isasyncgen(result):
                await result.aclose()
            guard.done(context, exc)
    return behavior


def _watch(inner, owner: GuardInterceptor):
    """`Health/Watch` behind a watch slot (per client IP and in all), ended with OK after
    `owner.watch_max_s`: a watcher that wants more watches again (and is admitted again)."""
    async def behavior(request, context):
        admission = owner.admission
        release = None
        if admission is not None:
            peer = peer_host(context.peer())
            release = admission.acquire("watch", peer)
            if release is None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    admission.refusal("watch", peer))
        try:
            await asyncio.wait_for(inner(request, context), owner.watch_max_s)
        except asyncio.TimeoutError:
            pass              # lived its time: the stream ends with OK
        finally:
            if release is not None:
                release()
    return behavior


def server_ssl_context(settings) -> ssl.SSLContext | None:
    """The data plane's TLS context from BankServerSettings: gRPC's certificate and key, or
    None without them."""
    if settings.tls_cert is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx
