"""Start a bank server: gRPC BankService over an LMDB store, plus health and reflection.

    python -m services.bank_server.ingest EXPORT_DIR --lmdb data/bank.lmdb
    python -m services.bank_server.server --lmdb data/bank.lmdb --port 0 [--redis-url redis://...]

Once bound it prints `membank bank_server admin on HOST:PORT` (the admin HTTP server, unless
--no-admin), `membank bank_server dataplane on HOST:PORT` (the raw-TCP block data plane, only
with --dataplane-port) and then `membank bank_server listening on HOST:PORT` (with port 0, the
ports the OS picked); scripts and tests wait for the last line. SIGTERM or SIGINT stop it
gracefully: health turns NOT_SERVING, /readyz 503, new RPCs and data plane connections are
refused, and in-flight RPCs and data plane requests (a fetch half sent) get `shutdown_grace_s`
(5 s) to finish.
One process, one event loop: grpc.aio serves the gRPC API (BankService: GetManifest,
FetchBlocks, Route; BankAdmin: Publish; health; reflection) and uvicorn the admin HTTP API
(admin.py), behind one interceptor for auth, rate limits and metrics (security.py). The data
plane (dataplane.py) runs on threads of its own beside them, over the same store and tiers,
with the same token, TLS certificate, rate limiter and metrics; with `--workers N` it runs in N
processes of its own instead (workers.py), the limits and metrics still the shard's as a whole.
Settings: services/bank_server/settings.py (env MEMBANK_SERVER_*, flags override).
"""
from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.bank_server import admin as admin_http
from services.bank_server.admission import Admission
from services.bank_server.control import ADMIN_SERVICE_NAME, add_control_services
from services.bank_server.dataplane import DataPlaneServer
from services.bank_server.metrics import ServerMetrics
from services.bank_server.peers import build_limiters
from services.bank_server.publish import publish
from services.bank_server.readiness import Readiness
from services.bank_server.security import GuardInterceptor, server_ssl_context
from services.bank_server.servicer import SERVICE_NAME, add_bank_service
from services.bank_server.settings import BankServerSettings
from services.bank_server.store import LMDBStore, tune_malloc
from services.bank_server.tiers import build_block_store, tiers
from services.bank_server.workers import DataPlaneWorkers, split_lru

log = logging.getLogger("membank.bank_server")
# how often health re-checks that the LMDB can be read (issue 16: a map grown by ingest)
STORE_CHECK_INTERVAL_S = 1.0


async def serve(settings: BankServerSettings) -> None:
    """Run the server until SIGTERM/SIGINT."""
    workers = DataPlaneWorkers(settings) if settings.workers > 1 else None
    try:
        await _serve(split_lru(settings), workers)
    finally:
        if workers is not None:
            workers.close()


async def _serve(settings: BankServerSettings, workers: DataPlaneWorkers | None) -> None:
    loop = asyncio.get_running_loop()
    # before anything serves: the data plane's threads answer as soon as they start, so a
    # SIGTERM right after the first answer must already find the graceful handler (it did not
    # once under load: the default action killed the process mid-fetch)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # blocking store reads run on this pool (servicer uses run_in_executor(None, ...))
    loop.set_default_executor(ThreadPoolExecutor(settings.max_workers, thread_name_prefix="store"))

    store = LMDBStore(settings.lmdb_path, settings.map_size, readonly=True,
                      verify_ttl_s=settings.verify_ttl_s)
    if settings.shard_id and store.shard_id not in (None, settings.shard_id):
        raise SystemExit(f"bank_server: {settings.lmdb_path} was ingested for shard "
                         f"{store.shard_id!r}, not {settings.shard_id!r}")
    blocks = build_block_store(settings, store)

    metrics = ServerMetrics(tier_sources=lambda: (blocks, store),
                            worker_dir=workers.metrics_dir if workers is not None else None)
    auth_token, admin_token = _secret(settings.auth_token), _secret(settings.admin_token)
    # requests/s and block bytes/s per client, one budget over gRPC and the data plane (and
    # over every process of the shard: peers.py)
    limiter, byte_limiter = workers.limiters() if workers is not None else build_limiters(settings)
    # no `maximum_concurrent_rpcs` for grpc itself: it would count health checks too, and a
    # client holding the slots would fail the liveness probe; the interceptor admits instead,
    # per client and in all, health apart (admission.py)
    admission = Admission(max_rpcs=settings.max_concurrent_rpcs,
                          max_rpcs_per_peer=settings.max_rpcs_per_peer,
                          max_watches=settings.max_health_watches,
                          max_watches_per_peer=settings.max_health_watches_per_peer)
    server = grpc.aio.server(
        interceptors=[GuardInterceptor(auth_token=auth_token, admin_token=admin_token,
                                       limiter=limiter, metrics=metrics, admission=admission,
                                       watch_max_s=settings.health_watch_max_s)],
        options=[
            # a FetchBlocksRequest of 64 ids is ~1 KB: anything larger is refused by grpc
            # itself with RESOURCE_EXHAUSTED before it is parsed
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.so_reuseport", 0),   # a second server on the same port must fail, not share
            *connection_options(settings),
        ],
    )
    servicer = add_bank_service(server, store, blocks,
                                max_blocks_per_request=settings.max_blocks_per_request,
                                stall_timeout_s=settings.stream_stall_timeout_s)
    servicer.metrics = metrics
    servicer.shard_id = settings.shard_id
    servicer.byte_limiter = byte_limiter
    add_control_services(server, servicer, settings)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME,
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)

    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"could not bind {address}")

    readiness = Readiness(store, blocks, levels=settings.warm_levels,
                          max_bytes=int(settings.warm_max_gb * (1 << 30)))
    admin = None
    if settings.admin:
        app = admin_http.create_app(
            store=store, metrics=metrics, readiness=readiness,
            publish=lambda bank, version: publish(settings.lmdb_path, bank, version,
                                                  settings.map_size),
            auth_token=auth_token, admin_token=admin_token, limits=limits(settings),
            max_body_bytes=settings.admin_max_body_bytes,
            auth_failures=admin_http.AuthFailures(settings.admin_auth_fail_rps,
                                                  settings.admin_auth_fail_burst),
            metrics_min_interval_s=settings.metrics_min_interval_s)
        try:
            sock = admin_http.bind(settings.host, settings.admin_port)
        except OSError as e:
            raise SystemExit(f"could not bind the admin port {settings.host}:"
                             f"{settings.admin_port}: {e.strerror}") from None
        admin = admin_http.AdminServer(app, tls_cert=settings.tls_cert, tls_key=settings.tls_key,
                                       limits=settings.admin_connection_limits())
        await admin.start(sock)
        print(f"membank bank_server admin on {settings.host}:{sock.getsockname()[1]}", flush=True)

    dataplane = None
    if workers is not None:
        try:
            dp_port = await asyncio.to_thread(workers.start, store.reader_check)
        except OSError as e:
            raise SystemExit(f"could not bind the data plane port {settings.host}:"
                             f"{settings.dataplane_port}: {e.strerror}") from None
        except RuntimeError as e:
            raise SystemExit(f"bank_server: {e}") from None
        log.info("data plane: %d worker processes", settings.workers)
        print(f"membank bank_server dataplane on {settings.host}:{dp_port}", flush=True)
    elif settings.dataplane_port is not None:
        dataplane = DataPlaneServer(settings, store, blocks, metrics=metrics, limiter=limiter,
                                    byte_limiter=byte_limiter,
                                    auth_token=auth_token, admin_token=admin_token,
                                    ssl_context=server_ssl_context(settings))
        try:
            dp_port = dataplane.start()
        except OSError as e:
            raise SystemExit(f"could not bind the data plane port {settings.host}:"
                             f"{settings.dataplane_port}: {e.strerror}") from None
        print(f"membank bank_server dataplane on {settings.host}:{dp_port}", flush=True)

    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"membank bank_server listening on {settings.host}:{port}", flush=True)
    warm = asyncio.create_task(readiness.warm())
    watch = asyncio.create_task(watch_store(store, health_servicer))
    await stop.wait()

    grace = settings.shutdown_grace_s
    log.info("shutting down (grace %.1f s)", grace)
    readiness.draining = True
    warm.cancel()
    watch.cancel()
    await health_servicer.enter_graceful_shutdown()
    # refuses new RPCs at once; in-flight ones (a half-sent fetch) may finish within the grace;
    # the data plane drains the same way, at the same time, on a thread (it blocks)
    drains = [server.stop(grace=grace)]
    if dataplane is not None:
        drains.append(asyncio.to_thread(dataplane.stop, grace))
    if workers is not None:
        drains.append(asyncio.to_thread(workers.stop, grace))
    await asyncio.gather(*drains)
    if admin is not None:
        await admin.stop()
    for tier in tiers(blocks)[:-1]:          # the caches in front of the store
        log.info("%s tier: %s", tier.name, tier.stats())
        tier.close()
    store.close()


def connection_options(settings: BankServerSettings) -> list[tuple[str, int]]:
    """HTTP/2 limits per connection. Streams: one connection cannot open more at once (the
    client queues the rest). Max age: a connection is closed (GOAWAY, then `grace` for its
    RPCs) after this long, which also ends any stream still parked behind a client that
    stopped reading (servicer.py): nothing the server holds outlives age + grace."""
    out = [("grpc.max_concurrent_streams", settings.max_streams_per_connection)]
    if settings.max_connection_age_s is not None:
        out += [("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms",
                 int(settings.max_connection_age_grace_s * 1000))]
    return out
async def watch_store(store: LMDBStore, health_servicer) -> None:
    """gRPC health follows the store: NOT_SERVING while its LMDB cannot be read (a grown map it
    could not adopt: store.py, "Map size"), SERVING when it can. Each check begins a read, so a
    map that ingest grew is adopted here before a request needs it."""
    loop = asyncio.get_running_loop()
    serving = True
    while True:
        await asyncio.sleep(STORE_CHECK_INTERVAL_S)
        failure = await loop.run_in_executor(None, store.check)
        if (failure is None) != serving:
            serving = failure is None
            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            if not serving:
                log.error("health NOT_SERVING: %s", failure)
            for service in ("", SERVICE_NAME):
                await health_servicer.set(service, status)


def limits(settings: BankServerSettings) -> dict:
    """The limits in force, as reported by /v1/stats (README: "Limits")."""
    from membank import wire
    return {
        "max_request_bytes": settings.max_request_bytes,
        "max_blocks_per_request": settings.max_blocks_per_request,
        "chunk_bytes": wire.CHUNK_BYTES,
        "max_concurrent_rpcs": settings.max_concurrent_rpcs,
        "max_rpcs_per_peer": settings.max_rpcs_per_peer,
        "max_streams_per_connection": settings.max_streams_per_connection,
        "stream_stall_timeout_s": settings.stream_stall_timeout_s,
        "rate_limit_rps": settings.rate_limit_rps,
        "rate_limit_burst": settings.rate_limit_burst if settings.rate_limit_rps else None,
        "auth": settings.auth_token is not None,
        "admin": settings.admin_token is not None,
        "tls": settings.tls_cert is not None,
        "dataplane": settings.dataplane_port is not None,
        "dataplane_max_connections": settings.dataplane_max_connections,
        "workers": settings.workers,
        # issue 16: per-peer slots, minimum send rate, byte rate limit
        "dataplane_max_connections_per_peer": settings.dataplane_max_connections_per_peer,
        "dataplane_min_send_rate_mb_s": settings.dataplane_min_send_rate_mb_s,
        "rate_limit_mb_s": settings.rate_limit_mb_s,
        "rate_limit_burst_mb": settings.rate_limit_burst_mb if settings.rate_limit_mb_s else None,
    }


def _secret(value) -> str | None:
    return None if value is None else value.get_secret_value()


def main(argv: list[str] | None = None) -> None:
    settings = BankServerSettings.from_args(argv)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()
    try:
        asyncio.run(serve(settings))
    except FileNotFoundError as e:   # no LMDB yet: say so in one line, not a traceback
        raise SystemExit(f"bank_server: {e}") from None


if __name__ == "__main__":
    main()
