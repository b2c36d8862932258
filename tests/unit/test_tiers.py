"""The read tiers without servers: LRU byte budget and single flight, the circuit breaker's
state machine, LMDBStore zero-copy reads and integrity (a temp LMDB, no subprocess).

Run: .venv/bin/python -m pytest -q tests/unit/test_tiers.py
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from membank.blocks import checksum
from services.bank_server import cache as cache_mod
from services.bank_server import store as store_mod
from services.bank_server.cache import CircuitBreaker
from services.bank_server.store import (
    CorruptBlock,
    Expect,
    LMDBStore,
    acquire_env,
    page_cache_residency,
    release_env,
)
from services.bank_server.tiers import LRUCache, build_block_store, tier_stats, tiers


class DictStore:
    name = "dict"

    def __init__(self, data: dict[bytes, bytes], delay_s: float = 0.0):
        self.data, self.reads, self.delay_s = data, 0, delay_s

    def get(self, key: bytes) -> bytes | None:
        self.reads += 1
        time.sleep(self.delay_s)
        return self.data.get(key)


def expect(data: bytes) -> Expect:
    return Expect(len(data), checksum(data))


# -- LRU ----------------------------------------------------------------------------------------
def test_lru_hits_evicts_by_bytes_and_reports():
    blocks = {f"b/x/v/1/{i}".encode(): bytes([i]) * 100 for i in range(5)}
    inner = DictStore(blocks)
    lru = LRUCache(inner, max_bytes=300, max_item_bytes=100)
    keys = list(blocks)
    for k in keys[:3]:
        with lru.read(k, expect(blocks[k])) as buf:
            assert buf == blocks[k]
    assert inner.reads == 3
    with lru.read(keys[0]) as buf:            # hit; keys[0] becomes most recent
        assert buf == blocks[keys[0]]
    assert inner.reads == 3
    lru.get(keys[3])                          # evicts keys[1], the least recently used
    s = lru.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 4, 1)
    assert s["resident_bytes"] == 300 and s["resident_items"] == 3
    lru.get(keys[0])
    assert inner.reads == 4                   # still cached
    lru.get(keys[1])
    assert inner.reads == 5                   # was evicted


def test_lru_passes_large_blocks_and_absent_keys_through():
    inner = DictStore({b"b/big": b"x" * 1000})
    lru = LRUCache(inner, max_bytes=4000)     # items up to 1000 bytes by default
    lru2 = LRUCache(inner, max_bytes=3999)    # ... up to 999: the block is too big
    for _ in range(2):
        assert lru2.get(b"b/big") == b"x" * 1000
        assert lru.get(b"b/nope") is None
    assert lru2.stats()["resident_items"] == 0 and lru.stats()["resident_items"] == 0
    with lru2.read(b"b/big", expect(b"x" * 1000)) as buf:
        assert buf == b"x" * 1000
    assert lru2.stats()["too_big"] == 1


def test_lru_only_caches_verified_bytes():
    inner = DictStore({b"b/k": b"corrupt!"})
    lru = LRUCache(inner, max_bytes=1000)
    with pytest.raises(CorruptBlock):
        with lru.read(b"b/k", Expect(8, checksum(b"intact!!"))):
            pass
    assert lru.stats()["resident_items"] == 0
    inner.data[b"b/k"] = b"intact!!"
    with lru.read(b"b/k", Expect(8, checksum(b"intact!!"))) as buf:
        assert buf == b"intact!!"


def test_lru_single_flight():
    inner = DictStore({b"b/k": b"v" * 10}, delay_s=0.2)
    lru = LRUCache(inner, max_bytes=1000)
    out = []
    threads = [threading.Thread(target=lambda: out.append(lru.get(b"b/k"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [b"v" * 10] * 6 and inner.reads == 1


def test_build_block_store_from_settings(tmp_path):
    from services.bank_server.settings import BankServerSettings
    env = acquire_env(tmp_path / "db", 1 << 24, readonly=False)
    with env.begin(write=True) as txn:
        txn.put(b"b/x/v/1/0", b"abc")
    release_env(env)
    store = LMDBStore(tmp_path / "db", 1 << 24)
    plain = build_block_store(BankServerSettings(lmdb_path=tmp_path / "db"), store)
    assert plain is store
    lru = build_block_store(BankServerSettings(lmdb_path=tmp_path / "db", lru_mb=1), store)
    assert isinstance(lru, LRUCache) and lru.inner is store and lru.max_bytes == 1 << 20
    assert [t.name for t in tiers(lru)] == ["lru", "lmdb"]
    assert lru.get(b"b/x/v/1/0") == b"abc"
    assert [s["tier"] for s in tier_stats(lru)] == ["lru", "lmdb"]
    store.close()


# -- circuit breaker ------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(cache_mod.time, "monotonic", c)
    return c


def test_breaker_opens_on_error_and_probes_once(clock):
    b = CircuitBreaker(retry_after_s=1.0, max_retry_after_s=4.0)
    assert b.allow() and b.state == "closed"
    b.failure(ConnectionError("down"))
    assert b.state == "open" and not b.allow()
    clock.t += 1.0
    assert b.allow()                  # the probe
    assert b.state == "half-open" and not b.allow() and not b.allow()   # only one probe
    b.failure(ConnectionError("still down"))
    assert b.state == "open"
    clock.t += 1.5
    assert not b.allow()              # backed off to 2 s
    clock.t += 0.5
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()
    assert b.opens == 1


def test_breaker_backoff_is_capped(clock):
    b = CircuitBreaker(retry_after_s=1.0, max_retry_after_s=4.0)
    b.failure(OSError())
    for _ in range(6):
        clock.t += 4.0
        assert b.allow()
        b.failure(OSError())
    clock.t += 4.0
    assert b.allow()


def test_breaker_opens_after_consecutive_slow_calls(clock):
    b = CircuitBreaker(retry_after_s=1.0, slow_calls=3)
    b.success(slow=True)
    b.success(slow=True)
    b.success()                       # a fast call resets the streak
    b.success(slow=True)
    b.success(slow=True)
    assert b.state == "closed"
    b.success(slow=True)
    assert b.state == "open"
    clock.t += 1.0
    assert b.allow()
    b.success(slow=True)              # a slow probe re-opens at once
    assert b.state == "open"


# -- LMDB store -----------------------------------------------------------------------------------
@pytest.fixture
def db(tmp_path):
    env = acquire_env(tmp_path / "db", 1 << 26, readonly=False)
    with env.begin(write=True) as txn:
        txn.put(b"b/x/v/1/0", b"a" * (1 << 20))
        txn.put(b"b/x/v/1/1", b"bb")
    release_env(env)
    return tmp_path / "db"


def test_lmdb_read_is_zero_copy_and_verified(db):
    with LMDBStore(db, 1 << 26) as store:
        big = b"a" * (1 << 20)
        with store.read(b"b/x/v/1/0", expect(big)) as buf:
            assert isinstance(buf, memoryview) and buf.readonly and buf == big
        with store.read(b"b/x/v/1/9") as buf:
            assert buf is None
        with pytest.raises(CorruptBlock):
            with store.read(b"b/x/v/1/1", expect(b"bc")):
                pass
        assert store.get(b"b/x/v/1/1") == b"bb"
        s = store.stats()
        assert (s["reads"], s["hits"], s["misses"], s["corrupt"]) == (3, 2, 1, 1)
        assert s["file_bytes"] > 1 << 20 and 0.0 <= s["resident_fraction"] <= 1.0


def test_one_environment_per_process(db):
    a = LMDBStore(db, 1 << 26)
    b = LMDBStore(db, 1 << 26)
    assert a.env is b.env
    with pytest.raises(RuntimeError, match="read-only"):
        acquire_env(db, 1 << 26, readonly=False)
    a.close()
    assert b.get(b"b/x/v/1/1") == b"bb"       # b's handle survives a's close
    b.close()
    env = acquire_env(db, 1 << 26, readonly=False)   # all closed: a writer may open it
    release_env(env)


def test_page_cache_residency(db):
    r = page_cache_residency(db / "data.mdb")
    assert r is None or 0.0 <= r <= 1.0


def test_breaker_ignores_calls_that_began_before_it_opened(clock):
    b = CircuitBreaker(retry_after_s=1.0, max_retry_after_s=8.0)
    b.failure(OSError("one in-flight call fails"))
    b.failure(OSError("three more, begun before it opened"))
    b.failure(OSError())
    b.success()                       # a late answer from before the outage: still open
    assert b.state == "open" and b.opens == 1
    clock.t += 1.0                    # backoff not doubled by the stale failures
    assert b.allow()


# -- verify once -----------------------------------------------------------------------------------
def _aged(db):
    """Date data.mdb an hour back, as a bank ingested long before it is served: the next write
    to the file then moves its mtime however coarse the file system's clock is."""
    old = time.time_ns() - 3600 * 10**9
    os.utime(db / "data.mdb", ns=(old, old))


def _flip_byte(db, value: bytes) -> None:
    """One byte of `value` flipped inside data.mdb (a write under LMDB, as bit rot or a tool)."""
    raw = (db / "data.mdb").read_bytes()
    at = raw.find(value)
    assert at >= 0
    with open(db / "data.mdb", "r+b") as f:
        f.seek(at + len(value) // 2)
        f.write(bytes([raw[at + len(value) // 2] ^ 0xFF]))


def test_verify_once_trusts_an_unchanged_resident_block_until_the_file_changes(db):
    _aged(db)
    big = b"a" * (1 << 20)
    with LMDBStore(db, 1 << 26, verify_ttl_s=60) as store:
        for _ in range(3):
            with store.read(b"b/x/v/1/0", expect(big)) as buf:
                assert buf == big
        assert store.stats()["trusted"] == 2          # hashed once, trusted twice
        _flip_byte(db, big)                            # the pages stay resident: mtime tells
        with pytest.raises(CorruptBlock):
            with store.read(b"b/x/v/1/0", expect(big)):
                pass
        with pytest.raises(CorruptBlock):              # and it stays refused
            with store.read(b"b/x/v/1/0", expect(big)):
                pass
        assert store.stats()["corrupt"] == 2


def test_verify_once_hashes_again_when_evicted_expired_or_expecting_other_bytes(db, monkeypatch):
    _aged(db)
    big = b"a" * (1 << 20)

    def read(store, want=big):
        with store.read(b"b/x/v/1/0", expect(want)):
            pass
        return store.stats()["trusted"]

    with LMDBStore(db, 1 << 26, verify_ttl_s=60) as store:
        assert read(store) == 0 and read(store) == 1
        monkeypatch.setattr(store_mod, "resident", lambda buf: False)   # read back from disk
        assert read(store) == 1
        monkeypatch.undo()
        assert read(store) == 2
        store.verify_ttl_s = 1e-9                                       # expired
        assert read(store) == 2
        store.verify_ttl_s = 60
        assert read(store) == 3
        with pytest.raises(CorruptBlock):     # another manifest's checksum: never trusted
            read(store, b"b" * (1 << 20))
        assert read(store) == 3               # the refusal dropped what was remembered
    with LMDBStore(db, 1 << 26) as store:     # off (the library default): hash every read
        assert read(store) == 0 and read(store) == 0


def test_resident_sees_every_page_of_a_mapping_small_or_large():
    """mincore per page, from the first to the last (and a mapping larger than the reused
    per-thread vector, which grows): untouched anonymous pages are not resident."""
    import mmap
    page = mmap.PAGESIZE
    for pages in (3, 9000):                          # 9000 pages: past the first 8192-page vector
        m = mmap.mmap(-1, pages * page)
        view = memoryview(m)
        assert not store_mod.resident(view)          # nothing touched yet
        for i in range(0, pages - 1):
            m[i * page] = 1
        assert not store_mod.resident(view)          # all but the last page
        assert store_mod.resident(view[: (pages - 1) * page])
        m[(pages - 1) * page] = 1
        assert store_mod.resident(view) and store_mod.resident(view[page + 5: 2 * page + 7])
        view.release()
        m.close()


def test_deferred_tier_serves_the_next_tier_until_it_can_be_built(monkeypatch):
    """A Redis Cluster down at start: reads go to the next tier, a later read connects."""
    from services.bank_server import tiers as tiers_mod
    from services.bank_server.tiers import DeferredTier
    now = [100.0]
    monkeypatch.setattr(tiers_mod.time, "monotonic", lambda: now[0])
    data = {b"b/x/v1/1/0": b"lmdb"}
    inner = DictStore(data)
    up = [False]
    built = DictStore({b"b/x/v1/1/0": b"redis"})

    def build():
        if not up[0]:
            raise ConnectionError("cluster down")
        return built
    tier = DeferredTier(build, inner, retry_after_s=1.0)
    assert tier.get(b"b/x/v1/1/0") == b"lmdb" and tier.attempts == 0   # no try before due
    now[0] += 1.5
    assert tier.get(b"b/x/v1/1/0") == b"lmdb" and tier.attempts == 1   # tried, still down
    assert tier.stats()["connected"] is False
    up[0] = True
    now[0] += 1.5                                                       # backoff doubled: 2 s
    assert tier.get(b"b/x/v1/1/0") == b"lmdb" and tier.attempts == 1
    now[0] += 1.0
    assert tier.get(b"b/x/v1/1/0") == b"redis" and tier.attempts == 2   # connected
    assert tier.get(b"b/x/v1/1/0") == b"redis" and tier.attempts == 2


def test_redact_url_hides_passwords():
    from services.bank_server.tiers import redact_url
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:pw@h:1") == "rediss://user:***@h:1"
    assert redact_url("redis://h:1/0?db=1&password=pw") == "redis://h:1/0?db=1&password=***"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
def test_lru_never_serves_an_entry_verified_against_other_content():
    """A key whose content changed (a version name reused): the entry verified against the old
    checksum is a miss for the new one, and is replaced."""
    inner = DictStore({b"b/k": b"old!"})
    lru = LRUCache(inner, 1000)
    with lru.read(b"b/k", expect(b"old!")) as buf:
        assert buf == b"old!"
    inner.data[b"b/k"] = b"new!"                          # same size, other bytes
    with lru.read(b"b/k", expect(b"new!")) as buf:
        assert buf == b"new!"
    with lru.read(b"b/k", expect(b"new!")) as buf:        # now cached as the new content
        assert buf == b"new!"
    assert lru.stats()["hits"] == 1 and lru.stats()["resident_items"] == 1
