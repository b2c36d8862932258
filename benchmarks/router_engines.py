"""Benchmark: the one numpy router (membank/router.py) vs the torch router it replaced, one run.

    .venv/bin/python -m benchmarks.router_engines [--n 100000] [--shapes 4x2,16x2,8x3,16x4]
                                                  [--rounds 3] [--repeats 5] [--threads 2]

Issue 15 replaced the torch router (membank/router.py at commit 0c22e8a, read from git history
with `git show`, so this needs the repository's history and torch) by one numpy router, on the
condition that batched routing does not get slower. Each engine routes the same --n random unit
vectors (384-d) through a random tree of each shape in its own fresh process (so neither warms
the other's caches or thread pool), torch / numpy alternating for --rounds rounds; a round
reports the best of --repeats. The best round per engine is compared: numpy / torch routes per
second, and the two engines' paths must be identical on every row. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASELINE_COMMIT = "0c22e8a"          # the last torch router (before issue 15's numpy router)
REPO = Path(__file__).resolve().parents[1]


def child(engine: str, k: int, depth: int, n: int, repeats: int, threads: int,
          baseline: Path, out: Path) -> None:
    """Route in this process with one engine; write the paths and print the best time."""
    import torch
    torch.set_num_threads(threads)
    from benchmarks.routing import random_router, unit_rows
    tree, x = random_router(k, depth), unit_rows(np.random.default_rng(1), n)
    if engine == "torch":
        sys.path.insert(0, str(baseline.parent))
        import torch_router_baseline as old  # the file written by fetch_baseline
        router = old.Router(branching=k, depth=depth, dim=384,
                            centroids=[torch.from_numpy(c) for c in tree.centroids])
        arg = torch.from_numpy(x)
    else:
        router, arg = tree, x
    router.route(arg[:256])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        paths = router.route(arg)
        best = min(best, time.perf_counter() - t0)
    np.save(out, np.asarray(paths))
    print(json.dumps({"seconds": best}))


def fetch_baseline(directory: Path) -> Path:
    try:
        src = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:membank/router.py"],
            check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"router_engines: cannot read the baseline router from git history "
                 f"({BASELINE_COMMIT}): {getattr(e, 'stderr', '') or e}".strip())
    path = directory / "torch_router_baseline.py"
    path.write_text(src)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--shapes", default="4x2,16x2,8x3,16x4", help="k x depth, comma separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "SHAPE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--baseline", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, shape, out = args.child
        k, depth = (int(v) for v in shape.split("x"))
        child(engine, k, depth, args.n, args.repeats, args.threads, args.baseline, Path(out))
        return
    shapes = [s.strip() for s in args.shapes.split(",")]
    print(f"{args.n:,} random unit vectors x 384; torch router of {BASELINE_COMMIT} vs numpy "
          f"router; {args.rounds} alternating rounds, best of {args.repeats}, "
          f"{args.threads} threads")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = fetch_baseline(tmp)
        for shape in shapes:
            best = {"torch": float("inf"), "numpy": float("inf")}
            for r in range(args.rounds):
                for engine in ("torch", "numpy"):
                    out = tmp / f"{engine}-{shape}.npy"
                    proc = subprocess.run(
                        [sys.executable, "-m", "benchmarks.router_engines", "--n", str(args.n),
                         "--repeats", str(args.repeats), "--threads", str(args.threads),
                         "--baseline", str(baseline), "--child", engine, shape, str(out)],
                        cwd=REPO, capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(f"router_engines: the {engine} run on {shape} failed:\n"
                                 f"{proc.stderr.strip()}")
                    seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
                    best[engine] = min(best[engine], seconds)
            differ = int((np.load(tmp / f"torch-{shape}.npy")
                          != np.load(tmp / f"numpy-{shape}.npy")).any(axis=1).sum())
            row = {"shape": shape, "n": args.n, "torch_per_s": args.n / best["torch"],
                   "numpy_per_s": args.n / best["numpy"],
                   "numpy_over_torch": best["torch"] / best["numpy"], "paths_differing": differ}
            results.append(row)
            print(f"{shape:>5}  torch {row['torch_per_s']:>11,.0f}/s  numpy "
                  f"{row['numpy_per_s']:>11,.0f}/s  numpy/torch {row['numpy_over_torch']:.2f}x  "
                  f"paths differing {differ}", flush=True)
    ratios = [r["numpy_over_torch"] for r in results]
    print(json.dumps({"baseline": BASELINE_COMMIT, "threads": args.threads, "rounds": args.rounds,
                      "routes": results, "min_ratio": min(ratios), "max_ratio": max(ratios)}))


if __name__ == "__main__":
    main()
