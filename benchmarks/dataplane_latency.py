"""Where one data plane fetch spends its time, next to raw TCP: time to first byte, body, end.

    .venv/bin/python -m benchmarks.dataplane_latency                # 1.7 MB blocks, ~30 s here
    .venv/bin/python -m benchmarks.dataplane_latency --sizes 1.7,6.9 --fetches 2000

Same synthetic bank and servers as benchmarks/fetch.py (its helpers are reused): the real bank
server with its data plane, and the raw-TCP baseline server. One client at a time, interleaved
over --rounds rounds. Per block size:

  raw-dp     the data plane's protocol spoken with bare socket calls (no DataPlaneClient): the
             request frame, then the time to the first byte of the answer (TTFB: the shard's
             work before it sends: reading and parsing the request, planning, the LMDB read and
             its checks), the header, the body (received as raw TCP's client does) and the end
  raw-tcp    the baseline: a key, then TTFB of the length prefix, then the body
  client-dp  DataPlaneClient.fetch (the device's fetch: plan, pooled connection, header checked
             against the manifest, body hashed while it arrives, checksum compared)
  client-tcp fetch.py's TcpClient.fetch

Medians in microseconds. "shard extra" = raw-dp TTFB - raw-tcp TTFB (what the shard adds before
its first byte); "device extra" = client-dp - raw-dp total (what the device's client adds).
The last line is ONE JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import benchmarks.fetch as F
from membank.dataplane import MAGIC, PREFIX
from services.model_client.dataplane_client import DataPlaneClient, dataplane_target

REPO = Path(__file__).resolve().parents[1]


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def raw_dp(sock: socket.socket, level: int, node: int, view: memoryview) -> tuple:
    """(ttfb, header, body, end, total) seconds of one fetch over the data plane's protocol."""
    body = json.dumps({"bank": F.BANK, "version": F.VERSION, "blocks": [[level, node]],
                       "deadline_ms": 10_000}, separators=(",", ":")).encode()
    t0 = time.perf_counter()
    sock.sendall(PREFIX.pack(MAGIC, b"Q", len(body)) + body)
    magic, kind, n = PREFIX.unpack(sock.recv(PREFIX.size, socket.MSG_WAITALL))
    t1 = time.perf_counter()
    if (magic, kind) != (MAGIC, b"H"):
        raise RuntimeError(f"unexpected frame {kind!r}: {sock.recv(n, socket.MSG_WAITALL)!r}")
    header = json.loads(sock.recv(n, socket.MSG_WAITALL))
    t2 = time.perf_counter()
    F.recv_exact_into(sock, view[:header["nbytes"]])
    t3 = time.perf_counter()
    _, kind, n = PREFIX.unpack(sock.recv(PREFIX.size, socket.MSG_WAITALL))
    sock.recv(n, socket.MSG_WAITALL)
    t4 = time.perf_counter()
    if kind != b"E":
        raise RuntimeError(f"frame {kind!r} where the end frame belongs")
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0


def raw_tcp(sock: socket.socket, level: int, node: int, view: memoryview) -> tuple:
    """(ttfb, body, total) seconds of one fetch from fetch.py's raw-TCP server."""
    key = f"{level}/{node}".encode()
    t0 = time.perf_counter()
    sock.sendall(struct.pack("<H", len(key)) + key)
    n = struct.unpack("<Q", sock.recv(8, socket.MSG_WAITALL))[0]
    t1 = time.perf_counter()
    F.recv_exact_into(sock, view[:n])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, t2 - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1.7", help="MB: any of 1.7, 6.9, 27.5")
    p.add_argument("--fetches", type=int, default=3000, help="per system and size, all rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", type=Path, help="keep the bank here (default: a temp dir)")
    args = p.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    from services.bank_server.launch import run_bank_server, stop

    work = args.work or Path(tempfile.mkdtemp(prefix="membank-dp-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    lmdb_path, manifest = F.build_bank(work)
    tcp_proc, tcp_port = F.start_child("tcp", lmdb_path)
    results = []
    try:
        with run_bank_server(lmdb_path, "--map-size-gb", "1", "--no-admin", "--dataplane-port",
                             "0", log_path=work / "bank_server.log", cwd=REPO) as (address, srv):
            dp_port = int(srv.dataplane_address.rsplit(":", 1)[-1])
            client = DataPlaneClient(dataplane_target(address, dp_port), timeout_s=60)
            sizes_by_level = {l: manifest.block_nbytes(l) for l in F.SIZE_LEVEL.values()}
            tcp_client = F.TcpClient(tcp_port, sizes_by_level)
            dp_sock, tcp_sock = _connect(dp_port), _connect(tcp_port)
            print(f"\n{'size MB':>7} {'path':<10} {'TTFB':>7} {'header':>7} {'body':>7} "
                  f"{'end':>6} {'total':>7}   (median us)", flush=True)
            for size in sizes:
                level = F.SIZE_LEVEL[size]
                nbytes, nodes = manifest.block_nbytes(level), F.K ** level
                buf = bytearray(nbytes)
                view = memoryview(buf)
                out = {}
                samples: dict[str, list[tuple]] = {"raw-dp": [], "raw-tcp": [],
                                                   "client-dp": [], "client-tcp": []}
                per_round = max(1, args.fetches // args.rounds)
                for rnd in range(args.rounds):
                    for i in range(per_round):
                        node = i % nodes
                        samples["raw-dp"].append(raw_dp(dp_sock, level, node, view))
                    for i in range(per_round):
                        samples["raw-tcp"].append(raw_tcp(tcp_sock, level, i % nodes, view))
                    for i in range(per_round):
                        node = i % nodes
                        out.clear()
                        out[(level, node)] = buf
                        t = time.perf_counter()
                        client.fetch(F.BANK, F.VERSION, [(level, node)], manifest, out=out)
                        samples["client-dp"].append((time.perf_counter() - t,))
                    for i in range(per_round):
                        t = time.perf_counter()
                        tcp_client.fetch(level, i % nodes)
                        samples["client-tcp"].append((time.perf_counter() - t,))
                    print(f"  {size} MB: round {rnd + 1}/{args.rounds} done", flush=True)

                def med(name: str, k: int) -> float:
                    return 1e6 * statistics.median(s[k] for s in samples[name])

                row = {"size_mb": size, "block_bytes": nbytes, "fetches": per_round * args.rounds,
                       "raw_dp": {"ttfb_us": med("raw-dp", 0), "header_us": med("raw-dp", 1),
                                  "body_us": med("raw-dp", 2), "end_us": med("raw-dp", 3),
                                  "total_us": med("raw-dp", 4)},
                       "raw_tcp": {"ttfb_us": med("raw-tcp", 0), "body_us": med("raw-tcp", 1),
                                   "total_us": med("raw-tcp", 2)},
                       "client_dp_us": med("client-dp", 0), "client_tcp_us": med("client-tcp", 0)}
                row["shard_extra_us"] = row["raw_dp"]["ttfb_us"] - row["raw_tcp"]["ttfb_us"]
                row["device_extra_us"] = row["client_dp_us"] - row["raw_dp"]["total_us"]
                results.append(row)
                d, t = row["raw_dp"], row["raw_tcp"]
                print(f"{size:>7} {'raw-dp':<10} {d['ttfb_us']:>7.0f} {d['header_us']:>7.0f} "
                      f"{d['body_us']:>7.0f} {d['end_us']:>6.0f} {d['total_us']:>7.0f}")
                print(f"{size:>7} {'raw-tcp':<10} {t['ttfb_us']:>7.0f} {'':>7} "
                      f"{t['body_us']:>7.0f} {'':>6} {t['total_us']:>7.0f}")
                print(f"{size:>7} {'client-dp':<10} {'':>7} {'':>7} {'':>7} {'':>6} "
                      f"{row['client_dp_us']:>7.0f}")
                print(f"{size:>7} {'client-tcp':<10} {'':>7} {'':>7} {'':>7} {'':>6} "
                      f"{row['client_tcp_us']:>7.0f}")
                print(f"        shard extra before the first byte {row['shard_extra_us']:.0f} us, "
                      f"device client extra {row['device_extra_us']:.0f} us", flush=True)
            client.close()
            tcp_client.close()
            dp_sock.close()
            tcp_sock.close()
    finally:
        stop(tcp_proc, timeout=5)
    print(json.dumps({"benchmark": "dataplane_latency", "machine": platform.machine(),
                      "python": platform.python_version(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
