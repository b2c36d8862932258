"""`make loadtest`: a headless locust run against a local cluster this script starts and stops.

    .venv/bin/python -m loadtests.run_local [--shards 2] [--replication 1] [--redis]
        [--users 8] [--spawn-rate 4] [--run-time 30s] [--out runs/loadtest]
        [--export runs/demo/export]

The bank: the demo export (`make demo`) when it exists, otherwise a synthetic bank of the demo's
shapes with random blocks (bank "demo", k=4, ranks 64/32, d 128, 4 memory layers, float32), so
a fresh clone can load-test in seconds without training. The local cluster launcher
(services/bank_server/cluster.py) ingests it into one LMDB per shard under OUT/cluster (ingest
is idempotent), starts `--shards` bank servers on free loopback ports (and a redis-server with
--redis); locust gets every shard (`shard-i=host:port`) and writes OUT/lt_stats.csv,
OUT/lt_stats_history.csv, OUT/lt_failures.csv and OUT/lt.html. Exit code: locust's (non-zero
when any request failed).
A development tool: traffic goes only to 127.0.0.1, and the run is bounded by --run-time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from membank.artifacts import MANIFEST
from services.bank_server.cluster import run_local_cluster
from testkit.exports import synthetic_export

REPO = Path(__file__).resolve().parents[1]


def demo_shaped_export(out: Path) -> Path:
    """A bank of the demo preset's shapes with random blocks (no training needed)."""
    synthetic_export(out, bank="demo", version="synthetic-1", d_model=128,
                     mem_layers=[0, 1, 2, 3], branching=4, ranks=[64, 32], reuse=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=1, help="bank shards (default 1)")
    p.add_argument("--replication", type=int, default=1)
    p.add_argument("--redis", action="store_true", help="a redis-server tier for every shard")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=4)
    p.add_argument("--run-time", default="30s")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "loadtest")
    p.add_argument("--export", type=Path, default=REPO / "runs" / "demo" / "export",
                   help="export to serve (default: the demo's; synthetic when it does not exist)")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    export = (args.export if (args.export / MANIFEST).exists()
              else demo_shaped_export(args.out / "export"))
    with run_local_cluster(export, shards=args.shards, replication=args.replication,
                           redis=args.redis, workdir=args.out / "cluster") as cluster:
        manifest = cluster.manifest
        host = ",".join(f"{name}={addr}" for name, addr in cluster.targets.items())
        print(f"loadtest: bank {manifest.bank} version {manifest.version} from {export}; "
              f"shards {host}; locust {args.users} users for {args.run_time}", flush=True)
        cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"),
               "--headless", "-u", str(args.users), "-r", str(args.spawn_rate),
               "-t", args.run_time, "--host", host, "--only-summary",
               "--csv", str(args.out / "lt"), "--html", str(args.out / "lt.html")]
        env = {**os.environ, "MEMBANK_LOADTEST_BANK": manifest.bank}
        rc = subprocess.call(cmd, cwd=REPO, env=env)
    print(f"loadtest: reports in {args.out} (lt_stats.csv, lt.html; server logs in "
          f"cluster/logs); locust exit code {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
