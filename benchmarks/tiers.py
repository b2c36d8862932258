"""When does Redis earn its place? Every read tier on the same blocks, in the same run.

    .venv/bin/python -m benchmarks.tiers                   # paper block sizes, private redis
    .venv/bin/python -m benchmarks.tiers --quick           # small blocks, a few reps (smoke)
    .venv/bin/python -m benchmarks.tiers --redis-url redis://host:6379/0 --sizes 6.9

Blocks are the paper's 160M block sizes in bf16 (level 3: 1.72 MB, level 2: 6.88 MB, level 1:
27.5 MB), random, `--blocks` distinct ones per size, all in one LMDB. One "read" is what the
server does to obtain a block it can send: the tier's `read(key, Expect)` (services/bank_server:
store.py, cache.py, tiers.py), i.e. including the checksum where that tier checks it.

  lmdb-warm         zero-copy view of the memory map (page cache warm) + xxh3 checksum
  lmdb-warm-copy    the old path: copy out of the map to bytes, then checksum
  lmdb-cold         the file evicted from the page cache before every read (env closed,
                    posix_fadvise(POSIX_FADV_DONTNEED) on data.mdb, env reopened): disk reads;
                    readahead on + MADV_WILLNEED over the block (the store's setting)
  lmdb-cold-norah   the same with readahead off and no WILLNEED (the store's old setting)
  redis             GET over TCP from a redis-server on this machine (hiredis) + checksum
  redis-unix        the same over a unix socket (private redis-server only)
  lru               in-process LRU hit (bytes verified on insert: no checksum)
  serve-old         read + encode the gRPC chunks from a copy (bytes) of the block
  serve-new         read + encode the gRPC chunks straight from the LMDB view (zero copy)
                    (the two serve rows are measured interleaved, block by block; malloc is
                    tuned as in the server)

Prints a table (p50 / p99 ms, GB/s at p50, ratio to lmdb-warm) and ends with one JSON line.
Machine noise: run it on an idle machine; all rows of one run share the machine state.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from membank import wire
from membank.blocks import checksum
from services.bank_server.cache import RedisCachedStore
from services.bank_server.cluster import LocalRedis
from services.bank_server.store import (
    Expect,
    LMDBStore,
    acquire_env,
    evict_from_page_cache,
    page_cache_residency,
    release_env,
)
from services.bank_server.tiers import LRUCache
from testkit.stats import median, percentile

# the paper's 160M model: 35 memory layers x 3 matrices x r_l x d 512, bf16
PAPER_SIZES = {"L3 1.7MB": 35 * 3 * 16 * 512 * 2, "L2 6.9MB": 35 * 3 * 64 * 512 * 2,
               "L1 27.5MB": 35 * 3 * 256 * 512 * 2}


def random_bf16(rng: np.random.Generator, nbytes: int) -> bytes:
    """Random finite bf16 values (|x| in [2^-7, 2^-6)), as bytes."""
    a = rng.integers(0, 1 << 16, nbytes // 2, dtype=np.uint16)
    a &= 0x807F
    a |= 0x3C00
    return a.tobytes()


class Never:
    """Inner store of the cache tiers during timing: every read must be a hit."""
    name = "never"

    def get(self, key):
        raise AssertionError(f"cache miss for {key!r} during timing")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", help="block sizes in MB, comma-separated (default: paper's)")
    p.add_argument("--blocks", type=int, default=8, help="distinct blocks per size")
    p.add_argument("--reps", type=int, default=5, help="passes over the blocks (warm tiers)")
    p.add_argument("--cold-reps", type=int, default=1, help="passes for the cold tiers")
    p.add_argument("--redis-url", help="an existing Redis (default: a private redis-server)")
    p.add_argument("--dir", help="parent of the work directory (default: the system temp "
                   "dir); the work directory is deleted after")
    p.add_argument("--quick", action="store_true", help="small blocks, few reps (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from services.bank_server.server import tune_malloc
    tune_malloc()     # as the server does at start (multi-MB buffers stay on the heap)
    if args.quick:
        sizes = {"64KB": 64 << 10, "1MB": 1 << 20}
        args.blocks, args.reps, args.cold_reps = 3, 2, 1
    elif args.sizes:
        sizes = {f"{s}MB": int(float(s) * 1e6) // 2 * 2 for s in args.sizes.split(",")}
    else:
        sizes = PAPER_SIZES
    work = Path(tempfile.mkdtemp(prefix="membank-tiers-", dir=args.dir))
    rng = np.random.default_rng(args.seed)
    order = random.Random(args.seed)
    results: dict[str, dict[str, dict]] = {}
    redis_srv = None
    try:
        # -- data: one LMDB with every block ----------------------------------------------------
        db = work / "bank.lmdb"
        blocks: dict[str, list[tuple[bytes, bytes, Expect]]] = {}
        env = acquire_env(db, 16 << 30, readonly=False)
        for label, nbytes in sizes.items():
            blocks[label] = []
            for i in range(args.blocks):
                data = random_bf16(rng, nbytes)
                key = f"b/bench/v1/{label.replace(' ', '_')}/{i}".encode()
                with env.begin(write=True) as txn:
                    txn.put(key, data)
                blocks[label].append((key, data, Expect(len(data), checksum(data))))
        release_env(env)
        total = sum(len(d) for bl in blocks.values() for _, d, _ in bl)

        if args.redis_url:
            urls = {"redis": args.redis_url}
        else:
            # room for every block twice over (+ 256 MB), so no read misses
            redis_srv = LocalRedis(work, maxmemory_mb=(2 * total >> 20) + 257,
                                   unix_socket=work / "redis.sock")
            redis_srv.start()
            urls = {"redis": redis_srv.url, "redis-unix": redis_srv.unix_url}

        def run(tier: str, label: str, fn, passes: int, before=None):
            times = []
            for _ in range(passes):
                items = list(blocks[label])
                order.shuffle(items)
                for key, data, want in items:
                    if before is not None:
                        before()
                    t0 = time.perf_counter()
                    fn(key, want)
                    times.append(time.perf_counter() - t0)
            results.setdefault(label, {})[tier] = {
                "p50_ms": median(times) * 1e3,
                "p99_ms": percentile(times, 0.99) * 1e3, "n": len(times),
                "gbps": sizes[label] / median(times) / 1e9}

        def read_view(store):
            def fn(key, want):
                with store.read(key, want) as buf:
                    assert buf is not None
            return fn

        for label in sizes:
            # LMDB warm: touch everything first
            store = LMDBStore(db, 16 << 30)
            for key, _, want in blocks[label]:
                with store.read(key, want):
                    pass
            run("lmdb-warm", label, read_view(store), args.reps)

            def copy_then_check(key, want, store=store):
                data = store.get(key)
                assert checksum(data) == want.checksum
            run("lmdb-warm-copy", label, copy_then_check, args.reps)

            def serve_old(key, want, store=store):
                data = store.get(key)
                assert checksum(data) == want.checksum
                chunks = list(wire.iter_block_chunks(0, {"level": 1, "nbytes": len(data)}, data))
                assert chunks

            def serve_new(key, want, store=store):
                with store.read(key, want) as buf:
                    chunks = list(wire.iter_block_chunks(0, {"level": 1, "nbytes": len(buf)}, buf))
                assert chunks
            # interleaved, block by block, so that drift hits both alike
            pair = {"serve-old": [], "serve-new": []}
            for _ in range(args.reps):
                items = list(blocks[label])
                order.shuffle(items)
                for key, _, want in items:
                    for tier, fn in (("serve-old", serve_old), ("serve-new", serve_new)):
                        t0 = time.perf_counter()
                        fn(key, want)
                        pair[tier].append(time.perf_counter() - t0)
            for tier, times in pair.items():
                results[label][tier] = {
                    "p50_ms": median(times) * 1e3,
                    "p99_ms": percentile(times, 0.99) * 1e3,
                    "n": len(times), "gbps": sizes[label] / median(times) / 1e9}
            store.close()

            # LMDB cold, the store's setting and the old one
            for tier, kw in (("lmdb-cold", {}), ("lmdb-cold-norah", {"prefetch": False})):
                holder = {}

                def reopen(kw=kw, holder=holder):
                    if "store" in holder:
                        holder["store"].close()
                    evict_from_page_cache(db / "data.mdb")
                    if kw:   # the old configuration: readahead off (MADV_RANDOM), no WILLNEED
                        import lmdb
                        holder["store"] = _OldStore(lmdb.open(str(db), map_size=16 << 30,
                                                              readonly=True, readahead=False))
                    else:
                        holder["store"] = LMDBStore(db, 16 << 30)
                    holder.setdefault("resident", []).append(page_cache_residency(db / "data.mdb"))

                def cold_read(key, want, holder=holder):
                    with holder["store"].read(key, want) as buf:
                        assert buf is not None
                run(tier, label, cold_read, args.cold_reps, before=reopen)
                holder["store"].close()
                # the fraction of data.mdb in the page cache just before each cold read
                results[label][tier]["max_resident_before"] = max(holder["resident"])

            # Redis: fill, then time hits (the inner store must never be asked)
            for tier, url in urls.items():
                redis_store = RedisCachedStore(Never(), url, ttl_s=None, socket_timeout_s=5,
                                               slow_s=60)
                for key, data, _ in blocks[label]:
                    redis_store.redis.set(key, data)
                run(tier, label, read_view(redis_store), args.reps)
                assert redis_store.stats()["hits"] == args.reps * args.blocks
                redis_store.close()

            # in-process LRU hits
            lru = LRUCache(Never(), max_bytes=2 * sizes[label] * args.blocks,
                           max_item_bytes=sizes[label])
            for key, data, want in blocks[label]:
                lru._insert(key, data, want.checksum)   # as verified against the manifest
            run("lru", label, read_view(lru), args.reps)
    finally:
        if redis_srv is not None:
            redis_srv.stop(kill=True)
        shutil.rmtree(work, ignore_errors=True)

    # -- report -------------------------------------------------------------------------------
    print(f"\n{'block':>10} {'tier':>16} {'p50 ms':>9} {'p99 ms':>9} {'GB/s':>7} "
          f"{'x warm':>7} {'n':>4}")
    for label, tiers in results.items():
        base = tiers["lmdb-warm"]["p50_ms"]
        for tier, r in tiers.items():
            r["vs_lmdb_warm"] = r["p50_ms"] / base
            print(f"{label:>10} {tier:>16} {r['p50_ms']:9.2f} {r['p99_ms']:9.2f} "
                  f"{r['gbps']:7.2f} {r['vs_lmdb_warm']:7.2f} {r['n']:4d}")
        t = tiers
        print(f"{'':>10} redis / lmdb-cold = {t['redis']['p50_ms'] / t['lmdb-cold']['p50_ms']:.2f}"
              f"   redis / lmdb-warm = {t['redis']['p50_ms'] / base:.2f}"
              f"   lmdb-cold-norah / lmdb-cold = "
              f"{t['lmdb-cold-norah']['p50_ms'] / t['lmdb-cold']['p50_ms']:.1f}"
              f"   serve-old / serve-new = "
              f"{t['serve-old']['p50_ms'] / t['serve-new']['p50_ms']:.2f}")
    out = {"benchmark": "tiers", "sizes": sizes, "blocks": args.blocks, "reps": args.reps,
           "cpus": os.cpu_count(), "results": results}
    print(json.dumps(out))
    return out


class _OldStore:
    """The store's read path before this issue: readahead off, no WILLNEED."""

    def __init__(self, env):
        self.env = env

    def read(self, key, want):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            with self.env.begin(buffers=True) as txn:
                buf = txn.get(key)
                assert want.ok(buf)
                yield buf
        return cm()

    def close(self):
        self.env.close()


if __name__ == "__main__":
    main()
