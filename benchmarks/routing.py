"""Benchmark: batched routing, the old exact per-row rule vs the matmul + margin rule, one run.

    .venv/bin/python -m benchmarks.routing [--n 100000] [--shapes 4x2,16x2,8x3,16x4] [--repeats 2]
                                           [--texts 512] [--threads 2] [--index-docs 25000]
                                           [--static FILE]

route only     n random unit vectors (384-d), a router of k x depth with random centroids of
               norm 0.5 (like k-means centroids of unit vectors); `old` is the previous
               membank/router.py rule (gather each row's k children, float32 elementwise
               distances), `new` is Router.route (one matmul per parent node, exact float64
               distances for near-ties only). Runs alternate old/new so machine load hits both;
               the best of --repeats is reported, with rows/s and new/old speed-up.
embed + route  --texts element documents embedded with MiniLM (batched) and routed, with each
               rule (embedding dominates); and one device prompt at a time (embed + route).

nearest-document  the rule that routes a query to its nearest training document's path, over an
               index of --index-docs documents: batched rows/s and one query at a time.
device prompt  one prompt at a time, embed + nearest-document route, MiniLM vs the static table
               distilled from it (membank/nn/static_embed.py; --static FILE, built if missing).

Also counts paths where the old float32 rule and the new exact rule differ (near-ties the old
rule's float32 sum got wrong or right by luck). Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from membank.router import Router


def old_route(router: Router, emb) -> np.ndarray:
    """The rule before the matmul + margin change: float32 distances for every row (a (c, k, dim)
    gather), in torch."""
    x = torch.as_tensor(np.asarray(emb), dtype=torch.float32)
    node = torch.zeros(len(x), dtype=torch.long)
    children = []
    for level in range(router.depth):
        lc = torch.from_numpy(router.centroids[level])
        k, dim = lc.shape[1:]
        out = torch.empty(len(x), dtype=torch.long)
        chunk = max(1, (1 << 24) // (k * dim))
        for s in range(0, len(x), chunk):
            rows, cand = x[s:s + chunk], lc[node[s:s + chunk]]
            out[s:s + chunk] = (cand - rows[:, None, :]).square().sum(-1).argmin(dim=1)
        children.append(out)
        node = node * router.branching + out
    return torch.stack(children, dim=1).numpy()


def unit_rows(rng: np.random.Generator, n: int, dim: int = 384) -> np.ndarray:
    """(n, dim) float32 random unit vectors: routed rows, or a document index."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_router(k: int, depth: int, dim: int = 384, seed: int = 0) -> Router:
    g = torch.Generator().manual_seed(seed)
    cs = [torch.nn.functional.normalize(torch.randn(k ** l, k, dim, generator=g), dim=-1) * 0.5
          for l in range(depth)]
    return Router(branching=k, depth=depth, dim=dim, centroids=cs)


def best_time(fn, arg) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(arg)
    return time.perf_counter() - t0, out


def route_only(n: int, shapes: list[tuple[int, int]], repeats: int) -> list[dict]:
    x = unit_rows(np.random.default_rng(1), n)
    xt = torch.from_numpy(x)
    rows = []
    for k, depth in shapes:
        router = random_router(k, depth)
        router.route(xt[:256])   # warm-up
        old_s, new_s = [], []
        for _ in range(repeats):
            t, old = best_time(lambda e: old_route(router, e), xt)
            old_s.append(t)
            t, new = best_time(router.route, xt)
            new_s.append(t)
        row = {"k": k, "depth": depth, "n": n, "old_s": min(old_s), "new_s": min(new_s),
               "old_per_s": n / min(old_s), "new_per_s": n / min(new_s),
               "speedup": min(old_s) / min(new_s),
               "paths_differing": int((old != new).any(axis=1).sum())}
        rows.append(row)
        print(f"k={k:<3} depth={depth}  old {row['old_per_s']:>10,.0f}/s  "
              f"new {row['new_per_s']:>10,.0f}/s  "
              f"new/old {row['speedup']:5.1f}x  paths differing {row['paths_differing']}",
              flush=True)
    return rows


def embed_and_route(n_texts: int) -> dict:
    from membank.nn.embed import Embedder
    from training.data import build_documents

    texts = [d.text for d in build_documents()][:n_texts]
    emb = Embedder()
    emb.encode(texts[:8])   # load the model outside the timing
    router = random_router(4, 2)
    t0 = time.perf_counter()
    vectors = emb.encode(texts)
    t_embed = time.perf_counter() - t0
    t_old, _ = best_time(lambda e: old_route(router, e), vectors)
    t_new, _ = best_time(router.route, vectors)
    one = []
    for t in texts[:32]:     # a device routes one prompt at a time
        t0 = time.perf_counter()
        router.route(emb.encode([t]))
        one.append(time.perf_counter() - t0)
    return {"texts": len(texts), "embed_per_s": len(texts) / t_embed,
            "embed_route_old_per_s": len(texts) / (t_embed + t_old),
            "embed_route_new_per_s": len(texts) / (t_embed + t_new),
            "one_prompt_embed_route_ms": 1e3 * float(np.median(one))}


def device_prompt(static_file: str, n_docs: int, n_prompts: int = 64) -> dict:
    """One device prompt at a time, embed + nearest-document route over an index of n_docs
    documents, with MiniLM and with the static table distilled from it (built into
    static_file if missing): median ms per prompt and the static / MiniLM ratio. The index
    holds random unit vectors of each embedder's width (routing cost does not depend on what
    they say); the prompts are the long-tail probe templates over element names."""
    from membank.nn.embed import Embedder
    from membank.nn.static_embed import StaticEmbedder, build
    from training.data import build_documents

    names = sorted({d.subject for d in build_documents()})
    templates = ["The atomic number of {} is", "The city served by {} is",
                 "{} is a city in the country of", "The ISO 639-3 code of {} is"]
    prompts = [templates[i % len(templates)].format(n) for i, n in enumerate(names)][:n_prompts]
    rng = np.random.default_rng(3)
    out = {"index_documents": n_docs, "prompts": len(prompts)}
    for label, emb in (("minilm", Embedder()), ("static", StaticEmbedder.load(build(static_file)))):
        docs = unit_rows(rng, n_docs, emb.dim)
        tree = random_router(16, 2, dim=emb.dim)
        router = tree.with_index(docs, tree.route(docs))
        router.route(emb.encode(prompts[:2]))          # load the model, warm the caches
        embed_ms, total_ms = [], []
        for p in prompts:
            t0 = time.perf_counter()
            v = emb.encode([p])
            t1 = time.perf_counter()
            router.route(v)
            t2 = time.perf_counter()
            embed_ms.append(1e3 * (t1 - t0))
            total_ms.append(1e3 * (t2 - t0))
        out[label] = {"embedder": emb.name, "dim": emb.dim,
                      "embed_ms": float(np.median(embed_ms)),
                      "embed_route_ms": float(np.median(total_ms))}
    out["static_over_minilm"] = out["static"]["embed_route_ms"] / out["minilm"]["embed_route_ms"]
    return out


def nearest_document(n_docs: int, n: int, repeats: int) -> dict:
    """The nearest-document rule over an index of n_docs random unit documents (k=16, depth 2):
    batched rows/s, and one query at a time (a device's prompt) in ms, next to centroid descent."""
    rng = np.random.default_rng(2)
    docs = unit_rows(rng, n_docs)
    tree = random_router(16, 2)
    router = tree.with_index(docs, tree.route(docs))
    x = unit_rows(rng, n)
    router.route(x[:64])
    batch = min(best_time(router.route, x)[0] for _ in range(repeats))
    one, one_centroid = [], []
    for row in x[:64]:
        one.append(best_time(router.route, row)[0])
        one_centroid.append(best_time(lambda r: router.route(r, routing="centroid"), row)[0])
    return {"index_documents": n_docs, "rows": n, "batch_per_s": n / batch,
            "one_query_ms": 1e3 * float(np.median(one)),
            "one_query_centroid_ms": 1e3 * float(np.median(one_centroid))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--shapes", default="4x2,16x2,8x3,16x4", help="k x depth, comma separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--texts", type=int, default=512, help="0 skips embed + route")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--index-docs", type=int, default=25_000,
                    help="documents in the nearest-document index (0 skips it)")
    ap.add_argument("--static", default="runs/static-embedder/static-embedder.safetensors",
                    help="the static embedder for the device-prompt rows (built if missing); "
                         "'' skips them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"route only: {args.n:,} random unit vectors x 384, best of {args.repeats}, "
          f"{args.threads} threads")
    figures: dict = {"threads": args.threads, "route": route_only(args.n, shapes, args.repeats)}
    speedups = [r["speedup"] for r in figures["route"]]
    figures["min_speedup"], figures["max_speedup"] = min(speedups), max(speedups)
    if args.index_docs:
        nd = nearest_document(args.index_docs, min(args.n, 20_000), args.repeats)
        figures["nearest_document"] = nd
        print(f"nearest-document routing over {nd['index_documents']:,} documents: "
              f"{nd['batch_per_s']:,.0f} rows/s "
              f"batched; one query {nd['one_query_ms']:.2f} ms "
              f"(centroid descent {nd['one_query_centroid_ms']:.3f} ms)")
    if args.texts:
        er = embed_and_route(args.texts)
        figures["embed_route"] = er
        print(f"embed + route, {er['texts']} element documents: "
              f"embed {er['embed_per_s']:.0f} texts/s; "
              f"embed + route old {er['embed_route_old_per_s']:.1f}/s, "
              f"new {er['embed_route_new_per_s']:.1f}/s "
              f"(new/old {er['embed_route_new_per_s'] / er['embed_route_old_per_s']:.3f}x); "
              f"one prompt embed + route {er['one_prompt_embed_route_ms']:.1f} ms")
    if args.static and args.index_docs:
        dp = device_prompt(args.static, args.index_docs)
        figures["device_prompt"] = dp
        for label in ("minilm", "static"):
            r = dp[label]
            print(f"device prompt, {label} ({r['dim']}-d): embed {r['embed_ms']:.2f} ms, "
                  f"embed + nearest-document route over {dp['index_documents']:,} documents "
                  f"{r['embed_route_ms']:.2f} ms (median of {dp['prompts']})")
        print(f"static / MiniLM per prompt: {dp['static_over_minilm']:.3f}x")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
