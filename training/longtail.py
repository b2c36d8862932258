"""The long-tail corpus: real prose per element, fact sentences in several phrasings, Zipf counts.

    python -m training.longtail --out runs/longtail-corpus     # writes train.jsonl, heldout.jsonl

Each of the 118 elements (the subjects of the atomic-number probe) gets a popularity rank from a
seeded permutation, so rarity is not tied to the atomic number, and appears in

    n_docs(rank) = max(min_docs, round(max_docs * rank ** -zipf))

documents. A document is about one element: a few of its prose fields from the mendeleev database (its
description, uses, sources, discovery, name origin or physical properties; cycled) and a few
fact sentences in phrasings drawn at random (atomic number, symbol, period, group, weight), in
random order. Keeping each document about one subject lets the document embeddings cluster by
subject, so a question about an element is routed to the leaf that trained on it.
So common elements are read hundreds of times in many phrasings and the rarest only a few times.

The probe's exact template ("The atomic number of {element} is") is **held out**: no training
sentence contains it for any subject (checked with `Probe.held_out_pattern()`), so the model has
to answer from what it knows about the element, not by completing a memorised string. The
atomic number is stated in other words ("Xenon has atomic number 54.", "Element 54 is Xenon.").

`heldout.jsonl` holds documents drawn the same way with another seed, never trained on: the
held-out perplexity set. `subjects.json` records each subject's rank, document count and how
often its name appears in the training text (the probe's frequency buckets come from that count,
as in PAPER.md section 7).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from membank.artifacts import atomic_write_bytes
from training.probes import Probe, atomic_number_probe


@dataclass(frozen=True)
class LongTailConfig:
    max_docs: int = 300      # documents of the most popular subject
    zipf: float = 1.2        # exponent of the popularity law
    min_docs: int = 1        # documents of the rarest subjects
    prose_per_doc: int = 3   # prose fields per document (cycled through the element's fields)
    facts_per_doc: int = 3   # fact sentences mixed into each document
    heldout_docs: int = 120  # size of the held-out perplexity set
    seed: int = 0


# the atomic number in words other than the probe's template
ATOMIC_NUMBER_PHRASINGS = (
    "{name} has atomic number {z}.",
    "{name}'s atomic number is {z}.",
    "The atomic number for {name} is {z}.",
    "{name} ({symbol}) is element number {z} of the periodic table.",
    "Element {z} is {name}.",
    "An atom of {name} has {z} protons in its nucleus.",
    "{name} is the chemical element with atomic number {z}.",
    "In the periodic table, {name} sits at atomic number {z}.",
)
OTHER_PHRASINGS = (
    ("symbol", "{name} has the chemical symbol {symbol}."),
    ("symbol", "The symbol {symbol} stands for {name}."),
    ("period", "{name} is in period {period} of the periodic table."),
    ("group", "{name} is in group {group} of the periodic table."),
    ("atomic_weight", "{name} has an atomic weight of about {weight}."),
)


def doc_counts(n_subjects: int, lt: LongTailConfig) -> np.ndarray:
    """(n_subjects,) documents per popularity rank 1..n."""
    ranks = np.arange(1, n_subjects + 1, dtype=np.float64)
    return np.maximum(lt.min_docs, np.round(lt.max_docs * ranks ** -lt.zipf)).astype(np.int64)


def fact_sentences(row: dict, rng: np.random.Generator, n: int) -> list[str]:
    """n fact sentences about one element: one atomic-number phrasing, then n - 1 others."""
    fields = dict(name=row["name"], z=row["atomic_number"], symbol=row["symbol"], period=row["period"],
                  group=row["group"], weight=f"{row['atomic_weight']:.1f}" if row["atomic_weight"] else None)
    others = [t for key, t in OTHER_PHRASINGS if fields.get("weight" if key == "atomic_weight" else key) is not None]
    out = [ATOMIC_NUMBER_PHRASINGS[rng.integers(len(ATOMIC_NUMBER_PHRASINGS))].format(**fields)]
    for i in rng.permutation(len(others))[:max(0, n - 1)]:
        out.append(others[i].format(**fields))
    return out


def _document(row: dict, prose_index: int, rng: np.random.Generator, lt: LongTailConfig,
              held_out: re.Pattern) -> str:
    kinds = sorted(row["prose"])
    picked = [kinds[(prose_index + j) % len(kinds)] for j in range(min(lt.prose_per_doc, len(kinds)))]
    # a prose sentence in the probe's exact form (none in mendeleev today) would leak the answer
    prose = [held_out.sub("", row["prose"][k]).strip() for k in picked]
    facts = fact_sentences(row, rng, lt.facts_per_doc)
    parts = [p for p in prose if p] + facts
    return " ".join(parts[i] for i in rng.permutation(len(parts)))  # facts anywhere among the prose


def build(lt: LongTailConfig = LongTailConfig(), probe: Probe | None = None) -> dict:
    """Build the corpus in memory: {"train": [texts], "heldout": [texts], "subjects": [...]}."""
    from training.data import element_rows

    probe = probe or atomic_number_probe()
    held_out = probe.held_out_pattern()
    rows = {r["name"]: r for r in element_rows()}
    subjects = [s for s in probe.subjects if s in rows]
    rng = np.random.default_rng(lt.seed)
    order = rng.permutation(len(subjects))          # order[i]: the subject at popularity rank i + 1
    counts = doc_counts(len(subjects), lt)
    docs, info = [], []
    for rank, i in enumerate(order, start=1):
        row = rows[subjects[i]]
        start = int(rng.integers(len(row["prose"]) or 1))  # which prose field a rare subject shows
        for j in range(int(counts[rank - 1])):
            docs.append((_document(row, start + j, rng, lt, held_out), row["name"]))
        info.append({"subject": row["name"], "rank": rank, "documents": int(counts[rank - 1])})
    docs = [docs[i] for i in rng.permutation(len(docs))]
    train = [text for text, _ in docs]

    held_rng = np.random.default_rng([lt.seed, 1])
    weights = counts / counts.sum()
    heldout = []
    for rank0 in held_rng.choice(len(subjects), size=lt.heldout_docs, p=weights):
        row = rows[subjects[order[rank0]]]
        heldout.append(_document(row, int(held_rng.integers(6)), held_rng, lt, held_out))

    for text in train:
        if held_out.search(text):  # the guarantee the evaluation relies on
            raise AssertionError(f"probe template leaked into the training text: {text[:80]!r}")
    mentions = name_counts([i["subject"] for i in info], train)
    for item in info:
        item["mentions"] = mentions[item["subject"]]
    return {"train": train, "train_subjects": [subject for _, subject in docs], "heldout": heldout,
            "subjects": info, "config": dataclasses.asdict(lt)}


def name_counts(names: list[str], texts: list[str]) -> dict[str, int]:
    """How often each name appears in the texts as a whole word (case-sensitive)."""
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")
    counts = dict.fromkeys(names, 0)
    for text in texts:
        for m in pattern.finditer(text):
            counts[m.group(1)] += 1
    return counts


def write(out_dir: str | Path, corpus: dict) -> dict[str, Path]:
    """train.jsonl, heldout.jsonl and subjects.json in out_dir (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl", "subjects": out / "subjects.json"}
    for split in ("train", "heldout"):
        atomic_write_bytes(paths[split], "".join(json.dumps({"text": t}) + "\n" for t in corpus[split]).encode())
    atomic_write_bytes(paths["subjects"], json.dumps({"config": corpus["config"], "subjects": corpus["subjects"]},
                                                     indent=1).encode())
    return paths


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/longtail-corpus")
    ap.add_argument("--max-docs", type=int, default=LongTailConfig.max_docs)
    ap.add_argument("--zipf", type=float, default=LongTailConfig.zipf)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    corpus = build(LongTailConfig(max_docs=a.max_docs, zipf=a.zipf, seed=a.seed))
    paths = write(a.out, corpus)
    m = sorted(s["mentions"] for s in corpus["subjects"])
    print(f"{len(corpus['train'])} training documents, {sum(map(len, corpus['train'])):,} characters; "
          f"{len(corpus['heldout'])} held out; name mentions min {m[0]} median {m[len(m) // 2]} max {m[-1]}")
    print(corpus["train"][0])
    print(f"wrote {', '.join(map(str, paths.values()))}")
