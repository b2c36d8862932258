"""A threaded load loop against bank shards: devices fetching Zipf-popular paths, no locust.

    from loadtests.load_loop import LoadLoop
    with LoadLoop(cluster.targets, bank="demo", threads=4) as load:   # starts the threads
        ...                       # faults happen here (kill a shard, stop Redis, publish)
    report = load.report          # requests, errors, bytes, latencies, versions, failovers

Used by the fault tests (tests/integration/test_faults.py) and benchmarks/cluster_load.py,
where a bounded, in-process loop with exact counts is worth more than locust's reports (locust:
locustfile.py, same device model). Each thread is one device (device.py): every prompt picks a
leaf with Zipf popularity, takes the path's blocks of the manifest it holds, skips the ones in
its device cache (capacity 0: fetch the whole path every time), and fetches the rest with one
FetchBlocks per shard holding them (`ShardedBank`, the manifest's placement). BankClient checks
every block's header (version included) and checksum against that manifest, so a block of
another version can never pass as this one.

`ShardedBank` is the load test's own small client over the shards: it plans a fetch with the
device's planner (services/model_client/fetcher.py `plan_groups`: the same groups, the same
first replica), asks each group's first replica with no hedging, and, when a shard fails
(UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS, a block failing verification, ...), marks it down
for `down_s` and plans the rest again without it (the next replica). A fetch counts as an
error only when every replica of a block failed. `LoadLoop(..., fetcher=F)` uses the device's
own client instead (services/model_client/fetcher.py ShardedFetcher, or anything with its
`get_manifest(bank)` / `fetch(bank, version, blocks, manifest)` / `stats()`): then RPC counts
and latencies come from `F.stats()` (report.failovers), not from the loop. Targets may be
"host:port+DATAPLANE_PORT" (e.g. `run_local_cluster(..., dataplane=True).targets`): block
bodies then go over each shard's raw-TCP data plane (services/model_client/targets.py).
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from loadtests.device import DeviceCache, ZipfLeaves
from membank.manifest import Manifest
from services.model_client.bank import BankError
from services.model_client.fetcher import plan_groups
from services.model_client.targets import make_client
from testkit.stats import percentile

# worth asking another replica: the shard is down, overloaded, slow, or its copy is bad
FAILOVER_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS", "RESOURCE_EXHAUSTED",
                  "CANCELLED", "UNKNOWN", "INTERNAL", "FAILED_PRECONDITION"}


class ShardedBank:
    """One client per shard; fetches routed by placement, failing over across replicas."""

    def __init__(self, targets: dict[str, str], *, timeout_s: float = 5.0, down_s: float = 0.5,
                 client=None):
        """`client(target, timeout_s)` builds each shard's client (default: BankClient for
        "host:port", DataPlaneClient for "host:port+DATAPLANE_PORT", targets.make_client; the
        locustfile passes its instrumented one)."""
        self.targets = dict(targets)
        make = client or make_client
        self.clients = {name: make(addr, timeout_s) for name, addr in targets.items()}
        self.down_s = down_s
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.failovers: Counter = Counter()     # (shard, code name) -> count

    def down(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            return {s for s, t in self._down_until.items() if t > now}

    def _mark_down(self, shard: str, code: str) -> None:
        with self._lock:
            self._down_until[shard] = time.monotonic() + self.down_s
            self.failovers[(shard, code)] += 1

    def manifest(self, bank: str, version: str = "") -> Manifest:
        """From the first shard that answers (shards known down last)."""
        down = self.down()
        order = sorted(self.clients, key=lambda s: s in down)
        last: BankError | None = None
        for shard in order:
            try:
                return self.clients[shard].get_manifest(bank, version)
            except BankError as e:
                if e.code not in FAILOVER_CODES:
                    raise
                self._mark_down(shard, e.code)
                last = e
        raise last

    def fetch(self, manifest: Manifest, blocks: list[tuple[int, int]], *,
              on_rpc=None) -> dict[tuple[int, int], bytearray]:
        """Every block, verified against `manifest`; raises BankError when some block could not
        be had from any of its replicas. The plan is the device's (fetcher.plan_groups): each
        group goes to its first replica; a failed one is avoided for the rest of this fetch.
        `on_rpc(shard, blocks, seconds, nbytes, error)` is called after each RPC."""
        out: dict[tuple[int, int], bytearray] = {}
        todo, failed = list(blocks), {}       # failed: shard -> its BankError in this fetch
        while todo:
            try:
                plan = plan_groups(manifest, todo, self.clients, down=self.down(),
                                   avoid=set(failed))
            except BankError:
                if failed:           # every replica of some block failed: say how
                    raise next(iter(failed.values())) from None
                raise
            todo = []
            for group in plan:
                shard, ids = group.replicas[0], group.blocks
                t0 = time.perf_counter()
                try:
                    got = self.clients[shard].fetch(manifest.bank, manifest.version, ids,
                                                    manifest)
                except BankError as e:
                    if on_rpc:
                        on_rpc(shard, ids, time.perf_counter() - t0, 0, e)
                    if e.code not in FAILOVER_CODES:
                        raise
                    self._mark_down(shard, e.code)
                    failed[shard] = e
                    todo.extend(ids)
                    continue
                if on_rpc:
                    on_rpc(shard, ids, time.perf_counter() - t0,
                           sum(len(b) for b in got.values()), None)
                out.update(got)
        return out

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


@dataclass
class LoadReport:
    prompts: int = 0
    rpcs: int = 0
    failed_rpcs: int = 0          # RPCs that failed (a failover may still have saved the prompt)
    errors: list = field(default_factory=list)        # failed prompts: (time, message)
    bytes: int = 0
    prompt_ms: list = field(default_factory=list)
    rpc_ms: dict = field(default_factory=lambda: defaultdict(list))    # "L1+L2" -> [ms]
    rpc_by_shard: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)   # version -> prompts fetched with it
    device_hits: int = 0
    device_misses: int = 0
    elapsed_s: float = 0.0
    failovers: dict = field(default_factory=dict)

    def summary(self) -> dict:
        def pct(xs, q):
            return None if not xs else round(percentile(xs, q), 3)
        el = max(self.elapsed_s, 1e-9)
        return {
            "prompts": self.prompts, "errors": len(self.errors), "rpcs": self.rpcs,
            "failed_rpcs": self.failed_rpcs, "prompts_per_s": round(self.prompts / el, 1),
            "rpcs_per_s": round(self.rpcs / el, 1), "bytes_per_s": round(self.bytes / el),
            "prompt_ms": {q: pct(self.prompt_ms, p) for q, p in
                          (("p50", .5), ("p95", .95), ("p99", .99))},
            "rpc_ms": {name: {"n": len(v), **{q: pct(v, p) for q, p in
                                              (("p50", .5), ("p95", .95), ("p99", .99))}}
                       for name, v in sorted(self.rpc_ms.items())},
            "rpc_by_shard": dict(self.rpc_by_shard), "versions": dict(self.versions),
            "device_hit_ratio": round(self.device_hits / max(1, self.device_hits
                                                             + self.device_misses), 3),
            "failovers": self.failovers, "elapsed_s": round(self.elapsed_s, 2),
        }


class LoadLoop:
    """`threads` devices issuing prompts until stopped (or `max_prompts` in all)."""

    def __init__(self, targets: dict[str, str], bank: str, *, threads: int = 4,
                 zipf_s: float = 1.1, seed: int = 0, cache_blocks: int = 0,
                 manifest_s: float = 0.5, rate: float | None = None,
                 max_prompts: int | None = None, timeout_s: float = 5.0, down_s: float = 0.5,
                 fetcher=None):
        self.bank_name, self.threads_n, self.zipf_s, self.seed = bank, threads, zipf_s, seed
        self.cache_blocks, self.manifest_s, self.max_prompts = cache_blocks, manifest_s, max_prompts
        self.rate = rate                    # prompts/s over all threads (None: closed loop)
        self.fetcher = fetcher       # the caller's (closed by the caller), or None: our own
        self.bank = None if fetcher else ShardedBank(targets, timeout_s=timeout_s, down_s=down_s)
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "LoadLoop":
        self._t0 = time.monotonic()
        for i in range(self.threads_n):
            t = threading.Thread(target=self._device, args=(i,), name=f"device-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 30.0) -> LoadReport:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self.report.elapsed_s = time.monotonic() - self._t0
        if self.bank is not None:
            self.report.failovers = {f"{s} {c}": n for (s, c), n in self.bank.failovers.items()}
            self.bank.close()
        else:
            self.report.failovers = self.fetcher.stats()
        return self.report

    def wait_prompts(self, n: int, timeout: float) -> bool:
        """Block until at least n more prompts completed (True) or timeout (False)."""
        with self._lock:
            target = self.report.prompts + n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.report.prompts >= target:
                    return True
            if not any(t.is_alive() for t in self._threads):
                return False
            time.sleep(0.02)
        return False

    def __enter__(self) -> "LoadLoop":
        return self.start()

    def __exit__(self, *exc) -> None:
        if not self._stop.is_set():
            self.stop()

    # -- one device ---------------------------------------------------------------------------
    def _on_rpc(self, shard, ids, seconds, nbytes, error) -> None:
        name = "+".join(f"L{l}" for l in sorted({l for l, _ in ids}))
        with self._lock:
            self.report.rpcs += 1
            self.report.rpc_by_shard[shard] += 1
            if error is None:
                self.report.rpc_ms[name].append(seconds * 1e3)
                self.report.bytes += nbytes
            else:
                self.report.failed_rpcs += 1

    def _device(self, index: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + index)
        cache = DeviceCache(max(1, self.cache_blocks)) if self.cache_blocks else None
        manifest, leaves, manifest_at = None, None, 0.0
        period = self.threads_n / self.rate if self.rate else 0.0
        next_at = time.monotonic() + rng.random() * period
        while not self._stop.is_set():
            if self.max_prompts is not None and self.report.prompts >= self.max_prompts:
                return
            if period:
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                next_at += period
            t0 = time.perf_counter()
            error = None
            version = None
            try:
                if manifest is None or time.monotonic() - manifest_at > self.manifest_s:
                    fresh = (self.fetcher.get_manifest(self.bank_name) if self.fetcher
                             else self.bank.manifest(self.bank_name))
                    if manifest is None or fresh.version != manifest.version:
                        if cache is not None:
                            cache.clear()     # held blocks are of the old version
                        leaves = ZipfLeaves(fresh.branching, fresh.depth, self.zipf_s, self.seed)
                    manifest, manifest_at = fresh, time.monotonic()
                m = manifest
                blocks = m.path_blocks(leaves.sample_path(rng))
                missing = cache.missing(blocks) if cache is not None else blocks
                if missing:
                    # one manifest for the whole path: each block's header (version included)
                    # and bytes are checked against it, so a block of another version fails
                    # (a failed RPC, then another replica), never joins the path
                    if self.fetcher is not None:
                        got = self.fetcher.fetch(m.bank, m.version, missing, m)
                    else:
                        got = self.bank.fetch(m, missing, on_rpc=self._on_rpc)
                    if cache is not None:
                        for b, buf in got.items():
                            cache.put(b, len(buf))
                version = m.version
            except BankError as e:
                error = f"{e.code}: {e.message}"
            dt = (time.perf_counter() - t0) * 1e3
            with self._lock:
                r = self.report
                r.prompts += 1
                if error is not None:
                    r.errors.append((round(time.monotonic() - self._t0, 3), error))
                else:
                    r.prompt_ms.append(dt)
                    r.versions[version] += 1
        if cache is not None:
            with self._lock:
                self.report.device_hits += cache.hits
                self.report.device_misses += cache.misses
