"""A fleet of simulated devices, each on its own emulated link, fetching memory from one bank
(issue 18): fetch-side time to first token per link class, the share of prompts whose whole
path arrives within the TTFT budget, bytes per prompt and bank egress, and what prefetch, an
edge cache and delta publishing change.

    .venv/bin/python -m benchmarks.fleet [--devices 1000] [--prompts 3] [--budget-ms 400]
                                         [--concurrency 48] [--out runs/fleet]

The bank: synthetic and signed (branching 8, depth 3, 512 leaves; a path is 3 blocks, 172 KB),
one bank server (data plane and admin HTTP), stored by content. Each device has its own device
cache (`--device-cache-mb`) and its own link: a user-space relay (testkit.net.Relay) with the
class's one-way delay and rate on every connection it opens, so devices never share a link.
Classes, assigned round robin:

  fast   20 ms RTT, 100 Mbit/s
  mid    80 ms RTT,  20 Mbit/s
  slow  150 ms RTT,   5 Mbit/s, and 2% of reply chunks held 300 ms (standing in for loss and
        its retransmissions: netem, which would drop packets, does not run in this kernel)

Every device answers `--prompts` prompts whose paths come from one Zipf popularity over the
leaves (s = 1.1): CachedBank.fetch_path with the TTFT budget as deadline (the levels verified
in time are attached, the rest keep coming for its next prompt), then attach into its own
buffers. No model runs in the fleet: the model's compute (prefill of a demo-shaped anchor with a
path attached) is measured once on its own and reported beside. Runs, each on fresh devices:

  direct     devices fetch over the data plane
  prefetch   each prompt is prefetched while "typed" (`--typing-s` before it is sent) from a
             predicted path: level 1 always the final one, the deeper levels right with the
             probability the prefetch benchmark measured at half the prompt (`--predict-p`)
  edge       devices fetch blocks from a local nginx in front of the bank (EdgeBank)
  publish    the direct run's devices, caches kept, after v2 is published (one level-1 subtree
             retrained: 1/8 of the blocks changed), against the same devices with their caches
             emptied (what a cache keyed by version meets after any publish)

Per run and class: fetch-side TTFT p50 / p99 (ms), the share of prompts with the whole path in
the budget, bytes per prompt (what the device's links carried from the bank or cache), and bank
egress (block bytes its /metrics reports). Ends with the table, a PNG (--out/fleet.png) and one
JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testkit.stats import percentile

REPO = Path(__file__).resolve().parents[1]
BANK, K, RANKS = "fleet", 8, [32, 16, 8]
DEPTH = len(RANKS)


@dataclass(frozen=True)
class LinkClass:
    name: str
    rtt_ms: float
    rate_mbit: float
    stall_p: float = 0.0
    stall_s: float = 0.0


CLASSES = [LinkClass("fast 20ms/100Mbit", 20, 100), LinkClass("mid 80ms/20Mbit", 80, 20),
           LinkClass("slow 150ms/5Mbit+loss", 150, 5, 0.02, 0.3)]


def bank_bytes_sent(admin: str) -> int:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=30).read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("membank_block_bytes_sent_total{"))


def leaf_path(leaf: int) -> list[int]:
    return [leaf // K ** (DEPTH - 1 - lv) % K for lv in range(DEPTH)]


def traces(devices: int, prompts: int, predict_p: float, seed: int = 0, s: float = 1.1):
    """Per device, `prompts` (final path, predicted path) pairs."""
    leaves = K ** DEPTH
    rng = np.random.default_rng(seed)
    rank_of = np.random.default_rng(1).permutation(leaves)
    w = 1.0 / np.arange(1, leaves + 1) ** s
    out = []
    for _ in range(devices):
        rows = []
        for leaf in rank_of[rng.choice(leaves, size=prompts, p=w / w.sum())]:
            final = leaf_path(int(leaf))
            guess = list(final)
            if rng.random() >= predict_p:      # a wrong guess below level 1
                guess[1:] = [int(x) for x in rng.integers(0, K, size=DEPTH - 1)]
            rows.append((final, guess))
        out.append(rows)
    return out


class Device:
    """One simulated device: its link (relays), its bank client, cache and attached levels."""

    def __init__(self, cls: LinkClass, grpc: str, dataplane_port: int | None, edge: str | None,
                 cache_mb: float):
        from services.model_client.bank_client import BankClient
        from services.model_client.cached_bank import CachedBank
        from services.model_client.dataplane_client import DataPlaneClient
        from services.model_client.device_cache import DeviceCache
        from services.model_client.edge import EdgeBank
        from testkit.keys import trust
        from testkit.net import Relay

        def link(addr: str) -> Relay:
            return Relay(addr, delay_s=cls.rtt_ms / 2e3, rate_mbit=cls.rate_mbit,
                         stall_p=cls.stall_p, stall_s=cls.stall_s)
        self.cls = cls
        self.relays = [link(grpc)]
        if edge is not None:
            self.relays.append(link(edge.removeprefix("http://")))
            bank = EdgeBank(BankClient(self.relays[0].address, timeout_s=60),
                            f"http://{self.relays[1].address}", timeout_s=60)
        else:
            self.relays.append(link(f"127.0.0.1:{dataplane_port}"))
            bank = DataPlaneClient(f"{self.relays[0].address}+{self.relays[1].port}",
                                   timeout_s=60)
        self.view = CachedBank(bank, BANK, cache=DeviceCache(int(cache_mb * (1 << 20))),
                               manifest_ttl_s=3600, trust=trust())
        self.attached: dict = {}
        self.room: dict[int, bytearray] = {}
        self.view.manifest()                  # a device knows its bank before the prompts

    def bytes_down(self) -> int:
        return sum(r.bytes_down for r in self.relays)

    def prompt(self, path: list[int], budget_s: float, guess: list[int] | None = None,
               typing_s: float = 0.0) -> dict:
        """One prompt: with `guess`, its prefetch starts `typing_s` before it is sent. Bytes:
        what the links carried from the prefetch's start (or the prompt's) to its answer."""
        before = self.bytes_down()
        if guess is not None:
            self.view.prefetch(guess, self.attached)
            time.sleep(typing_s)
        t0 = time.monotonic()
        got = self.view.fetch_path(path, self.attached, deadline=t0 + budget_s)
        for (lv, n), buf in got.blocks.items():            # attach into its own buffers
            self.room[lv] = bytearray(buf)
            self.attached[lv] = (got.manifest.bank,
                                 got.manifest.content_id(lv, n, got.encoding))
        return {"class": self.cls.name, "ttft_ms": (time.monotonic() - t0) * 1e3,
                "full": not got.pending, "bytes": self.bytes_down() - before}

    def idle(self, timeout_s: float = 30.0) -> None:
        """Wait for the background fetches a deadline left (they belong to this device)."""
        end = time.monotonic() + timeout_s
        while self.view.inflight._running and time.monotonic() < end:
            time.sleep(0.01)

    def close(self) -> None:
        self.view.close()
        for r in self.relays:
            r.close()


def run(name: str, devices_traces, *, grpc: str, dp_port: int, edge: str | None, admin: str,
        budget_s: float, cache_mb: float, concurrency: int, typing_s: float = 0.0,
        keep: dict | None = None, reuse: dict | None = None, clear: bool = False) -> dict:
    """Every device's trace; `keep`: store the devices (for the publish run), `reuse`: run
    those devices again (`clear`: with their caches emptied first)."""
    from services.model_client.device_cache import DeviceCache
    rows: list[dict] = []
    lock = threading.Lock()
    egress0 = bank_bytes_sent(admin)

    def one(i: int) -> None:
        cls = CLASSES[i % len(CLASSES)]
        if reuse is not None:
            dev = reuse[i]
            if clear:
                dev.view.cache = dev.view.inflight.cache = DeviceCache(
                    dev.view.cache.budget_bytes)
                dev.attached = {}
        else:
            dev = Device(cls, grpc, dp_port, edge, cache_mb)
        out = []
        for final, guess in devices_traces[i]:
            out.append(dev.prompt(final, budget_s, guess if typing_s else None, typing_s))
        before = dev.bytes_down()
        dev.idle()               # what a deadline left behind still arrives: the last prompt's
        out[-1]["bytes"] += dev.bytes_down() - before
        if keep is not None:
            keep[i] = dev
        elif reuse is None:          # reused devices are closed by their owner
            dev.close()
        with lock:
            rows.extend(out)

    from tqdm import tqdm
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool, \
            tqdm(total=len(devices_traces), desc=name, unit="device") as bar:
        for _ in pool.map(one, range(len(devices_traces))):
            bar.update()
    return summarise(name, rows, bank_bytes_sent(admin) - egress0, time.perf_counter() - t0)


def summarise(name: str, rows: list[dict], egress: int, seconds: float) -> dict:
    out = {"run": name, "prompts": len(rows), "bank_egress_bytes": egress,
           "seconds": round(seconds, 1), "classes": {}}
    for cls in CLASSES:
        mine = [r for r in rows if r["class"] == cls.name]
        t = [r["ttft_ms"] for r in mine]
        out["classes"][cls.name] = {
            "prompts": len(mine), "ttft_p50_ms": round(percentile(t, 0.5), 1),
            "ttft_p99_ms": round(percentile(t, 0.99), 1),
            "full_path_in_budget": round(sum(r["full"] for r in mine) / len(mine), 4),
            "bytes_per_prompt": int(np.mean([r["bytes"] for r in mine]))}
    return out


def model_compute_ms(work: Path, threads: int) -> dict:
    """Prefill of a demo-shaped anchor (random weights) with a whole path attached, and
    anchor-only, one new token: the model's share of the TTFT, measured apart from the fleet."""
    import torch

    from benchmarks.prompt import PROMPTS, build_demo_export
    from services.model_client.memory_model import MemoryModel
    from testkit.keys import trust
    torch.set_num_threads(threads)
    model = MemoryModel.from_pretrained(build_demo_export(work / "model" / "export", "demo"),
                                        trust=trust())
    model.warmup()
    with_mem, alone = [], []
    for _ in range(3):
        for p in PROMPTS:
            for mem, into in ((model.mem, with_mem), (None, alone)):
                t: dict = {}
                list(model.decode_tokens(model.encode_prompt(p), mem, _one_token(), t))
                into.append(t["prefill"])
    return {"prefill_with_path_ms": round(percentile(with_mem, 0.5), 2),
            "prefill_anchor_only_ms": round(percentile(alone, 0.5), 2)}


def _one_token():
    from services.model_client.sampling import SamplingParams
    return SamplingParams(max_tokens=1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per device")
    ap.add_argument("--budget-ms", type=float, default=400.0, help="fetch-side TTFT budget")
    ap.add_argument("--device-cache-mb", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=12,
                    help="devices active at once (more and the 2-core machine, not the links, "
                         "sets the times)")
    ap.add_argument("--typing-s", type=float, default=1.0,
                    help="prefetch run: how long before sending a prompt its prefetch starts")
    ap.add_argument("--predict-p", type=float, default=0.57,
                    help="prefetch run: share of predictions right below level 1 (the prefetch "
                         "benchmark's leaf agreement at half the prompt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "fleet")
    args = ap.parse_args(argv)

    from services.bank_server.ingest import ingest, ingest_stream
    from services.bank_server.launch import run_bank_server
    from services.bank_server.publish import publish_in_env
    from testkit.edge import run_nginx
    from testkit.exports import synthetic_export
    from testkit.keys import signing_key

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="membank-fleet-"))
    t_start = time.perf_counter()
    plan = traces(args.devices, args.prompts, args.predict_p)
    budget_s = args.budget_ms / 1e3
    report: dict = {"benchmark": "fleet", "devices": args.devices,
                    "prompts_per_device": args.prompts, "budget_ms": args.budget_ms,
                    "device_cache_mb": args.device_cache_mb, "cpus": os.cpu_count(),
                    "classes": [vars(c) for c in CLASSES], "runs": {}}
    try:
        report["model_compute"] = model_compute_ms(work, args.threads)
        m = synthetic_export(work / "export", bank=BANK, version="v1", d_model=128,
                             mem_layers=[0, 1], branching=K, ranks=RANKS, seed=0)
        db = work / "bank.lmdb"
        m = ingest(work / "export", db, progress=False, map_size=1 << 30,
                   signing_key=signing_key())
        report["path_bytes"] = sum(m.block_nbytes(lv) for lv, _ in m.path_blocks([0] * DEPTH))
        with run_bank_server(db, "--map-size-gb", "1", "--dataplane-port", "0",
                             "--warm-levels", "0", "--metrics-min-interval-s", "0",
                             "--dataplane-max-connections", "120",
                             "--dataplane-max-connections-per-peer", "120",
                             log_path=work / "server.log", cwd=REPO) as (addr, proc):
            admin = proc.admin_address
            dp_port = int(proc.dataplane_address.rsplit(":", 1)[1])
            common = dict(grpc=addr, dp_port=dp_port, admin=admin, budget_s=budget_s,
                          cache_mb=args.device_cache_mb, concurrency=args.concurrency)
            kept: dict = {}
            report["runs"]["direct"] = run("direct", plan, edge=None, keep=kept, **common)
            report["runs"]["prefetch"] = run("prefetch", plan, edge=None,
                                             typing_s=args.typing_s, **common)
            with run_nginx([admin], work) as edge:
                report["runs"]["edge"] = run("edge", plan, edge=edge.url, **common)
            # v2: subtree 0 retrained (its level-1 block and every block below it changed)
            changed = {(lv, n) for lv, n in m.blocks() if n // K ** (lv - 1) == 0}
            header = {k: v for k, v in m.model_dump().items() if k != "checksums"}
            header["version"] = "v2"
            ingest_stream({None: db}, header, (
                (lv, n, bytes(b ^ 0x5A for b in data) if (lv, n) in changed else data)
                for lv, n, data in _blocks(work / "export", m)),
                progress=False, map_size=1 << 30, signing_key=signing_key(), publish=False)
            publish_in_env(db, BANK, "v2", 1 << 30)
            for dev in kept.values():           # the manifest moved: read it now
                dev.view.manifest(refresh=True)
            report["changed_blocks"] = [len(changed), sum(1 for _ in m.blocks())]
            report["runs"]["publish"] = run("publish", plan, edge=None, reuse=kept, **common)
            report["runs"]["publish-by-version"] = run("publish-by-version", plan, edge=None,
                                                       reuse=kept, clear=True, **common)
            for dev in kept.values():
                dev.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(report)
    plot(report, args.out / "fleet.png")
    print(json.dumps(report))
    return report


def _blocks(export: Path, m):
    from membank.artifacts import iter_blocks, load_manifest
    return ((lv, n, bytes(d)) for lv, n, d in iter_blocks(export, load_manifest(export)))


def print_table(r: dict) -> None:
    mc = r["model_compute"]
    print(f"\n{r['devices']} devices x {r['prompts_per_device']} prompts, budget "
          f"{r['budget_ms']:.0f} ms, path {r['path_bytes'] / 1e3:.0f} KB; model compute apart: "
          f"prefill {mc['prefill_with_path_ms']} ms with the path, "
          f"{mc['prefill_anchor_only_ms']} ms anchor-only")
    print(f"{'run':20} {'class':22} {'p50 ms':>8} {'p99 ms':>8} {'full path':>9} "
          f"{'KB/prompt':>9} {'bank egress':>12}")
    for name, run_ in r["runs"].items():
        for i, (cls, c) in enumerate(run_["classes"].items()):
            egress = f"{run_['bank_egress_bytes'] / 1e6:9.1f} MB" if i == 0 else ""
            print(f"{name if i == 0 else '':20} {cls:22} {c['ttft_p50_ms']:>8.1f} "
                  f"{c['ttft_p99_ms']:>8.1f} {c['full_path_in_budget']:>9.1%} "
                  f"{c['bytes_per_prompt'] / 1e3:>9.1f} {egress:>12}")


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = list(r["runs"])
    classes = [c["name"] for c in r["classes"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(runs))
    width = 0.8 / len(classes)
    for j, cls in enumerate(classes):
        axes[0].bar(x + j * width, [r["runs"][n]["classes"][cls]["ttft_p50_ms"] for n in runs],
                    width, label=cls)
        axes[1].bar(x + j * width, [100 * r["runs"][n]["classes"][cls]["full_path_in_budget"]
                                    for n in runs], width, label=cls)
    axes[0].axhline(r["budget_ms"], color="k", lw=0.8, ls="--", label="budget")
    axes[0].set_ylabel("fetch-side TTFT p50 (ms)")
    axes[1].set_ylabel("% prompts with the whole path in budget")
    axes[2].bar(runs, [r["runs"][n]["bank_egress_bytes"] / 1e6 for n in runs], color="tab:gray")
    axes[2].set_ylabel("bank egress (MB)")
    for ax in axes[:2]:
        ax.set_xticks(x + width * (len(classes) - 1) / 2, runs, rotation=20)
        ax.legend(fontsize=7)
    axes[2].tick_params(axis="x", rotation=20)
    fig.suptitle(f"{r['devices']} devices, {r['prompts_per_device']} Zipf prompts each, "
                 f"budget {r['budget_ms']:.0f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
