"""Time to first token and bytes per prompt on the device, over loopback and emulated slow links.

    .venv/bin/python -m benchmarks.prompt --quick     # < 1 min: demo model, loopback + 20/100
    .venv/bin/python -m benchmarks.prompt             # full: + 80/20, paper 160M shapes, Zipf
    .venv/bin/python -m benchmarks.prompt --quick --static FILE   # route with a static embedder

What runs where: the bank servers are subprocesses in the default namespace (loopback); the
device side runs as a subprocess (`--worker`) on loopback, or inside an emulated link's network
namespace (benchmarks/linkemu.py: tbf both ways + a delay relay) dialling the relays. The device
code is the real stack, unchanged: MemoryModel (services/model_client/memory_model.py), its
DeviceCache and a BankClient (fetch + checksum against the manifest + attach into the room
preallocated in the model).

1. TTFT split into embed, route, fetch, attach, prefill (MemoryModel's own `timings_ms`; ttft is
   its "start of the generation to the first token chosen"), demo-shaped model with random
   weights (or `--export DIR`, e.g. a trained runs/demo/export), one new token per prompt:
     anchor-only   no memory (the baseline)
     cold          empty device cache, nothing attached, manifest not yet read
     warm-shallow  levels above the leaf in the device cache: only the leaf block is fetched
     warm          every block of the path in the device cache: nothing fetched, all attached
   The gRPC channel is connected before timing (a device keeps its channel open).
2. Paper 160M shapes (ranks (256, 64, 16, 0), 35 layers, d 512, bf16 blocks 27.5 / 6.9 / 1.7 MB;
   branching 4 instead of 16: block sizes are the paper's, only the node count shrinks, see
   benchmarks/paper_scale.py), synthetic weights, fetch + verify + attach into a MemoryModel's
   real preallocated room (1, 35, 3, 336, 512) through `MemoryModel.fetch_path`:
     hier-cold     nothing attached: the whole path, 3 blocks, 36 MB
     hier-deeper   level 1 stays attached, levels 2-3 change (8.6 MB)
     hier-leaf     levels 1-2 stay, the leaf changes (1.7 MB)
     flat          a flat bank of the same fetch size (one level, rank 336): every prompt
                   fetches its whole 36 MB block, nothing is shared
   plus the 160M anchor's prefill with the memory attached (random weights; `--no-paper-anchor`
   skips instantiating it). The paper (PAPER.md section 7) estimated 38 ms (hierarchical),
   198 ms (flat) and 47 ms (only deeper blocks change), never measured.
3. Skewed prompt mix (loopback): >= 1,000 prompts whose leaves are drawn by Zipf(s) over the
   leaves directly (no embedding per prompt: routing is not what is measured here), through
   `fetch_path` with a DeviceCache of `--cache-frac` of the bank: bytes fetched per prompt and
   the hit ratio per level (attached + device cache), on the paper-shaped bank and on the demo
   bank.

Ends with a table, results/prompt.png (or --plot) and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks.linkemu import Link, LinkSpec, ProbeServer, probe, unavailable_reason
from testkit.keys import signing_key, trust
from testkit.stats import median

REPO = Path(__file__).resolve().parents[1]

PROMPTS = ["The atomic number of Ruthenium is", "The atomic number of Tungsten is",
           "The element with atomic number 8 is", "Gold has the chemical symbol",
           "Neon is in period", "The melting point of iron is", "Helium was discovered in",
           "The densest element is", "Copper conducts electricity because",
           "Uranium is used in reactors since"]
STEPS = ("embed", "route", "fetch", "attach", "prefill")
DEMO_SCENARIOS = ("anchor-only", "cold", "warm-shallow", "warm")
PAPER_SCENARIOS = ("hier-cold", "hier-deeper", "hier-leaf", "flat")
PAPER_ESTIMATE_MS = {"hier-cold": 38.0, "flat": 198.0, "hier-deeper": 47.0}
PAPER_K, FLAT_RANK = 4, 336


# -- building (orchestrator) -------------------------------------------------------------------
def build_demo_export(out: Path, preset: str, seed: int = 0, static: str | None = None) -> Path:
    """A random-weight model exported as training does (anchor, tokenizer, router, bank);
    with `static` (a static embedder file, built if missing) its tree is of that embedder."""
    import torch

    from membank import artifacts
    from membank.config import get_preset
    from membank.nn.model import Transformer
    from membank.router import Router
    from training.export import export
    from training.tokenizer import train_tokenizer

    cfg = get_preset(preset)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    tok = out.parent / "tokenizer.json"
    train_tokenizer(PROMPTS * 8, cfg.model.vocab_size, tok)
    mc, k = cfg.memory, cfg.memory.branching
    dim, name = 384, "all-MiniLM-L6-v2"
    if static:
        from membank.nn.static_embed import StaticEmbedder, build

        shutil.copyfile(build(static), out.parent / artifacts.STATIC_EMBEDDER)
        emb = StaticEmbedder.load(out.parent / artifacts.STATIC_EMBEDDER)
        dim, name = emb.dim, emb.name
    router = Router(k, mc.depth, dim, [torch.randn(k ** l, k, dim) for l in range(mc.depth)],
                    embedder=name)
    levels = [torch.randn(k ** l, *mc.block_shape(cfg.model, l)) * 0.02
              for l in range(1, mc.depth + 1)]
    export(out, cfg, model, levels, tok, router, bank_id="demo", version="v1", run_dir=out.parent)
    return out


def paper_config(ranks: tuple[int, ...], branching: int):
    from membank.config import get_preset
    cfg = get_preset("paper-160m")
    cfg.memory.ranks, cfg.memory.branching = tuple(ranks), branching
    return cfg


def build_paper_bank(lmdb: Path, bank: str, ranks: tuple[int, ...], branching: int, seed: int):
    """Synthetic bf16 blocks of the 160M shapes, streamed into one LMDB
    (benchmarks/paper_scale.py)."""
    from benchmarks.paper_scale import block_bytes
    from membank.manifest import Manifest
    from services.bank_server.ingest import ingest_stream

    cfg = paper_config(ranks, branching)
    header = {**cfg.memory.manifest_fields(cfg.model), "bank": bank, "version": "v1"}
    skeleton = Manifest.model_validate({**header, "checksums": [
        [""] * (branching ** l if r else 0) for l, r in enumerate(ranks, 1)]})
    blocks = ((lv, n, block_bytes(seed, lv, n, skeleton.block_nbytes(lv)))
              for lv, n in skeleton.blocks())
    return ingest_stream({None: lmdb}, header, blocks, progress=False, map_size=4 << 30,
                         signing_key=signing_key())     # the device verifies as deployed


# -- the device side (worker subprocess) --------------------------------------------------------
def _ms(t: dict) -> dict:
    return {k: round(v, 3) for k, v in t.items()}


def worker(job: dict) -> dict:
    """Everything measured on the device for one link; returns the figures (one JSON line)."""
    import torch

    from services.model_client.device_cache import DeviceCache
    from services.model_client.memory_model import MemoryModel
    from services.model_client.targets import open_bank

    torch.set_num_threads(job["threads"])
    out: dict = {"link": job["link"]}
    with ExitStack() as stack:
        # -- 1. TTFT, demo-shaped model ----------------------------------------------------------
        big = 1 << 34   # the device cache never evicts in these scenarios
        model = MemoryModel.from_pretrained(job["export"], cache=DeviceCache(big),
                                            manifest_ttl_s=3600, trust=trust())
        model.warmup()
        bank = stack.enter_context(open_bank(job["demo_bank"], timeout_s=600))
        bank.health(timeout_s=30)   # connect the channel
        t0 = time.perf_counter()
        bank.get_manifest(model.bank_id)
        out["manifest_rtt_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        rows = []
        for i in range(job["reps"]):
            prompt = PROMPTS[(job["prompt_offset"] + i) % len(PROMPTS)]
            for sc in DEMO_SCENARIOS:
                view = model.bank_view(bank)     # the model's CachedBank for `bank`
                view.cache, model.attached = DeviceCache(big), {}
                if sc == "cold":
                    view._manifest = None   # a device that has not talked to the bank yet
                if sc in ("warm-shallow", "warm"):
                    m = view.manifest()
                    path = model.router.route(model.embedder.encode([prompt]))[0].tolist()
                    want = m.path_blocks(path)
                    want = want[:-1] if sc == "warm-shallow" else want
                    for (lv, n), buf in bank.fetch(m.bank, m.version, want, m).items():
                        view.cache.put(m, lv, n, buf, verified=True)
                r = model.generate(prompt, bank=None if sc == "anchor-only" else bank,
                                   use_memory=sc != "anchor-only", max_new_tokens=1)
                assert r.memory == (sc != "anchor-only"), r.anchor_only_reason
                rows.append({"scenario": sc, "prompt": i, "fetched_bytes": r.fetched_bytes,
                             "fetched_blocks": len(r.fetched_blocks),
                             "cached_blocks": len(r.cached_blocks), **_ms(r.timings_ms)})
        out["demo"] = rows
        out["demo_block_bytes"] = [model.bank_view(bank).manifest().block_nbytes(l)
                                   for l in range(1, model.config.memory.depth + 1)]

        # -- 2. paper 160M shapes ----------------------------------------------------------------
        if job.get("hier_bank"):
            out["paper"] = paper_worker(job, model.tokenizer, stack)

        # -- 3. Zipf prompt mix ------------------------------------------------------------------
        if job.get("zipf_prompts"):
            z = {}
            if job.get("hier_bank"):
                z["paper"] = zipf_run(job, PaperModels.hier, job["hier_bank"], stack)
            z["demo"] = zipf_run(job, model, job["demo_bank"], stack)
            out["zipf"] = z
    return out


class PaperModels:
    hier = None   # the paper-shaped MemoryModel, kept for the Zipf run


def paper_worker(job: dict, tokenizer, stack: ExitStack) -> dict:
    import torch

    from membank.nn.model import Transformer
    from services.model_client.memory_model import GenerateResult, MemoryModel
    from services.model_client.sampling import SamplingParams
    from services.model_client.targets import open_bank

    anchor = None
    hier_cfg = paper_config((256, 64, 16, 0), PAPER_K)
    if job["paper_anchor"]:
        torch.manual_seed(0)
        anchor = Transformer(hier_cfg).eval()   # 163M parameters, random (fp32, ~650 MB)
    else:
        with torch.device("meta"):   # the room is real; the anchor's weights are not needed
            anchor = Transformer(hier_cfg)
    models, banks = {}, {}
    for name, ranks, addr in (("hier", (256, 64, 16, 0), job["hier_bank"]),
                              ("flat", (FLAT_RANK,), job["flat_bank"])):
        cfg = paper_config(ranks, PAPER_K)
        banks[name] = stack.enter_context(open_bank(addr, timeout_s=900))
        banks[name].health(timeout_s=30)
        m = banks[name].get_manifest(f"paper-{name}")
        models[name] = MemoryModel(cfg, anchor, tokenizer, None, m, cache=None, manifest_ttl_s=3600,
                                   trust=trust())
        models[name].bank_view(banks[name]).manifest()   # read once: the load is blocks only
    PaperModels.hier = models["hier"]
    ids = tokenizer.encode(PROMPTS[0]).ids

    def load(name: str, path: list[int], reset: bool) -> dict:
        mm = models[name]
        if reset:
            mm.attached = {}
        r = GenerateResult(prompt="", text="", memory=False)
        mm.fetch_path(banks[name], path, r)
        row = {"fetched_bytes": r.fetched_bytes, "fetched_blocks": len(r.fetched_blocks),
               **_ms(r.timings_ms)}
        if job["paper_anchor"]:
            t: dict = {}
            next(mm.decode_tokens(ids, mm.mem, SamplingParams(max_tokens=1), t))
            row["prefill"] = round(t["prefill"], 3)
        row["load"] = round(row["fetch"] + row["attach"], 3)
        return row

    rows = []
    for i in range(job["paper_reps"]):
        a = i % PAPER_K
        # one prompt's path, then one that keeps level 1, then one that keeps levels 1-2
        rows.append({"scenario": "hier-cold", **load("hier", [a, 0, 0, 0], True)})
        rows.append({"scenario": "hier-deeper", **load("hier", [a, 1, 1, 0], False)})
        rows.append({"scenario": "hier-leaf", **load("hier", [a, 1, 2, 0], False)})
        rows.append({"scenario": "flat", **load("flat", [a], True)})
    return {"rows": rows, "anchor": "paper-160m random" if job["paper_anchor"] else "meta (none)"}


def zipf_run(job: dict, mm, addr: str, stack: ExitStack) -> dict:
    """`zipf_prompts` prompts, leaves by Zipf(s) over the deepest level that has blocks, through
    `fetch_path` and a DeviceCache of `cache_frac` of the bank; per level: how each block was
    served."""
    import numpy as np

    from services.model_client.device_cache import DeviceCache
    from services.model_client.memory_model import GenerateResult
    from services.model_client.targets import open_bank

    bank = stack.enter_context(open_bank(addr, timeout_s=600))
    view = mm.bank_view(bank)
    m = view.manifest(refresh=True)
    k = m.branching
    depth = max(l for l, r in enumerate(m.ranks, 1) if r)
    n_leaves = k ** depth
    rng = np.random.default_rng(job["seed"])
    # Zipf over the leaves in a random order (rank 1 = the most asked leaf)
    weights = 1.0 / np.arange(1, n_leaves + 1) ** job["zipf_s"]
    order = rng.permutation(n_leaves)
    leaves = order[rng.choice(n_leaves, size=job["zipf_prompts"], p=weights / weights.sum())]
    bank_bytes = sum(m.block_nbytes(lv) for lv, _ in m.blocks())
    budget = int(job["cache_frac"] * bank_bytes)
    view.cache, mm.attached = DeviceCache(budget), {}
    per = {l: {"attached": 0, "cache": 0, "fetched": 0, "bytes": 0} for l in range(1, depth + 1)}
    fetched_bytes, fetch_ms = [], []
    t_start = time.perf_counter()
    for leaf in leaves:
        path = [int(leaf) // k ** (depth - i) % k for i in range(1, depth + 1)]
        path += [0] * (m.depth - depth)
        r = GenerateResult(prompt="", text="", memory=False)
        mm.fetch_path(bank, path, r)
        fetched, cached = set(r.fetched_blocks), set(r.cached_blocks)
        for lv, n in m.path_blocks(path):
            s = per[lv]
            if (lv, n) in fetched:
                s["fetched"] += 1
                s["bytes"] += m.block_nbytes(lv)
            else:
                s["cache" if (lv, n) in cached else "attached"] += 1
        fetched_bytes.append(r.fetched_bytes)
        fetch_ms.append(r.timings_ms["fetch"] + r.timings_ms["attach"])
    n = len(leaves)
    levels = {}
    for lv, s in per.items():
        levels[lv] = {**s, "block_bytes": m.block_nbytes(lv), "nodes": k ** lv,
                      "hit_ratio": round((s["attached"] + s["cache"]) / n, 4),
                      "bytes_per_prompt": round(s["bytes"] / n)}
    return {"bank": m.bank, "prompts": n, "leaves": n_leaves, "zipf_s": job["zipf_s"],
            "cache_bytes": budget, "bank_bytes": bank_bytes,
            "path_bytes": sum(m.block_nbytes(l) for l in per),
            "bytes_per_prompt": round(statistics.fmean(fetched_bytes)),
            "prompts_fetching_nothing": sum(b == 0 for b in fetched_bytes),
            "load_ms_p50": round(median(fetch_ms), 3),
            "load_ms_mean": round(statistics.fmean(fetch_ms), 3),
            "seconds": round(time.perf_counter() - t_start, 1), "levels": levels,
            "device_cache": {l: vars(s) for l, s in view.cache.level_stats().items()}}


# -- orchestration ------------------------------------------------------------------------------
def run_worker(job: dict, link: Link | None, work: Path, timeout: float) -> dict:
    path = work / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    argv = [sys.executable, "-m", "benchmarks.prompt", "--worker", str(path)]
    kw = dict(capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    out = link.run(argv, **kw) if link else subprocess.run(argv, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"device worker on {job['link']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_by(rows: list[dict], key: str, fields) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return {g: {f: round(median(r.get(f, 0.0) for r in rs), 3) for f in fields}
            | {"n": len(rs)} for g, rs in groups.items()}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(report["links"])
    has_paper = any("paper" in report["links"][l] for l in links)
    has_zipf = "zipf" in report
    ncols = 1 + has_paper + has_zipf
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 5), squeeze=False)
    axes = axes[0]
    colors = dict(zip(STEPS, ["#4c72b0", "#8172b2", "#c44e52", "#dd8452", "#55a868"]))
    # TTFT stacked bars, demo model: one group per link
    ax, x, ticks = axes[0], 0, []
    for li, l in enumerate(links):
        med = report["links"][l]["demo"]
        for sc in DEMO_SCENARIOS:
            bottom = 0.0
            for st in STEPS:
                v = med[sc][st]
                ax.bar(x, v, bottom=bottom, color=colors[st], label=st if x == 0 else None)
                bottom += v
            ticks.append((x, f"{sc}\n{l}"))
            x += 1
        x += 0.6
    ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=70, fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_title("TTFT by step, demo-shaped model")
    ax.legend(fontsize=8)
    col = 1
    if has_paper:
        ax, x, ticks = axes[col], 0, []
        for l in links:
            if "paper" not in report["links"][l]:
                continue
            med = report["links"][l]["paper"]
            for sc in PAPER_SCENARIOS:
                parts = [("fetch", med[sc]["fetch"]), ("attach", med[sc]["attach"])]
                bottom = 0.0
                for st, v in parts:
                    ax.bar(x, v, bottom=bottom, color=colors[st], label=st if x == 0 else None)
                    bottom += v
                if sc in PAPER_ESTIMATE_MS:
                    ax.plot([x - 0.4, x + 0.4], [PAPER_ESTIMATE_MS[sc]] * 2, "k--", lw=1,
                            label="paper estimate" if x == 0 else None)
                ticks.append((x, f"{sc}\n{l}"))
                x += 1
            x += 0.6
        ax.set_yscale("log")
        ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks], rotation=70, fontsize=7)
        ax.set_ylabel("ms (median, log)")
        ax.set_title("Paper 160M shapes: load = fetch (+ verify) + attach")
        ax.legend(fontsize=8)
        col += 1
    if has_zipf:
        ax = axes[col]
        width = 0.38
        for j, (name, z) in enumerate(report["zipf"].items()):
            lv = sorted(z["levels"], key=int)
            xs = [int(l) + (j - 0.5) * width for l in lv]
            ax.bar(xs, [z["levels"][l]["hit_ratio"] for l in lv], width,
                   label=f"{name} bank: hit ratio ({z['bytes_per_prompt'] / 1e6:.2f} MB/prompt)")
            for xx, l in zip(xs, lv):
                ax.text(xx, z["levels"][l]["hit_ratio"] + 0.01,
                        f"{z['levels'][l]['bytes_per_prompt'] / 1e6:.2f} MB", ha="center",
                        fontsize=7)
        ax.set_xticks(sorted({int(l) for z in report["zipf"].values() for l in z["levels"]}))
        ax.set_xlabel("level")
        ax.set_ylabel("hit ratio (attached or device cache)")
        ax.set_ylim(0, 1.12)
        ax.set_title(f"Zipf prompt mix, {next(iter(report['zipf'].values()))['prompts']} prompts "
                     "(labels: MB fetched per prompt)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def print_tables(report: dict) -> None:
    print(f"\n== TTFT by step, demo-shaped model ({report['demo_preset']}), median ms "
          f"(n = {report['reps']} prompts each, {report['rounds']} rounds over the links); "
          "ratio = ttft / anchor-only")
    print(f"{'link':<14} {'scenario':<13} " + " ".join(f"{s:>8}" for s in STEPS)
          + f" {'ttft':>8} {'ratio':>6} {'fetched KB':>10}")
    for l, r in report["links"].items():
        base = r["demo"]["anchor-only"]["ttft"]
        for sc in DEMO_SCENARIOS:
            m = r["demo"][sc]
            print(f"{l:<14} {sc:<13} " + " ".join(f"{m[s]:8.2f}" for s in STEPS)
                  + f" {m['ttft']:8.2f} {m['ttft'] / base:6.2f} {m['fetched_bytes'] / 1e3:10.1f}")
    print("\n== emulated links, measured inside the namespace vs configured")
    print(f"{'link':<14} {'RTT conf':>9} {'RTT p50':>8} {'Mbit conf':>9} {'down':>7} {'up':>7}")
    for l, r in report["links"].items():
        v = r["validation"]
        conf = v["rate_mbit_configured"]
        print(f"{l:<14} {v['rtt_ms_configured']:9.1f} {v['rtt_ms_measured']:8.2f} "
              f"{('-' if conf is None else f'{conf:.1f}'):>9} {v['down_mbit_measured']:7.1f} "
              f"{v['up_mbit_measured']:7.1f}")
    if any("paper" in r for r in report["links"].values()):
        print("\n== paper 160M shapes: load = fetch + verify + attach (median ms); paper estimate "
              "in brackets; flat / hier ratio per link")
        print(f"{'link':<14} {'scenario':<12} {'MB':>6} {'fetch':>9} {'attach':>7} {'load':>9} "
              f"{'prefill':>8} {'paper':>7} {'x flat':>7}")
        for l, r in report["links"].items():
            if "paper" not in r:
                continue
            flat = r["paper"]["flat"]["load"]
            for sc in PAPER_SCENARIOS:
                m = r["paper"][sc]
                est = PAPER_ESTIMATE_MS.get(sc)
                print(f"{l:<14} {sc:<12} {m['fetched_bytes'] / 1e6:6.1f} {m['fetch']:9.1f} "
                      f"{m['attach']:7.1f} {m['load']:9.1f} {m.get('prefill', 0):8.1f} "
                      f"{(f'[{est:.0f}]' if est else ''):>7} {m['load'] / flat:7.3f}")
    for name, z in report.get("zipf", {}).items():
        print(f"\n== Zipf(s={z['zipf_s']}) over {z['leaves']} leaves, {z['prompts']} prompts, "
              f"{z['bank']} bank of {z['bank_bytes'] / 1e6:.1f} MB, device cache "
              f"{z['cache_bytes'] / 1e6:.1f} MB, loopback: "
              f"{z['bytes_per_prompt'] / 1e6:.3f} MB per prompt (a whole path: "
              f"{z['path_bytes'] / 1e6:.3f} MB, "
              f"ratio {z['bytes_per_prompt'] / z['path_bytes']:.3f}); "
              f"load p50 {z['load_ms_p50']:.1f} ms")
        print(f"{'level':>5} {'nodes':>6} {'block MB':>9} {'attached':>9} {'cache hit':>9} "
              f"{'fetched':>8} {'hit ratio':>9} {'MB/prompt':>10}")
        for lv, s in sorted(z["levels"].items(), key=lambda kv: int(kv[0])):
            print(f"{lv:>5} {s['nodes']:>6} {s['block_bytes'] / 1e6:9.3f} {s['attached']:>9} "
                  f"{s['cache']:>9} {s['fetched']:>8} {s['hit_ratio']:9.3f} "
                  f"{s['bytes_per_prompt'] / 1e6:10.3f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="< 1 min: loopback + 20/100, 2 prompts per scenario, no paper shapes, "
                         "300 Zipf prompts on the demo bank")
    ap.add_argument("--links", default=None,
                    help="comma-separated RTT_MS/RATE_MBIT (default 20/100,80/20; 'none': "
                         "loopback only)")
    ap.add_argument("--reps", type=int, default=None, help="prompts per TTFT scenario (default 8)")
    ap.add_argument("--paper-reps", type=int, default=2, help="loads per paper-shape scenario")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper 160M shapes")
    ap.add_argument("--no-paper-anchor", action="store_true",
                    help="do not instantiate the 160M anchor (no prefill at paper shapes)")
    ap.add_argument("--zipf-prompts", type=int, default=None, help="default 1000 (0: skip)")
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--cache-frac", type=float, default=0.5,
                    help="device cache for the Zipf mix, as a fraction of the bank's bytes")
    ap.add_argument("--rounds", type=int, default=None,
                    help="round-robin passes over the links (default 2; 1 with --quick)")
    ap.add_argument("--export", help="a model export to use instead of a random-weight one")
    ap.add_argument("--preset", default="demo", help="preset of the random-weight model")
    ap.add_argument("--static", metavar="FILE", default=None,
                    help="route the random-weight model with this static embedder (built if "
                         "missing; membank/nn/static_embed.py) instead of MiniLM")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the device")
    ap.add_argument("--plot", default=None, help="PNG path (default results/prompt.png, "
                                                  "results/prompt-quick.png with --quick)")
    ap.add_argument("--dir", help="parent of the work directory (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (banks, logs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", metavar="JSON", help="redraw the plot (and tables) from a saved "
                                                     "last JSON line, then exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        out = worker(json.loads(Path(args.worker).read_text()))
        print(json.dumps(out))
        return out

    if args.replot:
        report = json.loads(Path(args.replot).read_text().strip().splitlines()[-1])
        print_tables(report)
        plot(report, Path(args.plot or report["plot"]))
        return report

    # SIGTERM -> SystemExit, so the links and servers are torn down as on Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quick = args.quick
    links_arg = args.links if args.links is not None else ("20/100" if quick else "20/100,80/20")
    specs = [] if links_arg in ("", "none") else [LinkSpec.parse(s) for s in links_arg.split(",")]
    reps = args.reps or (2 if quick else 8)
    paper = not (args.no_paper or quick)
    zipf_prompts = args.zipf_prompts if args.zipf_prompts is not None else (300 if quick else 1000)
    plot_path = Path(args.plot
                     or REPO / "results" / ("prompt-quick.png" if quick else "prompt.png"))
    if specs and (why := unavailable_reason()):
        print(f"emulated links skipped: {why}", flush=True)
        specs = []

    from tqdm import tqdm

    from services.bank_server.ingest import ingest
    from services.bank_server.launch import run_bank_server

    report: dict = {"benchmark": "prompt", "quick": quick, "reps": reps,
                    "demo_preset": args.export or args.preset, "cpus": os.cpu_count(),
                    "static_embedder": None if args.export else args.static,
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()], "links": {}}
    work = Path(tempfile.mkdtemp(prefix="membank-prompt-", dir=args.dir))
    t_start = time.perf_counter()
    try:
        with ExitStack() as stack:
            # -- banks -------------------------------------------------------------------------
            export = (Path(args.export) if args.export
                      else build_demo_export(work / "export", args.preset, static=args.static))
            ingest(export, work / "demo.lmdb", progress=False, map_size=1 << 30,
                   signing_key=signing_key())
            servers = {}

            def serve(name: str, lmdb: Path) -> str:
                addr, _ = stack.enter_context(run_bank_server(
                    lmdb, "--no-admin", "--map-size-gb", "4", "--warm-levels", "0",
                    log_path=work / f"{name}.log", cwd=REPO, timeout=120))
                return addr

            servers["demo"] = serve("demo", work / "demo.lmdb")
            if paper:
                print("building the paper-shaped banks (hierarchical 0.36 GB, flat 0.14 GB)",
                      flush=True)
                t0 = time.perf_counter()
                build_paper_bank(work / "hier.lmdb", "paper-hier", (256, 64, 16, 0), PAPER_K,
                                 args.seed)
                build_paper_bank(work / "flat.lmdb", "paper-flat", (FLAT_RANK,), PAPER_K, args.seed)
                report["paper_build_s"] = round(time.perf_counter() - t0, 1)
                servers["hier"] = serve("hier", work / "hier.lmdb")
                servers["flat"] = serve("flat", work / "flat.lmdb")

            # -- the device on each link, round-robin (a busy moment of the shared machine
            # then hits every link alike); links stay up across rounds -----------------------------
            links: dict[str, Link | None] = {"loopback": None}
            for spec in specs:
                links[spec.label] = stack.enter_context(Link(spec.rtt_ms, spec.rate_mbit))
            raw: dict[str, dict] = {label: {"demo": [], "paper": [], "seconds": 0.0}
                                    for label in links}
            for label, link in links.items():
                if link:
                    v = link.validate(
                        bulk_bytes=int(link.spec.rate_mbit * 1e6 / 8 * (0.5 if quick else 2)))
                else:
                    with ProbeServer() as ps:
                        got = probe(ps.address, 20, 100 << 20)
                    v = {"link": label, "rtt_ms_configured": 0.0,
                         "rtt_ms_measured": round(got["rtt_ms_p50"], 3),
                         "rate_mbit_configured": None,
                         "down_mbit_measured": round(got["down_mbit"], 1),
                         "up_mbit_measured": round(got["up_mbit"], 1)}
                raw[label]["validation"] = v
            addrs = {label: {n: (link.forward(a) if link else a) for n, a in servers.items()}
                     for label, link in links.items()}
            rounds = max(1, min(args.rounds or (1 if quick else 2), reps))
            runs = [(i, label) for i in range(rounds) for label in links]
            for i, label in tqdm(runs, desc="device runs", unit="run"):
                link = links[label]
                job = {"link": label, "export": str(export), "demo_bank": addrs[label]["demo"],
                       "hier_bank": addrs[label].get("hier"), "flat_bank": addrs[label].get("flat"),
                       "reps": -(-reps // rounds), "prompt_offset": i * -(-reps // rounds),
                       "paper_reps": -(-args.paper_reps // rounds),
                       "paper_anchor": not args.no_paper_anchor, "threads": args.threads,
                       # the mix measures bytes and hit ratios, not the link: loopback, once
                       "zipf_prompts": zipf_prompts if link is None and i == 0 else 0,
                       "zipf_s": args.zipf_s, "cache_frac": args.cache_frac, "seed": args.seed + i}
                t0 = time.perf_counter()
                got = run_worker(job, link, work, timeout=3600)
                r = raw[label]
                r["seconds"] += time.perf_counter() - t0
                r["demo"] += got["demo"]
                r["paper"] += got.get("paper", {}).get("rows", [])
                r.setdefault("manifest_rtt_ms", []).append(got["manifest_rtt_ms"])
                if "paper" in got:
                    r["paper_anchor"] = got["paper"]["anchor"]
                if "zipf" in got:
                    report["zipf"] = got["zipf"]
                report["demo_block_bytes"] = got["demo_block_bytes"]
                tqdm.write(f"round {i + 1}/{rounds} {label}: {time.perf_counter() - t0:.1f} s")
            report["rounds"] = rounds
            for label, r in raw.items():
                entry = {"validation": r["validation"],
                         "manifest_rtt_ms": median(r["manifest_rtt_ms"]),
                         "seconds": round(r["seconds"], 1),
                         "demo": median_by(r["demo"], "scenario",
                                           STEPS + ("ttft", "fetched_bytes"))}
                if r["paper"]:
                    entry["paper"] = median_by(r["paper"], "scenario",
                                               ("fetch", "attach", "load", "prefill",
                                                "fetched_bytes"))
                    entry["paper_anchor"] = r["paper_anchor"]
                report["links"][label] = entry
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print_tables(report)
    plot(report, plot_path)
    report["plot"] = str(plot_path)
    print(f"\nplot: {plot_path}; {report['seconds']} s; load average {report['loadavg_start']} -> "
          f"{report['loadavg_end']} on {report['cpus']} CPUs")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
