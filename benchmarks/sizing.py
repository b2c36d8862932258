"""Resource requests for deploy/ (Kubernetes) and docker-compose, from measurements.

    .venv/bin/python -m benchmarks.sizing                      # about 1.5 minutes
    .venv/bin/python -m benchmarks.sizing --target-rps 50 --duration 30

Measures, on this machine, the three processes an operator sizes:
- **ingest**: peak RSS (the kernel's high-water mark, `wait4` rusage) and CPU seconds of
  `services.bank_server.ingest` over two synthetic exports, 1x and 16x the size, to show whether
  memory grows with the bank (it should not: ingest streams in `--batch-mb` transactions);
- **bank server**: one shard under a closed-loop load (loadtests/load_loop.py, Zipf paths, no
  device cache): server CPU seconds per prompt and per MB served, and its peak RSS (VmHWM);
- **Redis**: `used_memory_rss` against `maxmemory` once the LRU is full of block-sized values
  (allocator overhead, which the container's memory limit must cover).

Then prints the requests/limits that follow for `--target-rps` prompts/s per shard (the
formulas are below, in `recommend`), and ends with one JSON line. deploy/README.md ("Sizing")
quotes a run of it. Not covered here: the page cache for the LMDB working set, which the
kernel charges to the pod's memory cgroup but reclaims under pressure (size the node, not
the limit, for it: see deploy/README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks.cluster_load import cpu_seconds
from loadtests.load_loop import LoadLoop
from services.bank_server.cluster import LocalRedis, run_local_cluster
from testkit.exports import synthetic_export

REPO = Path(__file__).resolve().parents[1]


def sized_export(out: Path, scale: int) -> int:
    """k=4, depth 3, d 256, 4 layers, float32; ranks (32, 16, 8) x scale. Returns its bytes."""
    m = synthetic_export(out, bank="sizing", version=f"x{scale}", d_model=256,
                         mem_layers=[0, 1, 2, 3], branching=4,
                         ranks=[32 * scale, 16 * scale, 8 * scale], seed=scale, placement_level=2)
    return sum(m.block_nbytes(l) for l, _ in m.blocks())


def rss_split_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MB of a live process. They are sized differently: the
    anonymous part is the process's own memory; the file part is mapped page cache (the export's
    and the LMDB's pages), which the kernel reclaims under pressure."""
    anon = file = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) / 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return anon, file


def measure_ingest(export: Path, lmdb: Path) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "services.bank_server.ingest", str(export),
                             "--lmdb", str(lmdb), "--no-progress", "--map-size-gb", "4"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon = file = 0.0
    while True:                    # sample the split while it runs; wait4 gives the CPU time
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        a, f = rss_split_mb(proc.pid)
        anon, file = max(anon, a), max(file, f)
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"ingest failed: {proc.stderr.read().decode()[-500:]}")
    return {"seconds": round(time.monotonic() - t0, 2),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),   # ru_maxrss is in KiB on Linux
            "peak_anon_mb": round(anon, 1), "peak_file_mb": round(file, 1)}


def measure_server(export: Path, work: Path, duration: float, threads: int) -> dict:
    with run_local_cluster(export, shards=1, workdir=work) as cluster:
        pid = next(iter(cluster.shards.values())).proc.pid
        with LoadLoop(cluster.targets, cluster.bank, threads=threads) as load:
            load.wait_prompts(1, 60)
            time.sleep(2)                           # warm-up, not counted
            n0, b0, c0, t0 = (load.report.prompts, load.report.bytes, cpu_seconds(pid),
                              time.monotonic())
            anon = file = 0.0
            for _ in tqdm(range(int(duration)), desc="server under load", unit="s", leave=False):
                time.sleep(1)
                a, f = rss_split_mb(pid)
                anon, file = max(anon, a), max(file, f)
            n1, b1, c1, el = (load.report.prompts, load.report.bytes, cpu_seconds(pid),
                              time.monotonic() - t0)
            errors = len(load.report.errors)
    prompts, mb, cpu = n1 - n0, (b1 - b0) / 1e6, c1 - c0
    return {"seconds": round(el, 1), "prompts_per_s": round(prompts / el, 1),
            "mb_per_prompt": round(mb / max(prompts, 1), 3),
            "cpu_ms_per_prompt": round(1e3 * cpu / max(prompts, 1), 2),
            "cpu_ms_per_mb": round(1e3 * cpu / max(mb, 1e-9), 2),
            "peak_anon_mb": round(anon, 1), "peak_file_mb": round(file, 1), "errors": errors}


def measure_redis(work: Path, maxmemory_mb: int, value_kib: int) -> dict:
    import redis
    rds = LocalRedis(work / "redis", maxmemory_mb=maxmemory_mb)
    rds.start()
    try:
        r = redis.Redis(host="127.0.0.1", port=rds.port)
        value = os.urandom(value_kib << 10)
        n = 3 * (maxmemory_mb << 10) // value_kib      # three times what fits: the LRU is full
        for i in tqdm(range(n), desc="redis fill", leave=False):
            r.set(f"block:{i}", value)
        info = r.info("memory")
        stats = r.info("stats")
        r.close()
    finally:
        rds.stop()
    return {"maxmemory_mb": maxmemory_mb, "value_kib": value_kib,
            "used_memory_mb": round(info["used_memory"] / 2**20, 1),
            "used_memory_rss_mb": round(info["used_memory_rss"] / 2**20, 1),
            "rss_over_maxmemory": round(info["used_memory_rss"] / (maxmemory_mb << 20), 3),
            "evicted_keys": stats["evicted_keys"]}


def _cpu_m(cores: float) -> str:
    # round up to 50 millicores (after rounding away float noise: 0.3 cores is 300m, not 350m)
    return f"{max(50, 50 * math.ceil(round(cores * 1000 / 50, 6)))}m"


def _mi(mb: float) -> str:
    return f"{max(64, 64 * math.ceil(round(mb / 64, 6)))}Mi"      # round up to 64 MiB


def recommend(ingest: list[dict], server: dict, rds: dict, target_rps: float,
              lru_mb: float, redis_maxmemory_mb: int, max_block_mb: float,
              max_workers: int = 4) -> dict:
    """Requests cover the measured steady state with headroom; memory limits cover the peak.

    - server CPU request: cpu per prompt x target prompts/s x 1.5 (bursts, GC, TLS); no CPU
      limit (throttling a latency-bound server hurts p99 more than it protects neighbours);
    - server memory: request = peak anonymous RSS + the in-process LRU budget + the blocks in
      flight (a block's encoded chunks are held while they are sent: 2 x block size for each
      of `max_workers` concurrent reads), x 1.25; limit =
      2x that (gRPC buffers under many concurrent streams grow past the steady state); the
      LMDB's mapped pages are page cache, not counted here (deploy/README.md, "Sizing");
    - Redis: limit = maxmemory x measured RSS overhead x 1.2; request = limit (Redis must not
      be the pod the kubelet evicts first under memory pressure);
    - ingest: request = its peak anonymous RSS x 1.5; limit = 2x that; CPU request 500m (it is
      bounded by the disk's fsync, not the CPU).
    """
    srv_cores = server["cpu_ms_per_prompt"] / 1e3 * target_rps * 1.5
    srv_mem = (server["peak_anon_mb"] + lru_mb + 2 * max_workers * max_block_mb) * 1.25
    ing_mem = max(i["peak_anon_mb"] for i in ingest) * 1.5
    redis_mem = redis_maxmemory_mb * rds["rss_over_maxmemory"] * 1.2
    return {
        "target_prompts_per_s_per_shard": target_rps, "max_block_mb": max_block_mb,
        "server": {"requests": {"cpu": _cpu_m(srv_cores), "memory": _mi(srv_mem)},
                   "limits": {"memory": _mi(2 * srv_mem)}},
        "redis": {"maxmemory_mb": redis_maxmemory_mb,
                  "requests": {"cpu": "100m", "memory": _mi(redis_mem)},
                  "limits": {"memory": _mi(redis_mem)}},
        "ingest": {"requests": {"cpu": "500m", "memory": _mi(ing_mem)},
                   "limits": {"memory": _mi(2 * ing_mem)}},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target-rps", type=float, default=50, help="prompts/s per shard to size for")
    p.add_argument("--duration", type=float, default=30, help="seconds of server load")
    p.add_argument("--threads", type=int, default=4, help="load loop threads")
    p.add_argument("--lru-mb", type=float, default=0, help="the shard's in-process LRU budget")
    p.add_argument("--redis-maxmemory-mb", type=int, default=200, help="deploy/base/redis.yaml's")
    p.add_argument("--scales", default="1,16", help="export sizes for the ingest measurement")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="membank-sizing-") as tmp:
        tmp = Path(tmp)
        ingest = []
        for scale in [int(s) for s in args.scales.split(",")]:
            nbytes = sized_export(tmp / f"export-x{scale}", scale)
            r = measure_ingest(tmp / f"export-x{scale}", tmp / f"lmdb-x{scale}")
            ingest.append({"export_mb": round(nbytes / 1e6, 1), **r})
            print(f"ingest {nbytes / 1e6:7.1f} MB: {r['seconds']} s, {r['cpu_s']} CPU s, "
                  f"peak RSS {r['peak_rss_mb']} MB (anonymous {r['peak_anon_mb']}, "
                  f"file-backed {r['peak_file_mb']})")
        server = measure_server(tmp / "export-x1", tmp / "cluster", args.duration, args.threads)
        print(f"server: {server['prompts_per_s']} prompts/s closed loop, "
              f"{server['mb_per_prompt']} MB/prompt, {server['cpu_ms_per_prompt']} CPU ms/prompt, "
              f"{server['cpu_ms_per_mb']} CPU ms/MB, "
              f"peak RSS anonymous {server['peak_anon_mb']} MB, "
              f"file-backed {server['peak_file_mb']} MB, "
              f"{server['errors']} errors")
        rds = measure_redis(tmp, 64, 384)
        print(f"redis: maxmemory {rds['maxmemory_mb']} MB full of {rds['value_kib']} KiB values: "
              f"used {rds['used_memory_mb']} MB, RSS {rds['used_memory_rss_mb']} MB "
              f"({rds['rss_over_maxmemory']}x maxmemory), {rds['evicted_keys']} evicted")
    # the measured bank's largest block (level 1: 32 rows x 3 x 256 x 4 layers x 4 bytes), and
    # the paper's 160M level-1 block in bf16 (27.5 MB), whose in-flight copies dominate there
    recs = {"demo": recommend(ingest, server, rds, args.target_rps, args.lru_mb,
                              args.redis_maxmemory_mb, max_block_mb=0.393),
            "paper-160m": recommend(ingest, server, rds, args.target_rps, args.lru_mb,
                                    args.redis_maxmemory_mb, max_block_mb=27.5)}
    for label, rec in recs.items():
        print(f"\n{label} blocks (largest {rec['max_block_mb']} MB), "
              f"{args.target_rps} prompts/s per shard:")
        for name in ("server", "redis", "ingest"):
            print(f"  {name:7s} requests {rec[name]['requests']}  limits {rec[name]['limits']}")
    print(json.dumps({"benchmark": "sizing", "ingest": ingest, "server": server, "redis": rds,
                      "recommended": recs}))


if __name__ == "__main__":
    main()
