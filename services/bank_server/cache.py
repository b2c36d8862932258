"""Redis as a shared hot-block tier in front of the LMDB store (optional, off by default).

    store = RedisCachedStore(LMDBStore(path), "redis://127.0.0.1:6379/0", ttl_s=3600)
    store.get(block_key(...))     # Redis GET; on a miss, LMDB then Redis SET with a TTL

Block keys are immutable and versioned (membank/keys.py), so a cached block can never be
stale and needs no invalidation; the TTL only bounds memory. Only block keys (`b/...`) go
through Redis: `current` is mutable and manifests are cached in-process by the store.

Redis is an optimisation, never a dependency: any Redis error degrades to LMDB, is logged once
per outage, and Redis is skipped for `retry_after_s` so that a hung Redis does not add its
timeout to every block.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.bank_server.store import BlockStore

log = logging.getLogger(__name__)

_BLOCK_PREFIX = b"b/"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0


class RedisCachedStore:
    """A BlockStore that reads through Redis and falls back to `inner` on any Redis trouble."""

    def __init__(self, inner: BlockStore, redis_url: str, ttl_s: int = 3600, *,
                 socket_timeout_s: float = 0.2, retry_after_s: float = 1.0):
        self.inner = inner
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self.redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # no client-side retries: on failure LMDB answers at once, which beats retrying
            retry=Retry(NoBackoff(), 0),
        )
        self.stats = CacheStats()
        self._lock = threading.Lock()     # get() runs on several executor threads
        self._down_since: float | None = None
        self._skip_until = 0.0

    def get(self, key: bytes) -> bytes | None:
        if not key.startswith(_BLOCK_PREFIX) or time.monotonic() < self._skip_until:
            return self.inner.get(key)
        try:
            cached = self.redis.get(key)
        except redis.RedisError as e:
            self._failed(e)
            return self.inner.get(key)
        if cached is not None:
            self._ok(hit=True)
            return cached
        data = self.inner.get(key)
        if data is None:
            self._ok(hit=False)
            return None
        try:
            self.redis.set(key, data, ex=self.ttl_s)
        except redis.RedisError as e:
            self._failed(e)
        else:
            self._ok(hit=False)
        return data

    def _ok(self, *, hit: bool) -> None:
        with self._lock:
            if hit:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
            if self._down_since is not None:
                log.warning("redis is back after %.1f s; block cache re-enabled",
                            time.monotonic() - self._down_since)
                self._down_since = None

    def _failed(self, err: Exception) -> None:
        with self._lock:
            self.stats.errors += 1
            now = time.monotonic()
            self._skip_until = now + self.retry_after_s
            if self._down_since is None:  # log once per outage, not once per block
                self._down_since = now
                log.warning("redis unavailable (%s: %s); serving blocks from LMDB only",
                            type(err).__name__, err)

    def close(self) -> None:
        self.redis.close()
