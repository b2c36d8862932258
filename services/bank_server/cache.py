"""Redis as a shared hot-block tier in front of the LMDB store (optional, off by default).

    store = RedisCachedStore(LMDBStore(path), "redis://127.0.0.1:6379/0", ttl_s=3600)
    with store.read(block_key(...), Expect(nbytes, checksum)) as buf:   # Redis GET; on a miss
        ...                                                              # LMDB, then Redis SET
    store.stats()    # {"tier": "redis", "hits": .., "misses": .., "breaker": "closed", ...}

A single Redis (`redis://`, `rediss://`, `unix://`) or a Redis Cluster (`cluster=True`, any
node's URL; `redis.cluster.RedisCluster` follows the slots). hiredis parses replies when
installed (it is a dependency: `redis[hiredis]`).

Block keys are immutable: named by content (their digest: a block two versions share is one
entry) or, for versions stored before content addressing, by version (membank/keys.py; gc's
tombstones keep a collected version's name from ever being ingested again), so a cached block
needs no invalidation; the TTL
and Redis's own `maxmemory` bound memory. Should a key's content change anyway (a name reused
behind the tombstone's back), the entry is still never served as valid: every hit is checked
against the checksum of the manifest the server holds now (Integrity, below), and the server
re-reads a manifest whose stored bytes changed (store.py). Run Redis with
    maxmemory <bytes>  and  maxmemory-policy allkeys-lru
(`maxmemory_bytes=` applies both with CONFIG SET at start-up, best effort; otherwise a Redis
without a maxmemory policy that evicts is logged as a warning). Only block keys (`b/...`,
`h/...`) go through Redis: `current` is mutable and manifests are cached in-process by the
store. Blocks larger than `max_item_bytes` are never cached in Redis (an operator choice, see
README).

Integrity: with `expect`, a Redis value that fails its size or checksum is deleted, counted as
`corrupt`, and the block is read from the inner store, so a corrupt cache entry never becomes
DATA_LOSS. Only verified bytes are written to Redis.

Redis is an optimisation, never a dependency. A circuit breaker guards every call:
  closed     calls go to Redis; an error (connection, timeout) opens the breaker at once;
             `slow_calls` consecutive slow calls (longer than slow_s + nbytes / slow_min_bps,
             i.e. slower than reading LMDB would be) open it too
  open       Redis is skipped (reads go straight to the inner store) for `retry_after_s`,
             doubling on every failed probe up to `max_retry_after_s`
  half-open  after that, ONE request probes Redis (the others keep skipping it); success
             closes the breaker, failure re-opens it
So a dead Redis costs one failed call (connection refused), a hung one
at most `socket_timeout_s` per in-flight request when it hangs and once per retry period after
that; outages are logged once, recovery once.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.bank_server.store import BlockStore, Expect, read_from

log = logging.getLogger(__name__)

_BLOCK_PREFIXES = (b"b/", b"h/")      # versioned and content-addressed block keys
# errors that mean Redis is unusable (trip the breaker); others (e.g. OOM on SET) do not
_OUTAGE = (redis.ConnectionError, redis.TimeoutError, OSError)   # (and anything unexpected)


class CircuitBreaker:
    """closed -> open (skip) -> half-open (one probe) -> closed; thread-safe."""

    def __init__(self, *, retry_after_s: float = 1.0, max_retry_after_s: float = 30.0,
                 slow_calls: int = 3, name: str = "redis"):
        self.retry_after_s = retry_after_s
        self.max_retry_after_s = max(max_retry_after_s, retry_after_s)
        self.slow_calls = slow_calls
        self.name = name
        self.state = "closed"
        self.opens = 0            # closed -> open transitions (outages)
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._backoff = retry_after_s
        self._probing = False
        self._slow_streak = 0
        self._down_since: float | None = None

    def allow(self) -> bool:
        """May this call go to Redis? (In half-open, only the one probe may.)"""
        if self.state == "closed":
            return True
        with self._lock:
            if self.state == "open" and time.monotonic() >= self._open_until:
                self.state = "half-open"
                self._probing = False
            if self.state == "half-open" and not self._probing:
                self._probing = True
                return True
            return self.state == "closed"

    def success(self, *, slow: bool = False) -> None:
        with self._lock:
            if slow:
                self._slow_streak += 1
                if self.state == "half-open" or self._slow_streak >= self.slow_calls:
                    self._open("slow", f"{self._slow_streak} slow call(s)")
                return
            self._slow_streak = 0
            if self.state == "open":
                return     # a call that began before the breaker opened: no evidence either way
            if self.state != "closed":
                log.warning("%s is back after %.1f s; tier re-enabled", self.name,
                            time.monotonic() - (self._down_since or time.monotonic()))
                self.state = "closed"
                self._backoff = self.retry_after_s
                self._down_since = None
            self._probing = False

    def failure(self, err: BaseException) -> None:
        with self._lock:
            self._open("error", f"{type(err).__name__}: {err}")

    def _open(self, why: str, detail: str) -> None:
        now = time.monotonic()
        if self.state == "closed":       # a new outage: log once, not once per block
            self.opens += 1
            self._down_since = now
            self._backoff = self.retry_after_s
            log.warning("%s unavailable (%s); serving blocks from the next tier only", self.name,
                        detail)
        elif self.state == "open":       # a call that began before it opened: already counted
            return
        else:                            # a failed probe: back off
            self._backoff = min(max(self._backoff * 2, self.retry_after_s), self.max_retry_after_s)
        self.state = "open"
        self._probing = False
        self._slow_streak = 0
        self._open_until = now + self._backoff


class RedisCachedStore:
    """A BlockStore that reads through Redis and falls back to `inner` on any Redis trouble."""

    name = "redis"

    def __init__(self, inner: BlockStore, redis_url: str, ttl_s: int | None = 3600, *,
                 cluster: bool = False, socket_timeout_s: float = 0.2,
                 retry_after_s: float = 1.0, max_retry_after_s: float = 30.0,
                 slow_s: float = 0.05, slow_min_bps: float = 200e6, slow_calls: int = 3,
                 max_item_bytes: int | None = None, maxmemory_bytes: int | None = None):
        self.inner = inner
        self.ttl_s = ttl_s or None
        self.slow_s = slow_s
        self.slow_min_bps = slow_min_bps
        self.max_item_bytes = max_item_bytes
        common = dict(socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                      # no client-side retries: on failure the next tier answers at once
                      retry=Retry(NoBackoff(), 0))
        if cluster:
            from redis.cluster import RedisCluster
            self.redis = RedisCluster.from_url(redis_url, **common)
        else:
            self.redis = redis.Redis.from_url(redis_url, **common)
        self.cluster = cluster
        self.breaker = CircuitBreaker(retry_after_s=retry_after_s,
                                      max_retry_after_s=max_retry_after_s, slow_calls=slow_calls)
        self._lock = threading.Lock()     # reads run on several executor threads
        self._n = {"hits": 0, "misses": 0, "bytes_hit": 0, "sets": 0, "bytes_set": 0,
                   "errors": 0, "set_errors": 0, "slow": 0, "corrupt": 0, "skipped": 0}
        self._configure(maxmemory_bytes)

    # -- reads ------------------------------------------------------------------------------
    @contextmanager
    def read(self, key: bytes, expect: Expect | None = None) -> Iterator:
        key = bytes(key)
        if not key.startswith(_BLOCK_PREFIXES):
            with read_from(self.inner, key, expect) as buf:
                yield buf
            return
        ok, cached = self._call(lambda: self.redis.get(key),
                                size=lambda v: len(v) if v is not None else 0)
        if cached is not None:
            if expect is None or expect.ok(cached):
                self._count(hits=1, bytes_hit=len(cached))
                yield cached
                return
            # a corrupt cache entry: drop it and read on; never DATA_LOSS because of Redis
            self._count(corrupt=1)
            log.warning("redis value of %r fails its checksum; deleted, reading %s", key[:120],
                        getattr(self.inner, "name", "the next tier"))
            self._call(lambda: self.redis.delete(key))
        elif ok:
            self._count(misses=1)
        with read_from(self.inner, key, expect) as buf:
            # no SET when the GET failed or was skipped: at most one failed Redis call per read
            if ok and buf is not None and (self.max_item_bytes is None
                                           or len(buf) <= self.max_item_bytes):
                # verified by the inner tier when `expect` is given; memoryviews are sent as is
                if self._call(lambda: self.redis.set(key, buf, ex=self.ttl_s), len(buf))[0]:
                    self._count(sets=1, bytes_set=len(buf))
            yield buf

    def get(self, key: bytes) -> bytes | None:
        with self.read(key) as buf:
            return None if buf is None else bytes(buf)

    def _call(self, fn, nbytes: int = 0, *, size=None) -> tuple[bool, object]:
        """Run one Redis call behind the breaker: (ran without error, its result).

        A call is slow when it takes longer than slow_s + bytes / slow_min_bps (bytes: `nbytes`,
        or `size(result)` for reads).
        """
        if not self.breaker.allow():
            self._count(skipped=1)
            return False, None
        t0 = time.perf_counter()
        try:
            result = fn()
        except _OUTAGE as e:
            self._count(errors=1)
            self.breaker.failure(e)
            return False, None
        except redis.ResponseError as e:       # Redis answered, but no (e.g. OOM on SET)
            self._count(set_errors=1)
            log.debug("redis refused a call: %s", e)
            self.breaker.success()
            return False, None
        except Exception as e:                 # anything else: treat as an outage, never fail
            self._count(errors=1)
            self.breaker.failure(e)
            return False, None
        dt = time.perf_counter() - t0
        if size is not None:
            nbytes = size(result)
        slow = dt > self.slow_s + nbytes / self.slow_min_bps
        if slow:
            self._count(slow=1)
        self.breaker.success(slow=slow)
        return True, result

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self._n[k] += v

    # -- deployment -------------------------------------------------------------------------
    def _configure(self, maxmemory_bytes: int | None) -> None:
        """Apply (or check) the byte budget and eviction policy; best effort, never fatal."""
        try:
            if maxmemory_bytes:
                kw = {"target_nodes": "all"} if self.cluster else {}
                self.redis.config_set("maxmemory", str(maxmemory_bytes), **kw)
                self.redis.config_set("maxmemory-policy", "allkeys-lru", **kw)
                log.info("redis tier: maxmemory %d bytes, allkeys-lru", maxmemory_bytes)
                return
            policy = self.redis.config_get("maxmemory-policy")
            values = policy.values() if isinstance(policy, dict) else []
            if any(v in ("noeviction", b"noeviction") for v in values):
                log.warning("redis maxmemory-policy is noeviction: once full, blocks are not "
                            "cached any more; use allkeys-lru")
        except Exception as e:    # CONFIG may be disabled (managed Redis) or Redis down
            log.info("redis tier: could not check/apply maxmemory (%s)", e)

    def stats(self) -> dict:
        """Counters since start, breaker state, and Redis's own residency (when reachable)."""
        with self._lock:
            out = {"tier": self.name, **self._n}
        out["breaker"] = self.breaker.state
        out["breaker_opens"] = self.breaker.opens
        if self.breaker.state == "closed":
            try:
                info = (self.redis.info("memory", target_nodes="primaries") if self.cluster
                        else self.redis.info("memory"))
                if self.cluster:   # {node: info}: sum over nodes
                    nodes = list(info.values()) if isinstance(info, dict) and info and \
                        isinstance(next(iter(info.values())), dict) else [info]
                else:
                    nodes = [info]
                out["resident_bytes"] = sum(int(n.get("used_memory", 0)) for n in nodes)
                out["maxmemory_bytes"] = sum(int(n.get("maxmemory", 0)) for n in nodes)
                out["maxmemory_policy"] = nodes[0].get("maxmemory_policy")
                if self.cluster:
                    n = self.redis.dbsize(target_nodes="primaries")
                    out["resident_items"] = sum(n.values()) if isinstance(n, dict) else int(n)
                else:
                    out["resident_items"] = int(self.redis.dbsize())
            except Exception:
                pass
        return out

    def close(self) -> None:
        self.redis.close()
