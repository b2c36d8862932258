"""Server metrics: Prometheus families for `/metrics`, the same numbers as JSON for `/v1/stats`.

    metrics = ServerMetrics(tier_sources=lambda: [store, blocks])
    metrics.block_sent(level, nbytes, seconds)      # servicer, once per block sent
    metrics.rpc_done(method, code_name, seconds)    # interceptor, once per RPC
    metrics.render()                                # Prometheus text exposition
    scrapes = Scrapes(metrics, min_interval_s=1.0)  # the admin API's: off the event loop
    await scrapes.render(); await scrapes.snapshot()

Families (one private registry per server, so tests can run several in one process):
  membank_rpc_total{method,code}             RPCs by final gRPC status code (OK included);
                                             data plane requests as method "DataPlaneFetch"
  membank_rpc_seconds{method}                RPC latency histogram
  membank_rpc_in_flight                      RPCs running now
  membank_fetch_block_seconds{level}         read + verify + send of one block, per tree level
  membank_block_bytes_sent_total{level}      block bytes written to clients (level "http":
                                             served by content address, admin.py /v1/blocks)
  membank_tier_<stat>{tier}                  whatever each storage tier's `stats()` reports
                                             (hits, misses, bytes, residency, ...), at scrape time
plus the standard process_* families.

A shard with data plane worker processes (workers.py): each worker records into
prometheus_client's multiprocess files in `worker_dir`; the server's /metrics and /v1/stats add
them to its own numbers (same name and labels: summed), so the shard reports as one. There the
JSON's per-level p50/p99 are the histogram's bucket bounds (the recent latencies stay in each
process), and the tier and process_* families are the server process's own.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import struct
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger("membank.bank_server.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# from a cached 1.7 MB block on loopback to a cold 27.5 MB one under load (BENCHMARKS.md)
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_RECENT = 1024   # per-level latencies kept for the JSON percentiles


def tier_stats(obj) -> dict | None:
    """The stats of one tier as a dict: `obj.stats()` (a dict or dataclass) or `obj.stats`."""
    s = getattr(obj, "stats", None)
    if s is None:
        return None
    if callable(s):
        try:
            s = s()
        except Exception:   # a tier that cannot report must not break a scrape
            return None
    if dataclasses.is_dataclass(s) and not isinstance(s, type):
        s = dataclasses.asdict(s)
    return dict(s) if isinstance(s, dict) else None


def iter_tiers(roots: Iterable) -> list:
    """Distinct tier objects reachable from `roots` through `.inner` (cache -> store) links."""
    seen, out = set(), []
    for obj in roots:
        while obj is not None and id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
            obj = getattr(obj, "inner", None)
    return out


def collect_tier_stats(roots: Iterable) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for obj in iter_tiers(roots):
        s = tier_stats(obj)
        if s is None:
            continue
        name = str(s.get("tier") or s.get("name") or type(obj).__name__)
        while name in out:
            name += "_"
        out[name] = s
    return out


class _TierCollector:
    def __init__(self, sources: Callable[[], Iterable]):
        self.sources = sources

    def collect(self):
        families: dict[str, GaugeMetricFamily] = {}
        for tier, stats in collect_tier_stats(self.sources()).items():
            for key, value in stats.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                name = "membank_tier_" + re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = GaugeMetricFamily(
                        name, f"storage tier stat {key!r} (from the tier's stats())",
                        labels=["tier"])
                fam.add_metric([tier], float(value))
        yield from families.values()


class ServerMetrics:
    def __init__(self, tier_sources: Callable[[], Iterable] = lambda: (),
                 worker_dir: Path | None = None):
        """`worker_dir`: the data plane workers' multiprocess directory (None: no workers)."""
        self.started = time.time()
        self.tier_sources = tier_sources
        self.workers = (MultiProcessCollector(None, path=str(worker_dir))
                        if worker_dir is not None else None)
        self.registry = r = CollectorRegistry()
        self._rpc_total = Counter("membank_rpc", "RPCs by method and final gRPC status code",
                                  ["method", "code"], registry=r)
        self._rpc_seconds = Histogram("membank_rpc_seconds", "RPC latency", ["method"],
                                      buckets=_BUCKETS, registry=r)
        # livesum: in a worker (multiprocess mode) the sum over live processes; else ignored
        self._in_flight = Gauge("membank_rpc_in_flight", "RPCs running now", registry=r,
                                multiprocess_mode="livesum")
        self._block_seconds = Histogram("membank_fetch_block_seconds",
                                        "read + verify + send of one block, by tree level",
                                        ["level"], buckets=_BUCKETS, registry=r)
        self._bytes_sent = Counter("membank_block_bytes_sent", "block bytes sent, by level",
                                   ["level"], registry=r)
        r.register(_TierCollector(tier_sources))
        ProcessCollector(registry=r)
        # the same numbers, kept plainly for /v1/stats
        self._lock = threading.Lock()
        self._rpcs: dict[tuple[str, str], int] = defaultdict(int)
        self._levels: dict[int, dict] = defaultdict(lambda: {"blocks": 0, "bytes": 0,
                                                             "seconds": 0.0})
        self._recent: dict[int, deque] = defaultdict(lambda: deque(maxlen=_RECENT))
        self.in_flight = 0

    # -- recording --------------------------------------------------------------------------
    def rpc_started(self) -> None:
        self._in_flight.inc()
        with self._lock:     # the data plane's threads count here too, beside the event loop
            self.in_flight += 1

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        self._in_flight.dec()
        self._rpc_total.labels(method, code).inc()
        self._rpc_seconds.labels(method).observe(seconds)
        with self._lock:
            self.in_flight -= 1
            self._rpcs[(method, code)] += 1

    def block_sent(self, level: int, nbytes: int, seconds: float) -> None:
        self._block_seconds.labels(str(level)).observe(seconds)
        self._bytes_sent.labels(str(level)).inc(nbytes)
        with self._lock:
            s = self._levels[level]
            s["blocks"] += 1
            s["bytes"] += nbytes
            s["seconds"] += seconds
            self._recent[level].append(seconds)

    def http_block_sent(self, nbytes: int, seconds: float) -> None:
        """A block served by content address over HTTP (admin.py /v1/blocks): counted under
        level "http" (the address does not say the level)."""
        self._block_seconds.labels("http").observe(seconds)
        self._bytes_sent.labels("http").inc(nbytes)

    # -- reading ----------------------------------------------------------------------------
    def render(self) -> bytes:
        if self.workers is None:
            return generate_latest(self.registry)
        return generate_latest(_Families(self._merged(self.registry.collect())))

    def _merged(self, own) -> list:
        """`own` families of this process with the workers' added: equal names and labels
        summed (counters, histogram buckets and sums, the live in-flight gauge)."""
        try:
            theirs = list(self.workers.collect())
        except (struct.error, OSError, ValueError) as e:   # a worker's file just created
            log.warning("worker metrics unreadable this time: %s", e)
            theirs = []
        out: dict = {}
        for fam in [*own, *theirs]:
            have = out.get(fam.name)
            if have is None:
                out[fam.name] = fam
                continue
            where = {(x.name, tuple(sorted(x.labels.items()))): i
                     for i, x in enumerate(have.samples)}
            for x in fam.samples:
                i = where.get((x.name, tuple(sorted(x.labels.items()))))
                if i is None:
                    have.samples.append(x)
                else:
                    have.samples[i] = have.samples[i]._replace(
                        value=have.samples[i].value + x.value)
        return list(out.values())

    def snapshot(self) -> dict:
        if self.workers is not None:
            own = [f for m in (self._rpc_total, self._in_flight, self._block_seconds,
                               self._bytes_sent) for f in m.collect()]
            return {"uptime_s": round(time.time() - self.started, 3),
                    **_counts(self._merged(own)), "tiers": collect_tier_stats(self.tier_sources())}
        with self._lock:
            rpcs: dict[str, dict[str, int]] = defaultdict(dict)
            for (method, code), n in sorted(self._rpcs.items()):
                rpcs[method][code] = n
            levels = {}
            for level, s in sorted(self._levels.items()):
                recent = sorted(self._recent[level])
                levels[str(level)] = {
                    **s, "mean_ms": 1e3 * s["seconds"] / max(1, s["blocks"]),
                    "p50_ms": 1e3 * _pct(recent, 0.50), "p99_ms": 1e3 * _pct(recent, 0.99),
                }
            in_flight = self.in_flight
        return {"uptime_s": round(time.time() - self.started, 3), "in_flight": in_flight,
                "rpcs": dict(rpcs), "fetch_by_level": levels,
                "tiers": collect_tier_stats(self.tier_sources())}


class Scrapes:
    """What the admin API's /metrics and /v1/stats serve: the collection on a thread of its
    own, at most once per `min_interval_s`, shared by every scrape meanwhile.

    A collection is not cheap: the LMDB tier's page-cache residency runs mincore over the whole
    data file (about 33 ms at 8 GiB) and the Redis tier asks Redis for INFO (a network round
    trip, up to its timeout). On the event loop that gRPC shares, every scrape would stall every
    RPC; and any peer may scrape. So collections run on one dedicated thread (never the store
    pool the fetches read on), one at a time, and a scrape within `min_interval_s` of the last
    collection, or while one runs, gets that collection's result. `/v1/stats` (the read token's,
    and read by tools right after an action) shares a running collection but is never served
    from an older one."""

    def __init__(self, metrics: ServerMetrics, min_interval_s: float = 1.0):
        self.metrics, self.min_interval_s = metrics, min_interval_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="metrics")
        self._cached: dict[str, tuple[float, object]] = {}
        self._running: dict[str, asyncio.Future] = {}
        self.collections = 0   # how many collections ran (tests, /v1/stats)

    async def render(self) -> bytes:
        return await self._get("render", self.metrics.render, self.min_interval_s)

    async def snapshot(self) -> dict:
        return await self._get("snapshot", self.metrics.snapshot, 0.0)

    async def _get(self, what: str, collect: Callable[[], object], min_interval_s: float):
        now = time.monotonic()
        cached = self._cached.get(what)
        if cached is not None and now - cached[0] < min_interval_s:
            return cached[1]
        running = self._running.get(what)
        if running is None:
            running = asyncio.get_running_loop().run_in_executor(self._pool, self._collect,
                                                                 collect)
            self._running[what] = running
            running.add_done_callback(lambda f: self._done(what, f))
        # shielded: a scraper that gives up does not cancel the collection others wait for
        return await asyncio.shield(running)

    def _collect(self, collect: Callable[[], object]):
        self.collections += 1
        return collect()

    def _done(self, what: str, fut: asyncio.Future) -> None:
        self._running.pop(what, None)
        if not fut.cancelled() and fut.exception() is None:
            self._cached[what] = (time.monotonic(), fut.result())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Families:
    """What generate_latest reads: anything with collect()."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


def _counts(families: list) -> dict:
    """snapshot()'s in_flight, rpcs and fetch_by_level from (merged) metric families."""
    rpcs: dict[str, dict[str, int]] = defaultdict(dict)
    levels: dict[str, dict] = defaultdict(lambda: {"blocks": 0, "bytes": 0, "seconds": 0.0})
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    in_flight = 0
    for fam in families:
        for x in fam.samples:
            if x.name == "membank_rpc_total":
                rpcs[x.labels["method"]][x.labels["code"]] = int(x.value)
            elif x.name == "membank_rpc_in_flight":
                in_flight += int(x.value)
            elif x.name == "membank_block_bytes_sent_total":
                levels[x.labels["level"]]["bytes"] += int(x.value)
            elif x.name == "membank_fetch_block_seconds_count":
                levels[x.labels["level"]]["blocks"] += int(x.value)
            elif x.name == "membank_fetch_block_seconds_sum":
                levels[x.labels["level"]]["seconds"] += x.value
            elif x.name == "membank_fetch_block_seconds_bucket":
                buckets[x.labels["level"]].append((float(x.labels["le"]), x.value))
    for level, s in levels.items():
        cumulative = sorted(buckets[level])
        s.update(mean_ms=1e3 * s["seconds"] / max(1, s["blocks"]),
                 p50_ms=1e3 * _bucket_bound(cumulative, 0.50 * s["blocks"]),
                 p99_ms=1e3 * _bucket_bound(cumulative, 0.99 * s["blocks"]))
    return {"in_flight": in_flight,
            "rpcs": {m: dict(sorted(c.items())) for m, c in sorted(rpcs.items())},
            "fetch_by_level": {k: levels[k] for k in sorted(levels, key=int)}}


def _bucket_bound(cumulative: list[tuple[float, float]], rank: float) -> float:
    """The smallest finite bucket bound holding `rank` observations (0.0 when none)."""
    finite = [le for le, n in cumulative if n >= rank and le != float("inf")]
    if rank <= 0 or not cumulative:
        return 0.0
    return finite[0] if finite else _BUCKETS[-1]


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
