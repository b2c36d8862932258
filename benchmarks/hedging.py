"""Hedged requests vs none when replicas stall now and then: tail latency of a path fetch.

    .venv/bin/python -m benchmarks.hedging                     # 400 fetches per mode
    .venv/bin/python -m benchmarks.hedging --fetches 100       # quicker

Two bank shard servers (replication 2: every block on both) serve a synthetic bank, k=4, ranks
(64, 16), d 512, 2 memory layers, bf16: a path is a 384 KiB level-1 block + a 96 KiB level-2
block, one FetchBlocks RPC. Each shard sits behind a TCP relay (testkit.net.Relay) that,
independently per server->client segment (64 KiB at most), stalls for `--stall-ms` with
probability `--stall-p` (a replica with GC pauses or a noisy neighbour). Every fetch is a
random path (so both shards are primaries).

  bankclient      one BankClient per shard, the path's primary only (no retries, no hedging)
  fetcher         ShardedFetcher, hedging off (failover and retries only)
  fetcher-hedged  ShardedFetcher, hedging on: after the running p95 of observed latency the
                  same request goes to the other replica; the first good answer wins
  direct-*        the same two clients without the relays (the fetcher's own overhead)

Prints p50 / p99 / max per mode with the ratio to `bankclient`, and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from membank.manifest import Manifest
from services.bank_server.ingest import ingest
from services.bank_server.launch import run_bank_server
from services.model_client.bank_client import BankClient
from services.model_client.fetcher import FetchPolicy
from services.model_client.targets import open_bank
from testkit.exports import synthetic_export
from testkit.net import Relay
from testkit.stats import percentile

SHARDS = ["s0", "s1"]
K, RANKS, D, LAYERS = 4, [64, 16], 512, [0, 1]


def build(root: Path) -> dict[str, Path]:
    export = root / "export"
    synthetic_export(export, bank="hedge", version="v1", dtype="bfloat16", d_model=D,
                     mem_layers=LAYERS, branching=K, ranks=RANKS)
    paths = {s: root / s for s in SHARDS}
    for s in SHARDS:
        ingest(export, paths[s], shard_id=s, shards=SHARDS, replication=2, placement_level=1,
               progress=False, map_size=1 << 30)
    return paths


def run_modes(modes: dict, m: Manifest, n: int, warmup: int, rng: random.Random) -> dict:
    """Fetch the same random paths with every mode, interleaved path by path, so that a busy
    moment of the (shared) machine hits every mode alike; ms per fetch after the warm-up."""
    paths = [[rng.randrange(K) for _ in RANKS] for _ in range(n + warmup)]
    out: dict[str, list[float]] = {name: [] for name in modes}
    for i, path in enumerate(tqdm(paths, desc="fetches")):
        blocks = m.path_blocks(path)
        for name, (fetch_one, _) in modes.items():
            t0 = time.perf_counter()
            got = fetch_one(blocks)
            dt = time.perf_counter() - t0
            assert len(got) == len(blocks)
            if i >= warmup:
                out[name].append(dt * 1e3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fetches", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=30)
    # a path's reply is about 8 relayed segments: 0.004 stalls about 3% of the fetches, and
    # hedging at the p95 can only cut a tail thinner than 5%
    ap.add_argument("--stall-p", type=float, default=0.004, help="per relayed segment")
    ap.add_argument("--stall-ms", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="membank-hedging-") as tmp, ExitStack() as stack:
        lmdbs = build(Path(tmp))
        direct = {}
        for s in SHARDS:
            address, _ = stack.enter_context(run_bank_server(
                lmdbs[s], "--shard-id", s, "--no-admin", "--map-size-gb", "1",
                log_path=Path(tmp) / f"{s}.log"))
            direct[s] = address
        relays = {s: Relay(direct[s], stall_p=args.stall_p, stall_s=args.stall_ms / 1e3,
                           seed=args.seed + i)
                  for i, s in enumerate(SHARDS)}
        stack.callback(lambda: [r.close() for r in relays.values()])
        relayed = {s: r.address for s, r in relays.items()}
        with BankClient(direct["s0"]) as c:
            m = c.get_manifest("hedge")

        def bankclient(targets):
            clients = {s: stack.enter_context(BankClient(a)) for s, a in targets.items()}
            return lambda blocks: clients[m.owners(*blocks[-1])[0]].fetch(
                m.bank, m.version, blocks, m)

        def fetcher(targets, hedge):
            f = stack.enter_context(open_bank(targets, policy=FetchPolicy(hedge=hedge)))
            return (lambda blocks: f.fetch(m.bank, m.version, blocks, m)), f

        modes = {"bankclient": (bankclient(relayed), None)}
        modes["fetcher"] = fetcher(relayed, False)
        modes["fetcher-hedged"] = fetcher(relayed, True)
        modes["direct-bankclient"] = (bankclient(direct), None)
        modes["direct-fetcher"] = fetcher(direct, False)
        stalls0 = {s: r.stalls for s, r in relays.items()}
        times = run_modes(modes, m, args.fetches, args.warmup, random.Random(args.seed))
        for name, (_, f) in modes.items():
            ms = times[name]
            results[name] = {"p50_ms": round(percentile(ms, 0.5), 3),
                             "p90_ms": round(percentile(ms, 0.9), 3),
                             "p99_ms": round(percentile(ms, 0.99), 3), "max_ms": round(max(ms), 3),
                             "mean_ms": round(statistics.fmean(ms), 3)}
            if f is not None:
                st = f.stats()
                results[name].update(hedges=st["hedges"], hedge_wins=st["hedge_wins"],
                                     rpcs=st["rpcs"])
        stalls = sum(r.stalls - stalls0[s] for s, r in relays.items())

    base = results["bankclient"]
    print(f"path fetch = {sum(m.block_nbytes(l) for l in (1, 2)) / 1024:.0f} KiB, "
          f"{args.fetches} fetches per mode, relay stall p={args.stall_p}/segment x "
          f"{args.stall_ms:.0f} ms, {stalls} stalls in all")
    print(f"{'mode':<18} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p99/base':>9} "
          f"{'mean ms':>8} {'hedges':>7} {'wins':>5}")
    for name, r in results.items():
        ref = results["direct-bankclient"] if name.startswith("direct") else base
        print(f"{name:<18} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['max_ms']:8.2f} "
              f"{r['p99_ms'] / ref['p99_ms']:9.2f} {r['mean_ms']:8.2f} {r.get('hedges', '-'):>7} "
              f"{r.get('hedge_wins', '-'):>5}")
    out = {"benchmark": "hedging", "fetches": args.fetches, "stall_p": args.stall_p,
           "stall_ms": args.stall_ms, "stalls": stalls, "modes": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
