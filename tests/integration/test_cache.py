"""RedisCachedStore in-process against a private redis-server: hits, misses, outages.

Run: .venv/bin/python -m pytest -q tests/integration/test_cache.py
"""
from __future__ import annotations

import pytest

from services.bank_server.cache import RedisCachedStore

pytestmark = pytest.mark.integration


class DictStore:
    def __init__(self, data: dict[bytes, bytes]):
        self.data = data
        self.reads = 0

    def get(self, key: bytes) -> bytes | None:
        self.reads += 1
        return self.data.get(key)


def test_read_through_and_hit(redis_server):
    inner = DictStore({b"b/x/v1/1/0": b"block", b"m/x/v1": b"{}"})
    store = RedisCachedStore(inner, redis_server.url, ttl_s=60)
    assert store.get(b"b/x/v1/1/0") == b"block"          # miss: LMDB, then SET
    assert store.get(b"b/x/v1/1/0") == b"block"          # hit: Redis only
    assert inner.reads == 1
    assert (store.stats.hits, store.stats.misses, store.stats.errors) == (1, 1, 0)
    assert store.get(b"b/x/v1/1/9") is None               # absent stays absent, not cached
    assert not redis_server.client().exists(b"b/x/v1/1/9")
    assert store.get(b"m/x/v1") == b"{}"                  # not a block key: never cached
    assert not redis_server.client().exists(b"m/x/v1")
    store.close()


def test_redis_down_falls_back_and_recovers(redis_server, caplog):
    inner = DictStore({b"b/k": b"v"})
    store = RedisCachedStore(inner, redis_server.url, ttl_s=60, retry_after_s=0.0)
    redis_server.proc.kill()
    redis_server.proc.wait()
    for _ in range(5):
        assert store.get(b"b/k") == b"v"
    assert store.stats.errors == 5
    assert sum("redis unavailable" in r.message for r in caplog.records) == 1   # once per outage


def test_unreachable_redis_is_skipped_for_a_while(free_port):
    inner = DictStore({b"b/k": b"v"})
    store = RedisCachedStore(inner, f"redis://127.0.0.1:{free_port()}/0", ttl_s=60,
                             retry_after_s=60)
    for _ in range(10):
        assert store.get(b"b/k") == b"v"
    assert store.stats.errors == 1          # after the first failure Redis is not even tried
