"""Benchmark: a 100k-document JSONL corpus through `membank train`, end to end, on this machine.

    .venv/bin/python -m benchmarks.corpus_100k [--docs 100000] [--out runs/corpus_100k]
                                               [--config tiny] [--steps 5] [--set KEY=VALUE ...]

1. writes a synthetic corpus, streaming: each document is one or two sentences of one element's
   prose (training/data.py documents, recombined at random with a seeded generator), prefixed by
   the element's name, so the corpus has 118 topics and no two documents need be equal;
2. runs `membank train --corpus ... --config tiny` (anchor_steps = cotrain_steps = --steps) in a
   subprocess, from scratch (--force), teeing its log;
3. reports, from the run's log lines (training/prepare.py) and its rusage: documents/s of the
   embedding, tokenizer + tokenising time, clustering + routing time, packing time, data and
   train time, train steps, and the peak RSS of the training process.

Long: MiniLM embeds roughly 100-300 short documents/s on 2 cores, so 100k documents take several
minutes; the embeddings are cached in the run directory, and a rerun with the same corpus reuses
them (the report says so). Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def element_sentences() -> dict[str, list[str]]:
    """Element name -> its prose sentences (prefixes like "Uses of X: " stripped)."""
    from training.data import build_documents

    out: dict[str, list[str]] = {}
    for d in build_documents():
        text = d.text.split(": ", 1)[1] if ": " in d.text[:60] else d.text
        out.setdefault(d.subject, []).extend(s for s in _SENTENCE.split(text)
                                             if 20 <= len(s) <= 240)
    return out


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> dict:
    """Write n_docs JSONL documents, one line at a time; returns size and timing."""
    rng = np.random.default_rng(seed)
    sentences = element_sentences()
    names = sorted(sentences)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(n_docs):
            name = names[rng.integers(len(names))]
            pool = sentences[name]
            picks = rng.choice(len(pool), size=min(len(pool), int(rng.integers(1, 3))),
                               replace=False)
            f.write(json.dumps({"text": f"{name}. " + " ".join(pool[i] for i in picks)}) + "\n")
    os.replace(tmp, path)
    return {"docs": n_docs, "corpus_mb": path.stat().st_size / 1e6,
            "write_s": time.perf_counter() - t0}


# log lines of training/prepare.py and training/train.py -> figures
PATTERNS = {
    "tokenise_s": r"^corpus: .*\(tokenizer \+ tokenising ([\d.]+)s\)",
    "tokens": r"^corpus: \d+ documents, ([\d,]+) tokens",
    "embed_s": r"^embeddings: \d+ documents in ([\d.]+)s",
    "embed_docs_per_s": r"^embeddings: .*\(([\d.]+) documents/s\)",
    "cluster_route_s": r"^router: .* in ([\d.]+)s",
    "pack_s": r"^packed: .* in ([\d.]+)s",
    "sequences": r"^packed: (\d+) sequences",
    "data_s": r"\(data ([\d.]+)s, train [\d.]+s\)",
    "train_s": r"\(data [\d.]+s, train ([\d.]+)s\)",
}


def parse_log(lines: list[str]) -> dict:
    out: dict = {"embeddings_reused": any(l.startswith("embeddings:") and "reused" in l
                                          for l in lines)}
    for name, pattern in PATTERNS.items():
        for line in lines:
            m = re.search(pattern, line)
            if m:
                out[name] = float(m.group(1).replace(",", ""))
    return out


def run_train(corpus: Path, out: Path, config: str, steps: int,
              extra: list[str]) -> tuple[dict, float, int]:
    cmd = [sys.executable, "-m", "membank_cli", "train", "--config", config, "--out", str(out),
           "--corpus", str(corpus), "--force", "--set", f"anchor_steps={steps}",
           "--set", f"cotrain_steps={steps}"]
    for s in extra:
        cmd += ["--set", s]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:                      # tee: progress bars and log lines as they come
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line.strip())
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"membank train failed with exit code {rc}")
    # ru_maxrss of the largest terminated child: the training process (the only child)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return parse_log(lines), wall, int(peak_mb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--out", default="runs/corpus_100k")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=5, help="anchor and co-training steps each")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more training overrides")
    args = ap.parse_args()
    out = Path(args.out)
    corpus = out.parent / f"{out.name}.jsonl"
    figures: dict = {"config": args.config, "steps": 2 * args.steps}
    figures.update(write_corpus(corpus, args.docs))
    print(f"corpus: {args.docs:,} documents, {figures['corpus_mb']:.1f} MB written "
          f"in {figures['write_s']:.1f}s "
          f"-> {corpus}", flush=True)
    parsed, wall, peak = run_train(corpus, out, args.config, args.steps, args.set)
    figures.update(parsed)
    figures.update({"wall_s": wall, "peak_rss_mb": peak})
    print(f"\n{args.docs:,} documents, {int(figures.get('tokens', 0)):,} tokens, "
          f"{int(figures.get('sequences', 0)):,} packed sequences")
    if figures["embeddings_reused"]:
        print("embedding: reused the cached embeddings (delete the run directory to measure it)")
    else:
        print(f"embedding: {figures.get('embed_s', float('nan')):.1f}s, "
              f"{figures.get('embed_docs_per_s', float('nan')):.1f} documents/s")
    for name, label in (("tokenise_s", "tokenizer + tokenising"),
                        ("cluster_route_s", "clustering + routing"),
                        ("pack_s", "packing"), ("data_s", "data preparation in all"),
                        ("train_s", "training")):
        print(f"{label + ':':<26}{figures.get(name, float('nan')):8.1f}s")
    print(f"{'train steps:':<26}{figures['steps']:8d}")
    print(f"{'peak RSS (train process):':<26}{peak:8d} MB;  wall {wall:.0f}s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
