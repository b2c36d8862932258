"""The cache tiers inside a live bank server: LRU + Redis in front of LMDB, a corrupt Redis
entry (never DATA_LOSS), Redis outage and return, per-tier stats at shutdown.

Run: .venv/bin/python -m pytest -q tests/integration/test_tiers_server.py
"""
from __future__ import annotations

import ast
import re
import signal

import pytest

from membank.artifacts import iter_blocks, load_manifest
from services.model_client.bank_client import BankClient

pytestmark = pytest.mark.integration


def tier_stats_from_logs(log_dir) -> list[dict[str, dict]]:
    """Per server (in start order), the `<tier> tier: {...}` lines it logged at shutdown."""
    out = []
    for path in sorted(log_dir.glob("server-*.log")):
        out.append({m.group(1): ast.literal_eval(m.group(2))
                    for m in re.finditer(r"(\w+) tier: (\{.*\})", path.read_text())})
    return out


def test_lru_and_redis_tiers_with_a_corrupt_entry_and_an_outage(lmdb_dir, big_export,
                                                                 redis_server, start_bank_server,
                                                                 tmp_path):
    m = load_manifest(big_export)
    want = {(l, n): d for l, n, d in iter_blocks(big_export, m)}
    r = redis_server.client()
    # LRU 8 MB (items up to 2 MB: the 1.76 MB level-1 blocks fit); Redis behind it
    with start_bank_server(lmdb_dir, "--warm-levels", "0", "--lru-mb", "8",
                           "--redis-url", redis_server.url,
                           "--redis-retry-after-s", "0.2") as (address, proc), \
            BankClient(address) as c:
        ids = list(m.blocks())
        for _ in range(2):
            got = c.fetch("big", "b1", ids, m)
            assert {b: bytes(d) for b, d in got.items()} == want
        # the second pass came from the LRU: Redis saw each block once (the miss, then SET)
        stored = c.get_manifest("big")          # where ingest put each block (by content)
        assert all(r.exists(stored.storage_key(*b)) for b in ids)

        # corrupt a Redis entry; a server whose LRU does not hold it must still serve the block
        key = stored.storage_key(1, 1)
        bad = bytearray(r.get(key))
        bad[7] ^= 0xFF
        r.set(key, bytes(bad))
    with start_bank_server(lmdb_dir, "--warm-levels", "0", "--redis-url",
                           redis_server.url) as (address, proc), \
            BankClient(address) as c:
        got = c.fetch("big", "b1", [(1, 1), (3, 2)], m)         # no DATA_LOSS
        assert bytes(got[(1, 1)]) == want[(1, 1)]
        assert r.get(key) == want[(1, 1)]                     # evicted and re-set correctly
        # Redis goes away: fetches go on from LMDB
        redis_server.proc.send_signal(signal.SIGKILL)
        redis_server.proc.wait()
        for _ in range(3):
            got = c.fetch("big", "b1", ids, m)
            assert {b: bytes(d) for b, d in got.items()} == want
    first, second = tier_stats_from_logs(tmp_path)
    n = len(list(m.blocks()))
    assert first["lru"]["misses"] == n and first["lru"]["hits"] == n      # 2nd pass: all LRU
    assert first["redis"]["misses"] == n and first["redis"]["sets"] == n
    assert first["redis"]["hits"] == 0 and first["lru"]["resident_items"] == n
    assert second["redis"]["corrupt"] == 1 and second["redis"]["errors"] >= 1
    assert second["redis"]["breaker"] in ("open", "half-open")


def test_redis_password_is_never_logged(lmdb_dir, redis_server, start_bank_server, tmp_path):
    url = f"redis://:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    with start_bank_server(lmdb_dir, "--redis-url", url) as (address, _), \
            BankClient(address) as c:
        assert c.health()
    log = next(tmp_path.glob("server-*.log")).read_text()
    assert "redis block tier at redis://:***@127.0.0.1" in log
    assert "s3cret-pw" not in log


def test_redis_cluster_down_at_start_serves_degraded(lmdb_dir, start_bank_server, free_port,
                                                      tmp_path):
    """A Redis Cluster client cannot be built while no node answers: the server starts anyway
    and serves every block from LMDB (it connects when the cluster is back: test_tiers.py)."""
    url = f"redis://127.0.0.1:{free_port()}/0"          # nothing listens there
    with start_bank_server(lmdb_dir, "--redis-url", url, "--redis-cluster",
                           "--redis-timeout-ms", "50") as (address, _), \
            BankClient(address) as c:
        assert c.health()
        m = c.get_manifest("test")
        assert len(c.fetch("test", "", [(1, 0), (2, 3)], m)) == 2
    assert "unreachable" in next(tmp_path.glob("server-*.log")).read_text()
