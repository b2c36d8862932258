"""Load on a local cluster of 1, 2 and 4 shards, and a soak at a steady rate.

    .venv/bin/python -m benchmarks.cluster_load                       # 1, 2, 4 shards, 30 s each
    .venv/bin/python -m benchmarks.cluster_load --shards 1,2 --duration 10 --redis
    .venv/bin/python -m benchmarks.cluster_load --shards 1,2 --transports grpc,dataplane
    .venv/bin/python -m benchmarks.cluster_load --soak 600 --rate 50 --shards 2 --redis \\
        --plot results/soak.png

Each run starts a local cluster (services/bank_server/cluster.py: shard-aware ingest, one bank
server subprocess per shard, optionally a redis-server tier) over a synthetic bank (k=4,
depth 3, ranks 32/16/8, d 256, 4 layers, float32: blocks of 384 / 192 / 96 KiB; placement by
the level-2 ancestor, so 16 placement groups spread over the shards), then drives it with the
threaded load loop (loadtests/load_loop.py: `--threads` devices, Zipf s=1.1 over the 64 leaves,
each prompt fetching its path's missing blocks, one FetchBlocks per shard holding them, every
block verified against the manifest). A warm-up of `--warmup` s is not counted.

Reported per shard count: prompts/s, FetchBlocks/s, block bytes/s, client latency p50/p95/p99
per RPC (named by the levels it fetched), the servers' own per-level p50/p99 (admin /v1/stats),
server CPU (cores: utime+stime of the shard processes over the run), the load generator's CPU,
tier hit ratios (lmdb: found; redis: hits / (hits + misses); device cache), errors. Ratios are
against the first shard count. The soak reports errors and every shard's RSS at start and end.

Client and servers share this machine's cores: on 2 cores more shards cannot add throughput
(the run is CPU bound; more processes only add context switches). Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from loadtests.load_loop import LoadLoop
from services.bank_server.cluster import run_local_cluster
from testkit.exports import synthetic_export
from testkit.stats import percentile

REPO = Path(__file__).resolve().parents[1]

_TICK = os.sysconf("SC_CLK_TCK")


def load_export(out: Path) -> Path:
    """k=4, ranks (32, 16, 8), d 256, 4 layers, float32, placed by level 2 (kept between runs)."""
    synthetic_export(out, bank="load", version="l1", d_model=256, mem_layers=[0, 1, 2, 3],
                     branching=4, ranks=[32, 16, 8], placement_level=2, reuse=True)
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK        # utime + stime


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tier_totals(stats: dict) -> dict:
    """Summed tier counters and per-level server latency over every shard's /v1/stats."""
    tiers: dict[str, dict] = {}
    levels: dict[str, dict] = {}
    for s in stats.values():
        for name, t in s["tiers"].items():
            agg = tiers.setdefault(name, {"hits": 0, "misses": 0, "reads": 0})
            for k in agg:
                agg[k] += t.get(k, 0) or 0
        for level, v in s["fetch_by_level"].items():
            levels.setdefault(level, []).append(v)
    return {"tiers": tiers, "levels": levels}


def hit_ratios(before: dict, after: dict) -> dict:
    out = {}
    for name, a in after["tiers"].items():
        b = before["tiers"].get(name, {"hits": 0, "misses": 0, "reads": 0})
        hits, misses = a["hits"] - b["hits"], a["misses"] - b["misses"]
        out[name] = round(hits / (hits + misses), 3) if hits + misses else None
    return out


def server_levels(after: dict) -> dict:
    """Per level, the median over shards of each shard's recent p50/p99 (ms)."""
    out = {}
    for level, per_shard in sorted(after["levels"].items()):
        p50 = sorted(v["p50_ms"] for v in per_shard)
        p99 = sorted(v["p99_ms"] for v in per_shard)
        out[f"L{level}"] = {"p50": round(p50[len(p50) // 2], 3),
                            "p99": round(p99[len(p99) // 2], 3)}
    return out


def one_run(export: Path, workdir: Path, shards: int, args, transport: str = "grpc") -> dict:
    """One measured run; `transport` "dataplane" starts every shard with a data plane port and
    gives the devices "host:G+D" targets (block bodies over raw TCP), "grpc" plain targets."""
    server_args = ["--max-workers", str(args.max_workers)]
    with run_local_cluster(export, shards=shards, replication=min(args.replication, shards),
                           redis=args.redis, workdir=workdir, server_args=server_args,
                           placement_level=2, dataplane=transport == "dataplane") as cluster:
        pids = {n: s.proc.pid for n, s in cluster.shards.items()}
        with LoadLoop(cluster.targets, cluster.bank, threads=args.threads,
                      cache_blocks=args.device_cache, rate=args.rate, seed=args.seed) as load:
            load.wait_prompts(1, 60)
            time.sleep(args.warmup)
            n0, b0, r0 = load.report.prompts, load.report.bytes, load.report.rpcs
            lat0 = {k: len(v) for k, v in load.report.rpc_ms.items()}
            c0 = {n: cpu_seconds(p) for n, p in pids.items()}
            me0 = sum(os.times()[:2])
            s0 = tier_totals(cluster.stats())
            t0 = time.monotonic()
            for _ in tqdm(range(int(args.duration)), desc=f"{shards} shard(s), {transport}",
                          unit="s", leave=False):
                time.sleep(1)
            el = time.monotonic() - t0
            n1, b1, r1 = load.report.prompts, load.report.bytes, load.report.rpcs
            c1 = {n: cpu_seconds(p) for n, p in pids.items()}
            me1 = sum(os.times()[:2])
            s1 = tier_totals(cluster.stats())
            lat = {k: sorted(v[lat0.get(k, 0):]) for k, v in load.report.rpc_ms.items()}
        report = load.report
    return {
        "shards": shards, "transport": transport, "seconds": round(el, 1),
        "prompts_per_s": round((n1 - n0) / el, 1), "rpcs_per_s": round((r1 - r0) / el, 1),
        "mb_per_s": round((b1 - b0) / el / 1e6, 1),
        "rpc_ms": {k: {"n": len(v), **{name: round(percentile(v, q), 2)
                                       for name, q in (("p50", .5), ("p95", .95), ("p99", .99))}}
                   for k, v in sorted(lat.items()) if v},
        "server_ms": server_levels(s1),
        "server_cpu_cores": round(sum(c1[n] - c0[n] for n in pids) / el, 2),
        "client_cpu_cores": round((me1 - me0) / el, 2),
        "hit_ratio": {**hit_ratios(s0, s1),
                      "device": (report.summary()["device_hit_ratio"]
                                 if args.device_cache else None)},
        "errors": len(report.errors), "failed_rpcs": report.failed_rpcs,
    }


def soak(export: Path, workdir: Path, args) -> dict:
    shards = int(args.shards.split(",")[0])
    with run_local_cluster(export, shards=shards, replication=min(args.replication, shards),
                           redis=args.redis, workdir=workdir, placement_level=2) as cluster:
        pids = {n: s.proc.pid for n, s in cluster.shards.items()}
        with LoadLoop(cluster.targets, cluster.bank, threads=args.threads,
                      cache_blocks=args.device_cache, rate=args.rate, seed=args.seed) as load:
            load.wait_prompts(1, 60)
            time.sleep(args.warmup)
            rss0 = {n: round(rss_mb(p), 1) for n, p in pids.items()}
            n0 = load.report.prompts
            t0 = time.monotonic()
            samples = []      # every 10 s: {"t": s, "rss": {shard: MB}, "cpu": {shard: cores}}
            c_prev, t_prev = {n: cpu_seconds(p) for n, p in pids.items()}, t0
            errs_prev = 0
            bar = tqdm(total=int(args.soak), desc=f"soak {shards} shard(s) @ {args.rate}/s",
                       unit="s")
            while time.monotonic() - t0 < args.soak:
                time.sleep(min(10, args.soak - (time.monotonic() - t0)))
                now, c_now = time.monotonic(), {n: cpu_seconds(p) for n, p in pids.items()}
                samples.append({
                    "t": round(now - t0, 1),
                    "rss": {n: round(rss_mb(p), 1) for n, p in pids.items()},
                    "cpu": {n: round((c_now[n] - c_prev[n]) / max(now - t_prev, 1e-9), 3)
                            for n in pids},
                    "prompts": load.report.prompts - n0,
                    "new_errors": len(load.report.errors) - errs_prev})
                c_prev, t_prev, errs_prev = c_now, now, len(load.report.errors)
                bar.n = int(now - t0)
                bar.set_postfix(errors=len(load.report.errors),
                                rss=",".join(f"{v:.0f}" for v in samples[-1]["rss"].values()))
            bar.close()
            el = time.monotonic() - t0
            rss1 = {n: round(rss_mb(p), 1) for n, p in pids.items()}
            n1 = load.report.prompts
        report = load.report
    return {"soak_s": round(el), "shards": shards, "rate_target": args.rate,
            "prompts_per_s": round((n1 - n0) / el, 1), "errors": len(report.errors),
            "failed_rpcs": report.failed_rpcs, "rss_mb_start": rss0, "rss_mb_end": rss1,
            "rss_mb_max": {n: max(s["rss"][n] for s in samples) for n in pids} if samples else rss1,
            "server_cpu_cores_mean": {n: round(sum(s["cpu"][n] for s in samples)
                                               / max(len(samples), 1), 3) for n in pids},
            "first_errors": report.errors[:5], "samples": samples}


def plot_soak(out: dict, path: Path) -> None:
    """RSS and CPU of every shard over the soak (one line per shard), errors marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [s["t"] for s in out["samples"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for n in out["rss_mb_start"]:
        ax1.plot(t, [s["rss"][n] for s in out["samples"]], label=n)
        ax2.plot(t, [s["cpu"][n] for s in out["samples"]], label=n)
    for s in out["samples"]:
        if s["new_errors"]:
            ax1.axvline(s["t"], color="red", alpha=.4)
    ax1.set_ylabel("server RSS (MB)")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("server CPU (cores)")
    ax2.set_xlabel("seconds into the soak")
    ax1.set_title(f"soak: {out['shards']} shards at {out['rate_target']} prompts/s, "
                  f"{out['errors']} errors")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="1,2,4", help="comma-separated shard counts")
    p.add_argument("--replication", type=int, default=1)
    p.add_argument("--duration", type=float, default=30, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--threads", type=int, default=8, help="devices (load loop threads)")
    p.add_argument("--device-cache", type=int, default=0, help="blocks per device (0: none)")
    p.add_argument("--rate", type=float, help="prompts/s in all (default: closed loop)")
    p.add_argument("--redis", action="store_true", help="a redis-server tier for the shards")
    p.add_argument("--max-workers", type=int, default=4, help="server store threads")
    p.add_argument("--soak", type=float, help="soak for this many seconds instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep LMDBs and logs here (default: temp)")
    p.add_argument("--plot", type=Path, help="soak: write RSS/CPU over time to this PNG")
    p.add_argument("--transports", default="grpc",
                   help="comma-separated: grpc (FetchBlocks) and/or dataplane (raw-TCP bodies); "
                        "each shard count runs once per transport, ratios against the first")
    args = p.parse_args()
    if args.soak and not args.rate:
        p.error("--soak needs --rate (a steady rate, prompts/s)")

    with tempfile.TemporaryDirectory(prefix="membank-cluster-load-") as tmp:
        work = args.workdir or Path(tmp)
        export = load_export(Path(tmp) / "export")
        if args.soak:
            out = soak(export, work, args)
            print(f"soak {out['soak_s']} s, {out['shards']} shard(s), {out['prompts_per_s']} "
                  f"prompts/s (target {out['rate_target']}): {out['errors']} errors, "
                  f"{out['failed_rpcs']} failed RPCs; RSS MB start {out['rss_mb_start']} "
                  f"end {out['rss_mb_end']} max {out['rss_mb_max']}; server CPU cores (mean) "
                  f"{out['server_cpu_cores_mean']}")
            if args.plot:
                plot_soak(out, args.plot)
                print(f"plot: {args.plot}")
            out["samples_n"] = len(out.pop("samples"))
            print(json.dumps({"benchmark": "cluster_load.soak", **out}))
            return
        runs = [one_run(export, work, int(n), args, t) for n in args.shards.split(",")
                for t in args.transports.split(",")]

    base = runs[0]
    print(f"\n{'shards':>6} {'transport':>9} {'prompts/s':>10} {'RPC/s':>8} {'MB/s':>7} "
          f"{'x base':>7} "
          f"{'srv cores':>9} {'cli cores':>9} {'errors':>6}  hit ratios")
    for r in runs:
        r["ratio_vs_base"] = round(r["prompts_per_s"] / max(base["prompts_per_s"], 1e-9), 2)
        print(f"{r['shards']:>6} {r['transport']:>9} {r['prompts_per_s']:>10} "
              f"{r['rpcs_per_s']:>8} {r['mb_per_s']:>7} "
              f"{r['ratio_vs_base']:>7} {r['server_cpu_cores']:>9} {r['client_cpu_cores']:>9} "
              f"{r['errors']:>6}  {r['hit_ratio']}")
    print("\nclient RPC latency ms (p50 / p95 / p99) by levels fetched; server per level p50 / p99")
    for r in runs:
        rpc = "  ".join(f"{k} {v['p50']}/{v['p95']}/{v['p99']}" for k, v in r["rpc_ms"].items())
        srv = "  ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in r["server_ms"].items())
        print(f"{r['shards']:>6} {r['transport']:>9}  client: {rpc}\n{'':>16}  server: {srv}")
    print(json.dumps({"benchmark": "cluster_load", "threads": args.threads,
                      "duration_s": args.duration, "redis": args.redis,
                      "replication": args.replication, "runs": runs}))


if __name__ == "__main__":
    main()
