"""The long-tail evaluation's results: pooled accuracy, targets, Markdown tables and the plot.

    result = build(runs, ec, preset, machine(threads), total_s)  # runs: evaluate.py _run_one
    write(result, Path("results/longtail.json"), prompts_path, pooled_rows(runs))  # + .md, .png
    print(markdown(result))

Accuracy is pooled over domains and seeds: pooled bucket b is every domain's bucket b of every
seed. Each seed's own figures ride along (`per_seed`; the whiskers of the plot), and so does
each domain's (`per_domain`).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import platform
from pathlib import Path

import numpy as np

from membank import artifacts

N_BUCKETS = 5
MODELS = ("anchor", "generic", "fetched", "dense", "blocked")   # the comparison
EXTRA = ("cotrained-anchor", "fetched-int8", "fetched-centroid")
RAG = ("anchor", "anchor+rag", "fetched", "fetched+rag")


def per_bucket(rows: list[dict], values: list) -> list[float]:
    """The mean of `values` (one per row) over each bucket's rows; NaN where a bucket has none."""
    return [float(np.mean([v for r, v in zip(rows, values) if r["bucket"] == b] or [np.nan]))
            for b in range(N_BUCKETS)]


def accuracy(rows: list[dict], name: str) -> tuple[list[float], float]:
    """(per bucket, overall) share of rows `name` answered; NaN where a bucket has none."""
    have = [r for r in rows if name in r]
    correct = [r[name]["correct"] for r in have]
    return per_bucket(have, correct), float(np.mean(correct or [np.nan]))


def runtime_params(anchor: int, dense: int, sizes: dict, depth: int,
                   variants: list[str]) -> dict[str, int]:
    """Variant -> the parameters it runs with: the anchor's, plus the blocks it attaches (every
    level of the path unless it says otherwise); the dense model its own. sizes:
    MemoryConfig.sizes()."""
    params = {"anchor": anchor, "cotrained-anchor": anchor, "dense": dense,
              "anchor+rag": anchor, "fetched+rag": anchor + sizes["fetch_params"]}
    for j in range(1, depth):
        params[f"fetched-levels-{j}"] = anchor + sum(sizes["block_params_per_level"][:j])
    for name in variants:
        params.setdefault(name, anchor + sizes["fetch_params"])
    return params


def machine(torch_threads: int) -> dict:
    """What the results were measured on."""
    return {"platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch_threads}


def pooled_rows(runs: list[dict]) -> list[dict]:
    """Every seed's prompt rows, each with its seed."""
    return [dict(r, seed=run["seed"]) for run in runs for r in run["ev"]["rows"]]


def targets(acc: dict, overall: dict, routing: dict) -> tuple[dict, dict]:
    """Issue 14's targets on pooled accuracy: name -> met, and the figures behind them."""
    rare, common = 0, N_BUCKETS - 1
    f, a = acc["fetched"], acc["anchor"]
    gain_two = (f[0] + f[1]) - (a[0] + a[1])
    removed = (((f[0] + f[1]) - (acc["blocked"][0] + acc["blocked"][1])) / gain_two
               if gain_two > 0 else None)
    figures = {"rarest_fetched_over_anchor": f[rare] / a[rare] if a[rare] > 0 else None,
               "rarest_fetched_minus_anchor": f[rare] - a[rare],
               "overall_fetched_minus_anchor": overall["fetched"] - overall["anchor"],
               "blocking_removes_share_of_rare_gain": removed,
               "common_blocked_minus_anchor": acc["blocked"][common] - a[common],
               "common_cotrained_anchor_minus_anchor": acc["cotrained-anchor"][common] - a[common],
               "level1_in_domain": routing.get("level1_in_domain")}
    met = {"rarest_fetched_ge_3x_anchor": f[rare] >= 3 * a[rare] and f[rare] > 0,
           "rarest_fetched_ge_anchor_plus_15": f[rare] - a[rare] >= 0.15,
           "overall_fetched_ge_anchor_plus_10": overall["fetched"] - overall["anchor"] >= 0.10,
           "overall_fetched_gt_generic": overall["fetched"] > overall["generic"],
           "fetched_ge_dense_rarest_two": all(f[b] >= acc["dense"][b] for b in (0, 1)),
           "blocking_removes_70pct_of_rare_gain": removed is not None and removed >= 0.7,
           "blocked_common_within_5_of_anchor": abs(acc["blocked"][common] - a[common]) <= 0.05,
           "separation_cotrained_anchor_common_within_5":
               abs(acc["cotrained-anchor"][common] - a[common]) <= 0.05,
           "level1_domain_routing_ge_95pct": (routing.get("level1_in_domain") or 0) >= 0.95}
    return met, figures


def capacity_check(capacity: dict) -> bool | None:
    """The anchor cannot hold the corpus: on the training text's own phrasings it answers at most
    half of the rarest bucket's facts (None without train templates)."""
    per = (capacity or {}).get("anchor_train_phrasing_per_bucket")
    return None if not per or per[0] is None else per[0] <= 0.5


def build(runs: list[dict], ec, preset: str, machine: dict, total_s: float) -> dict:
    """The results dict from every seed's run (see training/evaluate.py `_run_one`)."""
    rows = pooled_rows(runs)
    variants = runs[0]["ev"]["variants"]
    acc, overall = {}, {}
    for v in variants:
        acc[v], overall[v] = accuracy(rows, v)
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    per_domain = {}
    for d in domains:
        drows = [r for r in rows if r["domain"] == d]
        per_domain[d] = {"n_prompts": len(drows), "bucket_mentions": _spans(drows),
                         "accuracy_per_bucket": {v: accuracy(drows, v)[0] for v in variants},
                         "accuracy_overall": {v: accuracy(drows, v)[1] for v in variants}}
    per_seed = []
    for run in runs:
        srows = run["ev"]["rows"]
        s_acc = {v: accuracy(srows, v)[0] for v in variants}
        s_all = {v: accuracy(srows, v)[1] for v in variants}
        met, _ = targets(s_acc, s_all, run["ev"]["routing"])
        per_seed.append({"seed": run["seed"], "accuracy_per_bucket": s_acc,
                         "accuracy_overall": s_all, "targets": met,
                         "level1_nodes_per_domain":
                             run["ev"]["routing"].get("level1_nodes_per_domain")})
    routing = _mean_nested([{k: v for k, v in run["ev"]["routing"].items()
                             if k != "level1_nodes_per_domain"}
                            for run in runs])
    met, figures = targets(acc, overall, routing)
    first = runs[0]
    q = first["ev"]["int8"]
    int8 = {**q, "accuracy_change": overall["fetched-int8"] - overall["fetched"],
            "answers_changed": sum(r["fetched-int8"]["text"] != r["fetched"]["text"] for r in rows),
            "n_prompts": len(rows)}
    ppl = _mean_nested([run["ev"]["perplexity"] for run in runs])
    if ppl.get("fetched-int8") is not None:
        int8["perplexity_change"] = ppl["fetched-int8"] - ppl["fetched"]
    capacity = _mean_nested([run["ev"]["capacity"] for run in runs if run["ev"]["capacity"]])
    return {
        "preset": preset, "seeds": [run["seed"] for run in runs], "domains": domains,
        "n_prompts": len(rows), "n_subjects_per_seed": [len(run["ev"]["rows"]) for run in runs],
        "eval_config": dataclasses.asdict(ec), "model_config": first["config"].to_dict(),
        "train_config": first["train_config"],
        "bank_params": first["sizes"]["bank_params"],
        "fetch_params": first["sizes"]["fetch_params"],
        "runtime_params": first["params"], "dense_added_neurons": first["dense_added_neurons"],
        "data": [run["data"] for run in runs],
        "timings_s": {"per_seed": [run["timings"] for run in runs], "total": total_s},
        "machine": machine, "variants": variants,
        "accuracy_per_bucket": acc, "accuracy_overall": overall, "bucket_mentions": _spans(rows),
        "targets": met, "target_figures": figures, "perplexity": ppl, "routing": routing,
        "rag_extra_prompt_tokens": float(np.mean([run["ev"]["rag_extra_tokens"] for run in runs
                                                  if run["ev"]["rag_extra_tokens"] is not None]
                                                 or [np.nan])),
        "capacity": capacity, "anchor_cannot_hold_rarest": capacity_check(capacity),
        "int8": int8, "per_domain": per_domain, "per_seed": per_seed,
    }


def write(result: dict, path: Path, prompts_path: Path, rows: list[dict]) -> None:
    """results JSON + .md + .png (each written atomically); every prompt's answers, gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(path, json.dumps(result, indent=1, allow_nan=True).encode())
    artifacts.atomic_write_bytes(path.with_suffix(".md"), markdown(result).encode())
    plot(result, path.with_suffix(".png"))
    prompts_path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(
        prompts_path, gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))


# ---------------------------------------------------------------------------------------------
# Markdown


def pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}%"


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(head: list[str], body: list[list]) -> list[str]:
    return [row(head), "|" + "---|" * len(head)] + [row(r) for r in body]


def markdown(result: dict) -> str:
    acc, overall, ppl = (result["accuracy_per_bucket"], result["accuracy_overall"],
                         result["perplexity"])
    params = result["runtime_params"]
    buckets = [f"bucket {b + 1}"
               + (" (rarest)" if b == 0 else " (most common)" if b == N_BUCKETS - 1 else "")
               for b in range(N_BUCKETS)]
    names = [v for v in MODELS + EXTRA if v in acc]
    lines = table(["model", "runtime params"] + buckets + ["overall", "held-out ppl"],
                   [[v, f"{params.get(v, 0):,}"] + [pct(a) for a in acc[v]] + [pct(overall[v]),
                    f"{ppl[v]:.3f}" if v in ppl else "-"] for v in names])
    seeds = result["seeds"]
    lines += ["", f"{result['n_prompts']:,} prompts: {len(result['domains'])} domains "
              f"({', '.join(result['domains'])}), {len(seeds)} seed(s) "
              f"({', '.join(map(str, seeds))}), pooled. "
              f"Buckets: each domain's subjects in 5 equal groups by how often their name "
              f"appears in the training text, rarest first; pooled bucket b is every domain's "
              f"bucket b."]

    lines += ["", "Per domain (overall / rarest bucket; mentions per bucket):", ""]
    dom = result["per_domain"]
    lines += table(["domain", "prompts", "mentions (bucket 1 .. 5)"] + list(MODELS),
                    [[d, f"{x['n_prompts']:,}",
                      " / ".join(f"{lo}-{hi}" for lo, hi in x["bucket_mentions"])]
                     + [f"{pct(x['accuracy_overall'][v])} / "
                        f"{pct(x['accuracy_per_bucket'][v][0])}" for v in MODELS]
                     for d, x in dom.items()])

    if len(result["per_seed"]) > 1:
        lines += ["", "Per seed (rarest bucket / overall):", ""]
        lines += table(["seed"] + list(MODELS) + ["targets met"],
                        [[s["seed"]]
                         + [f"{pct(s['accuracy_per_bucket'][v][0])} / "
                            f"{pct(s['accuracy_overall'][v])}" for v in MODELS]
                         + [f"{sum(s['targets'].values())} of {len(s['targets'])}"]
                         for s in result["per_seed"]])

    if "anchor+rag" in acc:
        extra = result.get("rag_extra_prompt_tokens")
        lines += ["", f"RAG next to memory (the nearest training document of the routed leaf "
                      f"prepended; {extra:.1f} extra prompt tokens on average):", ""]
        lines += table(["model"] + buckets + ["overall"],
                        [[v] + [pct(a) for a in acc[v]] + [pct(overall[v])]
                         for v in RAG if v in acc])

    partial = sorted(v for v in acc if v.startswith("fetched-levels-"))
    if partial:
        lines += ["", "Partial paths (levels 1..j attached; the full path is `fetched`):", ""]
        lines += table(["attached", "runtime params"] + buckets + ["overall", "held-out ppl"],
                        [[v.replace("fetched-levels-", "levels 1.."), f"{params.get(v, 0):,}"]
                         + [pct(a) for a in acc[v]]
                         + [pct(overall[v]), f"{ppl[v]:.3f}" if v in ppl else "-"]
                         for v in ["anchor"] + partial + ["fetched"]])

    lines += ["", "| target | met | figure |", "|---|---|---|"]
    figures = result["target_figures"]
    shown = {"rarest_fetched_ge_3x_anchor": ("rarest_fetched_over_anchor", "x"),
             "rarest_fetched_ge_anchor_plus_15": ("rarest_fetched_minus_anchor", "pts"),
             "overall_fetched_ge_anchor_plus_10": ("overall_fetched_minus_anchor", "pts"),
             "blocking_removes_70pct_of_rare_gain":
                 ("blocking_removes_share_of_rare_gain", "share"),
             "blocked_common_within_5_of_anchor": ("common_blocked_minus_anchor", "pts"),
             "separation_cotrained_anchor_common_within_5":
                 ("common_cotrained_anchor_minus_anchor", "pts"),
             "level1_domain_routing_ge_95pct": ("level1_in_domain", "share")}
    for name, ok in result["targets"].items():
        key, unit = shown.get(name, (None, ""))
        value = figures.get(key) if key else None
        text = "" if value is None else (f"{value:.2f}x" if unit == "x"
                                         else f"{100 * value:+.1f} points" if unit == "pts"
                                         else f"{100 * value:.0f}%")
        lines.append(f"| {name} | {'yes' if ok else 'no'} | {text} |")

    lines += ["", "Diagnostics:"]
    cap = result.get("capacity") or {}
    if cap:
        per = cap["anchor_train_phrasing_per_bucket"]
        lines.append(f"- the anchor asked each fact in the training text's own phrasings "
                     f"(does it hold the fact at all?): rarest bucket {pct(per[0])}, "
                     f"most common {pct(per[-1])}")
    r = result["routing"]
    lines.append(f"- probes whose level-1 node holds documents of their own domain: "
                 f"{pct(r.get('level1_in_domain'))}; "
                 f"level-1 purity (share of a node's documents from its largest domain): "
                 f"{pct(r.get('level1_purity'))}")
    for label in ("routed", "centroid"):
        if label in r:
            lv = r[label]["home_per_level"]
            lines.append(
                f"- {'as routed' if label == 'routed' else 'centroid descent'}: on the subject's "
                f"home path per level {' / '.join(pct(x['overall']) for x in lv)}; the leaf "
                f"holds a document of the subject: {pct(r[label]['leaf_holds_subject'])} "
                f"(per bucket "
                f"{' / '.join(pct(x) for x in r[label]['leaf_holds_subject_per_bucket'])})")
    if "fetched-home" in acc:
        lines.append(f"- fetched with every probe sent to its subject's home leaf: "
                     f"{' / '.join(pct(a) for a in acc['fetched-home'])} "
                     f"({pct(overall['fetched-home'])} overall)")
    q = result["int8"]
    lines.append(f"- fetched-int8: one path {q['path_native_bytes']:,} B {q['dtype']} -> "
                 f"{q['path_int8_bytes']:,} B "
                 f"int8 ({100 * q['path_saved_fraction']:.1f}% saved); accuracy "
                 f"{100 * q['accuracy_change']:+.1f} points, "
                 f"{q['answers_changed']} of {q['n_prompts']} answers changed")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# plot


def plot(result: dict, path: Path) -> None:
    """Two panels: the five models per bucket (whiskers span the seeds), and RAG and partial
    paths per bucket."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acc, per_seed = result["accuracy_per_bucket"], result["per_seed"]
    fig = Figure(figsize=(14, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    x = np.arange(N_BUCKETS)
    labels = ["rarest" if b == 0 else "most common" if b == N_BUCKETS - 1 else f"bucket {b + 1}"
              for b in range(N_BUCKETS)]
    partial = sorted(v for v in acc if v.startswith("fetched-levels-"))
    panels = [(list(MODELS), "the comparison (whiskers: seeds)"),
              ([v for v in ["anchor"] + partial + ["fetched", "anchor+rag", "fetched+rag"]
                if v in acc],
               "partial paths and RAG")]
    for i, (names, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            mid = [100 * a for a in acc[name]]
            err = None
            if len(per_seed) > 1:
                lo = [100 * min(s["accuracy_per_bucket"][name][b] for s in per_seed)
                      for b in range(N_BUCKETS)]
                hi = [100 * max(s["accuracy_per_bucket"][name][b] for s in per_seed)
                      for b in range(N_BUCKETS)]
                err = [[m - l for m, l in zip(mid, lo)], [h - m for m, h in zip(mid, hi)]]
            ax.bar(x + (j - (len(names) - 1) / 2) * width, mid, width, label=name, yerr=err,
                   capsize=2 if err else 0, error_kw={"elinewidth": 0.8})
        ax.set_xticks(x, labels)
        ax.set_ylabel("probe accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left", ncols=2)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"long-tail probes, {len(result['domains'])} domains, "
                 f"{len(result['seeds'])} seed(s), "
                 f"{result['preset']} preset")
    save_png(fig, path)


def save_png(fig, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    artifacts.atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# helpers


def _spans(rows: list[dict]) -> list[list[int]]:
    return [[min((r["mentions"] for r in rows if r["bucket"] == b), default=0),
             max((r["mentions"] for r in rows if r["bucket"] == b), default=0)]
            for b in range(N_BUCKETS)]


def _mean_nested(items: list):
    """Element-wise mean of equally shaped dicts / lists of numbers (None and NaN kept out)."""
    if not items:
        return {}
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_nested([d[k] for d in items if k in d]) for k in first}
    if isinstance(first, list):
        return [_mean_nested([x[i] for x in items if i < len(x)]) for i in range(len(first))]
    vals = [float(x) for x in items if x is not None and not (isinstance(x, float) and np.isnan(x))]
    return float(np.mean(vals)) if vals else None
