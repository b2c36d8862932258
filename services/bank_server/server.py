"""Start a bank server: gRPC BankService over an LMDB store, plus health and reflection.

    python -m services.bank_server.ingest EXPORT_DIR --lmdb data/bank.lmdb
    python -m services.bank_server.server --lmdb data/bank.lmdb --port 0 [--redis-url redis://...]

Once bound it prints exactly one line to stdout, `membank bank_server listening on HOST:PORT`
(with --port 0, the port the OS picked), which scripts and tests wait for. SIGTERM or SIGINT
stop it gracefully: health turns NOT_SERVING, in-flight RPCs get 5 s to finish.
Settings: services/bank_server/settings.py (env MEMBANK_SERVER_*, flags override).
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.bank_server.cache import RedisCachedStore
from services.bank_server.servicer import SERVICE_NAME, add_bank_service
from services.bank_server.settings import BankServerSettings
from services.bank_server.store import BlockStore, LMDBStore

log = logging.getLogger("membank.bank_server")

# largest request we accept: 64 block ids are ~1 KB; anything near this is not a real client
_MAX_REQUEST_BYTES = 64 << 10
_GRACE_S = 5.0


def tune_malloc() -> None:
    """Keep multi-MB block buffers on the heap instead of a fresh mmap per allocation.

    glibc serves allocations above M_MMAP_THRESHOLD with their own mmap, which the kernel
    zero-fills page by page on first touch and unmaps on free, so every block read would pay
    its page faults again. Raising the mmap threshold to 64 MiB (above the paper's largest
    27.5 MB block; older glibc caps it at 32 MiB, so fall back to that) and the trim threshold
    well above it lets freed block buffers be reused. Not glibc (musl, macOS): nothing to do.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        ok = libc.mallopt(M_TRIM_THRESHOLD, 256 << 20) and ok
    except (OSError, AttributeError):
        return
    if not ok:
        log.debug("mallopt refused the thresholds; keeping glibc defaults")


def build_block_store(settings: BankServerSettings, store: LMDBStore) -> BlockStore:
    if settings.redis_url:
        log.info("redis block tier at %s (ttl %d s)", settings.redis_url, settings.redis_ttl_s)
        return RedisCachedStore(store, settings.redis_url, settings.redis_ttl_s)
    return store


async def serve(settings: BankServerSettings) -> None:
    """Run the server until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    # blocking store reads run on this pool (servicer uses run_in_executor(None, ...))
    loop.set_default_executor(ThreadPoolExecutor(settings.max_workers, thread_name_prefix="store"))

    store = LMDBStore(settings.lmdb_path, settings.map_size, readonly=True)
    blocks = build_block_store(settings, store)

    server = grpc.aio.server(
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", _MAX_REQUEST_BYTES),
            ("grpc.so_reuseport", 0),   # a second server on the same port must fail, not share
        ],
    )
    add_bank_service(server, store, blocks)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)

    address = f"{settings.host}:{settings.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"could not bind {address}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"membank bank_server listening on {settings.host}:{port}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down (grace %.0f s)", _GRACE_S)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=_GRACE_S)
    if isinstance(blocks, RedisCachedStore):
        log.info("redis tier: %s", blocks.stats)
        blocks.close()
    store.close()


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
