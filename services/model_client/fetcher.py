"""ShardedFetcher: the device's client over many bank shards, with hedging, retries and failover.

    targets = {"s0": "10.0.0.1:50051", "s1": "10.0.0.2:50051"}   # shard id (manifest) -> address
    # or "10.0.0.1:50051+50052": block bodies over that shard's raw-TCP data plane
    with open_bank(targets, policy=FetchPolicy(deadline_s=5)) as bank:    # targets.py
        manifest = bank.get_manifest("demo")
        blocks = bank.fetch("demo", manifest.version, manifest.path_blocks(path), manifest)
        # or encoding="int8": the int8 payloads (membank/quant.py), verified the same way
        print(bank.stats())      # rpcs, retries, hedges, hedge_wins, failovers, integrity_errors

It is a Bank (services/model_client/bank.py), as BankClient and DataPlaneClient are, so any of
them can be passed as `model.generate(prompt, bank=...)`. `targets` is explicit: the manifest's
`shards` are ids, and only the device's configuration knows where each one listens. A plain
string ("host:port") means one server holding every block (a server started without
--shard-id). Each shard's client comes from `client_factory`; targets.open_bank passes the one
that picks a DataPlaneClient for "host:PORT+DATAPLANE_PORT" and a BankClient for "host:port",
with the same token / TLS / timeout.

How a fetch runs:
  1. plan: each block's owners come from the manifest's placement (membank/placement.py,
     replication included); blocks are grouped so that the fewest shards cover them (greedy set
     cover, shards marked down last). One prompt's path is always ONE group: its deep blocks share
     a placement group and the levels above it are on every shard.
  2. one FetchBlocks RPC per group, groups in parallel (a small thread pool);
  3. per group, the replicas are the shards that own every block of it, best first. The first
     replica gets the RPC; if it has not answered after the hedge delay (the running p95 of
     observed latencies for requests of that size, `FetchPolicy.hedge_*`) the same request goes to
     the next replica, and the first good answer wins (the other call is cancelled, and the
     replica it went to is tried last for `down_s`, as a down one: a stalled shard costs one
     hedge delay, not one per prompt). GetManifest is hedged the same way;
  4. a replica that fails is replaced at once by the next one (failover):
       UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED   retryable; UNAVAILABLE also marks
                                                              the shard down for `down_s`
       DATA_LOSS (server) or BlockIntegrityError (client)    that replica is not asked again for
                                                              this group; the block is never
                                                              returned unverified
       FAILED_PRECONDITION (wrong shard)                      not asked again; `placement_mismatch`
                                                              is set (the manifest may be stale)
       anything else (NOT_FOUND, INVALID_ARGUMENT, auth)      raised at once: another replica
                                                              would say the same
     when every replica of a round failed with a retryable error, the next round starts after an
     exponential backoff with full jitter, up to `max_rounds` rounds, all within `deadline_s`.
A fetch either returns every block, each verified against the manifest, or raises BankError.
With `out` (destinations the caller owns, e.g. the model's room: bank.py), one attempt at a time
receives into them; a hedge or failover that starts while that attempt still runs receives into
its own buffers, and if it wins, the first is cancelled and waited for before the winner's bytes
are copied in. No call still writing into `out` outlives the fetch, so a failed fetch cannot
scribble over the next prompt's memory.
Run its tests:
    .venv/bin/pytest -q tests/unit/test_fetcher.py tests/integration/test_client_failover.py
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping

from membank import quant
from membank.fetch import FetchError, check_fetch
from membank.manifest import Manifest
from services.model_client.bank import Bank, BankError, BlockIntegrityError, destination

log = logging.getLogger("membank.client.fetcher")

ANY = "*"          # the shard name of a single-address target: it holds every block
Block = tuple[int, int]
RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
INTEGRITY = {"DATA_LOSS"}
WRONG_SHARD = {"FAILED_PRECONDITION"}


@dataclass(frozen=True)
class FetchPolicy:
    deadline_s: float = 10.0        # one whole fetch: every group, retry, hedge and backoff
    attempt_timeout_s: float = 5.0  # one RPC (capped by what is left of the deadline)
    max_rounds: int = 3             # rounds over a group's replicas; retries = rounds - 1
    backoff_s: float = 0.05         # before round 2; doubles per round, full jitter
    backoff_max_s: float = 1.0
    hedge: bool = True
    hedge_quantile: float = 0.95    # hedge after this quantile of observed latencies...
    hedge_min_samples: int = 8      # ...once a size bucket has this many; before: hedge_initial_s
    hedge_initial_s: float = 0.25
    hedge_min_s: float = 0.002      # never hedge sooner (loopback latencies are ~1 ms)
    latency_window: int = 128       # latencies kept per size bucket
    down_s: float = 5.0             # a shard that answered UNAVAILABLE is tried last this long
    max_workers: int = 8            # concurrent RPCs (attempts and hedges of all groups)

    def __post_init__(self):
        if self.deadline_s <= 0 or self.attempt_timeout_s <= 0 or self.max_rounds < 1:
            raise ValueError("deadline_s and attempt_timeout_s must be > 0, max_rounds >= 1")
        if not 0 < self.hedge_quantile <= 1:
            raise ValueError("hedge_quantile must be in (0, 1]")


@dataclass
class Group:
    """Blocks fetched by one RPC, and the shards that own all of them (best first)."""
    blocks: list[Block]
    replicas: list[str]


def plan_groups(manifest: Manifest, blocks: list[Block], shards: Collection[str], *,
                down: Collection[str] = (), avoid: Collection[str] = ()) -> list[Group]:
    """The fetch plan (step 1 of the module docstring): `blocks` grouped into as few RPCs as
    the manifest's placement allows, over the shards in `shards` but none in `avoid`; shards in
    `down` are chosen last. Each group's replicas are the shards owning all of its blocks, best
    first. BankError for a block the manifest lacks (membank/fetch.py check_fetch: the server's
    code and message), UNAVAILABLE when a block has no owner left to ask. The load test plans
    with it too (loadtests/load_loop.py)."""
    blocks = list(dict.fromkeys((int(l), int(n)) for l, n in blocks))
    try:
        check_fetch(manifest, blocks)
    except FetchError as e:
        raise BankError(e.code, e.message) from None
    owners: dict[Block, list[str]] = {}
    for b in blocks:
        known = [s for s in manifest.owners(*b) if s in shards and s not in avoid]
        if not known:
            raise BankError("UNAVAILABLE",
                            f"no address for shard(s) {manifest.owners(*b)} holding block {b}"
                            f" (targets: {sorted(shards)}, failed: {sorted(avoid)})")
        owners[b] = known
    left = list(blocks)
    groups = []
    while left:
        def score(s: str):
            cover = [b for b in left if s in owners[b]]
            primary = sum(1 for b in cover if owners[b][0] == s)
            return (s not in down, len(cover), primary)
        candidates = {s for b in left for s in owners[b]}
        best = max(sorted(candidates), key=score)
        cover = [b for b in left if best in owners[b]]
        shared = set.intersection(*(set(owners[b]) for b in cover))
        rank = owners[cover[-1]]   # the deepest block's owner order (its placement group)
        rest = sorted(shared - {best}, key=lambda s: rank.index(s) if s in rank else len(rank))
        groups.append(Group(cover, [best, *sorted(rest, key=lambda s: s in down)]))
        left = [b for b in left if b not in cover]
    return groups


@dataclass
class FetchStats:
    rpcs: int = 0                # FetchBlocks calls started (first tries, failovers, hedges)
    retries: int = 0             # rounds after the first (after a backoff)
    hedges: int = 0              # hedge RPCs started
    hedge_wins: int = 0          # groups answered by the hedge, not the first replica
    failovers: int = 0           # RPCs started on another replica after one failed
    integrity_errors: int = 0    # DATA_LOSS or BlockIntegrityError from a replica
    wrong_shard: int = 0         # FAILED_PRECONDITION from a replica
    cancelled: int = 0           # losing hedges cancelled
    manifest_hedges: int = 0     # GetManifest calls to another shard while one was slow
    slow_marks: int = 0          # replicas outrun by a hedge: tried last for down_s
    errors: dict[str, int] = field(default_factory=dict)   # status code name -> count
    bytes: int = 0               # verified block bytes returned
    blocks: int = 0


class LatencyTracker:
    """Running quantiles of RPC latency per request-size bucket (powers of 4 bytes)."""

    def __init__(self, window: int):
        self.window = window
        self._lock = threading.Lock()
        self._by_bucket: dict[int, deque] = {}

    @staticmethod
    def bucket(nbytes: int) -> int:
        return max(0, int(nbytes).bit_length() - 1) // 2

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._by_bucket.setdefault(self.bucket(nbytes),
                                       deque(maxlen=self.window)).append(seconds)

    def quantile(self, nbytes: int, q: float, min_samples: int) -> float | None:
        with self._lock:
            xs = sorted(self._by_bucket.get(self.bucket(nbytes), ()))
        if len(xs) < min_samples:
            return None
        return xs[min(len(xs) - 1, int(q * len(xs)))]


class _Attempt:
    """One RPC to one replica; `cancel()` works before or after the call exists."""

    def __init__(self, shard: str, hedge: bool):
        self.shard, self.hedge = shard, hedge
        self.started = time.monotonic()
        self.future: Future | None = None
        self.out: dict | None = None     # the caller's destinations, when this attempt has them
        self._lock = threading.Lock()
        self._call = None
        self.cancelled = False

    def on_call(self, call) -> None:
        with self._lock:
            self._call = call
            if self.cancelled:
                call.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._call is not None:
                self._call.cancel()


class ShardedFetcher:
    def __init__(self, targets: str | Mapping[str, str], policy: FetchPolicy | None = None, *,
                 client_factory: Callable[[str], Bank], rng: random.Random | None = None):
        """`targets`: shard id -> target, or one target serving every block.
        `client_factory(target)` builds a shard's client, when first needed: any Bank with
        `fetch(..., timeout_s=, on_call=)` (targets.client_factory: BankClient for "host:port",
        DataPlaneClient for "host:port+DATAPLANE_PORT"; tests pass fakes). `rng` seeds the
        backoff jitter. From target strings, build it with targets.open_bank."""
        if isinstance(targets, str):
            targets = {ANY: targets}
        if not targets:
            raise ValueError("no targets")
        self.targets = dict(targets)
        self.policy = policy or FetchPolicy()
        self._factory = client_factory
        self._clients: dict[str, Bank] = {}
        self._lock = threading.Lock()
        self._stats = FetchStats()
        self._per_shard: dict[str, dict[str, int]] = {s: {"rpcs": 0, "errors": 0}
                                                      for s in self.targets}
        self._down_until: dict[str, float] = {}
        self.latency = LatencyTracker(self.policy.latency_window)
        self.manifest_latency = LatencyTracker(self.policy.latency_window)    # GetManifest
        self._rng = rng or random.Random()
        self._pool = ThreadPoolExecutor(self.policy.max_workers, thread_name_prefix="membank-rpc")
        # group drivers wait on attempts: a pool of their own, so they never starve the RPCs
        self._groups = ThreadPoolExecutor(self.policy.max_workers,
                                          thread_name_prefix="membank-group")
        # set when a shard answered FAILED_PRECONDITION: its manifest may be older than the
        # shard's (e.g. after a rebalance); MemoryModel re-reads the manifest when it sees it
        self.placement_mismatch = False

    # -- public API --------------------------------------------------------------------------
    def get_manifest(self, bank: str, version: str = "") -> Manifest:
        """The manifest from the first shard that answers, within `deadline_s`: up shards
        first; another shard is asked at once when one fails with a retryable error, and after
        the hedge delay when one is slow (a stalled shard, e.g. `docker pause`, answers nothing
        and would hold every prompt for `attempt_timeout_s`). A slow loser is not cancelled:
        its call ends at its own timeout, on a pool thread."""
        deadline = time.monotonic() + self.policy.deadline_s
        pending = self._order(list(self.targets))
        running: dict[Future, tuple[str, float]] = {}      # future -> (shard, start)
        last: BankError | None = None

        def launch() -> None:
            shard = pending.pop(0)
            timeout_s = min(self.policy.attempt_timeout_s, max(0.001, deadline - time.monotonic()))
            f = self._pool.submit(self._client(shard).get_manifest, bank, version,
                                  timeout_s=timeout_s)
            running[f] = (shard, time.monotonic())

        launch()
        hedge_at = time.monotonic() + self._hedge_delay(0, self.manifest_latency)
        while running:
            now = time.monotonic()
            if now >= deadline:
                break
            can_hedge = self.policy.hedge and pending
            until = min(deadline, hedge_at) if can_hedge else deadline
            done, _ = wait(list(running), timeout=max(0.0, until - now),
                           return_when=FIRST_COMPLETED)
            if not done:
                if can_hedge and time.monotonic() >= hedge_at:
                    self._count("manifest_hedges")
                    launch()
                    hedge_at = time.monotonic() + self._hedge_delay(0, self.manifest_latency)
                continue
            for f in done:
                shard, started = running.pop(f)
                err = f.exception()
                if err is None:
                    self.manifest_latency.add(0, time.monotonic() - started)
                    self._mark_up(shard)
                    self._mark_slow(s for s, _ in running.values())
                    return f.result()
                if not isinstance(err, BankError):
                    raise err
                self._count_error(shard, err)
                if err.code not in RETRYABLE:
                    raise err
                if err.code == "UNAVAILABLE":
                    self._mark_down(shard)
                last = err
            if pending and not running:
                launch()
        raise last or BankError("DEADLINE_EXCEEDED",
                                f"no shard answered GetManifest within {self.policy.deadline_s} s")

    def fetch(self, bank: str, version: str, blocks: list[Block],
              manifest: Manifest, *, encoding: str = "",
              out: dict | None = None) -> dict[Block, bytearray]:
        """Every block of `blocks`, each verified against `manifest`, or BankError.
        `encoding`: "" (native) or "int8" (payloads checked against the manifest's int8
        checksums; NOT_FOUND at once, no RPC, when the version has no int8 blocks).
        `out`: (level, node) -> a buffer or Scatter to receive that block into (the module
        docstring says how hedges share it); returned for that block."""
        version = version or manifest.version
        if bank != manifest.bank or version != manifest.version:
            raise ValueError(f"manifest is {manifest.bank}/{manifest.version}, "
                             f"not {bank}/{version}")
        encoding = quant.normalize(encoding)
        try:        # as each client: what the manifest refuses, with the server's answer
            check_fetch(manifest, [(int(l), int(n)) for l, n in blocks], encoding)
        except FetchError as e:
            raise BankError(e.code, e.message) from None
        if not blocks:
            return {}
        if out:             # ValueError before any I/O, as the single-server clients
            out = {(int(l), int(n)): destination(out[(l, n)],
                                                 manifest.block_nbytes(int(l), encoding), (l, n))
                   for l, n in blocks if out.get((l, n)) is not None}
        deadline = time.monotonic() + self.policy.deadline_s
        groups = self.plan(manifest, blocks)
        if len(groups) == 1:
            return self._fetch_group(manifest, groups[0], deadline, frozenset(), encoding, out)
        futures = [self._groups.submit(self._fetch_group, manifest, g, deadline, frozenset(),
                                       encoding, out)
                   for g in groups]
        got: dict[Block, bytearray] = {}
        errors = []
        for f in futures:   # every group finishes by the deadline; wait for all of them
            try:
                got.update(f.result())
            except BankError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return got

    def plan(self, manifest: Manifest, blocks: list[Block],
             avoid: frozenset[str] = frozenset()) -> list[Group]:
        """Group blocks into as few RPCs as possible (see the module docstring), using no shard
        in `avoid`; BankError UNAVAILABLE when a block has no owner left to ask."""
        if ANY in self.targets:
            return [Group(list(dict.fromkeys((int(l), int(n)) for l, n in blocks)), [ANY])]
        now = time.monotonic()
        down = {s for s, until in self._down_until.items() if until > now}
        return plan_groups(manifest, blocks, self.targets, down=down, avoid=avoid)

    def health(self, timeout_s: float = 1.0) -> bool:
        """True when at least one shard answers SERVING (grpc health), like BankClient.health."""
        return any(self.shard_health(timeout_s).values())

    def shard_health(self, timeout_s: float = 1.0) -> dict[str, bool]:
        """Each shard's grpc health (SERVING or not), checked in parallel."""
        futures = {s: self._pool.submit(self._client(s).health, timeout_s) for s in self.targets}
        return {s: f.result() for s, f in futures.items()}

    def stats(self) -> dict:
        with self._lock:
            d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self._stats).items()}
            d["shards"] = {s: dict(v) for s, v in self._per_shard.items()}
        d["down"] = sorted(s for s, t in self._down_until.items() if t > time.monotonic())
        return d

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._groups.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()

    def __enter__(self) -> "ShardedFetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one group ---------------------------------------------------------------------------
    def _fetch_group(self, manifest: Manifest, group: Group, deadline: float,
                     avoid: frozenset[str], encoding: str = "",
                     out: dict | None = None) -> dict[Block, bytearray]:
        nbytes = sum(manifest.block_nbytes(l, encoding) for l, _ in group.blocks)
        excluded: set[str] = set()      # replicas that must not be asked again for this group
        last: BankError | None = None
        for round_ in range(self.policy.max_rounds):
            if round_:
                cap = min(self.policy.backoff_max_s, self.policy.backoff_s * 2 ** (round_ - 1))
                pause = self._rng.uniform(0, cap)      # full jitter: spreads a fleet's retries
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
                self._count("retries")
            replicas = self._order([r for r in group.replicas if r not in excluded])
            if not replicas:
                break
            try:
                return self._race(manifest, group.blocks, replicas, nbytes, deadline, excluded,
                                  encoding, out)
            except _RoundFailed as e:
                last = e.error
                if e.fatal:
                    raise e.error from None
            # every replica of the group failed, but a block's other owners may not have been
            # asked: the cover put the group on the few shards owning ALL of its blocks. Split
            # the group over the shards not tried yet (sequentially: this is the rare path)
            tried = avoid | set(group.replicas)
            try:
                split = self.plan(manifest, group.blocks, avoid=tried)
            except BankError:
                split = []      # some block has no other owner: retry these replicas instead
            if split:
                self._count("failovers")
                got: dict[Block, bytearray] = {}
                for g in split:
                    got.update(self._fetch_group(manifest, g, deadline, tried, encoding, out))
                return got
            if time.monotonic() >= deadline:
                break
        if last is None:
            last = BankError("DEADLINE_EXCEEDED",
                             f"fetch of {len(group.blocks)} blocks ran out of time")
        elif last.code in INTEGRITY:
            last = BlockIntegrityError(f"blocks {group.blocks} failed verification on every "
                                       f"replica ({', '.join(group.replicas)}): {last.message}")
        log.warning("fetch of %s failed on %s: %s", group.blocks, group.replicas, last)
        raise last

    def _race(self, manifest, blocks, replicas, nbytes, deadline, excluded, encoding="",
              out=None):
        """One round: first replica, a hedge after the hedge delay, failover on errors."""
        pending = list(replicas)
        running: dict[Future, _Attempt] = {}
        hedged = False
        last: BankError | None = None
        mine = {b: out[b] for b in blocks if b in out} if out else {}   # this group's
        owner: list[_Attempt] = []      # the attempts given `mine` (one running at a time)

        def launch(hedge: bool) -> None:
            shard = pending.pop(0)
            a = _Attempt(shard, hedge)
            if mine and (not owner or owner[-1].future.done()):
                a.out = mine
                owner.append(a)
            remaining = max(0.001, deadline - time.monotonic())
            a.future = self._pool.submit(self._attempt, a, manifest, blocks,
                                         min(self.policy.attempt_timeout_s, remaining), encoding)
            running[a.future] = a

        launch(False)
        hedge_at = time.monotonic() + self._hedge_delay(nbytes)
        try:
            while running:
                now = time.monotonic()
                if now >= deadline:
                    raise _RoundFailed(BankError("DEADLINE_EXCEEDED",
                                                 f"fetch deadline ({self.policy.deadline_s} s) "
                                                 f"passed"), fatal=True)
                can_hedge = self.policy.hedge and not hedged and pending
                timeout = min(deadline, hedge_at) - now if can_hedge else deadline - now
                done, _ = wait(list(running), timeout=max(0.0, timeout),
                               return_when=FIRST_COMPLETED)
                if not done:
                    if can_hedge and time.monotonic() >= hedge_at:
                        hedged = True
                        self._count("hedges")
                        launch(True)
                    continue
                for f in done:
                    a = running.pop(f)
                    err = f.exception()
                    if err is None:
                        result = f.result()
                        self.latency.add(nbytes, time.monotonic() - a.started)
                        self._mark_up(a.shard)
                        if a.hedge:
                            self._count("hedge_wins")
                            self._mark_slow(other.shard for other in running.values())
                        with self._lock:
                            self._stats.bytes += sum(len(v) for v in result.values())
                            self._stats.blocks += len(result)
                        if mine and a.out is None:
                            # a hedge won into its own buffers: the attempt writing into
                            # `mine` must stop before they are copied in
                            self._settle(running, owner, deadline)
                            for b, dest in mine.items():
                                dest.write(0, result[b])
                            result = {**result, **{b: d.result for b, d in mine.items()}}
                        return result
                    if not isinstance(err, BankError):
                        raise err
                    last = err
                    self._count_error(a.shard, err)
                    if err.code in INTEGRITY or isinstance(err, BlockIntegrityError):
                        self._count("integrity_errors")
                        excluded.add(a.shard)
                        log.warning("replica %s sent a bad block for %s: %s", a.shard, blocks, err)
                    elif err.code in WRONG_SHARD:
                        self._count("wrong_shard")
                        excluded.add(a.shard)
                        self.placement_mismatch = True
                    elif err.code == "UNAVAILABLE":
                        self._mark_down(a.shard)
                    elif err.code not in RETRYABLE:
                        raise _RoundFailed(err, fatal=True)
                    if pending and not running:
                        self._count("failovers")
                        launch(False)
            raise _RoundFailed(last, fatal=False)
        finally:
            self._settle(running, owner, deadline)

    def _settle(self, running: dict, owner: list, deadline: float) -> None:
        """Cancel the attempts still running (the losers of a race, or everyone on a fatal
        error) and wait for the one writing into the caller's `out`, so that none writes there
        after this fetch has answered."""
        for a in running.values():
            a.cancel()
            self._count("cancelled")
        running.clear()
        for a in owner:
            if a.future.done():
                continue
            # cancelled: its socket is shut (data plane) or its call cancelled (gRPC), so it
            # ends at once; the bound only guards against a client that ignores cancel
            done, _ = wait([a.future], timeout=max(1.0, deadline - time.monotonic()))
            if not done:
                log.error("a cancelled fetch into the caller's buffers did not stop")
                raise _RoundFailed(BankError("INTERNAL", "a cancelled fetch did not stop"),
                                   fatal=True)

    def _attempt(self, a: _Attempt, manifest: Manifest, blocks, timeout_s: float,
                 encoding: str = ""):
        with self._lock:
            self._stats.rpcs += 1
            self._per_shard.setdefault(a.shard, {"rpcs": 0, "errors": 0})["rpcs"] += 1
        if a.cancelled:
            raise BankError("CANCELLED", "cancelled before it started")
        # `encoding` only when not native: per-shard clients built by a `client_factory`
        # (other transports, test fakes) need not know about encodings to fetch native blocks
        extra = {"encoding": encoding} if encoding else {}
        if a.out:
            extra["out"] = a.out
        return self._client(a.shard).fetch(manifest.bank, manifest.version, blocks, manifest,
                                           timeout_s=timeout_s, on_call=a.on_call, **extra)

    # -- helpers -----------------------------------------------------------------------------
    def _hedge_delay(self, nbytes: int, tracker: LatencyTracker | None = None) -> float:
        p = self.policy
        q = (tracker or self.latency).quantile(nbytes, p.hedge_quantile, p.hedge_min_samples)
        return min(p.attempt_timeout_s, max(p.hedge_min_s, p.hedge_initial_s if q is None else q))

    def _client(self, shard: str) -> Bank:
        with self._lock:
            c = self._clients.get(shard)
            if c is None:
                c = self._clients[shard] = self._factory(self.targets[shard])
            return c

    def _order(self, shards: list[str]) -> list[str]:
        """Up shards first, in the given order, then the ones marked down."""
        now = time.monotonic()
        return sorted(shards, key=lambda s: self._down_until.get(s, 0) > now)

    def _mark_down(self, shard: str) -> None:
        self._down_until[shard] = time.monotonic() + self.policy.down_s

    def _mark_slow(self, shards) -> None:
        """Replicas still silent when another one answered first: tried last for `down_s`, as
        a down one, so a stalled shard costs one hedge delay, not one per request."""
        for shard in shards:
            self._count("slow_marks")
            self._mark_down(shard)

    def _mark_up(self, shard: str) -> None:
        self._down_until.pop(shard, None)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._stats, name, getattr(self._stats, name) + n)

    def _count_error(self, shard: str, e: BankError) -> None:
        with self._lock:
            self._stats.errors[e.code] = self._stats.errors.get(e.code, 0) + 1
            self._per_shard.setdefault(shard, {"rpcs": 0, "errors": 0})["errors"] += 1


class _RoundFailed(Exception):
    def __init__(self, error: BankError | None, fatal: bool):
        super().__init__(str(error))
        self.error = error or BankError("UNAVAILABLE", "no replica answered")
        self.fatal = fatal
