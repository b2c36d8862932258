"""A cold path at the paper's 160M shapes against raw TCP moving the same bytes, and the time to
first token with the 160M anchor, with and without memory (issue 19).

    .venv/bin/python -m benchmarks.cold_path                  # loopback + 20/100 + 80/20 links
    .venv/bin/python -m benchmarks.cold_path --links none     # loopback only (no root needed)

The bank: the paper's 160M block shapes (ranks (256, 64, 16, 0), 35 layers, d 512, bfloat16
blocks of 27.5 / 6.9 / 1.7 MB; branching 4: the paper's block sizes, fewer nodes), synthetic
weights, signed, served by a real bank server subprocess with its data plane. One path is 3
blocks, 36.1 MB. Per round, interleaved so a busy moment of the machine hits all alike:

  raw-tcp           the path's 3 blocks as one 36.1 MB reply from a plain socket server
                    (held in memory), received into a preallocated buffer: the wire's floor,
                    with nothing verified or placed
  dp-in-place       MemoryModel.fetch_path over the data plane, nothing attached, no device
                    cache, a bfloat16 room: every block received straight into its slice of the
                    room while its BLAKE3 digest is checked, then attached (no copy)
  dp-copy           the same into a float32 room: received into a buffer, converted into place
  grpc-in-place     dp-in-place over gRPC (BankClient) instead of the data plane

On the emulated links (benchmarks/linkemu.py; root) the device runs inside the link's namespace
and only raw-tcp and dp-in-place run (a 36 MB transfer takes 3 s at 100 Mbit, 15 s at 20).

Then, on loopback, time to first token with the paper's 160M anchor (random weights) in
bfloat16 and float32: anchor-only against warm (the path attached: embed with the static
embedder, route, prefill with 336 more FFN neurons per layer), one new token, the prompts of
benchmarks/prompt.py. Ends with the tables and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.linkemu import Link, LinkSpec, unavailable_reason
from benchmarks.prompt import PAPER_K, PROMPTS, build_demo_export, build_paper_bank, paper_config
from testkit.keys import trust
from testkit.stats import median

REPO = Path(__file__).resolve().parents[1]
RANKS = (256, 64, 16, 0)
BANK = "paper-hier"
PATH = [0, 0, 0, 0]
STATIC = REPO / "runs" / "static-embedder" / "static-embedder.safetensors"


# -- the raw-TCP floor: a subprocess serving the path's bytes from memory ------------------------
def serve_raw(lmdb_path: str) -> None:
    """Request: one byte. Reply: u64 length + the path's blocks, concatenated."""
    import lmdb

    from membank.keys import manifest_key
    from membank.manifest import Manifest

    env = lmdb.open(lmdb_path, readonly=True, lock=False, map_size=4 << 30)
    with env.begin() as txn:
        m = Manifest.from_json(bytes(txn.get(manifest_key(BANK, "v1"))))
        data = b"".join(bytes(txn.get(m.storage_key(lv, n)))
                        for lv, n in m.path_blocks(PATH))
    env.close()
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while conn.recv(1):
                conn.sendall(struct.pack("<Q", len(data)))
                conn.sendall(data)


class RawClient:
    def __init__(self, address: str):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = None

    def fetch(self) -> int:
        self.sock.sendall(b"x")
        n = struct.unpack("<Q", self._recv(memoryview(bytearray(8))))[0]
        if self.buf is None or len(self.buf) != n:
            self.buf = bytearray(n)
            self.buf[::4096] = b"\1" * len(self.buf[::4096])    # preallocated and touched
        self._recv(memoryview(self.buf))
        return n

    def _recv(self, view: memoryview) -> memoryview:
        # MSG_WAITALL: one system call for the whole reply, the fastest Python receive (a
        # loop taking whatever each recv_into returns, benchmarks/fetch.py's, is 1.5x slower
        # for 36 MB here): the floor must be the best the wire gives
        got = 0
        while got < len(view):
            k = self.sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
            if k == 0:
                raise ConnectionError("raw server closed")
            got += k
        return view

    def close(self) -> None:
        self.sock.close()


# -- the device side (a subprocess: on loopback or inside a link's namespace) ---------------------
def device(job: dict) -> dict:
    import torch
    from tokenizers import Tokenizer

    from membank.nn.model import Transformer
    from services.model_client.bank_client import BankClient
    from services.model_client.dataplane_client import DataPlaneClient
    from services.model_client.memory_model import GenerateResult, MemoryModel

    torch.set_num_threads(job["threads"])
    cfg = paper_config(RANKS, PAPER_K)
    with ExitStack() as stack:
        banks = {"dp": stack.enter_context(DataPlaneClient(job["dataplane"], timeout_s=120)),
                 "grpc": stack.enter_context(BankClient(job["grpc"], timeout_s=120))}
        raw = RawClient(job["raw"])
        stack.callback(raw.close)
        models = {}
        # no prompt is decoded here: a one-word tokenizer stands in for the model's
        tok = Tokenizer.from_str(json.dumps({"version": "1.0", "model": {
            "type": "WordLevel", "vocab": {"<|endoftext|>": 0}, "unk_token": "<|endoftext|>"}}))
        manifest = banks["dp"].get_manifest(BANK)
        for dtype in ("bfloat16", "float32"):
            with torch.device("meta"):      # the room is real; the anchor's weights are not needed
                anchor = Transformer(cfg).to(getattr(torch, dtype))
            models[dtype] = MemoryModel(cfg, anchor, tok, None, manifest, manifest_ttl_s=3600,
                                        trust=trust())
        modes = {"dp-in-place": ("dp", "bfloat16"), "dp-copy": ("dp", "float32"),
                 "grpc-in-place": ("grpc", "bfloat16")}
        modes = {k: v for k, v in modes.items() if k in job["modes"]}
        rows = []
        for rep in range(job["warmup"] + job["reps"]):
            row = {"rep": rep}
            t0 = time.perf_counter()
            nbytes = raw.fetch()
            row["raw-tcp"] = {"total": (time.perf_counter() - t0) * 1e3, "bytes": nbytes}
            for mode, (transport, dtype) in modes.items():
                mm, bank = models[dtype], banks[transport]
                mm.attached = {}                    # cold: nothing attached, no device cache
                r = GenerateResult(prompt="", text="", memory=False)
                t0 = time.perf_counter()
                mm.fetch_path(bank, PATH, r)
                row[mode] = {"total": (time.perf_counter() - t0) * 1e3,
                             "fetch": r.timings_ms["fetch"], "attach": r.timings_ms["attach"],
                             "bytes": r.fetched_bytes}
            if rep >= job["warmup"]:
                rows.append(row)
        return {"rows": rows}


def ttft(job: dict) -> dict:
    """Anchor-only vs warm time to first token with the 160M anchor, per dtype (loopback)."""
    import torch
    from tokenizers import Tokenizer

    from membank import artifacts
    from membank.nn.model import Transformer
    from membank.nn.static_embed import StaticEmbedder
    from membank.router import Router
    from services.model_client.dataplane_client import DataPlaneClient
    from services.model_client.memory_model import MemoryModel

    torch.set_num_threads(job["threads"])
    cfg = paper_config(RANKS, PAPER_K)
    export = Path(job["export"])
    tok = Tokenizer.from_file(str(export / artifacts.TOKENIZER))
    emb = StaticEmbedder.load(export.parent / artifacts.STATIC_EMBEDDER)
    g = torch.Generator().manual_seed(0)
    k, depth = PAPER_K, len(RANKS)
    router = Router(k, depth, emb.dim, [torch.randn(k ** lv, k, emb.dim, generator=g)
                                        for lv in range(depth)], embedder=emb.name)
    out: dict = {}
    with DataPlaneClient(job["dataplane"], timeout_s=120) as bank:
        manifest = bank.get_manifest(BANK)
        for dtype in ("bfloat16", "float32"):
            torch.manual_seed(0)
            anchor = Transformer(cfg).to(getattr(torch, dtype)).eval()   # 163M, random
            mm = MemoryModel(cfg, anchor, tok, router, manifest, emb, bank=bank,
                             manifest_ttl_s=3600, trust=trust())
            mm.warmup()
            rows = []
            for rep in range(job["ttft_reps"]):
                prompt = PROMPTS[rep % len(PROMPTS)]
                mm.generate(prompt, max_new_tokens=1)          # attach its path (cold)
                a = mm.generate(prompt, use_memory=False, max_new_tokens=1)
                w = mm.generate(prompt, max_new_tokens=1)      # warm: nothing fetched
                assert w.memory and not w.fetched_blocks, w.anchor_only_reason
                rows.append({"anchor-only": a.timings_ms["ttft"], "warm": w.timings_ms["ttft"],
                             **{f"warm-{s}": w.timings_ms[s]
                                for s in ("embed", "route", "fetch", "attach", "prefill")},
                             "anchor-prefill": a.timings_ms["prefill"],
                             "tokens": len(tok.encode(prompt).ids)})
            out[dtype] = rows
            del mm, anchor
    return out


def run_device(job: dict, link: Link | None, work: Path, what: str) -> dict:
    path = work / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    argv = [sys.executable, "-m", "benchmarks.cold_path", f"--{what}", str(path)]
    kw = dict(capture_output=True, text=True, timeout=3600, cwd=str(REPO))
    got = link.run(argv, **kw) if link else subprocess.run(argv, **kw)
    if got.returncode != 0:
        raise RuntimeError(f"{what} on {job.get('link')} failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


# -- report --------------------------------------------------------------------------------------
def summarise(rows: list[dict]) -> dict:
    """Medians per mode, and the median of the per-round ratios to raw TCP."""
    modes = [m for m in rows[0] if m != "rep"]
    out = {}
    for m in modes:
        out[m] = {f: round(median(r[m][f] for r in rows), 2) for f in rows[0][m]}
        if m != "raw-tcp":
            out[m]["x_raw"] = round(median(r[m]["total"] / r["raw-tcp"]["total"]
                                           for r in rows), 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--links", default="20/100,80/20",
                    help="emulated links RTT_MS/RATE_MBIT, comma-separated ('none': loopback)")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds on loopback")
    ap.add_argument("--link-reps", type=int, default=3, help="timed rounds per emulated link")
    ap.add_argument("--ttft-reps", type=int, default=10, help="prompts per dtype (TTFT)")
    ap.add_argument("--no-ttft", action="store_true", help="skip the 160M TTFT part")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the device")
    ap.add_argument("--static", default=str(STATIC),
                    help="the static embedder table (built here when missing, about a minute)")
    ap.add_argument("--dir", help="parent of the work directory (default: the system temp dir)")
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--ttft", help=argparse.SUPPRESS)
    ap.add_argument("--serve-raw", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_raw:
        serve_raw(args.serve_raw)
        return {}
    for flag, fn in (("device", device), ("ttft", ttft)):
        if getattr(args, flag):
            out = fn(json.loads(Path(getattr(args, flag)).read_text()))
            print(json.dumps(out))
            return out

    from tqdm import tqdm

    from services.bank_server.launch import run_bank_server
    from services.model_client.dataplane_client import dataplane_target

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    specs = ([] if args.links in ("", "none")
             else [LinkSpec.parse(s) for s in args.links.split(",")])
    if specs and (why := unavailable_reason()):
        print(f"emulated links skipped: {why}", flush=True)
        specs = []
    report: dict = {"benchmark": "cold_path", "cpus": os.cpu_count(), "threads": args.threads,
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()], "links": {}}
    work = Path(tempfile.mkdtemp(prefix="membank-coldpath-", dir=args.dir))
    t_start = time.perf_counter()
    try:
        with ExitStack() as stack:
            lmdb_path = work / "hier.lmdb"
            print("building the paper-shaped bank (0.36 GB)", flush=True)
            m = build_paper_bank(lmdb_path, BANK, RANKS, PAPER_K, seed=0)
            report["path_bytes"] = sum(m.block_nbytes(lv) for lv, _ in m.path_blocks(PATH))
            addr, proc = stack.enter_context(run_bank_server(
                lmdb_path, "--no-admin", "--map-size-gb", "4", "--warm-levels", "0",
                "--dataplane-port", "0", log_path=work / "server.log", cwd=REPO, timeout=120))
            raw_proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cold_path",
                                         "--serve-raw", str(lmdb_path)], cwd=REPO,
                                        stdout=subprocess.PIPE)
            stack.callback(lambda: (raw_proc.kill(), raw_proc.wait()))
            raw_addr = f"127.0.0.1:{int(raw_proc.stdout.readline())}"
            dp = dataplane_target(addr, proc.dataplane_address)
            dp_port = int(proc.dataplane_address.rsplit(":", 1)[1])

            runs = [("loopback", None)] + [(s.label, s) for s in specs]
            for label, spec in tqdm(runs, desc="cold path", unit="link"):
                job = {"link": label, "threads": args.threads, "warmup": 2,
                       "reps": args.reps, "modes": ["dp-in-place", "dp-copy", "grpc-in-place"],
                       "dataplane": dp, "grpc": addr, "raw": raw_addr}
                link = None
                if spec is not None:
                    link = stack.enter_context(Link(spec.rtt_ms, spec.rate_mbit))
                    # every connection crosses the link: gRPC, data plane and raw, relayed
                    g, d, r = (link.forward(a) for a in (addr, f"127.0.0.1:{dp_port}", raw_addr))
                    job.update(warmup=1, reps=args.link_reps, modes=["dp-in-place"], raw=r,
                               grpc=g, dataplane=f"{g}+{d.rsplit(':', 1)[1]}")
                    report.setdefault("validation", {})[label] = link.validate()
                got = run_device(job, link, work, "device")
                report["links"][label] = summarise(got["rows"])
                report["links"][label]["rows"] = got["rows"]
                if link is not None:
                    link.close()

            if not args.no_ttft:
                print("time to first token with the 160M anchor (static embedder)", flush=True)
                export = build_demo_export(work / "export", "demo", static=args.static)
                got = run_device({"link": "loopback", "threads": args.threads,
                                  "export": str(export), "dataplane": dp,
                                  "ttft_reps": args.ttft_reps}, None, work, "ttft")
                report["ttft"] = {}
                for dtype, rows in got.items():
                    s = {f: round(median(r[f] for r in rows), 2) for f in rows[0]}
                    s["x_anchor"] = round(median(r["warm"] / r["anchor-only"] for r in rows), 3)
                    s["plus_ms"] = round(median(r["warm"] - r["anchor-only"] for r in rows), 2)
                    report["ttft"][dtype] = s
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print_tables(report)
    summary = dict(report)
    summary["links"] = {label: {m: v for m, v in entry.items() if m != "rows"}
                        for label, entry in report["links"].items()}
    print(json.dumps(summary))
    return report


def print_tables(report: dict) -> None:
    mb = report["path_bytes"] / 1e6
    print(f"\ncold path, {mb:.1f} MB (median ms; x raw = median of per-round ratios)")
    print(f"{'link':<16} {'mode':<14} {'total':>9} {'fetch':>9} {'attach':>8} {'x raw':>7}")
    for label, entry in report["links"].items():
        for mode, s in entry.items():
            if mode == "rows":
                continue
            print(f"{label:<16} {mode:<14} {s['total']:>9.1f} {s.get('fetch', 0):>9.1f} "
                  f"{s.get('attach', 0):>8.2f} {s.get('x_raw', 1.0):>7.3f}")
    for dtype, s in report.get("ttft", {}).items():
        print(f"TTFT 160M {dtype}: anchor-only {s['anchor-only']:.1f} ms, warm with memory "
              f"{s['warm']:.1f} ms (embed {s['warm-embed']:.2f}, route {s['warm-route']:.2f}, "
              f"prefill {s['warm-prefill']:.1f} vs {s['anchor-prefill']:.1f}): "
              f"x{s['x_anchor']:.3f}, +{s['plus_ms']:.1f} ms")


if __name__ == "__main__":
    main()
