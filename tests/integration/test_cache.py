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
    st = store.stats()
    assert (st["hits"], st["misses"], st["errors"]) == (1, 1, 0)
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
    assert store.stats()["errors"] == 5
    assert sum("redis unavailable" in r.message for r in caplog.records) == 1   # once per outage


def test_unreachable_redis_is_skipped_for_a_while(free_port):
    inner = DictStore({b"b/k": b"v"})
    store = RedisCachedStore(inner, f"redis://127.0.0.1:{free_port()}/0", ttl_s=60,
                             retry_after_s=60)
    for _ in range(10):
        assert store.get(b"b/k") == b"v"
    assert store.stats()["errors"] == 1          # after the first failure Redis is not even tried


# -- circuit breaker against a real Redis behind a relay that can hang or slow down -------------
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from membank.blocks import checksum  # noqa: E402
from services.bank_server.store import Expect  # noqa: E402
from testkit.net import Relay  # noqa: E402


def timed_reads(store, key, want, n):
    worst = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        with store.read(key, Expect(len(want), checksum(want))) as buf:
            assert bytes(buf) == want
        worst = max(worst, time.perf_counter() - t0)
    return worst


def test_hung_redis_degrades_within_the_timeout_and_recovers(redis_server, caplog):
    proxy = Relay(f"127.0.0.1:{redis_server.port}")
    inner = DictStore({b"b/k": b"v" * 1000})
    store = RedisCachedStore(inner, f"redis://{proxy.address}/0", ttl_s=60, socket_timeout_s=0.1,
                             retry_after_s=0.3, max_retry_after_s=0.6)
    timed_reads(store, b"b/k", b"v" * 1000, 2)
    assert store.stats()["hits"] == 1
    proxy.hold = True                          # replies held back: a hung Redis
    t0 = time.perf_counter()
    worst = timed_reads(store, b"b/k", b"v" * 1000, 50)
    assert worst < 0.35                        # one socket timeout (0.1 s), never more
    assert time.perf_counter() - t0 < 1.0
    s = store.stats()
    assert s["breaker"] in ("open", "half-open") and s["errors"] <= 3 and s["skipped"] >= 45
    proxy.hold = False
    deadline = time.monotonic() + 5
    while store.breaker.state != "closed" and time.monotonic() < deadline:
        timed_reads(store, b"b/k", b"v" * 1000, 1)
        time.sleep(0.05)
    assert store.breaker.state == "closed"
    hits = store.stats()["hits"]
    timed_reads(store, b"b/k", b"v" * 1000, 3)
    assert store.stats()["hits"] == hits + 3   # Redis serves again
    assert sum("unavailable" in r.message for r in caplog.records) == 1
    assert any("back after" in r.message for r in caplog.records)
    proxy.close()
    store.close()


def test_slow_redis_is_bypassed_then_probed(redis_server):
    proxy = Relay(f"127.0.0.1:{redis_server.port}")
    inner = DictStore({b"b/k": b"v" * 1000})
    store = RedisCachedStore(inner, f"redis://{proxy.address}/0", ttl_s=60, socket_timeout_s=1.0,
                             slow_s=0.02,
                             slow_calls=3, retry_after_s=0.2, max_retry_after_s=0.2)
    timed_reads(store, b"b/k", b"v" * 1000, 2)
    proxy.stall_p, proxy.stall_s = 1.0, 0.05       # each reply 50 ms late
    timed_reads(store, b"b/k", b"v" * 1000, 3)     # three slow calls open the breaker
    assert store.breaker.state == "open" and store.stats()["slow"] == 3
    worst = timed_reads(store, b"b/k", b"v" * 1000, 20)
    assert worst < 0.02                             # bypassed: the inner store answers
    proxy.stall_p = 0.0
    time.sleep(0.25)
    timed_reads(store, b"b/k", b"v" * 1000, 2)      # the probe is fast: closed again
    assert store.breaker.state == "closed"
    proxy.close()
    store.close()


def test_corrupt_redis_entry_is_evicted_and_repaired(redis_server):
    good = b"intact block bytes" * 10
    inner = DictStore({b"b/x/v1/1/0": good})
    store = RedisCachedStore(inner, redis_server.url, ttl_s=60)
    want = Expect(len(good), checksum(good))
    r = redis_server.client()
    for bad in (b"X" + good[1:], good[:-1]):        # flipped byte; truncated
        r.set(b"b/x/v1/1/0", bad)
        with store.read(b"b/x/v1/1/0", want) as buf:
            assert bytes(buf) == good
        assert r.get(b"b/x/v1/1/0") == good         # evicted, then re-set from the inner store
    assert store.stats()["corrupt"] == 2 and inner.reads == 2
    store.close()


def test_maxmemory_and_policy_are_applied(redis_server):
    store = RedisCachedStore(DictStore({}), redis_server.url, maxmemory_bytes=64 << 20)
    r = redis_server.client()
    assert [int(v) for v in r.config_get("maxmemory").values()] == [64 << 20]
    s = store.stats()
    assert s["maxmemory_bytes"] == 64 << 20 and s["maxmemory_policy"] == "allkeys-lru"
    assert s["resident_bytes"] > 0 and s["resident_items"] == 0
    store.close()


# -- Redis Cluster ----------------------------------------------------------------------------
@pytest.fixture
def redis_cluster(tmp_path, free_port):
    ports = []
    while len(ports) < 3:                  # the cluster bus listens on port + 10000
        p = free_port()
        if p + 10000 <= 65535 and p not in ports and p + 10000 not in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p + 10000))
                except OSError:
                    continue
            ports.append(p)
    procs = []
    for p in ports:
        d = tmp_path / str(p)
        d.mkdir()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(d / "nodes.conf"), "--save", "", "--appendonly", "no",
             "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    import redis as redis_lib
    for p in ports:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_lib.Redis(port=p, socket_timeout=1).ping()
                break
            except redis_lib.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", "0", "--cluster-yes"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    deadline = time.monotonic() + 20
    while "cluster_state:ok" not in subprocess.run(
            ["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True,
            text=True).stdout:
        assert time.monotonic() < deadline, "cluster did not come up"
        time.sleep(0.1)
    yield ports, procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_redis_cluster_tier(redis_cluster):
    ports, procs = redis_cluster
    data = {f"b/x/v1/3/{i}".encode(): bytes([i]) * 500 for i in range(40)}
    inner = DictStore(data)
    store = RedisCachedStore(inner, f"redis://127.0.0.1:{ports[0]}/0", cluster=True, ttl_s=60,
                             socket_timeout_s=0.2, retry_after_s=0.2)
    for _ in range(2):
        for k, v in data.items():
            with store.read(k, Expect(len(v), checksum(v))) as buf:
                assert bytes(buf) == v
    s = store.stats()
    assert (s["hits"], s["misses"]) == (40, 40) and s["resident_items"] == 40
    assert s["resident_bytes"] > 3 * 500_000 > s["maxmemory_bytes"] == 0   # 3 nodes' memory
    import redis as redis_lib
    per_node = [redis_lib.Redis(port=p).dbsize() for p in ports]
    assert sum(per_node) == 40 and all(n > 0 for n in per_node)    # spread over the slots
    # a node dies: reads still succeed (from the inner store), within bounded time
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    t0 = time.perf_counter()
    for k, v in data.items():
        with store.read(k, Expect(len(v), checksum(v))) as buf:
            assert bytes(buf) == v
    assert time.perf_counter() - t0 < 5.0
    store.close()
