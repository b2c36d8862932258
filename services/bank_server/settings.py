"""Settings of the bank server: environment variables `MEMBANK_SERVER_*`, overridden by flags.

    MEMBANK_SERVER_LMDB_PATH=/data/bank.lmdb python -m services.bank_server.server --port 0

`BankServerSettings.from_args(argv)` is called once, in `server.main()`; everything below it
receives the settings object and never reads the environment itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from membank.secrets import read_secret
from services.bank_server.peers import MAX_WORKERS
from services.bank_server.store import MAX_READERS


class BankServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMBANK_SERVER_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)   # 0: let the OS pick a free port
    lmdb_path: Path = Path("data/bank.lmdb")
    map_size_gb: float = Field(default=64, gt=0)        # LMDB address space, not disk usage
    redis_url: str | None = None                        # None: no Redis tier (the default)
    redis_ttl_s: int = Field(default=3600, gt=0)
    max_workers: int = Field(default=4, ge=1)           # threads for blocking LMDB/Redis reads
    # non-health RPCs at once, server-wide (admission.py; health checks never count); beyond
    # this: RESOURCE_EXHAUSTED (always capped: each stream may hold an LMDB reader slot)
    max_concurrent_rpcs: int = Field(default=256, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # -- storage: shards and cache tiers (services/bank_server/tiers.py, cache.py) -------------
    shard_id: str = ""                  # this server's shard id in the manifest; "": all blocks
    lru_mb: float = Field(default=0, ge=0)              # in-process LRU budget; 0: no LRU
    # an LMDB block verified this recently, unchanged and still in the page cache, is served
    # without hashing it again (store.py, "Verify once"); 0: hash on every read
    verify_ttl_s: float = Field(default=60, ge=0)
    lru_max_item_mb: float | None = Field(default=None, gt=0)  # None: a quarter of lru_mb
    redis_cluster: bool = False                         # redis_url is a Redis Cluster node
    redis_timeout_ms: float = Field(default=200, gt=0)  # per socket operation (connect, recv)
    redis_retry_after_s: float = Field(default=1.0, ge=0)  # breaker open time (doubles to 30 s)
    redis_slow_ms: float = Field(default=50, gt=0)      # + 5 ms/MB: slower calls count as slow
    redis_max_item_mb: float | None = Field(default=None, gt=0)  # larger blocks skip Redis
    redis_maxmemory_mb: int | None = Field(default=None, gt=0)   # CONFIG SET + allkeys-lru

    # -- API surface: admin HTTP, security, limits, readiness ----------------------------------
    admin: bool = True                                        # admin HTTP server (FastAPI)
    admin_port: int = Field(default=8080, ge=0, le=65535)     # 0: pick a free port (printed)
    auth_token: SecretStr | None = None     # set: every read RPC needs `authorization: Bearer T`
    admin_token: SecretStr | None = None    # admin RPCs and admin HTTP writes; None: refused
    tls_cert: Path | None = None            # PEM chain; with tls_key, gRPC and admin HTTP use TLS
    tls_key: Path | None = None
    max_request_bytes: int = Field(default=64 << 10, ge=1024)  # larger: RESOURCE_EXHAUSTED
    # FetchBlocks ids per request (more: INVALID_ARGUMENT); a path needs depth blocks, and 64 ids
    # bound one request's work to 64 block reads (1.8 GB at paper scale's 27.5 MB level 1)
    max_blocks_per_request: int = Field(default=64, ge=1, le=4096)
    rate_limit_rps: float | None = Field(default=None, gt=0)   # per client; None: no limit
    rate_limit_burst: int = Field(default=50, ge=1)            # token bucket size
    warm_levels: int = Field(default=1, ge=0)                  # levels pre-read before ready
    warm_max_gb: float = Field(default=4, ge=0)                # stop warming past this
    shutdown_grace_s: float = Field(default=5.0, ge=0)         # drain time after SIGTERM

    # -- data plane (dataplane.py): block bodies over framed raw TCP, beside gRPC --------------
    dataplane_port: int | None = Field(default=None, ge=0, le=65535)  # None: off; 0: free port
    dataplane_max_connections: int = Field(default=64, ge=1)   # one thread each; more: refused
    dataplane_idle_timeout_s: float = Field(default=60, gt=0)  # kept-alive, no request: closed
    dataplane_request_timeout_s: float = Field(default=10, gt=0)  # a whole request frame (and
    #                                                             the TLS handshake) by then
    dataplane_send_timeout_s: float = Field(default=30, gt=0)  # a client taking no bytes: dropped
    dataplane_sndbuf_kb: int = Field(default=0, ge=0)          # SO_SNDBUF; 0: kernel autotuning
    # data plane processes (workers.py): 1 serves it on threads of the server process; N > 1
    # starts N worker processes on the one listening socket (limits, cache budget and metrics
    # stay the shard's as a whole). Needs dataplane_port.
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)

    # -- gRPC admission and stream limits (issue 16 point 1: admission.py, servicer.py) -------
    # one client (IP) may hold this many of the max_concurrent_rpcs slots: it cannot take all;
    # None: a quarter of max_concurrent_rpcs (64 of 256), so a lowered global cap lowers it too
    max_rpcs_per_peer: int | None = Field(default=None, ge=1)
    # Health/Watch streams never end by themselves: few per client, a bounded number in all,
    # each ended (OK) after health_watch_max_s; Health/Check is never limited (the probe)
    max_health_watches_per_peer: int = Field(default=2, ge=0)
    max_health_watches: int = Field(default=64, ge=0)
    health_watch_max_s: float = Field(default=300, gt=0)
    max_streams_per_connection: int = Field(default=64, ge=1)  # HTTP/2 streams at once
    # a FetchBlocks chunk the client does not take within this ends the stream
    # (DEADLINE_EXCEEDED): a client that stops reading cannot pin a handler and its block
    stream_stall_timeout_s: float = Field(default=30, gt=0)
    # a connection is closed after this age (+ grace for its RPCs): bounds anything parked
    # behind a client that stopped reading; None: connections live as long as their clients
    max_connection_age_s: float | None = Field(default=3600, gt=0)
    max_connection_age_grace_s: float = Field(default=300, ge=0)
    # -- one peer must not deny service to others (issue 16: data plane slots, slow readers,
    #    amplification; dataplane.py, fetchplan.py admit_bytes) --------------------------------
    # data plane connections one client address may hold (more: RESOURCE_EXHAUSTED, closed),
    # within dataplane_max_connections: a single peer can take at most this share of the slots;
    # None: an eighth of dataplane_max_connections (8 of 64)
    dataplane_max_connections_per_peer: int | None = Field(default=None, ge=1)
    # slowest send the data plane keeps up: an answer must be sent within
    # dataplane_send_timeout_s + its bytes at this rate, else the connection is dropped (a
    # client reading a few bytes at a time cannot hold a thread and an LMDB read snapshot)
    dataplane_min_send_rate_mb_s: float = Field(default=1.0, gt=0)
    # block bytes per second per client, both transports (FetchBlocks and the data plane);
    # None: no byte limit. The burst is what a client may take at once (a request larger than
    # it is admitted once the bucket is full, then waits off its debt)
    rate_limit_mb_s: float | None = Field(default=None, gt=0)
    rate_limit_burst_mb: float = Field(default=256, gt=0)
    # -- admin HTTP limits (issue 16, point 4; admin.py, admin_guard.py, membank/http_limits.py):
    # no single peer may hold the admin API; per peer = per IP
    admin_max_connections: int = Field(default=128, ge=1)      # in all; more: 503 at once
    admin_max_connections_per_peer: int = Field(default=16, ge=1)  # one IP; more: 503 at once
    admin_request_timeout_s: float = Field(default=10, gt=0)   # head + body by then, else 408
    admin_send_timeout_s: float = Field(default=30, gt=0)      # a reader taking no bytes: cut
    admin_max_header_bytes: int = Field(default=16 << 10, ge=1024)  # request head; more: 400
    admin_max_body_bytes: int = Field(default=16 << 10, ge=1024)    # more: 413, read no further
    admin_auth_fail_rps: float = Field(default=1.0, gt=0)      # 401/403 per peer, sustained;
    admin_auth_fail_burst: int = Field(default=10, ge=1)       # beyond: 429 with Retry-After
    metrics_min_interval_s: float = Field(default=1.0, ge=0)   # /metrics collects at most this
    #                                                            often; scrapes between share it

    @model_validator(mode="after")
    def _per_peer_shares(self) -> "BankServerSettings":
        # per-client caps follow the server-wide ones unless set: one peer never holds them all
        if self.max_rpcs_per_peer is None:
            self.max_rpcs_per_peer = max(1, self.max_concurrent_rpcs // 4)
        if self.dataplane_max_connections_per_peer is None:
            self.dataplane_max_connections_per_peer = max(1, self.dataplane_max_connections // 8)
        return self

    @model_validator(mode="after")
    def _readers_fit(self) -> "BankServerSettings":
        # every FetchBlocks stream and data plane send holds an LMDB read transaction; past the
        # store's reader slots reads fail (MDB_READERS_FULL) for everyone. A quarter of the
        # slots stays for ingest, gc and a second server on the same directory.
        held = self.max_concurrent_rpcs + self.dataplane_max_connections + self.max_workers
        if held > MAX_READERS * 3 // 4:
            raise ValueError(f"max_concurrent_rpcs + dataplane_max_connections + max_workers "
                             f"must be at most {MAX_READERS * 3 // 4} (LMDB has {MAX_READERS} "
                             f"reader slots), got {self.max_concurrent_rpcs} + "
                             f"{self.dataplane_max_connections} + {self.max_workers}")
        return self

    @model_validator(mode="after")
    def _workers_serve_the_dataplane(self) -> "BankServerSettings":
        if self.workers > 1 and self.dataplane_port is None:
            raise ValueError("workers > 1 serve the data plane: set dataplane_port too")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "BankServerSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self

    @property
    def map_size(self) -> int:
        return int(self.map_size_gb * (1 << 30))

    def admin_connection_limits(self):
        """The admin HTTP server's per-connection limits (membank/http_limits.py)."""
        from membank.http_limits import ConnectionLimits
        return ConnectionLimits(max_connections=self.admin_max_connections,
                                max_per_peer=self.admin_max_connections_per_peer,
                                request_timeout_s=self.admin_request_timeout_s,
                                send_timeout_s=self.admin_send_timeout_s,
                                max_header_bytes=self.admin_max_header_bytes)

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "BankServerSettings":
        """Settings from the environment, with any flag given on the command line on top."""
        p = argparse.ArgumentParser(prog="python -m services.bank_server.server",
                                    description="Serve a membank bank over gRPC from LMDB.")
        # defaults are None so that only flags actually given override the environment
        p.add_argument("--host")
        p.add_argument("--port", type=int, help="0 picks a free port (printed at start-up)")
        p.add_argument("--lmdb", dest="lmdb_path", help="LMDB directory written by ingest")
        p.add_argument("--map-size-gb", type=float)
        p.add_argument("--redis-url", help="e.g. redis://127.0.0.1:6379/0 (off when not given)")
        p.add_argument("--redis-ttl-s", type=int)
        p.add_argument("--max-workers", type=int)
        p.add_argument("--max-concurrent-rpcs", type=int)
        p.add_argument("--log-level", type=str.upper)
        # storage: shards and cache tiers
        p.add_argument("--shard-id", help="serve only this shard's blocks (FAILED_PRECONDITION "
                       "for others); empty: every block")
        p.add_argument("--lru-mb", type=float, help="in-process LRU block cache (0: off)")
        p.add_argument("--lru-max-item-mb", type=float)
        p.add_argument("--verify-ttl-s", type=float, help="trust a verified, unchanged, "
                       "resident LMDB block this long without re-hashing (0: hash every read)")
        p.add_argument("--redis-cluster", action="store_const", const=True,
                       help="--redis-url names a Redis Cluster node")
        p.add_argument("--redis-timeout-ms", type=float)
        p.add_argument("--redis-retry-after-s", type=float)
        p.add_argument("--redis-slow-ms", type=float)
        p.add_argument("--redis-max-item-mb", type=float)
        p.add_argument("--redis-maxmemory-mb", type=int)
        p.add_argument("--admin-port", type=int, help="admin HTTP port; 0 picks a free port")
        p.add_argument("--no-admin", dest="admin", action="store_const", const=False,
                       help="do not start the admin HTTP server")
        # tokens from files (e.g. mounted secrets) so they never show on a command line;
        # MEMBANK_SERVER_AUTH_TOKEN / MEMBANK_SERVER_ADMIN_TOKEN work too
        p.add_argument("--auth-token-file", type=read_secret, dest="auth_token")
        p.add_argument("--admin-token-file", type=read_secret, dest="admin_token")
        p.add_argument("--tls-cert",
                       help="PEM certificate chain (TLS on when given with --tls-key)")
        p.add_argument("--tls-key", help="PEM private key")
        p.add_argument("--max-request-bytes", type=int)
        p.add_argument("--max-blocks-per-request", type=int,
                       help="FetchBlocks ids per request (more: INVALID_ARGUMENT)")
        p.add_argument("--rate-limit-rps", type=float, help="requests/s per client (token or IP)")
        p.add_argument("--rate-limit-burst", type=int)
        p.add_argument("--warm-levels", type=int, help="levels pre-read at start (0: none)")
        p.add_argument("--warm-max-gb", type=float)
        p.add_argument("--shutdown-grace-s", type=float)
        # data plane (services/bank_server/dataplane.py)
        p.add_argument("--dataplane-port", type=int,
                       help="serve block bodies over framed raw TCP on this port too "
                       "(0 picks a free port, printed); off when not given")
        p.add_argument("--dataplane-max-connections", type=int)
        p.add_argument("--dataplane-idle-timeout-s", type=float)
        p.add_argument("--dataplane-request-timeout-s", type=float)
        p.add_argument("--dataplane-send-timeout-s", type=float)
        p.add_argument("--dataplane-sndbuf-kb", type=int)
        p.add_argument("--workers", type=int, help="data plane worker processes sharing its "
                       "port (1: threads of this process)")
        # gRPC admission and stream limits (issue 16 point 1)
        p.add_argument("--max-rpcs-per-peer", type=int,
                       help="non-health RPCs one client IP may hold at once")
        p.add_argument("--max-health-watches-per-peer", type=int)
        p.add_argument("--max-health-watches", type=int)
        p.add_argument("--health-watch-max-s", type=float,
                       help="a Health/Watch stream ends (OK) after this long")
        p.add_argument("--max-streams-per-connection", type=int)
        p.add_argument("--stream-stall-timeout-s", type=float,
                       help="a FetchBlocks client taking no data this long: stream ended")
        p.add_argument("--max-connection-age-s", type=float)
        p.add_argument("--max-connection-age-grace-s", type=float)
        # one peer must not deny service to others (issue 16)
        p.add_argument("--dataplane-max-connections-per-peer", type=int,
                       help="data plane connections per client address (more: refused)")
        p.add_argument("--dataplane-min-send-rate-mb-s", type=float,
                       help="an answer must be sent within send-timeout + its size at this "
                       "rate (MB/s), else the connection is dropped")
        p.add_argument("--rate-limit-mb-s", type=float,
                       help="block bytes per second per client, FetchBlocks and data plane")
        p.add_argument("--rate-limit-burst-mb", type=float)
        # admin HTTP limits (issue 16, point 4)
        p.add_argument("--admin-max-connections", type=int)
        p.add_argument("--admin-max-connections-per-peer", type=int)
        p.add_argument("--admin-request-timeout-s", type=float,
                       help="a request's head and body must arrive within this (else 408)")
        p.add_argument("--admin-send-timeout-s", type=float)
        p.add_argument("--admin-max-header-bytes", type=int)
        p.add_argument("--admin-max-body-bytes", type=int)
        p.add_argument("--admin-auth-fail-rps", type=float,
                       help="failed authentications per second per client (more: 429)")
        p.add_argument("--admin-auth-fail-burst", type=int)
        p.add_argument("--metrics-min-interval-s", type=float)
        args = p.parse_args(argv)
        return cls(**{k: v for k, v in vars(args).items() if v is not None})


# -- issue 16 (storage): the LMDB map size, one setting for the server and its tools -----------
class LMDBSettings(BaseSettings):
    """What ingest, gc and rebalance read of the server's settings when no flag is given: the
    map size (MEMBANK_SERVER_MAP_SIZE_GB, BankServerSettings.map_size_gb), so that a tool never
    grows the map past what the server maps (the server then has to adopt it: store.py, "Map
    size") or runs out of map where the server's setting would have had room."""
    model_config = SettingsConfigDict(env_prefix="MEMBANK_SERVER_", extra="ignore")

    map_size_gb: float = Field(default=64, gt=0)

    @property
    def map_size(self) -> int:
        return int(self.map_size_gb * (1 << 30))
