"""Pure parts of the bank server's API layer: rate limiter, bearer parsing, server-side router,
tier stats for metrics, publish name checks, settings of the API surface.

Run: .venv/bin/python -m pytest -q tests/unit/test_api_parts.py
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from membank.router import Router
from services.bank_server.metrics import ServerMetrics, collect_tier_stats
from services.bank_server.publish import PublishError, check_names, publish_in_env
from services.bank_server.router_store import Router as StoredRouter
from services.bank_server.router_store import RouterFormatError, router_key, store_router
from services.bank_server.security import RateLimiter, bearer, peer_host
from services.bank_server.settings import BankServerSettings


# -- security ----------------------------------------------------------------------------------
def test_rate_limiter_buckets_per_client():
    rl = RateLimiter(rate=2, burst=3)
    assert [rl.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a", now=0.0) == pytest.approx(0.5)       # empty: one token in 0.5 s
    assert rl.take("b", now=0.0) == 0.0                       # another client is unaffected
    assert rl.take("a", now=0.5) == 0.0                       # refilled one
    assert rl.take("a", now=0.5) > 0
    assert rl.take("a", now=100.0) == 0.0                     # refill caps at burst
    assert [rl.take("a", now=100.0) for _ in range(3)][-1] > 0


def test_rate_limiter_counts_a_cost_and_never_refuses_one_over_the_burst_forever():
    """The byte limiter (issue 16): `take(key, cost)` charges `cost` units; a cost over the
    burst is admitted from a full bucket and then waits off its debt, so the sustained rate
    holds for any mix of sizes."""
    rl = RateLimiter(rate=1e6, burst=4e6)                     # 1 MB/s, 4 MB at once
    assert rl.take("a", 3e6, now=0.0) == 0.0                  # 3 MB of 4
    assert rl.take("a", 2e6, now=0.0) == pytest.approx(1.0)   # 1 MB left: 1 s until 2 MB
    assert rl.take("b", 2e6, now=0.0) == 0.0                  # per client
    assert rl.take("a", 2e6, now=1.0) == 0.0
    assert rl.take("a", 10e6, now=1.0) == pytest.approx(4.0)  # over the burst: a full bucket
    assert rl.take("a", 10e6, now=5.0) == 0.0                 # ... and then admitted
    assert rl.take("a", 1.0, now=5.0) == pytest.approx(6.0)   # 6 MB of debt to wait off first
    assert rl.take("a", 1.0, now=12.0) == 0.0


def test_rate_limiter_bounds_its_memory():
    rl = RateLimiter(rate=1, burst=1, max_clients=10)
    for i in range(100):
        rl.take(f"c{i}", now=0.0)
    assert len(rl._buckets) == 10


def test_bearer_and_peer():
    assert bearer([("authorization", "Bearer abc")]) == "abc"
    assert bearer([("x", "y"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer([("authorization", "abc")]) == ""          # malformed
    assert bearer([("authorization", "Basic abc")]) == ""
    assert bearer([("authorization", "Bearer ")]) == ""
    assert bearer([]) is None and bearer(None) is None
    assert peer_host("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "::1"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"


# -- router ------------------------------------------------------------------------------------
def make_router(k=3, depth=3, dim=16, seed=0) -> Router:
    g = torch.Generator().manual_seed(seed)
    return Router(k, depth, dim, [torch.randn(k ** l, k, dim, generator=g) for l in range(depth)])


def test_stored_router_routes_like_the_device(tmp_path):
    router = make_router()
    router.save(tmp_path / "router.safetensors")
    npr = StoredRouter.from_bytes((tmp_path / "router.safetensors").read_bytes())
    assert (npr.branching, npr.depth, npr.dim) == (3, 3, 16)
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    want = router.route(x).tolist()
    assert [npr.path(row.numpy()) for row in x] == want
    with pytest.raises(ValueError):
        npr.path(np.zeros(15))


@pytest.mark.parametrize("mutate", [
    lambda b: b[:20],                          # truncated
    lambda b: b"\x00" * 8 + b[8:],             # header length 0
    lambda b: b"x" * len(b),                   # garbage
    lambda b: b"",
])
def test_malformed_router_bytes(tmp_path, mutate):
    make_router().save(tmp_path / "r.safetensors")
    with pytest.raises(RouterFormatError):
        StoredRouter.from_bytes(mutate((tmp_path / "r.safetensors").read_bytes()))


def test_router_with_wrong_format_or_dtype(tmp_path):
    from safetensors.torch import save_file
    good = {"centroids.1": torch.zeros(1, 2, 4), "centroids.2": torch.zeros(2, 2, 4)}
    meta = {"format": "membank.router/1", "k": "2", "depth": "2", "dim": "4"}
    cases = [
        (good, {**meta, "format": "other"}),
        (good, {**meta, "depth": "3"}),
        ({**good, "centroids.2": torch.zeros(2, 2, 4, dtype=torch.float16)}, meta),
        ({**good, "centroids.2": torch.zeros(3, 2, 4)}, meta),
        ({**good, "centroids.2": torch.full((2, 2, 4), float("nan"))}, meta),
    ]
    for tensors, md in cases:
        save_file(tensors, str(tmp_path / "r"), metadata=md)
        with pytest.raises(RouterFormatError):
            StoredRouter.from_bytes((tmp_path / "r").read_bytes())
    save_file(good, str(tmp_path / "r"), metadata=meta)
    assert StoredRouter.from_bytes((tmp_path / "r").read_bytes()).path([1, 0, 0, 0]) == [0, 0]


def test_store_router_writes_the_versioned_key(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    assert not store_router(tmp_path / "db", export, "b", "v1", map_size=1 << 24)  # no router
    make_router().save(export / "router.safetensors")
    assert store_router(tmp_path / "db", export, "b", "v1", map_size=1 << 24)
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24, readonly=True)
    with env.begin() as txn:
        assert txn.get(router_key("b", "v1")) == (export / "router.safetensors").read_bytes()
    env.close()
    (export / "router.safetensors").write_bytes(b"junk")
    with pytest.raises(RouterFormatError):
        store_router(tmp_path / "db", export, "b", "v2", map_size=1 << 24)


# -- publish -----------------------------------------------------------------------------------
def test_publish_in_env(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"m/b/v1", b"{}")
        txn.put(b"m/b/v2", b"{}")
    env.close()
    assert publish_in_env(tmp_path / "db", "b", "v1", 1 << 24) == ""
    assert publish_in_env(tmp_path / "db", "b", "v2", 1 << 24) == "v1"
    with pytest.raises(PublishError) as e:
        publish_in_env(tmp_path / "db", "b", "v3", 1 << 24)
    assert e.value.kind == "not_found"
    for bank, version in (("", "v1"), ("b", ""), ("a/b", "v1"), ("b", "v" * 200)):
        with pytest.raises(PublishError) as e:
            check_names(bank, version)
        assert e.value.kind == "invalid"


# -- metrics -----------------------------------------------------------------------------------
def test_tier_stats_from_any_shape():
    @dataclasses.dataclass
    class DC:
        hits: int = 3

    class Inner:
        def stats(self):
            return {"tier": "lmdb", "hits": 5, "resident_fraction": 0.5, "note": "x"}

    class Cache:
        def __init__(self):
            self.inner = Inner()
            self.stats = DC()

    class Broken:
        def stats(self):
            raise RuntimeError("no")

    cache = Cache()
    stats = collect_tier_stats([cache, cache.inner, Broken(), object()])
    assert stats == {"Cache": {"hits": 3},
                     "lmdb": {"tier": "lmdb", "hits": 5, "resident_fraction": 0.5, "note": "x"}}
    m = ServerMetrics(tier_sources=lambda: [cache])
    m.rpc_started()
    m.rpc_done("FetchBlocks", "OK", 0.01)
    m.block_sent(1, 100, 0.002)
    text = m.render().decode()
    assert 'membank_tier_hits{tier="lmdb"} 5.0' in text
    assert 'membank_tier_resident_fraction{tier="lmdb"} 0.5' in text
    assert "note" not in text
    snap = m.snapshot()
    assert snap["rpcs"] == {"FetchBlocks": {"OK": 1}} and snap["in_flight"] == 0
    assert snap["fetch_by_level"]["1"]["bytes"] == 100


# -- settings ----------------------------------------------------------------------------------
def test_api_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMBANK_SERVER_AUTH_TOKEN", "from-env")
    (tmp_path / "admin").write_text("  from-file\n")
    s = BankServerSettings.from_args(["--admin-token-file", str(tmp_path / "admin"),
                                      "--admin-port", "0", "--rate-limit-rps", "5"])
    assert s.auth_token.get_secret_value() == "from-env"
    assert s.admin_token.get_secret_value() == "from-file"
    assert "from-env" not in repr(s)                  # secrets never printed
    assert (s.admin, s.admin_port, s.rate_limit_rps) == (True, 0, 5.0)
    assert BankServerSettings.from_args(["--no-admin"]).admin is False
    with pytest.raises(ValidationError):
        BankServerSettings.from_args(["--tls-cert", "c.pem"])          # key missing
    with pytest.raises(SystemExit):
        BankServerSettings.from_args(["--auth-token-file", str(tmp_path / "missing")])
    s = BankServerSettings.from_args(["--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert s.tls_cert == Path("c.pem")
