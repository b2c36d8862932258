"""int8 blocks vs native: bytes per block / path / bank, fetch and attach time, and what int8 does
to long-tail accuracy and perplexity.

    .venv/bin/python -m benchmarks.int8                                  # demo + paper-160m shapes
    .venv/bin/python -m benchmarks.int8 --eval-run runs/eval-small --eval-preset small
    .venv/bin/python -m benchmarks.int8 --eval-run /tmp/int8-smoke --eval-preset smoke \\
        --train-if-missing

1. Formulas: for each preset's bank (membank/config.py), the bytes of every level's block in the
   bank dtype and in int8 (membank/quant.py: 1 byte per weight + one float32 scale per row), per
   path and for the whole bank.
2. Real blocks: a bank of those block shapes (random N(0, 0.02) weights; the branching cut to 2
   so the paper's 27.5 MB level-1 blocks stay few) goes through the streaming ingest with
   `encodings=("int8",)`, and every stored int8 payload's size is checked against the formula.
3. Serving: one bank server subprocess over that LMDB; a whole path is fetched `--reps` times
   natively and as int8 (BankClient over loopback gRPC, alternating, checksums verified), and
   attached into a float32 room (a copy vs `dequantize_into`, 3x reps alternating rounds).
   Medians and int8/native ratios. Loopback says nothing about slow links: bytes are what a link
   pays for.
4. Accuracy: with `--eval-run DIR`, the long-tail evaluation (training/evaluate.py) re-probes the
   finished checkpoints in DIR (`reuse_only`: never trains); `--train-if-missing` runs the whole
   preset instead when DIR has none. Reports fetched vs fetched-int8 per bucket, overall and
   held-out perplexity.
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from membank import quant
from membank.config import get_preset
from membank.nn.tensors import dequantize_into, tensor_from_buffer, tensor_to_bytes
from services.bank_server import launch
from services.bank_server.ingest import ingest_stream
from services.bank_server.store import LMDBStore
from services.model_client.bank_client import BankClient
from testkit.stats import median

REPO = Path(__file__).resolve().parents[1]

MAP = 4 << 30


def formulas(preset: str) -> dict:
    cfg = get_preset(preset)
    mc, dtype = cfg.memory, cfg.memory.dtype
    levels = []
    for level, r in enumerate(mc.ranks, start=1):
        if not r:
            continue
        shape = mc.block_shape(cfg.model, level)
        native, int8 = (quant.encoded_nbytes(shape, "", dtype),
                        quant.encoded_nbytes(shape, "int8", dtype))
        levels.append({"level": level, "shape": list(shape), "blocks": mc.n_nodes(level),
                       "native_bytes": native, "int8_bytes": int8, "ratio": int8 / native})
    path_n = sum(x["native_bytes"] for x in levels)
    path_q = sum(x["int8_bytes"] for x in levels)
    bank_n = sum(x["native_bytes"] * x["blocks"] for x in levels)
    bank_q = sum(x["int8_bytes"] * x["blocks"] for x in levels)
    return {"preset": preset, "dtype": dtype, "levels": levels,
            "path_native_bytes": path_n, "path_int8_bytes": path_q, "path_ratio": path_q / path_n,
            "bank_native_bytes": bank_n, "bank_int8_bytes": bank_q, "bank_ratio": bank_q / bank_n}


def header(preset: str, branching: int) -> dict:
    cfg = get_preset(preset)
    return {**cfg.memory.manifest_fields(cfg.model), "bank": f"q-{preset}", "version": "v1",
            "branching": branching}


def blocks(h: dict, seed: int):
    """(level, node, bytes) of random N(0, 0.02) blocks in the bank dtype."""
    from membank.manifest import Manifest
    skeleton = Manifest.model_validate({**h, "checksums": [
        [""] * (h["branching"] ** l if r else 0) for l, r in enumerate(h["ranks"], 1)]})
    g = torch.Generator().manual_seed(seed)
    for level, node in skeleton.blocks():
        t = torch.randn(skeleton.block_shape(level), generator=g) * 0.02
        yield level, node, tensor_to_bytes(t, h["dtype"])


def median_ms(xs: list[float]) -> float:
    return round(median(xs) * 1e3, 3)


def serve_and_fetch(preset: str, work: Path, reps: int, seed: int) -> dict:
    h = header(preset, branching=2)
    db = work / f"{preset}.lmdb"
    # the baseline first: the same blocks (generation included in both) ingested native only
    t0 = time.perf_counter()
    ingest_stream({None: work / f"{preset}-native.lmdb"}, h, blocks(h, seed), progress=True,
                  map_size=MAP)
    native_s = time.perf_counter() - t0
    shutil.rmtree(work / f"{preset}-native.lmdb")
    t0 = time.perf_counter()
    m = ingest_stream({None: db}, h, blocks(h, seed), encodings=("int8",), progress=True,
                      map_size=MAP)
    ingest_s = time.perf_counter() - t0
    # every stored int8 payload has the size the formula says; decoding it is within half a
    # step of the native block
    errors = {}
    with LMDBStore(db, MAP) as store:
        for level, node in m.blocks():
            payload = store.get(m.storage_key(level, node, "int8"))
            assert len(payload) == m.block_nbytes(level, "int8") == \
                quant.encoded_nbytes(m.block_shape(level), "int8", m.dtype)
            if node == 0:
                native = tensor_from_buffer(
                    bytearray(store.get(m.storage_key(level, 0))),
                    m.block_shape(level), m.dtype).float()
                deq = torch.from_numpy(quant.dequantize(payload, m.block_shape(level)))
                errors[level] = float((deq - native).norm() / native.norm())
    path = m.path_blocks([0] * m.depth)
    room = {lv: torch.empty(m.block_shape(lv)) for lv, _ in path}
    fetch = {"native": [], "int8": []}
    attach = {"native": [], "int8": []}
    got_bytes, last = {}, {}

    def attach_once(enc: str, got: dict) -> float:
        t = time.perf_counter()
        for (lv, _), buf in got.items():
            if enc == "int8":
                dequantize_into(buf, m.block_shape(lv), room[lv])
            else:
                room[lv].copy_(tensor_from_buffer(buf, m.block_shape(lv), m.dtype))
        return time.perf_counter() - t

    with launch.run_bank_server(db, "--map-size-gb", "4", "--warm-levels", "0",
                                log_path=work / f"{preset}.log", cwd=REPO,
                                timeout=120) as (address, _), \
            BankClient(address, timeout_s=120) as client:
        for i in range(reps + 1):                       # the first round warms the page cache
            for enc in (("native", "int8") if i % 2 == 0 else ("int8", "native")):
                e = "" if enc == "native" else enc
                t = time.perf_counter()
                got = client.fetch(m.bank, m.version, path, m, encoding=e)
                dt = time.perf_counter() - t
                got_bytes[enc], last[enc] = sum(len(b) for b in got.values()), got
                if i:
                    fetch[enc].append(dt)
    # attach: cheap, so many alternating rounds (3x reps) over the last fetched path
    for i in range(3 * reps):
        for enc in (("native", "int8") if i % 2 == 0 else ("int8", "native")):
            attach[enc].append(attach_once(enc, last[enc]))
    out = {"preset": preset, "branching_built": 2, "blocks": sum(1 for _ in m.blocks()),
           "ingest_s_native": round(native_s, 2), "ingest_s_with_int8": round(ingest_s, 2),
           "relative_l2_error_random": errors,
           "path_bytes": got_bytes, "path_ratio": got_bytes["int8"] / got_bytes["native"]}
    for enc in ("native", "int8"):
        out[f"fetch_ms_{enc}"] = median_ms(fetch[enc])
        out[f"attach_ms_{enc}"] = median_ms(attach[enc])
    out["fetch_ratio"] = out["fetch_ms_int8"] / out["fetch_ms_native"]
    out["attach_ratio"] = out["attach_ms_int8"] / out["attach_ms_native"]
    return out


def accuracy(run: Path, preset: str, train_if_missing: bool, work: Path) -> dict:
    from training import checkpoint
    from training.evaluate import eval_preset, run_dirs, run_eval

    have = all(checkpoint.latest(d / r) is not None for d in run_dirs(run, eval_preset(preset))
               for r in ("memory", "anchor", "dense"))
    if not have and not train_if_missing:
        return {"skipped": f"no checkpoints under {run} (--train-if-missing trains the preset)"}
    t0 = time.perf_counter()
    r = run_eval(run, eval_preset(preset), results=work / "longtail-int8.json", preset=preset,
                 reuse_only=have)
    q = r["int8"]
    return {"run": str(run), "preset": preset, "reused_checkpoints": have,
            "seconds": round(time.perf_counter() - t0, 1),
            "accuracy_per_bucket": {k: r["accuracy_per_bucket"][k]
                                    for k in ("fetched", "fetched-int8")},
            "accuracy_overall": {k: r["accuracy_overall"][k] for k in ("fetched", "fetched-int8")},
            "perplexity": {k: r["perplexity"][k] for k in ("fetched", "fetched-int8")},
            "accuracy_change": q["accuracy_change"], "perplexity_change": q["perplexity_change"],
            "answers_changed": q["answers_changed"], "n_prompts": q["n_prompts"],
            "path_native_bytes": q["path_native_bytes"], "path_int8_bytes": q["path_int8_bytes"],
            "relative_l2_error_trained": {x["level"]: x["relative_l2_error"] for x in q["levels"]}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="demo,paper-160m",
                   help="presets whose block shapes to build")
    p.add_argument("--formulas", default="demo,paper-160m,paper-410m,paper-1.4b")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-run", help="run dir of `membank eval` (its checkpoints are re-probed)")
    p.add_argument("--eval-preset", default="small")
    p.add_argument("--train-if-missing", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    report: dict = {"benchmark": "int8"}
    report["formulas"] = {name: formulas(name) for name in args.formulas.split(",") if name}
    print(f"{'preset':<11} {'dtype':<9} {'level':>5} {'native B':>12} {'int8 B':>12} "
          f"{'int8/native':>11}")
    for f in report["formulas"].values():
        for x in f["levels"]:
            print(f"{f['preset']:<11} {f['dtype']:<9} {x['level']:>5} {x['native_bytes']:>12,} "
                  f"{x['int8_bytes']:>12,} {x['ratio']:>11.4f}")
        print(f"{f['preset']:<11} {f['dtype']:<9} {'path':>5} {f['path_native_bytes']:>12,} "
              f"{f['path_int8_bytes']:>12,} {f['path_ratio']:>11.4f}   bank "
              f"{f['bank_native_bytes'] / 1e9:.2f} GB -> {f['bank_int8_bytes'] / 1e9:.2f} GB")

    work = Path(tempfile.mkdtemp(prefix="membank-int8-", dir=args.dir))
    try:
        report["served"] = {}
        for preset in [s for s in args.shapes.split(",") if s]:
            r = serve_and_fetch(preset, work, args.reps, args.seed)
            report["served"][preset] = r
            print(f"{preset}: path {r['path_bytes']['native']:,} B native "
                  f"vs {r['path_bytes']['int8']:,} B "
                  f"int8 (x{r['path_ratio']:.4f}); "
                  f"fetch {r['fetch_ms_native']} vs {r['fetch_ms_int8']} ms "
                  f"(x{r['fetch_ratio']:.2f}); "
                  f"attach {r['attach_ms_native']} vs {r['attach_ms_int8']} ms "
                  f"(x{r['attach_ratio']:.2f}); ingest {r['ingest_s_native']} s native, "
                  f"{r['ingest_s_with_int8']} s with int8", flush=True)
        if args.eval_run:
            a = accuracy(Path(args.eval_run), args.eval_preset, args.train_if_missing, work)
            report["accuracy"] = a
            if "skipped" in a:
                print(f"accuracy: skipped: {a['skipped']}")
            else:
                print(f"accuracy ({a['preset']}, {a['n_prompts']} prompts, "
                      f"{'re-probed checkpoints' if a['reused_checkpoints'] else 'trained now'}):")
                for k in ("fetched", "fetched-int8"):
                    print(f"  {k:<13} "
                          f"buckets {[round(100 * x, 1) for x in a['accuracy_per_bucket'][k]]} "
                          f"overall {100 * a['accuracy_overall'][k]:.1f}%  "
                          f"ppl {a['perplexity'][k]:.4f}")
                print(f"  change: accuracy {100 * a['accuracy_change']:+.1f} points, ppl "
                      f"{a['perplexity_change']:+.4f}, {a['answers_changed']} answers differ")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
