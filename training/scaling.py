"""Memory-size scaling: probe accuracy and held-out perplexity against bank size and fetch size.

    membank eval-scaling --preset small          # results/scaling.{json,md,png}
    make eval-scaling

PAPER.md section 7: "At a fixed bank, accuracy rises with fetch size; at a fixed fetch, with bank
size." Per seed this takes the long-tail evaluation's corpus, data and schedule
(training/evaluate.py, the same preset), pretrains the anchor once, continues it alone once
(the anchor-only baseline), and then co-trains one bank per grid point from that same
pretrained anchor, on the same data and data order. The tree (k, depth) is the preset's, so the
ranks (r_1, .., r_p) set both sizes: with c0 = 3 * layers * d_model per FFN neuron, a fetch holds
c0 * sum(r_l) parameters and the bank c0 * sum(k^l r_l). At a fixed fetch, moving rank from
level 1 to the leaves grows the bank; halving every rank halves the fetch and the bank.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from membank import artifacts
from training import checkpoint
from training.config import TrainConfig
from training.evaluate import (
    DomainFiles,
    _train,
    continuation,
    eval_preset,
    evaluate,
    prepare_seed,
    probing_for,
)
from training.report import N_BUCKETS, accuracy, machine, pct, save_png, table
from training.train import Trainer

GRIDS: dict[str, tuple[tuple[int, ...], ...]] = {"smoke": ((2, 2), (1, 3))}


def default_grid(ranks: list[int]) -> tuple[tuple[int, ...], ...]:
    """For a two-level tree: the preset's fetch F = r_1 + r_2 and half of it, each split three
    ways, 2/9, 1/2 and 7/9 of it at the leaves (the small preset's (32, 112) is F = 144 at 7/9):
    three bank sizes per fetch size."""
    if len(ranks) != 2:
        raise ValueError(f"the default scaling grid is for two-level trees; "
                         f"give --grid for ranks {ranks}")
    out = []
    for fetch in (sum(ranks), sum(ranks) // 2):
        for share in (2 / 9, 1 / 2, 7 / 9):
            leaf = round(fetch * share)
            out.append((fetch - leaf, leaf))
    return tuple(out)


def run_scaling(out_dir: str | Path, preset: str = "small", *,
                grid: tuple[tuple[int, ...], ...] | None = None,
                seeds: tuple[int, ...] = (0,), domains: list[DomainFiles] | None = None,
                results: str | Path | None = None, log=print) -> dict:
    """Train and probe every grid point for every seed; write results JSON, .md and .png."""
    from membank.nn.embed import Embedder
    from training.embeddings import EmbeddingStore

    t_start = time.perf_counter()
    ec = eval_preset(preset)
    memory = TrainConfig(**ec.train).model_config().memory
    grid = grid or GRIDS.get(preset) or default_grid(list(memory.ranks))
    depth = memory.depth
    for ranks in grid:
        if len(ranks) != depth:
            raise ValueError(f"grid point {ranks} has {len(ranks)} levels, "
                             f"the preset's tree {depth}")
    ec = dataclasses.replace(ec, rag=False)
    torch.set_num_threads(ec.threads)
    out = Path(out_dir)
    store = EmbeddingStore(out / "embeddings", Embedder())
    points: dict[tuple, dict] = {}
    anchor_rows, timings = [], []
    for seed in seeds:
        run = out / f"seed-{seed}"
        s = prepare_seed(run, ec, seed, list(domains or []), store, log)
        t0 = time.perf_counter()
        pre_tc = dataclasses.replace(s.tc, cotrain_steps=0)
        pre = _train(Trainer(s.config, pre_tc, s.data.packed, data_fingerprint=s.data.fingerprint,
                             log=log),
                     run / "pretrain", "pretrain", log)
        anchor = _train(Trainer(s.config, continuation(s.tc), s.data.packed,
                                data_fingerprint=s.data.fingerprint,
                                init=run / "pretrain" / "anchor-end", log=log),
                        run / "anchor", "anchor", log)
        del pre
        anchor.model.eval()
        probing = probing_for(run, s)
        ev = evaluate({"anchor": anchor}, probing, ec, log=log, names=("anchor",))
        anchor_rows += ev["rows"]
        anchor_ppl = ev["perplexity"].get("anchor")
        seed_t = {"data": s.seconds, "anchor": time.perf_counter() - t0}
        for ranks in grid:
            t1 = time.perf_counter()
            tc = dataclasses.replace(s.tc, anchor_steps=0,
                                     memory={**s.tc.memory, "ranks": list(ranks)})
            config = tc.validate().model_config()
            name = "ranks-" + "-".join(map(str, ranks))
            trainer = Trainer(config, tc, s.data.packed, data_fingerprint=s.data.fingerprint,
                              log=log)
            if checkpoint.latest(run / name) is None:
                trainer.load_anchor(run / "pretrain" / "anchor-end")
            trainer = _train(trainer, run / name, name, log)
            trainer.model.eval()
            ev = evaluate({"memory": trainer, "anchor": anchor}, probing, ec, log=log,
                          names=("fetched",))
            sizes = config.memory.sizes(config.model)
            p = points.setdefault(tuple(ranks), {"ranks": list(ranks),
                                                 "bank_params": sizes["bank_params"],
                                                 "fetch_params": sizes["fetch_params"],
                                                 "rows": [], "ppl": []})
            p["rows"] += ev["rows"]
            p["ppl"].append(ev["perplexity"].get("fetched"))
            seed_t[name] = time.perf_counter() - t1
            log(f"seed {seed} {name}: bank {sizes['bank_params']:,}, "
                f"fetch {sizes['fetch_params']:,}: "
                f"fetched {100 * accuracy(ev['rows'], 'fetched')[1]:.1f}% ({seed_t[name]:.0f} s)")
        timings.append(seed_t)
        anchor_params = anchor.model.num_params()

    result = {
        "preset": preset, "seeds": list(seeds), "anchor_params": anchor_params,
        "anchor": {"accuracy_per_bucket": accuracy(anchor_rows, "anchor")[0],
                   "accuracy_overall": accuracy(anchor_rows, "anchor")[1],
                   "perplexity": anchor_ppl},
        "points": [{k: v for k, v in p.items() if k not in ("rows", "ppl")}
                   | {"accuracy_per_bucket": accuracy(p["rows"], "fetched")[0],
                      "accuracy_overall": accuracy(p["rows"], "fetched")[1],
                      "perplexity": float(np.mean([x for x in p["ppl"] if x is not None]
                                                  or [np.nan])),
                      "bank_over_anchor": p["bank_params"] / anchor_params,
                      "fetch_over_anchor": p["fetch_params"] / anchor_params}
                   for p in points.values()],
        "train_config": {k: v for k, v in ec.train.items()},
        "timings_s": {"per_seed": timings, "total": time.perf_counter() - t_start},
        "machine": machine(torch.get_num_threads()),
    }
    path = Path(results) if results else out / "scaling.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(path, json.dumps(result, indent=1).encode())
    artifacts.atomic_write_bytes(path.with_suffix(".md"), markdown(result).encode())
    plot(result, path.with_suffix(".png"))
    log(markdown(result))
    log(f"results: {path} (+ .md, .png); total {result['timings_s']['total']:.0f} s")
    return result


def markdown(result: dict) -> str:
    head = ["ranks", "bank params", "bank / anchor", "fetch params", "fetch / anchor"] + \
        [f"bucket {b + 1}" for b in range(N_BUCKETS)] + ["overall", "held-out ppl"]
    a = result["anchor"]
    body = [["anchor only", 0, 0, 0, 0] + [pct(x) for x in a["accuracy_per_bucket"]]
            + [pct(a["accuracy_overall"]), f"{a['perplexity']:.3f}"]]
    for p in sorted(result["points"], key=lambda p: (p["fetch_params"], p["bank_params"])):
        body.append([f"({', '.join(map(str, p['ranks']))})", f"{p['bank_params']:,}",
                     f"{p['bank_over_anchor']:.1f}x", f"{p['fetch_params']:,}",
                     f"{p['fetch_over_anchor']:.3f}"]
                    + [pct(x) for x in p["accuracy_per_bucket"]]
                    + [pct(p["accuracy_overall"]), f"{p['perplexity']:.3f}"])
    lines = table(head, body)
    lines += ["", f"Anchor {result['anchor_params']:,} parameters; "
                  f"seeds {', '.join(map(str, result['seeds']))}; "
                  f"fetched memory routed as in the evaluation, probes pooled over domains "
                  f"(bucket 1 rarest)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Accuracy (overall and rarest bucket) and held-out perplexity against bank size, one line
    per fetch size; the anchor alone as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    by_fetch: dict[int, list[dict]] = {}
    for p in result["points"]:
        by_fetch.setdefault(p["fetch_params"], []).append(p)
    a = result["anchor"]
    panels = [("accuracy_overall", "overall probe accuracy (%)", 100, a["accuracy_overall"]),
              ("rarest", "rarest-bucket accuracy (%)", 100, a["accuracy_per_bucket"][0]),
              ("perplexity", "held-out perplexity", 1, a["perplexity"])]
    for i, (key, label, scale, anchor_value) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for fetch, pts in sorted(by_fetch.items()):
            pts = sorted(pts, key=lambda p: p["bank_params"])
            ys = [scale * (p["accuracy_per_bucket"][0] if key == "rarest" else p[key]) for p in pts]
            ax.plot([p["bank_params"] / 1e6 for p in pts], ys, marker="o",
                    label=f"fetch {fetch / 1e3:.0f}k "
                          f"({100 * pts[0]['fetch_over_anchor']:.0f}% of anchor)")
        if anchor_value is not None:
            ax.axhline(scale * anchor_value, color="grey", linestyle="--", label="anchor only")
        ax.set_xlabel("bank parameters (M)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"memory-size scaling ({result['preset']} preset, "
                 f"anchor {result['anchor_params'] / 1e6:.2f}M params)")
    save_png(fig, path)
