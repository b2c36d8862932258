"""The read path's tiers: in-process LRU -> Redis (optional, shared) -> LMDB (the truth).

    blocks = build_block_store(settings, store)      # what server.py hands to the servicer
    with blocks.read(key, Expect(nbytes, checksum)) as buf: ...
    tier_stats(blocks)   # [{"tier": "lru", ...}, {"tier": "redis", ...}, {"tier": "lmdb", ...}]

Every tier has the same face (store.BlockStore: `read`, `get`, `stats`) and wraps the next one.

LRUCache keeps whole verified blocks as `bytes` within a byte budget (`lru_bytes`), evicting the
least recently used; a block larger than `max_item_bytes` (default: a quarter of the budget) is
passed through, never cached, so one level-1 block cannot flush the hot set. Only bytes that
passed `expect` (or came without one, from `get`) enter it; entries are immutable `bytes`, so a
hit is served without hashing again. Each entry remembers the checksum it was verified against,
and a read expecting another checksum is a miss (the entry is replaced): a block key whose
content changed (a version name reused behind gc's tombstone) never serves the old bytes.
Concurrent misses of one key read the next tier once (the others wait for that read).

The Redis tier's URL is logged without its password (`redact_url`). A Redis Cluster that is
down at start does not stop the server: a `DeferredTier` serves from LMDB and connects later.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from services.bank_server.store import BlockStore, Expect, LMDBStore, read_from

log = logging.getLogger("membank.bank_server")


class LRUCache:
    """A byte-budgeted in-process LRU of block bytes in front of another BlockStore."""

    name = "lru"

    def __init__(self, inner: BlockStore, max_bytes: int, *, max_item_bytes: int | None = None):
        if max_bytes <= 0:
            raise ValueError("an LRU needs a positive byte budget")
        self.inner = inner
        self.max_bytes = max_bytes
        self.max_item_bytes = max_item_bytes if max_item_bytes is not None else max_bytes // 4
        # key -> (checksum the bytes were verified against, or None: read without one; bytes)
        self._items: OrderedDict[bytes, tuple[str | None, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[bytes, threading.Event] = {}
        self._n = {"hits": 0, "misses": 0, "bytes_hit": 0, "inserts": 0, "evictions": 0,
                   "bytes_evicted": 0, "too_big": 0}

    @contextmanager
    def read(self, key: bytes, expect: Expect | None = None) -> Iterator:
        key = bytes(key)
        if expect is not None and expect.nbytes > self.max_item_bytes:
            self._count("too_big")            # never cached: straight through, no waiting
            with read_from(self.inner, key, expect) as buf:
                yield buf
            return
        data, done = self._lookup(key, expect)
        if data is not None:
            yield data
            return
        try:
            with read_from(self.inner, key, expect) as buf:
                if buf is None or len(buf) > self.max_item_bytes:
                    self._done(key, done)
                    done = None
                    yield buf
                    return
                data = bytes(buf)             # the copy the cache keeps
            self._insert(key, data, expect.checksum if expect is not None else None)
        finally:
            if done is not None:
                self._done(key, done)
        yield data

    def _lookup(self, key: bytes, expect: Expect | None):
        """(bytes, None) on a hit; (None, event) when this thread must load the key."""
        while True:
            with self._lock:
                entry = self._items.get(key)
                data = None if entry is None else entry[1]
                if data is not None and not _matches(entry, expect):
                    data = None                  # other content expected: load it anew
                if data is not None:
                    self._items.move_to_end(key)
                    self._n["hits"] += 1
                    self._n["bytes_hit"] += len(data)
                    return data, None
                waiting = self._loading.get(key)
                if waiting is None:
                    self._n["misses"] += 1
                    done = self._loading[key] = threading.Event()
                    return None, done
            waiting.wait()       # another thread is reading this key from the next tier

    def _done(self, key: bytes, done: threading.Event) -> None:
        with self._lock:
            if self._loading.get(key) is done:
                del self._loading[key]
        done.set()

    def _insert(self, key: bytes, data: bytes, verified: str | None) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            self._items[key] = (verified, data)
            self._bytes += len(data)
            self._n["inserts"] += 1
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= len(evicted)
                self._n["evictions"] += 1
                self._n["bytes_evicted"] += len(evicted)

    def _count(self, name: str) -> None:
        with self._lock:
            self._n[name] += 1

    def get(self, key: bytes) -> bytes | None:
        with self.read(key) as buf:
            return None if buf is None else bytes(buf)

    def stats(self) -> dict:
        with self._lock:
            return {"tier": self.name, **self._n, "resident_bytes": self._bytes,
                    "resident_items": len(self._items), "max_bytes": self.max_bytes}

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def close(self) -> None:
        self.clear()


def _matches(entry: tuple[str | None, bytes], expect: Expect | None) -> bool:
    """Whether a cached entry is the content `expect` asks for (anything does without one)."""
    if expect is None:
        return True
    verified, data = entry
    if verified is not None:
        return verified == expect.checksum and len(data) == expect.nbytes
    return expect.ok(data)      # cached by a read without a checksum: hash it once here


def tiers(blocks) -> list:
    """The chain of tiers from `blocks` inwards (outermost first)."""
    out = []
    while blocks is not None:
        out.append(blocks)
        blocks = getattr(blocks, "inner", None)
    return out


def tier_stats(blocks) -> list[dict]:
    """`stats()` of every tier, outermost first (what /metrics and /v1/stats export)."""
    return [t.stats() for t in tiers(blocks) if hasattr(t, "stats")]


def build_block_store(settings, store: LMDBStore) -> BlockStore:
    """The tier chain a deployment's settings ask for: [LRU ->] [Redis ->] LMDB."""
    blocks: BlockStore = store
    if getattr(settings, "redis_url", None):
        blocks = _redis_tier(settings, blocks)
    lru_mb = getattr(settings, "lru_mb", 0) or 0
    if lru_mb > 0:
        item_mb = getattr(settings, "lru_max_item_mb", None)
        log.info("in-process LRU block tier: %d MB", lru_mb)
        blocks = LRUCache(blocks, int(lru_mb * (1 << 20)),
                          max_item_bytes=int(item_mb * (1 << 20)) if item_mb else None)
    return blocks


def _redis_tier(settings, inner: BlockStore) -> BlockStore:
    """The Redis tier over `inner`. A Redis Cluster client must reach a node to learn the
    slots, so with the cluster down it cannot even be built: then the server starts degraded
    (every read from `inner`, as a single Redis's breaker does) and connects later."""
    from services.bank_server.cache import RedisCachedStore
    cluster = getattr(settings, "redis_cluster", False)
    mb = getattr(settings, "redis_max_item_mb", None)
    maxmem = getattr(settings, "redis_maxmemory_mb", None)
    retry_after_s = getattr(settings, "redis_retry_after_s", 1.0)
    where = redact_url(settings.redis_url)    # never log the password
    log.info("redis block tier at %s (%s, ttl %s s)", where, "cluster" if cluster else "single",
             settings.redis_ttl_s)

    def connect() -> RedisCachedStore:
        return RedisCachedStore(
            inner, settings.redis_url, settings.redis_ttl_s, cluster=cluster,
            socket_timeout_s=getattr(settings, "redis_timeout_ms", 200) / 1000,
            retry_after_s=retry_after_s,
            slow_s=getattr(settings, "redis_slow_ms", 50) / 1000,
            max_item_bytes=int(mb * (1 << 20)) if mb else None,
            maxmemory_bytes=int(maxmem * (1 << 20)) if maxmem else None)
    try:
        return connect()
    except Exception as e:
        log.warning("redis tier at %s unreachable (%s: %s); serving blocks from the next tier "
                    "only, connecting again later", where, type(e).__name__, e)
        return DeferredTier(connect, inner, retry_after_s=retry_after_s, where=where)


class DeferredTier:
    """A tier that could not be built yet: reads go to `inner` until a later read builds it
    (one try at a time, at most every `retry_after_s`, doubling up to `max_retry_after_s`),
    then through it. The Redis tier's stand-in while a Redis Cluster is down at start."""

    name = "redis"

    def __init__(self, build, inner: BlockStore, *, retry_after_s: float = 1.0,
                 max_retry_after_s: float = 30.0, where: str = ""):
        self.build, self.inner, self.where = build, inner, where
        self.tier = None
        self.retry_after_s = self._backoff = max(retry_after_s, 0.05)
        self.max_retry_after_s = max_retry_after_s
        self.attempts = 0
        self._next_try = time.monotonic() + self._backoff
        self._lock = threading.Lock()

    def _current(self):
        """The built tier, trying to build it when a try is due; None while it is not."""
        if self.tier is not None or time.monotonic() < self._next_try:
            return self.tier
        if not self._lock.acquire(blocking=False):     # another thread is trying
            return self.tier
        try:
            if self.tier is None and time.monotonic() >= self._next_try:
                self.attempts += 1
                try:
                    self.tier = self.build()
                    log.warning("redis tier at %s connected", self.where)
                except Exception as e:
                    self._backoff = min(self._backoff * 2, self.max_retry_after_s)
                    self._next_try = time.monotonic() + self._backoff
                    log.info("redis tier at %s still unreachable (%s)", self.where,
                             type(e).__name__)
        finally:
            self._lock.release()
        return self.tier

    @contextmanager
    def read(self, key: bytes, expect: Expect | None = None) -> Iterator:
        tier = self._current()
        with read_from(tier if tier is not None else self.inner, key, expect) as buf:
            yield buf

    def get(self, key: bytes) -> bytes | None:
        with self.read(key) as buf:
            return None if buf is None else bytes(buf)

    def stats(self) -> dict:
        if self.tier is not None:
            return self.tier.stats()
        return {"tier": self.name, "breaker": "open", "connected": False,
                "connect_attempts": self.attempts}

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()


def redact_url(url: str) -> str:
    """`url` with any password replaced by "***" (in user:password@ and in ?password=), for
    logs: a Redis URL carries its credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0] if ":" in creds else ""
        netloc = f"{user}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))
