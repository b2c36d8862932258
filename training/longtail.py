"""The long-tail corpus: several knowledge domains, Zipf popularity within each, probes held out.

    python -m training.longtail --out runs/longtail-corpus      # one directory per domain

For each domain (training/domains.py) a seeded draw picks `subjects` of its subjects and gives
each a popularity rank, so rarity is tied to nothing in the table; the subject at rank r appears in

    n_docs(r) = max(min_docs, round(max_docs * r ** -zipf))

documents. A document is about one subject: its probed fact and `facts_per_doc - 1` of its other
facts, each in a phrasing drawn at random, in random order (elements add a sentence of the
element's own prose). Document j of a subject is the same text in every seed (its randomness is
seeded by the subject and j), so seeds differ in which subjects are drawn and how popular they
are, and embeddings computed for one seed serve the next.

Every domain's probe template is **held out**: no training document contains it for any subject
(checked), so a model answers from what it knows, not by completing a memorised string.

Written per domain, the plug-in format `membank eval --domain CORPUS:PROBE[:HELDOUT]` reads:

    DIR/NAME/corpus.jsonl    {"text": ..., "subject": ...} per training document
    DIR/NAME/heldout.jsonl   documents drawn the same way, never trained on (held-out perplexity)
    DIR/NAME/probe.json      {"name", "template", "matcher", "pairs": [[subject, answer], ...]}
    DIR/NAME/subjects.json   each drawn subject's rank and document count
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from membank.artifacts import atomic_write_bytes
from training.domains import BUILTIN, Domain, Subject, builtin, disambiguate
from training.probes import Probe

DOMAINS = tuple(BUILTIN)


@dataclass(frozen=True)
class LongTailConfig:
    domains: tuple[str, ...] = DOMAINS   # built-in domains in the corpus
    subjects: int = 2500     # subjects drawn per domain (all of a smaller table)
    max_docs: int = 200      # documents of the most popular subject of a domain
    zipf: float = 1.0        # exponent of the popularity law
    min_docs: int = 2        # documents of the rarest subjects
    facts_per_doc: int = 3   # fact sentences per document (the probed fact is always one)
    heldout_docs: int = 100  # held-out documents per domain
    seed: int = 0


def doc_counts(n_subjects: int, lt: LongTailConfig) -> np.ndarray:
    """(n_subjects,) documents per popularity rank 1..n."""
    ranks = np.arange(1, n_subjects + 1, dtype=np.float64)
    return np.maximum(lt.min_docs, np.round(lt.max_docs * ranks ** -lt.zipf)).astype(np.int64)


def _rng(*key) -> np.random.Generator:
    """A generator seeded by a key of strings and ints (stable across runs and machines)."""
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def document(domain: Domain, subject: Subject, j: int, facts_per_doc: int) -> str:
    """Document j about `subject`: the probed fact plus facts_per_doc - 1 others, shuffled."""
    rng = _rng(domain.name, subject.name, j)
    others = [r for r in subject.facts if r != domain.probe_relation]
    picked = [others[i] for i in rng.permutation(len(others))[:max(0, facts_per_doc - 1)]]
    relations = ([domain.probe_relation] if domain.probe_relation in subject.facts else []) + picked
    parts = [domain.sentence(r, subject, rng) for r in relations]
    prose = domain.prose.get(subject.name)
    if prose:  # one sentence of the subject's own prose, a different field per document
        first = re.split(r"(?<=[.!?])\s", prose[j % len(prose)], maxsplit=1)[0]
        parts.append(first)
    return " ".join(parts[i] for i in rng.permutation(len(parts)))


def build_domain(domain: Domain, lt: LongTailConfig) -> dict:
    """One domain's corpus in memory: train / heldout documents (text, subject), probe, subjects."""
    # only subjects the probe can ask about are drawn: each one drawn is probed
    probed = {s for s, _ in domain.probe_pairs()}
    pool = [s for s in domain.subjects if s.name in probed]
    draw = _rng("draw", domain.name, lt.seed)
    n = min(lt.subjects, len(pool))
    chosen = [pool[i] for i in draw.choice(len(pool), n, replace=False)]
    counts = doc_counts(n, lt)                     # chosen[i] has popularity rank i + 1
    docs, info = [], []
    for rank, (subject, count) in enumerate(zip(chosen, counts.tolist()), start=1):
        docs += [(document(domain, subject, j, lt.facts_per_doc), subject.name)
                 for j in range(count)]
        info.append({"subject": subject.name, "rank": rank, "documents": count})
    weights = counts / counts.sum()
    held = _rng("heldout", domain.name, lt.seed)
    heldout = []
    for i in held.choice(n, size=min(lt.heldout_docs, n), p=weights):
        # indices past any training document's: text never trained on
        j = 1_000_000 + int(held.integers(1_000_000))
        heldout.append((document(domain, chosen[i], j, lt.facts_per_doc), chosen[i].name))
    names = {s.name for s in chosen}
    pairs = tuple((s, a) for s, a in domain.probe_pairs() if s in names)
    probe = Probe(domain.name, domain.probe_template, pairs, domain.matcher,
                  tuple(domain.train_templates()))
    held_out = probe.held_out_pattern()
    for text, _ in docs:
        if held_out.search(text):   # the guarantee the evaluation relies on
            raise AssertionError(f"{domain.name}: probe template leaked into a document: "
                                 f"{text[:80]!r}")
    return {"train": docs, "heldout": heldout, "probe": probe, "subjects": info}


def build(lt: LongTailConfig = LongTailConfig()) -> dict[str, dict]:
    """Every domain of lt.domains: name -> build_domain(...) (names shared across domains
    disambiguated first)."""
    domains = disambiguate([builtin(name) for name in lt.domains])
    return {d.name: build_domain(d, lt) for d in domains}


def write_domain(out_dir: str | Path, built: dict, lt: LongTailConfig) -> dict[str, Path]:
    """corpus.jsonl, heldout.jsonl, probe.json and subjects.json in out_dir (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("corpus", "corpus.jsonl"), ("heldout", "heldout.jsonl"),
                                     ("probe", "probe.json"), ("subjects", "subjects.json"))}
    for key, split in (("corpus", "train"), ("heldout", "heldout")):
        lines = "".join(json.dumps({"text": t, "subject": s}) + "\n" for t, s in built[split])
        atomic_write_bytes(paths[key], lines.encode())
    p = built["probe"]
    atomic_write_bytes(paths["probe"], json.dumps({"name": p.name, "template": p.template,
                                                   "matcher": p.matcher,
                                                   "train_templates": list(p.train_templates),
                                                   "pairs": [list(x) for x in p.pairs]},
                                                  indent=0).encode())
    atomic_write_bytes(paths["subjects"], json.dumps({"config": dataclasses.asdict(lt),
                                                      "subjects": built["subjects"]}).encode())
    return paths


def write(out_dir: str | Path, lt: LongTailConfig) -> dict[str, dict[str, Path]]:
    """Build every domain and write it under out_dir/NAME; returns name -> its paths."""
    return {name: write_domain(Path(out_dir) / name, built, lt)
            for name, built in build(lt).items()}


def name_counts(names: list[str], texts: list[str]) -> dict[str, int]:
    """How often each name appears in the texts, case-sensitive, not inside a longer word.

    A mention is bounded by non-word characters (or the text's ends) on both sides: a name that
    ends in "." or ")" ("St. Kitts", "Eton (Cameroon)") is found too, which `\\b` would miss.
    Longer names win where names overlap ("New York" is not a mention of "York")."""
    alternation = "|".join(sorted(map(re.escape, set(names)), key=len, reverse=True))
    pattern = re.compile(r"(?<!\w)(" + alternation + r")(?!\w)")
    counts = dict.fromkeys(names, 0)
    for text in texts:
        for m in pattern.finditer(text):
            counts[m.group(1)] += 1
    return counts


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/longtail-corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subjects", type=int, default=LongTailConfig.subjects)
    a = ap.parse_args()
    lt = LongTailConfig(subjects=a.subjects, seed=a.seed)
    for name, built in build(lt).items():
        paths = write_domain(Path(a.out) / name, built, lt)
        texts = [t for t, _ in built["train"]]
        print(f"{name}: {len(texts):,} documents, {sum(map(len, texts)):,} characters, "
              f"{len(built['probe'].pairs):,} probe pairs; e.g. {texts[-1]!r}")
    print(f"wrote {a.out}/*/corpus.jsonl, heldout.jsonl, probe.json, subjects.json")
