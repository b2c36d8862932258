"""Prefetch while the user types: how often the path of a partial prompt is the final one, and
the time to first token a prefetch saves, on loopback and on emulated device links (issue 18).

    .venv/bin/python -m benchmarks.prefetch [--export DIR] [--cuts 0.25,0.5,0.75]
                                            [--links 20/100,80/20] [--prompts 40]

The model: `--export` (a trained export; default: the demo preset trained into --out/base, as
`membank train` would, reused when it exists). Its probe prompts (`--probe`: the built-in
atomic-number probe, or a probe JSON file as `membank eval --probe` takes) are cut at each
fraction of their tokens (rounded up, at least one token) and routed by the device's embedder
and router, cut and whole:

  agreement   per cut and level, the share of prompts whose partial path reaches the same node
              at that level as the whole prompt's (level l agrees when the first l choices do:
              the block fetched for level l is the one the prompt needs)

Then on a bank server (data plane; the export ingested and signed) a device subprocess, on
loopback and inside each emulated link's namespace (benchmarks/linkemu.py; root), answers
`--prompts` of them (one new token) per cut from a cold start: its manifest read, nothing
cached or attached:

  cold        time to first token with nothing prefetched
  prefetched  the same prompt after `MemoryModel.prefetch(cut prompt)` ran to completion (the
              typing the cut leaves is assumed to take longer than the prefetch; the prefetch's
              own time is reported beside it)
  saved       cold - prefetched, median (and mean) over prompts

Ends with the tables, a PNG (--out/prefetch.png) and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from benchmarks.linkemu import Link, LinkSpec, unavailable_reason
from testkit.stats import median

REPO = Path(__file__).resolve().parents[1]


def cut(tokenizer, prompt: str, fraction: float) -> str:
    """The prompt's first ceil(fraction * n) tokens (at least one), as text."""
    ids = tokenizer.encode(prompt).ids
    return tokenizer.decode(ids[:max(1, math.ceil(fraction * len(ids)))])


def agreement(export: Path, prompts: list[str], cuts: list[float]) -> dict:
    """{cut: [share agreeing at level 1, ..., depth]} over every prompt (no bank needed)."""
    from tokenizers import Tokenizer

    from membank import artifacts
    from membank.nn.static_embed import embedder_for
    from membank.router import Router
    router = Router.load(export / artifacts.ROUTER)
    embedder = embedder_for(router.embedder, export)
    tok = Tokenizer.from_file(str(export / artifacts.TOKENIZER))
    full = router.route(embedder.encode(prompts))                     # (N, depth)
    out = {}
    for c in cuts:
        part = router.route(embedder.encode([cut(tok, p, c) for p in prompts]))
        same = np.cumprod(part == full, axis=1)                       # prefix agreement
        out[str(c)] = [round(float(x), 4) for x in same.mean(axis=0)]
    return out


def device(job: dict) -> dict:
    """In this process (inside a link's namespace when there is one): per prompt and cut, the
    cold and the prefetched time to first token."""
    import torch

    from services.model_client.device_cache import DeviceCache
    from services.model_client.memory_model import MemoryModel
    from testkit.keys import trust

    torch.set_num_threads(job["threads"])
    model = MemoryModel.from_pretrained(job["export"], bank=job["bank"], trust=trust(),
                                        manifest_ttl_s=3600)
    model.warmup()

    def fresh() -> None:
        """A device that has read the manifest and holds no block."""
        if model._view is not None:
            model._view.inflight.close()
        model._view, model.cache = None, DeviceCache(256 << 20)
        model.attached, model.level_versions = {}, {}
        model.bank_view(model.bank).manifest()

    rows = []
    for prompt, cuts in job["prompts"]:
        row = {"prompt": prompt, "cuts": {}}
        fresh()
        r = model.generate(prompt, max_new_tokens=1)
        row["cold"], row["cold_bytes"] = r.timings_ms["ttft"], r.fetched_bytes
        for c, partial in cuts.items():
            fresh()
            t0 = time.perf_counter()
            model.prefetch(partial)
            view = model.bank_view(model.bank)
            while view.inflight._running:       # the rest of the typing: the fetch completes
                time.sleep(0.001)
            prefetch_ms = (time.perf_counter() - t0) * 1e3
            r = model.generate(prompt, max_new_tokens=1)
            row["cuts"][c] = {"ttft": r.timings_ms["ttft"], "prefetch_ms": prefetch_ms,
                              "fetched_bytes": r.fetched_bytes}
        rows.append(row)
    model.close()
    return {"rows": rows}


def run_device(job: dict, link: Link | None, work: Path) -> dict:
    path = work / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    argv = [sys.executable, "-m", "benchmarks.prefetch", "--device", str(path)]
    kw = dict(capture_output=True, text=True, timeout=3600, cwd=str(REPO))
    got = link.run(argv, **kw) if link else subprocess.run(argv, **kw)
    if got.returncode != 0:
        raise RuntimeError(f"device on {job['link']} failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict], cuts: list[float]) -> dict:
    out = {"cold_ms": round(median(r["cold"] for r in rows), 2),
           "cold_bytes": int(median(r["cold_bytes"] for r in rows))}
    for c in map(str, cuts):
        out[c] = {"ttft_ms": round(median(r["cuts"][c]["ttft"] for r in rows), 2),
                  "saved_ms": round(median(r["cold"] - r["cuts"][c]["ttft"] for r in rows), 2),
                  "saved_mean_ms": round(float(np.mean([r["cold"] - r["cuts"][c]["ttft"]
                                                        for r in rows])), 2),
                  "prefetch_ms": round(median(r["cuts"][c]["prefetch_ms"] for r in rows), 2),
                  "fetched_after_bytes": int(median(r["cuts"][c]["fetched_bytes"]
                                                    for r in rows))}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, help="a trained export (default: train the demo)")
    ap.add_argument("--config", default="demo", help="preset trained when --export is absent")
    ap.add_argument("--probe", default="atomic-number",
                    help="built-in probe name or probe JSON file (membank eval --probe)")
    ap.add_argument("--cuts", default="0.25,0.5,0.75")
    ap.add_argument("--prompts", type=int, default=40, help="prompts timed per link")
    ap.add_argument("--links", default="20/100,80/20",
                    help="RTT_MS/RATE_MBIT, comma separated; 'none': loopback only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "prefetch")
    ap.add_argument("--device", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device:
        out = device(json.loads(Path(args.device).read_text()))
        print(json.dumps(out))
        return out

    from tokenizers import Tokenizer

    from membank import artifacts
    from services.bank_server.ingest import ingest
    from services.bank_server.launch import run_bank_server
    from services.model_client.dataplane_client import dataplane_target
    from testkit.keys import signing_key
    from training.probes import load_probe

    cuts = [float(c) for c in args.cuts.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    export = args.export or train_base(args.out / "base", args.config, args.threads)
    probe = load_probe(args.probe)
    prompts = [probe.template.format(subject=s) for s, _ in probe.pairs]
    t0 = time.perf_counter()
    report: dict = {"benchmark": "prefetch", "probe": probe.name, "prompts": len(prompts),
                    "cuts": cuts, "cpus": os.cpu_count(), "export": str(export),
                    "agreement": agreement(export, prompts, cuts), "links": {}}
    tok = Tokenizer.from_file(str(export / artifacts.TOKENIZER))
    timed = [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))
             [:args.prompts]]
    jobs = [(p, {str(c): cut(tok, p, c) for c in cuts}) for p in timed]
    specs = ([] if args.links in ("", "none")
             else [LinkSpec.parse(s) for s in args.links.split(",")])
    if specs and (why := unavailable_reason()):
        print(f"emulated links skipped: {why}", flush=True)
        specs = []
    work = Path(tempfile.mkdtemp(prefix="membank-prefetch-"))
    try:
        with ExitStack() as stack:
            db = work / "bank.lmdb"
            ingest(export, db, progress=False, map_size=1 << 30, signing_key=signing_key())
            addr, proc = stack.enter_context(run_bank_server(
                db, "--no-admin", "--map-size-gb", "1", "--dataplane-port", "0",
                log_path=work / "server.log", cwd=REPO))
            dp_port = proc.dataplane_address.rsplit(":", 1)[1]
            for label, spec in [("loopback", None)] + [(s.label, s) for s in specs]:
                job = {"link": label, "threads": args.threads, "export": str(export),
                       "prompts": jobs, "bank": dataplane_target(addr, proc.dataplane_address)}
                link = None
                if spec is not None:
                    link = stack.enter_context(Link(spec.rtt_ms, spec.rate_mbit))
                    g, d = link.forward(addr), link.forward(f"127.0.0.1:{dp_port}")
                    job["bank"] = f"{g}+{d.rsplit(':', 1)[1]}"
                print(f"timing {len(jobs)} prompts on {label}", flush=True)
                report["links"][label] = summarise(run_device(job, link, work)["rows"], cuts)
                if link is not None:
                    link.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print_tables(report)
    plot(report, args.out / "prefetch.png")
    print(json.dumps(report))
    return report


def train_base(out: Path, config: str, threads: int) -> Path:
    from membank.config import get_preset
    from training.config import TrainConfig
    from training.train import run
    seq_len = min(TrainConfig.seq_len, get_preset(config).model.max_seq_len)
    return Path(run(out, TrainConfig(preset=config, threads=threads, seq_len=seq_len)
                    .validate()))


def print_tables(report: dict) -> None:
    depth = len(next(iter(report["agreement"].values())))
    print(f"\npath agreement, partial vs whole prompt ({report['prompts']} prompts of "
          f"{report['probe']}):")
    print("cut    " + "  ".join(f"level {lv}" for lv in range(1, depth + 1)))
    for c, shares in report["agreement"].items():
        print(f"{float(c):4.0%}  " + "  ".join(f"{s:7.1%}" for s in shares))
    print("\ntime to first token, cold vs after prefetching the cut prompt (median ms):")
    for label, s in report["links"].items():
        cells = "  ".join(f"{float(c):.0%}: {s[c]['ttft_ms']:.1f} (saved {s[c]['saved_ms']:.1f}, "
                          f"mean {s[c]['saved_mean_ms']:.1f}; prefetch {s[c]['prefetch_ms']:.0f})"
                          for c in map(str, report["cuts"]))
        print(f"{label:>16}  cold {s['cold_ms']:.1f}  {cells}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for c, shares in report["agreement"].items():
        a.plot(range(1, len(shares) + 1), [100 * s for s in shares], marker="o",
               label=f"cut at {float(c):.0%}")
    a.set_xlabel("level")
    a.set_ylabel("% of prompts: partial path = final path")
    a.set_ylim(0, 105)
    a.set_title(f"path of a partial prompt ({report['probe']})")
    a.legend(fontsize=8)
    labels = list(report["links"])
    x = np.arange(len(labels))
    width = 0.8 / (1 + len(report["cuts"]))
    b.bar(x, [report["links"][lb]["cold_ms"] for lb in labels], width, label="cold")
    for i, c in enumerate(map(str, report["cuts"]), start=1):
        b.bar(x + i * width, [report["links"][lb][c]["ttft_ms"] for lb in labels], width,
              label=f"prefetched at {float(c):.0%}")
    b.set_xticks(x + width * len(report["cuts"]) / 2, labels)
    b.set_ylabel("time to first token, ms (median)")
    b.set_title("TTFT with a prefetch while typing")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
