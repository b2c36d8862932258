"""Faults under load: the results table an operator reads (issue 7).

    .venv/bin/python -m benchmarks.faults                        # 4 scenarios, ~5 min on 2 cores
    .venv/bin/python -m benchmarks.faults --quick                # smoke run: 2 shards, short
    .venv/bin/python -m benchmarks.faults --rate 40 --phase-s 15 --plot results/faults.png
    .venv/bin/python -m benchmarks.faults --scenarios kill,corrupt

The same faults as tests/integration/test_faults.py, measured instead of only asserted. Two
local clusters (services/bank_server/cluster.py: 3 shard subprocesses over their own LMDBs,
replication 2, loopback only): one with a redis-server tier for the Redis scenario, one without
for kill, corrupt and publish, run in that order (publish last: it changes the version). The
bank is small and synthetic (k=4, depth 2, ranks 16/8, d 256, 2 layers, float32: blocks of
96 / 48 KiB). Each scenario drives its cluster at a steady `--rate` of prompts/s with the
threaded load loop (loadtests/load_loop.py, `--threads` devices, Zipf s=1.1 over the 16 leaves,
each prompt fetching its whole path) through a fresh device client
(services/model_client/fetcher.py ShardedFetcher: placement, hedging, failover), and injects
one fault:

  redis    redis-server SIGKILLed, then started again (empty, same port)
  publish  a new version (other seed: every block differs) published on every shard
  kill     the busiest shard SIGKILLed, then restarted on its ports
  corrupt  one byte of a popular level-1 block flipped in its primary replica's data.mdb,
           then flipped back (repaired)

Phases: `before` (steady state, the baseline), `during` (fault present), `after` (fault removed).
For publish, `during` is the roll-out: from the publish call until every device fetched with v2.
Per scenario and phase: prompts, failed prompts, errors by code (failed prompts, and RPC errors
the client recovered from by failing over), client latency p50/p95/p99 per prompt (manifest
refresh + fetch of the path, every block verified) and its ratio to `before`, and what the
servers counted (admin /v1/stats: tier hits/misses, lmdb corrupt reads, FetchBlocks DATA_LOSS).
Per scenario: time from the fault to the first successful prompt served without the faulty part
(started after the fault, and needing the killed shard / the corrupted block / Redis, or fetched
with the new version), and time to recovery (killed shard rejoined and serving FetchBlocks;
Redis hit again with every breaker closed; every device on the new version; the repaired
replica serving the block again). Every fetched path is re-checked here against the ONE
manifest it was fetched with (each block's xxh3 against that manifest's checksum): for publish,
where every v1 block differs from its v2 block, that proves no path mixed versions.

Each scenario is bounded: every phase ends after `--phase-s` seconds and `--min-prompts`
prompts, or at `--phase-timeout-s`; every recovery wait at `--recovery-timeout-s`. Devices mark
a shard that answered UNAVAILABLE down for `--down-s` (0.5 s, as the fault tests; the device
default is 5 s) and the shards open their Redis breaker for `--redis-retry-after-s` (0.2 s, as
the tests; default 1 s, doubling per failed probe up to 30 s). Prints a
Markdown table, writes a PNG (prompt latency over time per scenario, faults marked), and ends
with ONE JSON line. The smoke test: tests/integration/test_faults_benchmark.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from loadtests.load_loop import LoadLoop
from membank.artifacts import MANIFEST
from membank.blocks import checksum
from membank.manifest import Manifest
from services.bank_server.cluster import LocalCluster, run_local_cluster
from services.model_client.bank_client import BankClient, BankError
from services.model_client.fetcher import FetchPolicy, ShardedFetcher
from services.model_client.targets import open_bank
from testkit.exports import synthetic_export
from testkit.stats import percentile

REPO = Path(__file__).resolve().parents[1]

SCENARIOS = ("redis", "kill", "corrupt", "publish")     # the order they run in
PHASES = ("before", "during", "after")
BANK = "faults"


@dataclass(frozen=True)
class FaultSettings:
    rate: float = 40.0             # prompts/s over all devices (open loop: paced, not closed)
    threads: int = 4               # devices
    shards: int = 3
    replication: int = 2
    warmup_s: float = 3.0          # not counted: connections, page cache, Redis fill
    phase_s: float = 15.0          # each phase lasts this long...
    min_prompts: int = 100         # ...and at least this many prompts
    phase_timeout_s: float = 90.0  # hard bound of a phase (a loaded machine is slow, not stuck)
    recovery_timeout_s: float = 60.0
    down_s: float = 0.5            # FetchPolicy.down_s, as the fault tests use (default 5 s)
    manifest_s: float = 0.2        # devices re-read the manifest this often (publish is seen)
    redis_retry_after_s: float = 0.2   # server flag, as the fault tests use (default 1 s)
    seed: int = 0
    scenarios: tuple[str, ...] = SCENARIOS
    workdir: Path | None = None
    plot: Path | None = REPO / "results" / "faults.png"
    quick: bool = False


# -- the bank -----------------------------------------------------------------------------------
def fault_export(out: Path, version: str, seed: int) -> Manifest:
    """k=4, depth 2, ranks 16/8, d 256, 2 layers, float32 (blocks of 96 / 48 KiB): small enough
    for 2 cores at 40 prompts/s, with 4 placement groups over the shards (placement level 1)."""
    return synthetic_export(out, bank=BANK, version=version, d_model=256, mem_layers=[0, 1],
                            branching=4, ranks=[16, 8], seed=seed, reuse=True)


# -- what the devices saw -------------------------------------------------------------------------
@dataclass
class Prompt:
    start: float                   # seconds since the scenario's t0 (monotonic)
    end: float
    ok: bool
    code: str | None               # status code name of a failed prompt
    version: str | None
    device: str
    blocks: tuple                  # ((level, node), ...) of the path

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


class RecordingFetcher:
    """The device's ShardedFetcher with a timeline: LoadLoop reports latencies without times,
    so this wrapper (the loop's `fetcher=`) records every prompt with its start, end, version,
    path and outcome, and re-checks every block of a fetched path against the one manifest the
    path was fetched with. A prompt is LoadLoop's: an optional manifest refresh, then a fetch,
    both on the device's thread (so a thread-local ties the two together)."""

    def __init__(self, inner: ShardedFetcher, t0: float):
        self.inner, self.t0 = inner, t0
        self.prompts: list[Prompt] = []
        self.paths_checked = 0
        self.paths_mixed = 0            # a block not matching its path's manifest: never expected
        self._lock = threading.Lock()
        self._local = threading.local()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _record(self, p: Prompt) -> None:
        with self._lock:
            self.prompts.append(p)

    def get_manifest(self, bank: str, version: str = "") -> Manifest:
        start = self._now()
        self._local.start = start
        try:
            return self.inner.get_manifest(bank, version)
        except BankError as e:       # LoadLoop counts it as a failed prompt: so do we
            self._local.start = None
            self._record(Prompt(start, self._now(), False, e.code, None,
                                threading.current_thread().name, ()))
            raise

    def fetch(self, bank: str, version: str, blocks, manifest: Manifest, **kw):
        start = getattr(self._local, "start", None)
        self._local.start = None
        start = self._now() if start is None else start
        device = threading.current_thread().name
        try:
            got = self.inner.fetch(bank, version, blocks, manifest, **kw)
        except BankError as e:
            self._record(Prompt(start, self._now(), False, e.code, manifest.version,
                                device, tuple(blocks)))
            raise
        end = self._now()
        same = all(checksum(got[b]) == manifest.checksum(*b) for b in blocks)
        with self._lock:
            self.paths_checked += 1
            self.paths_mixed += not same
        self._record(Prompt(start, end, True, None, manifest.version, device, tuple(blocks)))
        return got

    def stats(self) -> dict:
        return self.inner.stats()

    def snapshot(self) -> list[Prompt]:
        with self._lock:
            return list(self.prompts)


# -- what the servers counted --------------------------------------------------------------------
COUNTERS = (("rpcs", "FetchBlocks"), ("tiers", "lmdb"), ("tiers", "redis"))


def server_counters(cluster: LocalCluster) -> dict[str, tuple[int, dict[str, int]]]:
    """shard -> (its start count, flat counters from its admin /v1/stats). A shard that is down
    or does not answer in time is left out (its counters restart with it anyway)."""
    out = {}
    for name, s in cluster.shards.items():
        if not s.alive:
            continue
        try:
            st = s.stats(timeout=10)
        except OSError:
            continue
        flat: dict[str, int] = {}
        for code, n in st["rpcs"].get("FetchBlocks", {}).items():
            flat[f"FetchBlocks.{code}"] = n
        for tier in ("lmdb", "redis"):
            t = st["tiers"].get(tier)
            if t:
                for k in ("hits", "misses", "corrupt", "errors", "skipped"):
                    if isinstance(t.get(k), int):
                        flat[f"{tier}.{k}"] = t[k]
        out[name] = (s.starts, flat)
    return out


def counter_delta(a: dict, b: dict) -> dict[str, int]:
    """Summed over shards, b - a; a shard restarted in between counts from zero (its counters
    from before the kill are lost with the process)."""
    total: Counter = Counter()
    for name, (starts, flat) in b.items():
        base = a.get(name)
        base_flat = base[1] if base is not None and base[0] == starts else {}
        for k, v in flat.items():
            total[k] += max(0, v - base_flat.get(k, 0))
    return {k: v for k, v in sorted(total.items()) if v}


def rpc_error_delta(a: dict, b: dict) -> dict[str, int]:
    """The device client's RPC errors (recovered or not) between two fetcher.stats()."""
    ea, eb = a.get("errors", {}), b.get("errors", {})
    out = {k: eb[k] - ea.get(k, 0) for k in eb if eb[k] - ea.get(k, 0)}
    for k in ("failovers", "hedges", "integrity_errors"):
        if b.get(k, 0) - a.get(k, 0):
            out[k] = b[k] - a.get(k, 0)
    return out


# -- one scenario ----------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    """testkit's percentile, rounded for the report."""
    v = percentile(xs, q)
    return None if v is None else round(v, 2)


class Run:
    """One scenario's cluster, load, timeline, marks and snapshots."""

    def __init__(self, name: str, cluster: LocalCluster, load: LoadLoop, rec: RecordingFetcher,
                 fetcher: ShardedFetcher, cfg: FaultSettings, bar: tqdm):
        self.name, self.cluster, self.load, self.rec, self.fetcher = (name, cluster, load, rec,
                                                                      fetcher)
        self.cfg, self.bar = cfg, bar
        self.marks: dict[str, float] = {}          # "before", "during", "after", "end" -> t
        self.snaps: dict[str, tuple[dict, dict]] = {}   # mark -> (server counters, fetcher stats)
        self.counts: dict[str, int] = {}           # mark -> prompts recorded by then
        self.notes: list[str] = []
        self.figures: dict = {}

    def now(self) -> float:
        return self.rec._now()

    def mark(self, phase: str) -> None:
        self.snaps[phase] = (server_counters(self.cluster), self.fetcher.stats())
        self.marks[phase] = self.now()
        self.counts[phase] = len(self.rec.prompts)
        self.bar.set_postfix_str(f"{self.name}: {phase}")

    def run_phase(self, label: str) -> None:
        """Until `phase_s` passed and `min_prompts` prompts completed since the phase's mark
        (a recovery wait inside the phase counts), bounded by `phase_timeout_s`."""
        start, n0 = self.marks[label], self.counts[label]
        while True:
            el, n = self.now() - start, len(self.rec.prompts) - n0
            if el >= self.cfg.phase_s and n >= self.cfg.min_prompts:
                return
            if el >= self.cfg.phase_timeout_s:
                self.notes.append(f"{label}: phase bound hit ({n} prompts in {el:.0f} s)")
                return
            time.sleep(0.1)
            self.bar.update(0)

    def wait_until(self, what: str, predicate, step: float = 0.05) -> float | None:
        """Seconds until predicate() holds, or None after recovery_timeout_s (noted)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.cfg.recovery_timeout_s:
            if predicate():
                return time.monotonic() - t0
            time.sleep(step)
        self.notes.append(f"{what}: not within {self.cfg.recovery_timeout_s:.0f} s")
        return None

    def first_ok_after(self, t_fault: float, needs) -> float | None:
        """ms from the fault to the end of the first successful prompt started after it for
        which needs(prompt) holds (the prompt needed what the fault removed)."""
        ends = [p.end for p in self.rec.snapshot() if p.ok and p.start >= t_fault and needs(p)]
        return round((min(ends) - t_fault) * 1e3, 1) if ends else None

    # -- the table's rows
    def phases(self) -> dict[str, dict]:
        prompts = self.rec.snapshot()
        out = {}
        for ph in PHASES:
            nxt = nxt_of(ph)
            a, b = self.marks[ph], self.marks[nxt]
            mine = [p for p in prompts if a <= p.end < b]
            ms = [p.ms for p in mine if p.ok]
            failed = Counter(p.code for p in mine if not p.ok)
            out[ph] = {
                "seconds": round(b - a, 2), "prompts": len(mine),
                "failed_prompts": sum(failed.values()), "failed_by_code": dict(failed),
                "rpc_errors": rpc_error_delta(self.snaps[ph][1], self.snaps[nxt][1]),
                "p50_ms": pct(ms, .5), "p95_ms": pct(ms, .95), "p99_ms": pct(ms, .99),
                "server": counter_delta(self.snaps[ph][0], self.snaps[nxt][0]),
                "versions": dict(Counter(p.version for p in mine if p.ok)),
            }
        base = out["before"]
        for ph in PHASES:
            for q in ("p50_ms", "p99_ms"):
                a, b = out[ph][q], base[q]
                out[ph][f"{q[:3]}_x_before"] = round(a / b, 2) if a and b else None
        return out


def nxt_of(phase: str) -> str:
    return (PHASES + ("end",))[PHASES.index(phase) + 1]


def scenario_redis(run: Run) -> None:
    c = run.cluster

    def redis_hits() -> int:
        return sum(f.get("redis.hits", 0) for _, f in server_counters(c).values())

    # the tier is in use before the fault (the warm-up filled it)
    run.wait_until("redis hit before the fault", lambda: redis_hits() > 0, step=0.2)
    run.mark("before")
    run.run_phase("before")
    run.mark("during")
    t_fault = run.now()
    c.stop_redis(kill=True)
    run.run_phase("during")
    hits = redis_hits()
    run.mark("after")
    t_back = run.now()
    c.start_redis()                 # empty (no persistence), same port

    def picked_up() -> bool:
        tiers = [s["tiers"]["redis"] for s in c.stats().values()]
        return (sum(t["hits"] for t in tiers) > hits
                and all(t["breaker"] == "closed" for t in tiers))

    back_s = run.wait_until("redis hit again", picked_up)
    run.run_phase("after")
    run.mark("end")
    run.figures.update(
        fault_at_s=round(t_fault, 2), recovery_action_at_s=round(t_back, 2),
        first_ok_without_ms=run.first_ok_after(t_fault, lambda p: True),
        recovery_ms=round(back_s * 1e3, 1) if back_s is not None else None,
        recovery_what="Redis started -> Redis hits grow again, every breaker closed")


def scenario_publish(run: Run, export_v2: Path, m1: Manifest) -> None:
    c = run.cluster
    run.mark("before")
    run.run_phase("before")
    devices = {f"device-{i}" for i in range(run.cfg.threads)}
    run.mark("during")
    t_fault = run.now()
    t_pub = time.monotonic()
    m2 = c.publish(export_v2)
    publish_s = time.monotonic() - t_pub

    def all_on_new() -> bool:
        first = {}
        for p in run.rec.snapshot():
            if p.ok and p.version == m2.version and p.start >= t_fault:
                first.setdefault(p.device, p.end)
        return set(first) >= devices

    moved_s = run.wait_until("every device on the new version", all_on_new, step=0.02)
    run.mark("after")
    run.run_phase("after")
    run.mark("end")
    prompts = run.rec.snapshot()
    # after a device saw v2, did it ever fetch with v1 again? (shards switch one by one: a
    # manifest refresh answered by a shard not switched yet would take it back)
    back, seen = 0, set()
    for p in sorted(prompts, key=lambda p: p.start):
        if p.ok and p.version == m2.version:
            seen.add(p.device)
        elif p.ok and p.device in seen:
            back += 1
    differ = sum(m1.checksum(l, n) != m2.checksum(l, n)
                 for l in range(1, m1.depth + 1) for n in range(m1.n_nodes(l)))
    n_blocks = sum(m1.n_nodes(l) for l in range(1, m1.depth + 1))
    run.figures.update(
        fault_at_s=round(t_fault, 2), recovery_action_at_s=round(run.marks["after"], 2),
        publish_call_ms=round(publish_s * 1e3, 1),
        first_ok_without_ms=run.first_ok_after(t_fault, lambda p: p.version == m2.version),
        # from the publish call: its ingest + switch, then the devices' manifest refresh
        recovery_ms=round((publish_s + moved_s) * 1e3, 1) if moved_s is not None else None,
        recovery_what="publish called -> every device fetched with the new version",
        versions={v: sum(1 for p in prompts if p.ok and p.version == v)
                  for v in (m1.version, m2.version)},
        devices_back_to_old=back, blocks_differing_between_versions=f"{differ}/{n_blocks}")


def scenario_kill(run: Run) -> None:
    c = run.cluster
    run.mark("before")
    run.run_phase("before")

    def fetches_ok(name: str) -> int:
        """FetchBlocks answered OK by `name` since it (re)started (its admin /v1/stats)."""
        s = c.shard(name)
        try:
            return s.stats()["rpcs"].get("FetchBlocks", {}).get("OK", 0) if s.alive else 0
        except OSError:          # started, admin not answering yet
            return 0

    # the busiest shard: a primary replica of the popular paths (devices ask primaries first)
    victim = max(c.shards, key=fetches_ok)
    m = run.cluster.manifest
    run.mark("during")
    t_fault = run.now()
    c.kill(victim)                                  # SIGKILL: no drain
    run.run_phase("during")
    run.mark("after")
    t_back = run.now()
    t0 = time.monotonic()
    c.restart(victim)                               # same ports, fresh counters
    restart_s = time.monotonic() - t0
    rejoin_s = run.wait_until("killed shard serving FetchBlocks again",
                              lambda: fetches_ok(victim) > 0)
    run.run_phase("after")
    run.mark("end")
    touched = lambda p: any(victim in m.owners(*b) for b in p.blocks)  # noqa: E731
    run.figures.update(
        victim=victim, fault_at_s=round(t_fault, 2), recovery_action_at_s=round(t_back, 2),
        first_ok_without_ms=run.first_ok_after(t_fault, touched),
        restart_ms=round(restart_s * 1e3, 1),
        recovery_ms=round((restart_s + rejoin_s) * 1e3, 1) if rejoin_s is not None else None,
        recovery_what="restart called -> the shard is up and has served a FetchBlocks OK",
        paths_needing_victim_during=sum(1 for p in run.rec.snapshot()
                                        if t_fault <= p.end < t_back and touched(p)))


def flip_byte(data_mdb: Path, block: bytes) -> tuple[int, int]:
    """Flip one byte of `block`'s bytes inside data.mdb (bit rot under LMDB, not an LMDB write;
    the serving process sees it through the shared page cache). Returns (offset, old byte)."""
    raw = data_mdb.read_bytes()
    at = raw.find(block)
    if at < 0 or raw.find(block, at + 1) >= 0:
        raise RuntimeError(f"block bytes not found exactly once in {data_mdb}")
    offset = at + len(block) // 2
    with open(data_mdb, "r+b") as f:
        f.seek(offset)
        f.write(bytes([raw[offset] ^ 0xFF]))
    return offset, raw[offset]


def restore_byte(data_mdb: Path, offset: int, old: int) -> None:
    with open(data_mdb, "r+b") as f:
        f.seek(offset)
        f.write(bytes([old]))


def scenario_corrupt(run: Run) -> None:
    c = run.cluster
    m = c.manifest
    run.mark("before")
    run.run_phase("before")
    # the level-1 node most prompts fetched: its primary replica is asked first for it
    popular = Counter(b for p in run.rec.snapshot() if p.ok for b in p.blocks if b[0] == 1)
    block = popular.most_common(1)[0][0] if popular else (1, 0)
    bad = m.owners(*block)[0]
    with BankClient(c.targets[bad]) as client:
        good = bytes(client.fetch(BANK, m.version, [block], m)[block])
    data = c.shard(bad).lmdb / "data.mdb"
    run.mark("during")
    t_fault = run.now()
    offset, old = flip_byte(data, good)
    run.run_phase("during")
    run.mark("after")
    t_back = run.now()
    restore_byte(data, offset, old)

    def replica_serves() -> bool:
        try:
            with BankClient(c.targets[bad], timeout_s=5) as client:
                return bytes(client.fetch(BANK, m.version, [block], m)[block]) == good
        except BankError:
            return False

    repaired_s = run.wait_until("repaired replica serving the block", replica_serves)
    run.run_phase("after")
    run.mark("end")
    has = lambda p: block in p.blocks  # noqa: E731
    run.figures.update(
        block=list(block), bad_replica=bad, fault_at_s=round(t_fault, 2),
        recovery_action_at_s=round(t_back, 2),
        first_ok_without_ms=run.first_ok_after(t_fault, has),
        recovery_ms=round(repaired_s * 1e3, 1) if repaired_s is not None else None,
        recovery_what="byte restored -> that replica serves the block again (verified)",
        paths_with_block_during=sum(1 for p in run.rec.snapshot()
                                    if t_fault <= p.end < t_back and has(p)))


def start_cluster(stack: ExitStack, redis: bool, cfg: FaultSettings, export: Path,
                  workdir: Path) -> tuple[LocalCluster, float]:
    """One cluster for the Redis scenario (with a redis-server), one for the replica scenarios
    (kill, corrupt, then publish: it changes the version); returns it and its start seconds."""
    # the breaker's first open period (it doubles per failed probe, to 30 s): the fault tests'
    server_args = ["--redis-retry-after-s", str(cfg.redis_retry_after_s)] if redis else []
    t0 = time.monotonic()
    cluster = stack.enter_context(run_local_cluster(
        export, shards=cfg.shards, replication=cfg.replication, redis=redis,
        workdir=workdir / ("redis" if redis else "replicas"), server_args=server_args))
    return cluster, time.monotonic() - t0


def run_scenario(name: str, cluster: LocalCluster, cfg: FaultSettings, exports: dict[str, Path],
                 bar: tqdm) -> dict:
    """A fresh device client and load loop on `cluster`; warm-up, then the scenario's phases."""
    m1 = Manifest.from_json((exports["v1"] / MANIFEST).read_text())
    t_start = time.monotonic()
    with ExitStack() as stack:
        fetcher = stack.enter_context(open_bank(
            cluster.targets, policy=FetchPolicy(down_s=cfg.down_s, deadline_s=10)))
        t0 = time.monotonic()
        rec = RecordingFetcher(fetcher, t0)
        load = stack.enter_context(LoadLoop(cluster.targets, BANK, threads=cfg.threads,
                                            rate=cfg.rate, seed=cfg.seed, fetcher=rec,
                                            manifest_s=cfg.manifest_s))
        run = Run(name, cluster, load, rec, fetcher, cfg, bar)
        bar.set_postfix_str(f"{name}: warm-up")
        load.wait_prompts(1, cfg.phase_timeout_s)
        time.sleep(cfg.warmup_s)
        if name == "redis":
            scenario_redis(run)
        elif name == "publish":
            scenario_publish(run, exports["v2"], m1)
        elif name == "kill":
            scenario_kill(run)
        else:
            scenario_corrupt(run)
        report = load.stop()
    prompts = rec.snapshot()
    counted = [p for p in prompts if p.end >= run.marks["before"]]
    return {
        "scenario": name, "shards": cfg.shards, "replication": cfg.replication,
        "redis": cluster.redis is not None, "wall_s": round(time.monotonic() - t_start, 1),
        "phases": run.phases(), **run.figures,
        "prompts": len(counted), "failed_prompts": sum(not p.ok for p in counted),
        "loop_prompts": report.prompts, "loop_failed_prompts": len(report.errors),
        "first_errors": report.errors[:3],
        "paths_checked": rec.paths_checked, "paths_mixed": rec.paths_mixed,
        "achieved_rate": round(len(counted) / max(1e-9, run.marks["end"] - run.marks["before"]), 1),
        "notes": run.notes,
        "timeline": [(round(p.end, 3), round(p.ms, 2), p.ok) for p in prompts],
    }


# -- output ----------------------------------------------------------------------------------------
def fmt_codes(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


SERVER_KEYS = {"redis": ("redis.hits", "redis.misses", "redis.errors", "redis.skipped"),
               "publish": ("lmdb.hits",), "kill": ("lmdb.hits",),
               "corrupt": ("lmdb.hits", "lmdb.corrupt", "FetchBlocks.DATA_LOSS")}


def markdown(results: list[dict], cfg: FaultSettings, load_avg: tuple) -> str:
    lines = [f"rate {cfg.rate:g} prompts/s, {cfg.threads} devices, {cfg.shards} shards, "
             f"replication {cfg.replication}; load average at start "
             f"{' '.join(f'{x:.2f}' for x in load_avg)}", "",
             "| scenario | phase | s | prompts | failed | errors by code (failed prompts; RPCs "
             "recovered) | p50 ms | p95 ms | p99 ms | p99 x before | server counters |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        for ph, v in r["phases"].items():
            server = ", ".join(f"{k} {v['server'].get(k, 0)}" for k in SERVER_KEYS[r["scenario"]])
            lines.append(
                f"| {r['scenario']} | {ph} | {v['seconds']:.1f} | {v['prompts']} | "
                f"{v['failed_prompts']} | {fmt_codes(v['failed_by_code'])}; "
                f"{fmt_codes(v['rpc_errors'])} | {v['p50_ms']} | {v['p95_ms']} | {v['p99_ms']} | "
                f"{v['p99_x_before']} | {server} |")
    lines += ["", "| scenario | fault -> first OK prompt without the faulty part (ms) | "
                  "time to recovery (ms) | recovery means | paths checked / mixed |",
              "|---|---:|---:|---|---|"]
    for r in results:
        lines.append(f"| {r['scenario']} | {r['first_ok_without_ms']} | {r['recovery_ms']} | "
                     f"{r['recovery_what']} | {r['paths_checked']} / {r['paths_mixed']} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Prompt latency over time per scenario (log scale), fault and recovery marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.6 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results):
        ok = [(t, ms) for t, ms, good in r["timeline"] if good]
        bad = [t for t, _, good in r["timeline"] if not good]
        ax.scatter([t for t, _ in ok], [ms for _, ms in ok], s=3, alpha=.4, label="prompt")
        # a running median over 0.5 s windows: the level a scatter hides
        if ok:
            ok.sort()
            edges = [i * 0.5 for i in range(int(ok[-1][0] / 0.5) + 2)]
            mids, meds = [], []
            for lo, hi in zip(edges, edges[1:]):
                xs = [ms for t, ms in ok if lo <= t < hi]
                if xs:
                    mids.append((lo + hi) / 2)
                    meds.append(pct(xs, .5))
            ax.plot(mids, meds, color="black", lw=1, label="median (0.5 s)")
        top = max((ms for _, ms in ok), default=1)
        if bad:
            ax.scatter(bad, [top] * len(bad), marker="x", color="red", label="failed prompt")
        ax.axvspan(r["fault_at_s"], r["recovery_action_at_s"], color="red", alpha=.08)
        ax.axvline(r["fault_at_s"], color="red", lw=1,
                   label="publish called" if r["scenario"] == "publish" else "fault")
        ax.axvline(r["recovery_action_at_s"], color="green", lw=1,
                   label="rolled out" if r["scenario"] == "publish" else "fault removed")
        if r.get("recovery_ms") is not None and r["scenario"] != "publish":
            ax.axvline(r["recovery_action_at_s"] + r["recovery_ms"] / 1e3, color="green", lw=1,
                       ls="--", label="recovered")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel("prompt ms")
        ph = r["phases"]
        ax.set_title(f"{r['scenario']}: p99 before/during/after "
                     f"{ph['before']['p99_ms']} / {ph['during']['p99_ms']} / "
                     f"{ph['after']['p99_ms']} ms, failed prompts {r['failed_prompts']}",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper left", ncol=6)
    axes[-1, 0].set_xlabel("seconds since the scenario's load started")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None) -> FaultSettings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=40.0, help="prompts/s over all devices")
    p.add_argument("--threads", type=int, default=4, help="devices (threads)")
    p.add_argument("--phase-s", type=float, default=15.0)
    p.add_argument("--min-prompts", type=int, default=100, help="per phase")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--phase-timeout-s", type=float, default=90.0)
    p.add_argument("--recovery-timeout-s", type=float, default=60.0)
    p.add_argument("--down-s", type=float, default=0.5, help="FetchPolicy.down_s of the devices")
    p.add_argument("--redis-retry-after-s", type=float, default=0.2,
                   help="the shards' Redis breaker open time (doubles per failed probe)")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--replication", type=int, default=2)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="exports, LMDBs, logs (default: a temp dir)")
    p.add_argument("--plot", type=Path, default=REPO / "results" / "faults.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 60 s): short phases, few prompts")
    a = p.parse_args(argv)
    names = tuple(s.strip() for s in a.scenarios.split(",") if s.strip())
    unknown = set(names) - set(SCENARIOS)
    if unknown or not names:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if a.rate <= 0 or a.threads < 1:
        p.error("--rate must be > 0 and --threads >= 1")
    if not 2 <= a.replication <= a.shards:
        p.error("the replica faults need --replication >= 2 and <= --shards")
    kw = dict(rate=a.rate, threads=a.threads, phase_s=a.phase_s, min_prompts=a.min_prompts,
              warmup_s=a.warmup_s, phase_timeout_s=a.phase_timeout_s,
              recovery_timeout_s=a.recovery_timeout_s, down_s=a.down_s, seed=a.seed,
              redis_retry_after_s=a.redis_retry_after_s, shards=a.shards,
              replication=a.replication,
              scenarios=names, workdir=a.workdir, plot=None if a.no_plot else a.plot,
              quick=a.quick)
    if a.quick:
        # 2 shards: one shard process fewer to start per scenario (starts dominate a smoke run)
        kw.update(phase_s=1.5, min_prompts=15, warmup_s=0.3, phase_timeout_s=20.0,
                  recovery_timeout_s=20.0, shards=2, replication=2)
    return FaultSettings(**kw)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    # the client logs every replica it fails over from; this run counts them instead
    logging.getLogger("membank").setLevel(logging.ERROR)
    load_avg = os.getloadavg()
    t0 = time.monotonic()
    with ExitStack() as stack:
        work = cfg.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="membank-faults-")))
        work.mkdir(parents=True, exist_ok=True)
        exports = {"v1": work / "export-v1", "v2": work / "export-v2"}
        fault_export(exports["v1"], "v1", seed=11)
        fault_export(exports["v2"], "v2", seed=12)
        results, starts = [], {}
        bar = tqdm(total=len(cfg.scenarios), desc="faults", unit="scenario", file=sys.stderr)
        for redis, names in ((True, ["redis"]), (False, ["kill", "corrupt", "publish"])):
            names = [n for n in names if n in cfg.scenarios]
            if not names:
                continue
            with ExitStack() as cstack:
                bar.set_postfix_str("starting a cluster" + (" with Redis" if redis else ""))
                cluster, starts["redis" if redis else "replicas"] = start_cluster(
                    cstack, redis, cfg, exports["v1"], work)
                for name in names:
                    results.append(run_scenario(name, cluster, cfg, exports, bar))
                    bar.update(1)
        bar.close()
    print(markdown(results, cfg, load_avg))
    for r in results:
        for n in r["notes"]:
            print(f"note: {r['scenario']}: {n}")
    if cfg.plot:
        plot(results, cfg.plot)
        print(f"plot: {cfg.plot}")
    summary = {
        "benchmark": "faults", "quick": cfg.quick, "rate": cfg.rate, "threads": cfg.threads,
        "shards": cfg.shards, "replication": cfg.replication, "phase_s": cfg.phase_s,
        "load_avg_start": [round(x, 2) for x in load_avg],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - t0, 1),
        "scenarios": {r["scenario"]: {k: v for k, v in r.items() if k != "timeline"}
                      for r in results},
        "cluster_start_s": {k: round(v, 1) for k, v in starts.items()},
        "failed_prompts": sum(r["failed_prompts"] for r in results),
        "plot": str(cfg.plot) if cfg.plot else None,
    }
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
