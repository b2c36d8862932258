"""A shard's data plane with worker processes vs one process vs raw TCP, many client processes.

    .venv/bin/python -m benchmarks.shard_workers                  # 8 client processes, 1.7 + 6.9 MB
    .venv/bin/python -m benchmarks.shard_workers --workers 1,2,4 --sizes 6.9 --seconds 3

Same bank as benchmarks/fetch.py (the paper's 160M shapes, bf16: level-3 blocks 1.7 MB, level-2
6.9 MB). Each point runs `--clients` client processes at once (each its own connection, warmed
first), all started together; each fetches whole blocks back to back for `--seconds` and counts
the bytes of the fetches that ended inside that window. Aggregate MB/s = all those bytes / the
window. Systems:
  tcp        raw TCP: fetch.py's threaded socket server (one process) sending length-prefixed
             bytes from memory; clients recv_into a preallocated buffer
  dp-wN      the real bank server's data plane with `--workers N` (N = 1: threads of the
             server process, today's default); clients are the real DataPlaneClient, which
             verifies every block's checksum while receiving (the device's client)
Rounds are interleaved (every system once per round); reported: the median MB/s per system
and the median of each round's ratio to raw TCP. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.fetch import (
    BANK,
    REPO,
    SIZE_LEVEL,
    VERSION,
    MembankDataPlaneClient,
    TcpClient,
    build_bank,
    start_child,
)

K = 2   # level 2 and level 3 of the paper's bank have K**level blocks


# -- one client process ------------------------------------------------------------------------
def client_main(args) -> int:
    """Connect, warm, print "ready", wait for the start time on stdin, fetch until the window
    ends, print the bytes of the fetches that ended inside it."""
    from membank.artifacts import load_manifest
    manifest = load_manifest(args.export)
    level = args.level
    if args.client == "tcp":
        c = TcpClient(args.port, {level: manifest.block_nbytes(level)})
    else:
        c = MembankDataPlaneClient(args.target, manifest)
    n_nodes = K ** level
    for i in range(2):
        c.fetch(level, i % n_nodes)
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    end = start + args.seconds
    while time.monotonic() < start:
        time.sleep(min(0.001, max(0.0, start - time.monotonic())))
    nbytes, k = 0, args.index
    while True:
        n = c.fetch(level, k % n_nodes)
        if time.monotonic() > end:
            break
        nbytes += n
        k += 1
    c.close()
    print(nbytes, flush=True)
    return 0


def run_point(kind: str, where: dict, export: Path, level: int, clients: int,
              seconds: float) -> float:
    """Aggregate MB/s of `clients` client processes fetching at once."""
    procs = []
    for i in range(clients):
        cmd = [sys.executable, "-m", "benchmarks.shard_workers", "--client", kind,
               "--export", str(export), "--level", str(level), "--seconds", str(seconds),
               "--index", str(i), *where]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a {kind} client did not start")
    start = time.monotonic() + 0.3          # every client starts at this instant
    for p in procs:
        p.stdin.write(f"{start}\n")
        p.stdin.flush()
    total = 0
    for p in procs:
        out = p.stdout.readline().strip()
        if p.wait(60) != 0 or not out:
            raise RuntimeError(f"a {kind} client failed")
        total += int(out)
    return total / seconds / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1.7,6.9", help="MB: 1.7 and/or 6.9")
    p.add_argument("--clients", type=int, default=8, help="client processes at once")
    p.add_argument("--workers", default="1,2", help="data plane worker counts to run")
    p.add_argument("--seconds", type=float, default=3.0, help="measured window per point")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--work", type=Path, help="keep the bank here (default: a temp dir)")
    # internal: one client process
    p.add_argument("--client", choices=["tcp", "dp"], help=argparse.SUPPRESS)
    p.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--level", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client_main(args)

    from services.bank_server.launch import run_bank_server, stop
    from services.model_client.dataplane_client import dataplane_target

    sizes = [float(s) for s in args.sizes.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="membank-shard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lmdb_path, manifest = build_bank(work)
    export = work / "export"
    tcp_proc, tcp_port = start_child("tcp", lmdb_path)
    systems = {"tcp": ["--port", str(tcp_port)]}
    try:
        with ExitStack() as stack:
            for n in worker_counts:
                address, proc = stack.enter_context(run_bank_server(
                    lmdb_path, "--dataplane-port", "0", "--workers", str(n), "--no-admin",
                    "--dataplane-max-connections", "64",
                    "--dataplane-max-connections-per-peer", "64",
                    log_path=work / f"server-w{n}.log"))
                systems[f"dp-w{n}"] = ["--target",
                                       dataplane_target(address, proc.dataplane_address)]
            results: dict = {}
            for size in sizes:
                level = SIZE_LEVEL[size]
                mbs: dict[str, list[float]] = {s: [] for s in systems}
                for r in range(args.rounds):
                    for name, where in systems.items():
                        kind = "tcp" if name == "tcp" else "dp"
                        mbs[name].append(run_point(kind, where, export, level, args.clients,
                                                   args.seconds))
                    print(f"{size} MB round {r + 1}: " + ", ".join(
                        f"{s} {v[-1]:.0f}" for s, v in mbs.items()), flush=True)
                point = {}
                for name, values in mbs.items():
                    ratios = [v / t for v, t in zip(values, mbs["tcp"])]
                    point[name] = {"mb_s": statistics.median(values),
                                   "ratio_to_tcp": statistics.median(ratios),
                                   "rounds_mb_s": [round(v, 1) for v in values]}
                results[f"{size}"] = point
    finally:
        stop(tcp_proc)

    print(f"\n{args.clients} client processes, {args.seconds:g} s windows, median of "
          f"{args.rounds} interleaved rounds (MB/s, ratio to raw TCP)")
    names = list(systems)
    print("| block | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for size, point in results.items():
        print(f"| {size} MB | " + " | ".join(
            f"{point[n]['mb_s']:.0f} ({point[n]['ratio_to_tcp']:.2f})" for n in names) + " |")
    print(json.dumps({"benchmark": "shard_workers", "clients": args.clients,
                      "seconds": args.seconds, "rounds": args.rounds, "bank": BANK,
                      "version": VERSION, "machine": {"cpus": os.cpu_count(),
                                                      "python": platform.python_version(),
                                                      "platform": platform.platform()},
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
