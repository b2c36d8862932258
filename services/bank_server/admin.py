"""The admin HTTP API (FastAPI), served by uvicorn on the bank server's own event loop.

    GET  /healthz                     200 while the process runs (liveness)
    GET  /readyz                      200 when every current manifest loads and the hot set is
                                      warm; 503 (with the reasons) otherwise and while draining
    GET  /metrics                     Prometheus text (metrics.py)
    GET  /v1/stats                    the same numbers as JSON, plus banks, warm-up, limits
    GET  /v1/manifest/{bank}          the current manifest (membank.manifest/1 JSON)
    GET  /v1/manifest/{bank}/{ver}    a given version's manifest
    GET  /v1/blocks/{bank}/{content}  a block by content address (`Manifest.content_id`, e.g.
                                      blake3-<hex>), for HTTP caches in front of the bank:
                                      immutable, ETag = the address, 304 on If-None-Match
    POST /v1/publish                  {"bank", "version"}: switch current (admin token)
    GET  /docs, /openapi.json         OpenAPI

Auth: `Authorization: Bearer TOKEN`, checked from the request head by admin_guard.py before
any body is read. POST needs the admin token (none configured: 403); `/v1/*` reads need the
read token when one is configured (so they cannot bypass the gRPC auth); health and metrics are
open (probes and scrapers); readiness is open but says only ready / not ready without a valid
read token while read auth is on. Missing -> 401, wrong -> 403; a peer failing too often ->
429. Bodies over `max_body_bytes` -> 413.

No single peer can deny the others: connections per peer and in all, the time a request may
take to arrive and a stalled reader are bounded (membank/http_limits.py, `limits`); /metrics and
/v1/stats collect on a thread of their own, at most once per `metrics_min_interval_s`
(metrics.Scrapes), and /readyz reads the store on the store pool, so the event loop gRPC shares
never waits for them.

`AdminServer(app, ...).start(sock)` runs it as a task on the running loop; `serve()` calls it
with a socket it bound itself, so port 0 works and the port is known before start.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Awaitable, Callable

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from membank.blocks import digest
from membank.http_limits import ConnectionLimits
from membank.keys import CONTENT_ID, content_key, valid_name
from services.bank_server.admin_guard import AdminGuard, AuthFailures
from services.bank_server.metrics import CONTENT_TYPE, Scrapes, ServerMetrics
from services.bank_server.publish import Published, PublishError
from services.bank_server.readiness import Readiness

_HTTP_FOR = {"invalid": 400, "not_found": 404, "gone": 409, "failed": 500}


class PublishBody(BaseModel):
    bank: str
    version: str


class PublishResult(BaseModel):
    bank: str
    version: str
    previous: str


# a block's bytes never change under its address: any cache may keep it for good
BLOCK_CACHE_CONTROL = "public, max-age=31536000, immutable"


def create_app(*, store, metrics: ServerMetrics, readiness: Readiness,
               publish: Callable[[str, str], Awaitable[Published]],
               auth_token: str | None = None, admin_token: str | None = None,
               limits: dict | None = None, max_body_bytes: int = 16 << 10,
               auth_failures: AuthFailures | None = None,
               metrics_min_interval_s: float = 1.0) -> AdminGuard:
    """The admin API as an ASGI app: the FastAPI routes behind AdminGuard (auth, body cap)."""
    app = FastAPI(title="membank bank server admin", version="1",
                  description="Health, readiness, metrics, manifests and admin operations of "
                              "one bank server (the blocks themselves are served over gRPC).")
    scrapes = Scrapes(metrics, min_interval_s=metrics_min_interval_s)
    app.state.scrapes = scrapes

    async def ready_status() -> tuple[bool, dict]:
        # LMDB reads and manifest parses: on the store pool, not the shared event loop
        return await asyncio.get_running_loop().run_in_executor(None, readiness.status)

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    async def readyz(request: Request) -> JSONResponse:
        ok, detail = await ready_status()
        if not request.state.read_access:   # read auth on, no token: banks stay private
            detail = {"ready": ok}
        return JSONResponse(detail, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def prometheus() -> Response:
        return Response(await scrapes.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/stats", tags=["read"])
    async def stats() -> dict:
        ok, detail = await ready_status()
        return {**await scrapes.snapshot(), "ready": ok, "banks": detail["banks"],
                "warm": detail["warm"], "limits": limits or {}}

    async def manifest_response(bank: str, version: str | None) -> Response:
        loop = asyncio.get_running_loop()
        if version is None:
            version = await loop.run_in_executor(None, store.current_version, bank)
            if version is None:
                raise HTTPException(404, f"unknown bank {bank!r}")
        m = await loop.run_in_executor(None, store.manifest, bank, version)
        if m is None:
            raise HTTPException(404, f"unknown version {version!r} of bank {bank!r}")
        return Response(m.to_json(), media_type="application/json")

    @app.get("/v1/manifest/{bank}", tags=["read"], response_class=Response)
    async def manifest_current(bank: str) -> Response:
        return await manifest_response(bank, None)

    @app.get("/v1/manifest/{bank}/{version}", tags=["read"], response_class=Response)
    async def manifest_version(bank: str, version: str) -> Response:
        return await manifest_response(bank, version)

    @app.get("/v1/blocks/{bank}/{content}", tags=["read"], response_class=Response,
             responses={304: {"description": "If-None-Match names it: the cached copy holds"},
                        400: {"description": "not a bank name or content address"},
                        404: {"description": "no block with this address on this server"}})
    async def block_by_content(bank: str, content: str, request: Request) -> Response:
        """A block's bytes by its content address, checked against it before they leave. The
        address is a 256-bit digest a reader learns only from the (token-protected) manifest,
        so a shared cache may serve it to any device that names it (`public`)."""
        if not valid_name(bank) or not CONTENT_ID.fullmatch(content) \
                or content.startswith("xxh3"):
            raise HTTPException(400, "expected /v1/blocks/BANK/blake3-<64 hex> (a content "
                                     "address from the manifest)")
        headers = {"Cache-Control": BLOCK_CACHE_CONTROL, "ETag": f'"{content}"'}
        if request.headers.get("if-none-match", "").strip() == f'"{content}"':
            return Response(status_code=304, headers=headers)   # the asker holds these bytes
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, _verified_block, store, bank, content)
        if data is None:
            raise HTTPException(404, f"no block {content[:24]}... of bank {bank!r} here")
        metrics.http_block_sent(len(data), time.perf_counter() - t0)
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.post("/v1/publish", tags=["admin"], response_model=PublishResult)
    async def publish_version(body: PublishBody) -> PublishResult:
        try:
            done = await publish(body.bank, body.version)
        except PublishError as e:
            raise HTTPException(_HTTP_FOR[e.kind], str(e)) from None
        return PublishResult(bank=done.bank, version=done.version, previous=done.previous)

    return AdminGuard(app, auth_token=auth_token, admin_token=admin_token,
                      failures=auth_failures or AuthFailures(rate=1.0, burst=10),
                      max_body_bytes=max_body_bytes)


def _verified_block(store, bank: str, content: str) -> bytes | None:
    """The block stored under `content` in LMDB (not through the Redis / LRU tiers, which keep
    only bytes verified against a manifest's checksum; the HTTP cache in front is this path's
    tier), hashed against it (the address is the digest): None when absent; HTTPException 500
    when the stored bytes do not match (never sent)."""
    data = store.get(content_key(bank, content))
    if data is None:
        return None
    algo, want = content.split("-", 1)
    if digest(data, algo) != want:
        raise HTTPException(500, f"block {content[:24]}... of bank {bank!r} fails its digest "
                                 f"on this server (corrupt store); not sent")
    return data


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the bank server owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    def install_signal_handlers(self) -> None:   # older uvicorn
        pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class AdminServer:
    def __init__(self, app, *, tls_cert=None, tls_key=None, log_level: str = "warning",
                 limits: ConnectionLimits = ConnectionLimits()):
        config = uvicorn.Config(app, log_level=log_level.lower(), access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2,
                                # idle kept-alive connections go after 5 s (uvicorn's
                                # default, said here because the connection caps rely on it)
                                timeout_keep_alive=5, **limits.uvicorn_options(),
                                ssl_certfile=str(tls_cert) if tls_cert else None,
                                ssl_keyfile=str(tls_key) if tls_key else None)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock` (bound already); returns once uvicorn accepts connections."""
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()   # raise uvicorn's start-up error
                raise RuntimeError("admin HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
