"""What verifying a received block costs the device: xxh3_64 vs SHA-256 vs BLAKE3, per block.

    .venv/bin/python -m benchmarks.verify [--reps 15] [--preset paper-160m]

The device checks every block it receives against the hash its signed manifest lists
(membank/signing.py, membank/manifest.py `Manifest.block_check`). This measures one block's
hash at the preset's block sizes (paper-160m: 27.5 / 6.9 / 1.7 MB native, bfloat16; and their
int8 payloads), fed in the pieces a receiver feeds it (1 MiB, gRPC's chunk; 32 KiB, the data
plane's MSG_WAITALL piece) and whole, alternating the algorithms round by round; medians, in
ms per block and GB/s, and each algorithm's ratio to xxh3. Also one Ed25519 verification of the
paper-scale manifest's canonical bytes (one per manifest read, not per block). Random bytes:
the hashes' speed does not depend on the content. blake3 is the `blake3` package (Rust,
single-threaded here: `max_threads` left at 1, the device has other work). Ends with one JSON
line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import xxhash

from membank.config import get_preset
from membank.quant import encoded_nbytes
from testkit.stats import median

REPO = Path(__file__).resolve().parents[1]


def _algorithms() -> dict:
    algos = {"xxh3_64": xxhash.xxh3_64, "sha256": hashlib.sha256}
    try:
        import blake3
        algos["blake3"] = blake3.blake3
    except ImportError:       # optional: the comparison runs without it
        pass
    return algos


def hash_ms(make, buf: memoryview, piece: int) -> float:
    t0 = time.perf_counter()
    h = make()
    if piece >= len(buf):
        h.update(buf)
    else:
        for i in range(0, len(buf), piece):
            h.update(buf[i:i + piece])
    h.hexdigest()
    return (time.perf_counter() - t0) * 1e3


def sizes(preset: str) -> list[tuple[str, int]]:
    cfg = get_preset(preset)
    out = []
    for level, r in enumerate(cfg.memory.ranks, start=1):
        if r:
            shape = cfg.memory.block_shape(cfg.model, level)
            out.append((f"level {level}", encoded_nbytes(shape, "", cfg.memory.dtype)))
            out.append((f"level {level} int8", encoded_nbytes(shape, "int8", cfg.memory.dtype)))
    return out


def signature_ms(preset: str, reps: int) -> float:
    """One Ed25519 verification of a paper-scale manifest (canonical bytes + verify)."""
    from membank.manifest import Manifest
    from membank.signing import TrustedKeys, generate_key, sign_manifest, verify_manifest

    cfg = get_preset(preset)
    mc = cfg.memory
    table = [[("%016x" % n) for n in range(mc.branching ** l)] if r else []
             for l, r in enumerate(mc.ranks, start=1)]
    hashes = [["ab" * 32 for _ in level] for level in table]
    m = Manifest(bank="b", version="v1", dtype=mc.dtype, d_model=cfg.model.d_model,
                 mem_layers=mc.mem_layers(cfg.model.n_layer), branching=mc.branching,
                 ranks=list(mc.ranks), checksums=table, digests={"native": hashes})
    key = generate_key()
    signed = sign_manifest(m, key)
    trusted = TrustedKeys.of([key.public_key()])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        verify_manifest(signed, trusted, allow_unsigned=False)
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.verify")
    p.add_argument("--preset", default="paper-160m")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    algos = _algorithms()
    pieces = {"1 MiB": 1 << 20, "32 KiB": 32 << 10, "whole": 1 << 62}
    rows = []
    for name, n in sizes(args.preset):
        buf = memoryview(os.urandom(n))
        times = {(a, pc): [] for a in algos for pc in pieces}
        for _ in range(args.reps):          # rounds alternate the algorithms
            for a, make in algos.items():
                for pc, piece in pieces.items():
                    times[(a, pc)].append(hash_ms(make, buf, piece))
        for pc in pieces:
            base = median(times[("xxh3_64", pc)])
            for a in algos:
                ms = median(times[(a, pc)])
                rows.append({"block": name, "bytes": n, "piece": pc, "algo": a,
                             "ms": round(ms, 3), "gb_s": round(n / ms / 1e6, 2),
                             "vs_xxh3": round(ms / base, 2)})
    sig = signature_ms(args.preset, args.reps)
    print(f"{'block':<14}{'bytes':>12}  {'piece':<7}{'algo':<9}{'ms':>9}{'GB/s':>8}{'x xxh3':>8}")
    for r in rows:
        print(f"{r['block']:<14}{r['bytes']:>12,}  {r['piece']:<7}{r['algo']:<9}{r['ms']:>9.3f}"
              f"{r['gb_s']:>8.2f}{r['vs_xxh3']:>8.2f}")
    print(f"Ed25519 verification of the {args.preset} manifest: {sig:.3f} ms")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    print(json.dumps({"benchmark": "verify", "preset": args.preset, "reps": args.reps,
                      "commit": commit, "machine": platform.machine(), "cpus": os.cpu_count(),
                      "rows": rows, "manifest_signature_ms": round(sig, 3)}))


if __name__ == "__main__":
    main()
