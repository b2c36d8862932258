"""What the data plane's tuning knobs are worth: the device's receive piece size and receive
buffer, and the shard's verify-once of LMDB blocks, each against raw TCP in the same run.

    .venv/bin/python -m benchmarks.dataplane_tuning            # about 2 minutes here
    .venv/bin/python -m benchmarks.dataplane_tuning --quick

Same synthetic bank and servers as benchmarks/fetch.py (its helpers are reused): a real bank
server with the data plane, fetched with the real DataPlaneClient, and the raw-TCP baseline.

  pieces   the device receives a block in MSG_WAITALL pieces of PIECE bytes, hashing each as it
           completes. Measured per piece size (32 KiB .. 1 MiB, and the shipped adaptive rule:
           32 KiB when the fetch is alone in its process, 512 KiB when several run) with 1 and 8
           concurrent clients (threads of this process) per block size.
  verify   the shard with --verify-ttl-s 0 (hash every block on every read) vs 60 (the
           default: hash once, then trust while the file is unchanged and the block resident),
           one client, adaptive pieces.
  rcvbuf   the device's SO_RCVBUF on its data plane connections: "auto" (not set: the
           kernel's autotuning, as the raw-TCP client) vs the shipped 4 MiB, 1 and 8 clients.

Every point is interleaved over --rounds rounds; reported: MB/s (bytes / wall time) and the
ratio to raw TCP's MB/s for the same size and client count. The last line is ONE JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import benchmarks.fetch as F
from services.model_client import dataplane_client as DC
from testkit.stats import percentile

REPO = Path(__file__).resolve().parents[1]

PIECES = {"32K": 32 << 10, "128K": 128 << 10, "512K": 512 << 10, "1M": 1 << 20}
ADAPTIVE = "adaptive"


RCVBUFS = {"auto": 0, "4M": 4 << 20}


def set_pieces(name: str) -> None:
    """Point the client at one piece size (both cases), or back at the shipped rule."""
    if name == ADAPTIVE:
        DC.PIECE_ALONE, DC.PIECE_BUSY = SHIPPED
    else:
        DC.PIECE_ALONE = DC.PIECE_BUSY = PIECES[name]


SHIPPED = (DC.PIECE_ALONE, DC.PIECE_BUSY)
SHIPPED_RCVBUF = DC.RCVBUF


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1.7,6.9,27.5")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--mb-per-point", type=float, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a third of the bytes per point")
    p.add_argument("--work", type=Path, help="keep the bank here (default: a temp dir)")
    args = p.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    client_counts = [int(c) for c in args.clients.split(",")]
    mb = args.mb_per_point / (3 if args.quick else 1)
    work = args.work or Path(tempfile.mkdtemp(prefix="membank-dp-tuning-"))
    work.mkdir(parents=True, exist_ok=True)

    from services.bank_server.launch import run_bank_server
    from services.model_client.dataplane_client import dataplane_target

    lmdb_path, manifest = F.build_bank(work)
    sizes_by_level = {l: manifest.block_nbytes(l) for l in F.SIZE_LEVEL.values()}
    tcp_proc, tcp_port = F.start_child("tcp", lmdb_path)
    results: list[dict] = []
    try:
        with run_bank_server(lmdb_path, "--map-size-gb", "1", "--no-admin", "--dataplane-port", "0",
                             "--verify-ttl-s", "60", log_path=work / "bank_server_ttl60.log",
                             cwd=F.REPO) as (address, server), \
             run_bank_server(lmdb_path, "--map-size-gb", "1", "--no-admin", "--dataplane-port", "0",
                             "--verify-ttl-s", "0", log_path=work / "bank_server_ttl0.log",
                             cwd=F.REPO) as (address0, server0):
            targets = {60: dataplane_target(address, server.dataplane_address),
                       0: dataplane_target(address0, server0.dataplane_address)}
            points = []   # (experiment, setting, size, clients)
            for size in sizes:
                for c in client_counts:
                    points.append(("tcp", "-", size, c))
                    for name in [*PIECES, ADAPTIVE]:
                        points.append(("pieces", name, size, c))
                    points += [("rcvbuf", name, size, c) for name in RCVBUFS]
                points += [("verify", "ttl0", size, 1), ("verify", "ttl60", size, 1)]
            acc: dict[tuple, list] = {pt: [0.0, 0, []] for pt in points}   # wall, bytes, lat
            for r in range(args.rounds):
                for pt in points:
                    experiment, setting, size, c = pt
                    level = F.SIZE_LEVEL[size]
                    ops = max(4, int(mb * 1e6 / sizes_by_level[level] / c / args.rounds))
                    if experiment == "tcp":
                        make = lambda: F.TcpClient(tcp_port, sizes_by_level)           # noqa: E731
                    else:
                        set_pieces(setting if experiment == "pieces" else ADAPTIVE)
                        DC.RCVBUF = RCVBUFS[setting] if experiment == "rcvbuf" else SHIPPED_RCVBUF
                        target = targets[0 if setting == "ttl0" else 60]
                        make = lambda t=target: F.MembankDataPlaneClient(t, manifest)  # noqa: E731
                    lat, wall, nbytes = F.measure(make, level, manifest.n_nodes(level), c, ops)
                    a = acc[pt]
                    a[0] += wall
                    a[1] += nbytes
                    a[2] += lat
                print(f"round {r + 1}/{args.rounds} done", flush=True)
            set_pieces(ADAPTIVE)
            DC.RCVBUF = SHIPPED_RCVBUF
    finally:
        tcp_proc.kill()

    tcp_mbs = {(size, c): acc[("tcp", "-", size, c)][1] / acc[("tcp", "-", size, c)][0] / 1e6
               for size in sizes for c in client_counts}
    print(f"\n{'experiment':10s} {'setting':9s} {'size MB':>7s} {'clients':>7s} {'median ms':>9s} "
          f"{'MB/s':>7s} {'x tcp':>6s}")
    for pt, (wall, nbytes, lat) in acc.items():
        experiment, setting, size, c = pt
        mbs = nbytes / wall / 1e6
        row = {"experiment": experiment, "setting": setting, "size_mb": size, "clients": c,
               "median_ms": round(percentile(lat, 0.5) * 1e3, 3),
               "p99_ms": round(percentile(lat, 0.99) * 1e3, 3),
               "mb_s": round(mbs, 1), "x_tcp": round(mbs / tcp_mbs[(size, c)], 3)}
        results.append(row)
        print(f"{experiment:10s} {setting:9s} {size:7.1f} {c:7d} {row['median_ms']:9.3f} "
              f"{mbs:7.0f} {row['x_tcp']:6.2f}")
    print(json.dumps({"benchmark": "dataplane_tuning", "machine": {
        "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
        "platform": platform.platform()}, "rounds": args.rounds, "mb_per_point": mb,
        "shipped_pieces": {"alone": SHIPPED[0], "busy": SHIPPED[1]},
        "shipped_rcvbuf": SHIPPED_RCVBUF, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
