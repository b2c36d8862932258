"""Delta publishing with a real continued-training run: bytes ingested per publish and bytes a
device re-fetches per publish, content-addressed blocks against today's version-keyed ones
(issue 18).

    .venv/bin/python -m benchmarks.delta_publish [--config demo] [--continue-steps 100]
                                                 [--prompts 300] [--out runs/delta_publish]

Three versions of one bank, each from training that continued the last (the anchor frozen
after v1, so every version names the same anchor):

  v1  the base run (anchor pretraining + co-training), exported
  v2  a frozen-anchor job on level-1 subtree 0 started from v1 (`subtree=0, init_from=v1`),
      merged (training/merge.py): the other subtrees keep v1's bytes
  v3  a frozen-anchor continuation of the whole bank from v2 (`init_from=v2`): lazy AdamW
      changes the blocks its batches fetched, which on a small tree is most of them

Each version is ingested twice: into an LMDB stored by content (what ingest does now) and one
stored by version (what it did before): bytes written per publish. A bank server serves the
content-addressed LMDB (data plane), and one device (MemoryModel, a device cache large enough
for the bank) answers a Zipf trace of prompts (the first sentence of each document of the demo
corpus, the elements) at v1, then the same trace after each publish: its workload, so what it
fetches after a publish is what it re-fetches. "Today" is that trace on a cache that misses
every block of the new version (a version-keyed cache, as the device had before content
addressing, right after any publish), measured by replaying it on a cold cache. The bound is
the bytes of the blocks the publish changed, plus the manifest the device re-reads. Ends with a
table, a PNG (`--out`/delta_publish.png) and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def train_versions(out: Path, config: str, steps: dict, threads: int) -> dict[str, Path]:
    """The three exports (cached: a finished run with the same inputs is reused)."""
    from membank.config import get_preset
    from training.config import TrainConfig
    from training.merge import merge
    from training.train import run
    seq_len = min(TrainConfig.seq_len, get_preset(config).model.max_seq_len)

    def tc(**kw) -> TrainConfig:
        return TrainConfig(preset=config, threads=threads, bank="delta", seq_len=seq_len,
                           **kw).validate()

    v1 = run(out / "v1", tc(anchor_steps=steps["anchor"], cotrain_steps=steps["cotrain"],
                            version="v1"))
    cont = dict(anchor_steps=0, cotrain_steps=0, frozen_steps=steps["continue"])
    run(out / "v2-subtree0", tc(**cont, subtree=0, init_from=str(out / "v1"), version="v2"))
    v2 = merge([out / "v2-subtree0"], out / "v2")
    v3 = run(out / "v3", tc(**cont, init_from=str(out / "v2"), version="v3"))
    return {"v1": Path(v1), "v2": Path(v2), "v3": Path(v3)}


def zipf_trace(prompts: list[str], n: int, seed: int, s: float = 1.1) -> list[str]:
    """n prompts drawn with Zipf popularity (rank r with weight 1 / r^s), a fixed random order
    of ranks per seed: most prompts are a few popular ones, most subjects are rare."""
    rng = np.random.default_rng(seed)
    order = np.random.default_rng(0).permutation(len(prompts))   # the popularity ranking
    w = 1.0 / np.arange(1, len(prompts) + 1) ** s
    picks = rng.choice(len(prompts), size=n, p=w / w.sum())
    return [prompts[order[i]] for i in picks]


def replay(model, trace: list[str]) -> dict:
    """Answer every prompt of the trace (one new token); what the device fetched."""
    fetched = blocks = anchor_only = 0
    for prompt in trace:
        r = model.generate(prompt, max_new_tokens=1)
        if not r.memory:
            anchor_only += 1
        fetched += r.fetched_bytes
        blocks += len(r.fetched_blocks)
    return {"prompts": len(trace), "fetched_bytes": fetched, "fetched_blocks": blocks,
            "anchor_only": anchor_only}


def changed_blocks(old, new) -> list[tuple[int, int]]:
    return [b for b in new.blocks() if old.content_id(*b) != new.content_id(*b)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo", help="model preset (default demo)")
    ap.add_argument("--anchor-steps", type=int, default=300)
    ap.add_argument("--cotrain-steps", type=int, default=300)
    ap.add_argument("--continue-steps", type=int, default=100,
                    help="frozen-anchor steps of each continuation (v2, v3)")
    ap.add_argument("--prompts", type=int, default=300, help="prompts per trace")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "delta_publish")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from membank.artifacts import anchor_id
    from services.bank_server.ingest import ingest
    from services.bank_server.launch import run_bank_server
    from services.model_client.dataplane_client import dataplane_target
    from services.model_client.device_cache import DeviceCache
    from services.model_client.memory_model import MemoryModel
    from testkit.keys import signing_key, trust
    from training.data import build_documents

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    exports = train_versions(args.out, args.config,
                             {"anchor": args.anchor_steps, "cotrain": args.cotrain_steps,
                              "continue": args.continue_steps}, args.threads)
    anchors = {v: anchor_id(d) for v, d in exports.items()}
    if len(set(anchors.values())) != 1:
        sys.exit(f"delta_publish: the continuations changed the anchor: {anchors}")
    train_s = time.perf_counter() - t0

    # the corpus's documents, cut to their first sentence, as prompts: they route across the
    # tree as users' questions about the corpus would (one probe template would route to few)
    prompts = sorted({d.text.split(". ")[0] for d in build_documents()})
    work = Path(tempfile.mkdtemp(prefix="membank-delta-"))
    content_db, version_db = work / "content.lmdb", work / "version.lmdb"
    key = signing_key()
    report: dict = {"benchmark": "delta_publish", "config": args.config, "cpus": os.cpu_count(),
                    "continue_steps": args.continue_steps, "prompts_per_trace": args.prompts,
                    "train_s": round(train_s, 1), "publishes": []}
    manifests = {}
    ingest_reports = {}
    for v, d in exports.items():
        ingest_reports[v] = {"content": {}, "version": {}}
        # the version named here: a merged export keeps its base's name
        manifests[v] = ingest(d, content_db, version=v, progress=False, map_size=1 << 30,
                              signing_key=key, report=ingest_reports[v]["content"],
                              publish=(v == "v1"))
        ingest(d, version_db, version=v, progress=False, map_size=1 << 30, signing_key=key,
               report=ingest_reports[v]["version"], block_store="version", publish=False)
    bank_bytes = sum(manifests["v1"].block_nbytes(lv) for lv, _ in manifests["v1"].blocks())
    report["bank_bytes"] = bank_bytes

    from services.bank_server.publish import publish_in_env
    with run_bank_server(content_db, "--no-admin", "--map-size-gb", "1", "--dataplane-port",
                         "0", log_path=work / "server.log", cwd=REPO) as (addr, proc):
        target = dataplane_target(addr, proc.dataplane_address)

        def device(cache_bytes: int) -> MemoryModel:
            return MemoryModel.from_pretrained(
                exports["v1"], bank=target, cache=DeviceCache(cache_bytes),
                manifest_ttl_s=0.0, trust=trust())

        fleet_device = device(4 * bank_bytes)        # keeps its cache across publishes
        fleet_device.warmup()
        # one workload for the device before and after every publish: what it fetches after
        # one is what it re-fetches (blocks it never asked for would be first fetches)
        trace = zipf_trace(prompts, args.prompts, seed=1)
        report["warm_v1"] = replay(fleet_device, trace)
        for v in tqdm(["v2", "v3"], desc="publishes", unit="publish"):
            old, new = manifests["v1" if v == "v2" else "v2"], manifests[v]
            publish_in_env(content_db, "delta", v, 1 << 30)
            after = replay(fleet_device, trace)
            cold = device(4 * bank_bytes)            # today: every block of the new version
            today = replay(cold, trace)              # misses, as on a version-keyed cache
            cold.close()
            changed = changed_blocks(old, new)
            changed_bytes = sum(new.block_nbytes(lv) for lv, _ in changed)
            manifest_bytes = len(new.to_json().encode())
            row = {
                "version": v, "blocks": sum(1 for _ in new.blocks()),
                "changed_blocks": len(changed), "changed_bytes": changed_bytes,
                "manifest_bytes": manifest_bytes,
                "ingest_bytes_content": ingest_reports[v]["content"][None]["bytes_written"],
                "ingest_bytes_version": ingest_reports[v]["version"][None]["bytes_written"],
                "refetch_bytes_content": after["fetched_bytes"],
                "refetch_bytes_today": today["fetched_bytes"],
                "anchor_only_prompts": after["anchor_only"] + today["anchor_only"],
            }
            row["refetch_within_bound"] = (row["refetch_bytes_content"]
                                           <= changed_bytes + manifest_bytes)
            row["refetch_ratio_vs_today"] = (row["refetch_bytes_content"]
                                             / max(1, row["refetch_bytes_today"]))
            row["ingest_ratio_vs_today"] = (row["ingest_bytes_content"]
                                            / max(1, row["ingest_bytes_version"]))
            report["publishes"].append(row)
        fleet_device.close()
    shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(report)
    plot(report, args.out / "delta_publish.png")
    print(json.dumps(report))
    return report


def print_table(report: dict) -> None:
    mb = 1e6
    print(f"\nbank {report['bank_bytes'] / mb:.2f} MB; {report['prompts_per_trace']} prompts "
          f"per trace; continuations of {report['continue_steps']} steps")
    print(f"{'publish':8} {'changed':>14} {'ingest: today':>14} {'content':>9} "
          f"{'re-fetch: today':>16} {'content':>9} {'bound':>9} {'ratio':>6}")
    for r in report["publishes"]:
        bound = r["changed_bytes"] + r["manifest_bytes"]
        print(f"{r['version']:8} {r['changed_blocks']:>3}/{r['blocks']:<3} blocks "
              f"{r['ingest_bytes_version'] / mb:>11.2f} MB "
              f"{r['ingest_bytes_content'] / mb:>6.2f} MB "
              f"{r['refetch_bytes_today'] / mb:>13.2f} MB "
              f"{r['refetch_bytes_content'] / mb:>6.2f} MB {bound / mb:>6.2f} MB "
              f"{r['refetch_ratio_vs_today']:>5.2f}x")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["publishes"]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, today, content) in zip(axes, [
            ("bytes ingested per publish", "ingest_bytes_version", "ingest_bytes_content"),
            ("bytes a device re-fetches per publish", "refetch_bytes_today",
             "refetch_bytes_content")]):
        ax.bar(x - 0.2, [r[today] / 1e6 for r in rows], 0.4, label="by version (before)")
        ax.bar(x + 0.2, [r[content] / 1e6 for r in rows], 0.4, label="by content")
        ax.scatter(x + 0.2, [(r["changed_bytes"] + r["manifest_bytes"]) / 1e6 for r in rows],
                   marker="_", s=400, color="k", label="changed blocks + manifest")
        ax.set_xticks(x, [f"{r['version']} ({r['changed_blocks']}/{r['blocks']} changed)"
                          for r in rows])
        ax.set_ylabel("MB")
        ax.set_title(title)
        ax.set_ylim(0, 1.4 * max(r[today] for r in rows) / 1e6)    # room for the legend
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
