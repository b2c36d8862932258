"""Bank egress with and without an HTTP cache in front of the bank: many devices, one nginx,
a Zipf prompt trace (issue 18).

    .venv/bin/python -m benchmarks.edge_cache [--devices 100] [--prompts 20] [--out DIR]

A synthetic signed bank (branching 8, depth 3: 512 leaves, 16.5 MB) served by one bank server.
Each simulated device has its own device cache (`--device-cache-mb`, small: a phone's share)
and answers `--prompts` prompts whose paths are drawn from one Zipf popularity over the leaves
(s = 1.1): route -> fetch the path's missing blocks -> verify -> attach into its own buffer
(CachedBank, as MemoryModel does; no model compute: memory delivery only). Devices run
`--concurrency` at a time. Two runs of the same trace:

  direct     every device fetches from the bank server (data plane)
  edge       every device fetches blocks from a local nginx (deploy/edge/nginx.conf, a real
             process) by content address, verified against its signed manifest (EdgeBank);
             nginx asks the bank on a miss

Bank egress is the block bytes the bank server reports sending (its /metrics), per run; the
target is edge <= a tenth of direct. Also: nginx hits and misses, and the fetch time per prompt.
Ends with the table, a PNG (--out/edge_cache.png) and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from testkit.stats import percentile

REPO = Path(__file__).resolve().parents[1]
BANK, K, RANKS = "edge", 8, [32, 16, 8]


def bank_bytes_sent(admin: str) -> int:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=30).read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("membank_block_bytes_sent_total{"))


def trace(devices: int, prompts: int, seed: int = 0, s: float = 1.1) -> list[list[list[int]]]:
    """Per device, `prompts` root-to-leaf paths drawn from one Zipf popularity over leaves."""
    leaves = K ** len(RANKS)
    rng = np.random.default_rng(seed)
    rank_of = np.random.default_rng(1).permutation(leaves)     # which leaf is how popular
    w = 1.0 / np.arange(1, leaves + 1) ** s
    out = []
    for _ in range(devices):
        picks = rank_of[rng.choice(leaves, size=prompts, p=w / w.sum())]
        out.append([[int(leaf) // K ** (len(RANKS) - 1 - l) % K for l in range(len(RANKS))]
                    for leaf in picks])
    return out


def run_devices(paths: list[list[list[int]]], make_bank, cache_bytes: int,
                concurrency: int) -> dict:
    """Every device's trace; returns fetch times (ms) per prompt and blocks fetched."""
    from services.model_client.cached_bank import CachedBank
    from services.model_client.device_cache import DeviceCache
    from testkit.keys import trust

    def device(device_paths: list[list[int]]) -> list[float]:
        bank = make_bank()
        view = CachedBank(bank, BANK, cache=DeviceCache(cache_bytes), manifest_ttl_s=3600,
                          trust=trust())
        attached: dict = {}
        room: dict[int, bytearray] = {}
        times = []
        try:
            for path in device_paths:
                t0 = time.perf_counter()
                got = view.fetch_path(path, attached)
                for (lv, n), buf in got.blocks.items():          # attach: into its buffer
                    room[lv] = bytearray(buf)
                    attached[lv] = (got.manifest.bank, got.manifest.content_id(lv, n,
                                                                               got.encoding))
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            view.close()
        return times

    with ThreadPoolExecutor(concurrency) as pool:
        per_device = list(pool.map(device, paths))
    times = [t for d in per_device for t in d]
    return {"prompts": len(times), "fetch_p50_ms": round(percentile(times, 0.5), 2),
            "fetch_p99_ms": round(percentile(times, 0.99), 2)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=20, help="prompts per device")
    ap.add_argument("--device-cache-mb", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "edge_cache")
    args = ap.parse_args(argv)

    from services.bank_server.ingest import ingest
    from services.bank_server.launch import run_bank_server
    from services.model_client.bank_client import BankClient
    from services.model_client.dataplane_client import DataPlaneClient, dataplane_target
    from services.model_client.edge import EdgeBank
    from testkit.edge import run_nginx
    from testkit.exports import synthetic_export
    from testkit.keys import signing_key

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="membank-edge-"))
    t_start = time.perf_counter()
    paths = trace(args.devices, args.prompts)
    cache_bytes = int(args.device_cache_mb * (1 << 20))
    report: dict = {"benchmark": "edge_cache", "devices": args.devices,
                    "prompts_per_device": args.prompts, "device_cache_mb": args.device_cache_mb,
                    "cpus": os.cpu_count(), "distinct_leaves": len({tuple(p) for d in paths
                                                                    for p in d})}
    try:
        synthetic_export(work / "export", bank=BANK, version="v1", d_model=128,
                         mem_layers=[0, 1], branching=K, ranks=RANKS, seed=0)
        m = ingest(work / "export", work / "bank.lmdb", progress=False, map_size=1 << 30,
                   signing_key=signing_key())
        report["bank_bytes"] = sum(m.block_nbytes(lv) for lv, _ in m.blocks())
        with run_bank_server(work / "bank.lmdb", "--map-size-gb", "1", "--dataplane-port", "0",
                             "--warm-levels", "0", "--metrics-min-interval-s", "0",
                             log_path=work / "server.log", cwd=REPO) as (addr, proc):
            admin, dp = proc.admin_address, dataplane_target(addr, proc.dataplane_address)
            before = bank_bytes_sent(admin)
            report["direct"] = run_devices(
                paths, lambda: DataPlaneClient(dp, timeout_s=30), cache_bytes, args.concurrency)
            report["direct"]["bank_egress_bytes"] = bank_bytes_sent(admin) - before
            with run_nginx([admin], work) as edge:
                before = bank_bytes_sent(admin)
                report["edge"] = run_devices(
                    paths, lambda: EdgeBank(BankClient(addr, timeout_s=30), edge.url),
                    cache_bytes, args.concurrency)
                report["edge"]["bank_egress_bytes"] = bank_bytes_sent(admin) - before
                log = edge.access_log()
                report["edge"]["nginx_hits"] = sum(1 for _, c, _ in log if c == "HIT")
                report["edge"]["nginx_misses"] = sum(1 for _, c, _ in log if c == "MISS")
                report["edge"]["nginx_bytes_to_devices"] = sum(n for s, _, n in log if s == 200)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["egress_ratio"] = round(report["edge"]["bank_egress_bytes"]
                                   / max(1, report["direct"]["bank_egress_bytes"]), 4)
    report["target_met"] = report["egress_ratio"] <= 0.1
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(report)
    plot(report, args.out / "edge_cache.png")
    print(json.dumps(report))
    return report


def print_table(r: dict) -> None:
    print(f"\n{r['devices']} devices x {r['prompts_per_device']} prompts (Zipf over 512 leaves, "
          f"{r['distinct_leaves']} distinct), device cache {r['device_cache_mb']} MB each; "
          f"bank {r['bank_bytes'] / 1e6:.1f} MB")
    print(f"{'run':8} {'bank egress':>12} {'fetch p50':>10} {'p99':>8}")
    for run in ("direct", "edge"):
        x = r[run]
        print(f"{run:8} {x['bank_egress_bytes'] / 1e6:>9.1f} MB {x['fetch_p50_ms']:>7.2f} ms "
              f"{x['fetch_p99_ms']:>5.1f} ms")
    e = r["edge"]
    print(f"edge / direct egress: {r['egress_ratio']:.3f} (target <= 0.1: "
          f"{'met' if r['target_met'] else 'missed'}); nginx {e['nginx_hits']} hits, "
          f"{e['nginx_misses']} misses, {e['nginx_bytes_to_devices'] / 1e6:.1f} MB to devices")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    vals = [r["direct"]["bank_egress_bytes"] / 1e6, r["edge"]["bank_egress_bytes"] / 1e6,
            r["edge"]["nginx_bytes_to_devices"] / 1e6]
    ax.bar(["bank egress,\ndirect", "bank egress,\nbehind nginx", "nginx to devices"], vals,
           color=["tab:blue", "tab:orange", "tab:gray"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.1f} MB", ha="center", va="bottom")
    ax.set_ylabel("MB")
    ax.set_title(f"{r['devices']} devices, {r['prompts_per_device']} Zipf prompts each: "
                 f"egress x{r['egress_ratio']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
