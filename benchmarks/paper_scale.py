"""Paper scale: build and serve the 160M model's bank (ranks (256, 64, 16, 0), k 16: 4.62B
parameters, 9.2 GB in bf16) across shards on this machine; report build time, disk size and
fetch latency per level through real gRPC server subprocesses.

    .venv/bin/python -m benchmarks.paper_scale                # small: k 4 (84 blocks, 0.36 GB)
    .venv/bin/python -m benchmarks.paper_scale --scale full --shards 2   # the paper's bank

`--scale small` keeps every block the paper's size (27.5 / 6.9 / 1.7 MB) and only shrinks the
branching to 4, so per-block latencies are comparable and the run takes seconds.

Build: synthetic random bf16 blocks are generated straight into the shard LMDBs by the streaming
ingest (services/bank_server/ingest.py `ingest_stream`: one pass, each block checksummed and
written to the shards placement gives it; no export file). Placement: level 1 on every shard
(placement_level 2), levels 2-3 by their level-2 ancestor, replication 1.

Serve: one `services.bank_server.server --shard-id S` per shard. Fetch latency is the client's
wall time for one FetchBlocks call (BankClient: receive, reassemble, verify the checksum),
asked of the block's owner:
  cold  first fetch of each block after its shard's data.mdb was evicted from the page cache
        (posix_fadvise DONTNEED before the servers start; servers do not pre-warm)
  warm  the same blocks again, random order (in the page cache now)
  path  a whole root-to-leaf path (3 blocks, 36 MB) in one RPC, cold paths then warm
Ends with one JSON line. Data goes to a temp dir under --dir (deleted unless --keep).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from membank.config import get_preset
from services.bank_server import launch
from services.bank_server.ingest import ingest_stream
from services.bank_server.store import evict_from_page_cache
from services.model_client.bank_client import BankClient
from testkit.stats import percentile

REPO = Path(__file__).resolve().parents[1]


def block_bytes(seed: int, level: int, node: int, nbytes: int) -> bytes:
    """Deterministic random finite bf16 (|x| in [2^-7, 2^-6)): a rerun rebuilds the same bank."""
    a = np.random.default_rng([seed, level, node]).integers(0, 1 << 16, nbytes // 2,
                                                            dtype=np.uint16)
    a &= 0x807F
    a |= 0x3C00
    return a.tobytes()


def summary(times: list[float], nbytes: int) -> dict:
    return {"n": len(times), "p50_ms": statistics.median(times) * 1e3,
            "p99_ms": percentile(times, 0.99) * 1e3, "max_ms": max(times) * 1e3,
            "gbps_p50": nbytes / statistics.median(times) / 1e9}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=["small", "full"], default="small")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dir", help="parent of the work directory (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the LMDBs")
    p.add_argument("--cold", type=int, default=32, help="cold fetches per level (distinct blocks)")
    p.add_argument("--warm", type=int, default=100, help="warm fetches per level")
    p.add_argument("--paths", type=int, default=8, help="whole-path fetches (cold, then warm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--writemap", action="store_true",
                   help="ingest through LMDB's writable map (store.open_env)")
    args = p.parse_args(argv)

    cfg = get_preset("paper-160m")
    fields = cfg.memory.manifest_fields(cfg.model)
    if args.scale == "small":
        fields["branching"] = 4
    shards = [f"shard-{i}" for i in range(args.shards)]
    header = {**fields, "bank": "paper160m", "version": "v1", "shards": shards,
              "replication": 1, "placement_level": 2}
    work = Path(tempfile.mkdtemp(prefix="membank-paper-", dir=args.dir))
    paths = {s: work / s for s in shards}
    report: dict = {"benchmark": "paper_scale", "scale": args.scale, "shards": shards,
                    "branching": fields["branching"], "ranks": fields["ranks"],
                    "mem_layers": len(fields["mem_layers"]), "d_model": fields["d_model"],
                    "dtype": fields["dtype"], "cpus": os.cpu_count()}
    try:
        # -- build ------------------------------------------------------------------------------
        from membank.manifest import Manifest
        ranks, k = fields["ranks"], fields["branching"]
        skeleton = Manifest.model_validate({**header, "checksums": [
            [""] * (k ** l if r else 0) for l, r in enumerate(ranks, 1)]})
        n_blocks = sum(1 for _ in skeleton.blocks())
        params = sum(skeleton.block_nbytes(l) // 2 for l, _ in skeleton.blocks())
        gen_s = [0.0]

        def generate(q: queue.Queue):
            for level, node in skeleton.blocks():
                t0 = time.perf_counter()
                data = block_bytes(args.seed, level, node, skeleton.block_nbytes(level))
                gen_s[0] += time.perf_counter() - t0
                q.put((level, node, data))
            q.put(None)

        def blocks():
            # generated on a second thread, a few blocks ahead, while ingest writes
            q: queue.Queue = queue.Queue(maxsize=4)
            threading.Thread(target=generate, args=(q,), daemon=True).start()
            while (item := q.get()) is not None:
                yield item

        print(f"building {n_blocks} blocks, {params / 1e9:.2f}B parameters, "
              f"{2 * params / 1e9:.2f} GB over {len(shards)} shards in {work}", flush=True)
        t0 = time.perf_counter()
        manifest = ingest_stream(paths, header, blocks(), progress=True,
                                 writemap=args.writemap)
        build_s = time.perf_counter() - t0
        disk = {s: (paths[s] / "data.mdb").stat().st_blocks * 512 for s in shards}
        report["build"] = {
            "blocks": n_blocks, "parameters": params, "bytes": 2 * params,
            "seconds": round(build_s, 1), "generate_seconds": round(gen_s[0], 1),
            "writemap": args.writemap,
            "gbps": round(2 * params / build_s / 1e9, 3),
            "disk_bytes": disk, "disk_total_bytes": sum(disk.values()),
            "blocks_per_shard": {s: sum(1 for l, n in manifest.blocks()
                                        if s in manifest.owners(l, n)) for s in shards}}
        print(json.dumps(report["build"]), flush=True)

        # -- serve ------------------------------------------------------------------------------
        for s in shards:
            evict_from_page_cache(paths[s] / "data.mdb")
        rng = random.Random(args.seed)
        with ExitStack() as stack:
            clients = {}
            for s in shards:
                address, _ = stack.enter_context(launch.run_bank_server(
                    paths[s], "--shard-id", s, "--warm-levels", "0", "--admin-port", "0",
                    "--map-size-gb", "64", log_path=work / f"{s}.log", cwd=REPO,
                    timeout=120))
                clients[s] = stack.enter_context(BankClient(address, timeout_s=120))
            m = clients[shards[0]].get_manifest("paper160m")
            assert m == manifest

            def fetch(blocks_: list[tuple[int, int]]) -> float:
                owner = m.owners(*blocks_[-1])[0]    # deepest block decides (same group)
                t = time.perf_counter()
                got = clients[owner].fetch("paper160m", "v1", blocks_, m)
                dt = time.perf_counter() - t
                assert len(got) == len(set(blocks_))
                return dt

            levels = [l for l, r in enumerate(ranks, 1) if r > 0]
            chosen = {l: rng.sample(range(k ** l), min(args.cold, k ** l)) for l in levels}
            lat: dict = {}
            for l in levels:
                cold = [fetch([(l, n)]) for n in chosen[l]]
                warm = [fetch([(l, rng.choice(chosen[l]))]) for _ in range(args.warm)]
                lat[f"level{l}"] = {"block_mb": m.block_nbytes(l) / 1e6,
                                    "cold": summary(cold, m.block_nbytes(l)),
                                    "warm": summary(warm, m.block_nbytes(l))}
                print(f"level {l}: {json.dumps(lat[f'level{l}'])}", flush=True)
            # whole paths in one RPC, leaves not fetched above: their level-3 (and mostly level-2)
            # blocks are cold; level 1 was touched by the per-level pass
            depth = max(levels)
            fresh = [n for n in range(k ** depth) if n not in set(chosen[depth])]
            leaves = rng.sample(fresh, min(args.paths, len(fresh)))
            path_blocks = [m.path_blocks([(leaf // k ** (depth - i)) % k
                                          for i in range(1, depth + 1)]) for leaf in leaves]
            nbytes = sum(m.block_nbytes(l) for l, _ in path_blocks[0])
            cold_paths = [fetch(pb) for pb in path_blocks]
            warm_paths = [fetch(rng.choice(path_blocks)) for _ in range(args.paths * 4)]
            lat["path"] = {"blocks": len(path_blocks[0]), "mb": nbytes / 1e6,
                           "cold": summary(cold_paths, nbytes), "warm": summary(warm_paths, nbytes)}
            print(f"path: {json.dumps(lat['path'])}", flush=True)
            report["fetch"] = lat
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report["dir"] = str(work)

    b = report["build"]
    print(f"\nbank: {b['blocks']} blocks, {b['parameters'] / 1e9:.2f}B params, "
          f"{b['bytes'] / 1e9:.2f} GB; built in {b['seconds']} s ({b['gbps']} GB/s, generating "
          f"{b['generate_seconds']} s); disk {b['disk_total_bytes'] / 1e9:.2f} GB "
          f"({', '.join(f'{s} {v / 1e9:.2f}' for s, v in b['disk_bytes'].items())})")
    print(f"{'fetch':>8} {'MB':>6} {'cold p50':>9} {'cold p99':>9} {'warm p50':>9} "
          f"{'warm p99':>9}  (ms; n cold / warm)")
    for name, r in report["fetch"].items():
        mb = r.get("block_mb", r.get("mb"))
        print(f"{name:>8} {mb:6.1f} {r['cold']['p50_ms']:9.1f} {r['cold']['p99_ms']:9.1f} "
              f"{r['warm']['p50_ms']:9.1f} {r['warm']['p99_ms']:9.1f}  "
              f"({r['cold']['n']} / {r['warm']['n']})")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
