"""The long-tail evaluation: does fetched memory hold the rare facts a small anchor cannot?

    membank eval --preset small                               # results/longtail.{json,md,png}
    membank eval --preset small --domain my.jsonl:my.json     # plus a domain of your own
    make eval-longtail                                        # the published run

PAPER.md section 7, on several knowledge domains at once. Per seed: the built-in domains
(training/longtail.py: real tables, Zipf popularity, each probe's template held out) plus any
`--domain CORPUS:PROBE[:HELDOUT]` are mixed into one corpus, one tokenizer, one router; one
anchor pretraining run; then three continuations that see the same number of tokens with the
same anchor learning-rate schedule:

  memory   co-training anchor + bank (the paper's recipe), with the generic memory used by
           1/17 of the samples, so one run gives both "fetched" and "generic";
  anchor   the anchor alone;
  dense    the anchor widened by as many FFN neurons as one fetch adds (the new neurons start
           with zero output weights, so it starts as exactly the same function).

Every probe prompt is decoded greedily (membank/nn/decode.py, batched) by these models:

  anchor            anchor only
  generic           the co-trained anchor + the generic memory (the paper's fair baseline)
  fetched           the co-trained anchor + the blocks on the prompt's routed path
  dense             the dense model, the runtime parameters of anchor + fetch
  blocked           as fetched, with the prompt's level-1 subtree blocked: the router may not
                    enter the best-matching level-1 node (the paper's "blocking the best-matching
                    1/16 of the bank"; 1/k here)
  cotrained-anchor  the co-trained anchor with its memory removed (separation)
  fetched-int8      fetched, every block through the int8 encoding devices can fetch
  fetched-centroid  fetched, routed by centroid descent (the paper's rule) when the preset
                    routes by nearest document (membank/router.py)
  fetched-levels-j  fetched with only levels 1..j attached (a device on a slow link)
  anchor+rag        the anchor with the nearest training document of the routed leaf prepended
  fetched+rag       fetched, with the same document prepended

and, as diagnostics: the anchor on the training text's own phrasings of each fact (does the
anchor hold the fact at all?), fetched with every prompt sent to its subject's home leaf,
routing agreement per level and bucket, held-out perplexity per model.

Subjects are split per domain into 5 equal buckets by how often their name appears in the
training text (rarest first); pooled bucket b is every domain's bucket b. Each seed is a whole run
of its own (corpus draw, tree, training) under OUT/seed-S; results pool every seed's prompts and
give each seed's too (the plot's whiskers). A seed's run is deterministic (fixed threads, seeded
data order and initialisation, embeddings independent of batching): rerun, it gives the same
answers bit for bit. Training runs checkpoint: a rerun of the same command reuses them;
`reuse_only` re-probes finished checkpoints and refuses to train. With `jobs` > 1 the seeds'
data is prepared here, their training runs in `jobs` child processes at once (`python -m
training.evaluate --train-seed JOB.json`, log in OUT/seed-S/train.log), then every seed is
probed here from its checkpoints; a seed's training then reproduces at its child's thread count.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from membank import artifacts, quant
from membank.blocks import block_nbytes
from membank.config import Config
from membank.nn.decode import greedy
from membank.nn.tensors import roundtrip
from membank.router import Router
from training import checkpoint, report
from training.config import TrainConfig
from training.longtail import LongTailConfig, name_counts
from training.probes import Probe, load_probe
from training.train import Trainer, lm_loss

N_BUCKETS = report.N_BUCKETS


@dataclass(frozen=True)
class DomainFiles:
    """A domain as files: training documents ({"text"[, "subject"]} per line), a probe JSON
    (training/probes.py) and optionally held-out documents for perplexity."""
    corpus: Path
    probe: Path
    heldout: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> "DomainFiles":
        """CORPUS:PROBE[:HELDOUT] (the `--domain` argument); each file must exist."""
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"--domain takes CORPUS.jsonl:PROBE.json[:HELDOUT.jsonl], "
                             f"got {spec!r}")
        paths = [Path(p) for p in parts]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"--domain {spec}: no file {p}")
        return cls(paths[0], paths[1], paths[2] if len(paths) == 3 else None)


@dataclass
class EvalConfig:
    train: dict                  # TrainConfig fields: shapes, batch, anchor_steps (pretraining),
                                 # cotrain_steps (the continuation every model gets), rates
    corpus: dict = field(default_factory=dict)  # LongTailConfig fields: the built-in domains
    max_new_tokens: int = 8      # greedy tokens generated per probe prompt
    threads: int = 2             # torch threads, fixed so that a run is deterministic
    jobs: int = 1                # seeds trained at once, each in its own process with
                                 # max(1, threads // jobs) threads (small models use one core
                                 # far better than two); probing stays in this process
    seeds: tuple[int, ...] = (0,)  # one whole run per seed (corpus draw, tree, training)
    rag: bool = True             # the RAG rows (anchor+rag, fetched+rag)

    def train_config(self, corpus_path: Path, seed: int | None = None) -> TrainConfig:
        tc = TrainConfig(**{**self.train, "corpus": str(corpus_path),
                            **({"seed": seed} if seed is not None else {})})
        if tc.frozen_steps or not (tc.anchor_steps and tc.cotrain_steps):
            raise ValueError("the evaluation needs anchor_steps (pretraining) and cotrain_steps "
                             "(the continuation), and no frozen_steps")
        return tc.validate()


# The published comparison (README, "Long-tail results"): sizes in the paper's proportions. The
# anchor (4 layers, d 96, 0.79M parameters) cannot hold 10,118 subjects' facts; the bank
# (k=16, depth 2) is 21x the anchor, one fetch 10.5% of it (the paper's 160M: 29x and 11%),
# in the last 2 of 4 layers (the paper: last layers beat uniform placement; measured here +2.6
# points overall). Queries take the path of their nearest training document: centroid descent
# reaches a leaf holding the prompt's subject for a third of the probes, the document index for
# 94% ("fetched-centroid" reports descent). A tenth of co-training samples see no memory, so the
# co-trained anchor keeps working alone (a quarter meets separation but costs the rare facts
# about 3 points; README, "Long-tail results"). 1,800 steps per continuation: rare facts are
# limited by how often they are seen (1,000 steps: 1.9x the anchor on the rarest bucket; 1,800:
# 2.9x on seed 0); three seeds trained side by side (jobs=3), one thread each.
EVAL_PRESETS: dict[str, EvalConfig] = {
    # make test: the pipeline end to end in about a minute, not the accuracy
    "smoke": EvalConfig(
        train=dict(preset="tiny", bank="longtail-smoke", batch_size=8, seq_len=48, anchor_steps=6,
                   cotrain_steps=6, warmup_steps=2, anchor_lr=1e-2, anchor_min_lr=1e-3,
                   memory_lr=1e-2, memory_min_lr=1e-3, routing="nearest-document",
                   model=dict(max_seq_len=64)),
        corpus=dict(subjects=30, max_docs=6, zipf=1.0, heldout_docs=6), max_new_tokens=4),
    "small": EvalConfig(
        train=dict(preset="demo", bank="longtail-small", batch_size=32, seq_len=128,
                   model=dict(vocab_size=2048, n_layer=4, n_head=4, d_model=96, d_ff=384),
                   memory=dict(branching=16, ranks=[32, 112], placement="last", n_layers=2),
                   routing="nearest-document", no_memory_prob=0.1,
                   anchor_steps=600, cotrain_steps=1800, warmup_steps=60,
                   anchor_lr=3e-3, anchor_min_lr=3e-4, memory_lr=1e-2, memory_min_lr=1e-3),
        corpus=dict(subjects=2500, max_docs=200, zipf=1.0, min_docs=2, facts_per_doc=2,
                    heldout_docs=100),
        seeds=(0, 1, 2), jobs=3),
}


def corpus_override(corpus: dict, item: str) -> dict:
    """`corpus.KEY=VALUE` -> a copy of the corpus fields with KEY set (a number; checked against
    LongTailConfig; the domains have their own flag, the seed is --seeds)."""
    key, sep, raw = item.removeprefix("corpus.").partition("=")
    fields = {f.name for f in dataclasses.fields(LongTailConfig)} - {"seed", "domains"}
    if not sep or key not in fields:
        raise ValueError(f"bad corpus override {item!r}: use corpus.KEY=VALUE with KEY one of "
                         f"{', '.join(sorted(fields))} "
                         f"(seeds: --seeds; domains: --builtin-domains)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"bad corpus override {item!r}: {raw!r} is not a number") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"bad corpus override {item!r}: {key} takes a number")
    return {**corpus, key: value}


def eval_preset(name: str) -> EvalConfig:
    if name not in EVAL_PRESETS:
        raise ValueError(f"unknown eval preset {name!r}; known: {', '.join(EVAL_PRESETS)}")
    return dataclasses.replace(EVAL_PRESETS[name])


# ---------------------------------------------------------------------------------------------
# the corpus: built-in domains and the user's, mixed


@dataclass
class Mix:
    """The mixed corpus of one seed: documents in training order, each with its domain and
    subject ("" when the domain's corpus does not say), the probes and held-out texts."""
    texts: list[str]
    domains: list[str]
    subjects: list[str]
    probes: dict[str, Probe]         # domain name -> probe
    heldout: list[str]


def load_domain(files: DomainFiles) -> tuple[list[str], list[str], Probe, list[str]]:
    """(texts, subjects, probe, held-out texts) of a domain given as files."""
    texts, subjects = [], []
    with files.corpus.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"corpus file {files.corpus} line {lineno} is not JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'corpus file {files.corpus} line {lineno} needs a string "text"')
            texts.append(obj["text"])
            subjects.append(obj["subject"] if isinstance(obj.get("subject"), str) else "")
    if not texts:
        raise ValueError(f"corpus file {files.corpus} holds no documents")
    probe = load_probe(str(files.probe))
    heldout = []
    if files.heldout is not None:
        from training.data import read_jsonl_corpus
        heldout = read_jsonl_corpus(files.heldout)
    return texts, subjects, probe, heldout


def mix_domains(domains: list[DomainFiles], seed: int) -> Mix:
    """Every domain's documents shuffled together (seeded); refuses a corpus that contains any
    probe's held-out template, or two probes of one name."""
    texts, dom, subj, heldout, probes = [], [], [], [], {}
    for files in domains:
        t, s, probe, h = load_domain(files)
        if probe.name in probes:
            raise ValueError(f"two domains have a probe named {probe.name!r} "
                             f"(rename one in its probe file)")
        probes[probe.name] = probe
        texts += t
        subj += s
        dom += [probe.name] * len(t)
        heldout += h
    for name, probe in probes.items():
        pattern = probe.held_out_pattern()
        leaks = [t[:60] for t in texts if pattern.search(t)]
        if leaks:
            raise ValueError(f"the training corpus contains the {name} probe's template "
                             f"({len(leaks)} documents, e.g. {leaks[0]!r}): "
                             f"the probe would test memorised strings")
    order = np.random.default_rng([seed, 7]).permutation(len(texts))
    return Mix([texts[i] for i in order], [dom[i] for i in order], [subj[i] for i in order],
               probes, heldout)


# ---------------------------------------------------------------------------------------------
# the three training runs


def dense_config(config: Config) -> tuple[Config, int]:
    """The anchor with d_ff widened by the FFN neurons that one fetch adds to every layer
    (equal runtime parameters for FFN memories in all layers); returns (config, added)."""
    sizes = config.memory.sizes(config.model)
    per_neuron = 3 * config.model.d_model * config.model.n_layer  # w1, w2 rows and a w3 column
    added = round(sizes["fetch_params"] / per_neuron)
    d = config.to_dict()
    d["model"]["d_ff"] += added
    return Config.from_dict(d), added


@torch.no_grad()
def widen_from(dense: torch.nn.Module, anchor_state: dict[str, torch.Tensor]) -> None:
    """Copy an anchor into a wider dense model: the first d_ff FFN neurons are the anchor's,
    the new ones keep their random input weights and get zero output weights (w3 columns), so
    the dense model starts as the same function, as memories start with no effect."""
    for name, p in dense.state_dict().items():
        src = anchor_state.get(name)
        if src is None:
            continue
        if p.shape == src.shape:
            p.copy_(src)
        elif name.endswith("ffn.w3.weight"):        # (d, d_ff_dense) <- (d, d_ff)
            p.zero_()
            p[:, :src.shape[1]] = src
        else:                                       # w1 / w2: (d_ff_dense, d) <- (d_ff, d)
            p[:src.shape[0]] = src


def _train(trainer: Trainer, root: Path, label: str, log, reuse_only: bool = False) -> Trainer:
    """Train to the end, resuming from (or reusing) the newest checkpoint under root;
    `reuse_only`: never train, ValueError unless a finished checkpoint is there."""
    latest = checkpoint.latest(root)
    if latest is not None:
        trainer.load(latest)
        log(f"{label}: resumed from {latest} at step {trainer.global_step}")
    if not trainer.done:
        if reuse_only:
            raise ValueError(
                f"{label}: no finished checkpoint under {root} "
                f"({'none' if latest is None else f'{latest} is at step {trainer.global_step}'}); "
                f"run the evaluation without reuse_only to train it")
        trainer.train(root)
    return trainer


def continuation(tc: TrainConfig) -> TrainConfig:
    """The anchor-only continuation: as many steps as co-training, the anchor's own schedule
    (a rate lowered for co-training, cotrain_anchor_lr, is part of the memory recipe, not of
    the baselines)."""
    return dataclasses.replace(tc, anchor_steps=tc.cotrain_steps, cotrain_steps=0,
                               cotrain_anchor_lr=None)


def train_models(out: Path, tc: TrainConfig, data, log=print, reuse_only: bool = False) -> dict:
    """The memory run (pretraining + co-training), the anchor-only and dense continuations."""
    config = tc.model_config()
    t = {}
    t0 = time.perf_counter()
    memory = _train(Trainer(config, tc, data.packed, data_fingerprint=data.fingerprint, log=log),
                    out / "memory", "memory", log, reuse_only)
    t["memory_s"] = time.perf_counter() - t0
    pretrained = out / "memory" / "anchor-end"

    cont = continuation(tc)
    t0 = time.perf_counter()
    anchor = _train(Trainer(config, cont, data.packed, data_fingerprint=data.fingerprint,
                            init=pretrained, log=log), out / "anchor", "anchor", log, reuse_only)
    t["anchor_s"] = time.perf_counter() - t0

    dcfg, added = dense_config(config)
    dtc = dataclasses.replace(cont, model={**tc.model, "d_ff": dcfg.model.d_ff})
    t0 = time.perf_counter()
    dense = Trainer(dcfg, dtc, data.packed, data_fingerprint=data.fingerprint, log=log)
    tensors, _ = checkpoint.load(pretrained)
    widen_from(dense.model,
               {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    dense = _train(dense, out / "dense", "dense", log, reuse_only)
    t["dense_s"] = time.perf_counter() - t0
    return {"memory": memory, "anchor": anchor, "dense": dense, "dense_added_neurons": added,
            "timings": t}


# ---------------------------------------------------------------------------------------------
# memories and probing


def memory_fn(trainer: Trainer, mode: str, nodes: np.ndarray | None, levels: int | None = None):
    """The memories of a variant for greedy(): None (no memory), one tensor for every prompt, or
    a function of prompt rows -> (rows, L, n, R, W). mode: none, generic, zeros, fetched, int8;
    nodes (N, depth) node ids per prompt; levels: attach only levels 1..levels."""
    if mode == "none":
        return None
    if mode == "generic":
        return trainer.generic.detach()

    def fn(rows: list[int]) -> torch.Tensor:
        ids = torch.from_numpy(nodes[rows])
        depth = len(trainer.bank) if levels is None else levels
        parts = [lvl[ids[:, l]] for l, lvl in enumerate(trainer.bank[:depth]) if lvl.shape[3]]
        mem = torch.cat(parts, dim=3)
        if mode == "int8":
            # per row (sample, layer, matrix, neuron) over W: exactly the rows of the blocks, so
            # this is each block through the bank's int8 encoding and the device's decoding
            return roundtrip(mem)
        return torch.zeros_like(mem) if mode == "zeros" else mem
    return fn


@torch.no_grad()
def perplexity(model, docs: list[list[int]], mem, seq_len: int, eos: int, batch: int = 32) -> float:
    """exp(mean next-token NLL) over documents (each truncated to seq_len + 1 tokens); `mem` as
    for memory_fn."""
    nll, count = 0.0, 0
    for s in range(0, len(docs), batch):
        rows = list(range(s, min(s + batch, len(docs))))
        chunk = [docs[i][:seq_len + 1] for i in rows]
        width = max(map(len, chunk))
        tokens = torch.full((len(chunk), width), eos, dtype=torch.long)
        doc_ids = torch.full((len(chunk), width), -1, dtype=torch.long)
        for i, d in enumerate(chunk):
            tokens[i, :len(d)] = torch.tensor(d)
            doc_ids[i, :len(d)] = 0
        m = mem(rows) if callable(mem) else mem
        nll += float(lm_loss(model, tokens, doc_ids, m, normalizer=1))
        count += int((doc_ids[:, 1:] >= 0).sum())
    return float(np.exp(nll / max(count, 1)))


def buckets_by_mentions(subjects: list[str], mentions: dict[str, int],
                        n: int = N_BUCKETS) -> dict[str, int]:
    """Subject -> bucket 0 (rarest) .. n-1 (most common): equal-size groups by mention count."""
    order = sorted(subjects, key=lambda s: (mentions[s], s))
    return {s: b for b, group in enumerate(np.array_split(np.array(order, dtype=object), n))
            for s in group}


@dataclass
class Probing:
    """Everything evaluate() needs about one seed's data."""
    mix: Mix
    router: Router
    doc_emb: np.ndarray          # (D, dim) training documents' embeddings
    doc_nodes: np.ndarray        # (D, depth) their node ids
    tokenizer: object
    eos: int
    seq_len: int
    embedder: object             # what embedded the documents, so also the prompts


def variant_table(depth: int, routing: str, rag: bool, have_home: bool) -> dict[str, tuple]:
    """name -> (model, memory mode, route, levels, rag)."""
    v = {"anchor": ("anchor", "none", "path", None, False),
         "generic": ("memory", "generic", "path", None, False),
         "fetched": ("memory", "fetched", "path", None, False),
         "dense": ("dense", "none", "path", None, False),
         "blocked": ("memory", "fetched", "blocked", None, False),
         "cotrained-anchor": ("memory", "zeros", "path", None, False),
         "fetched-int8": ("memory", "int8", "path", None, False)}
    if routing != "centroid":
        v["fetched-centroid"] = ("memory", "fetched", "centroid", None, False)
    for j in range(1, depth):
        v[f"fetched-levels-{j}"] = ("memory", "fetched", "path", j, False)
    if rag:
        v["anchor+rag"] = ("anchor", "none", "path", None, True)
        v["fetched+rag"] = ("memory", "fetched", "path", None, True)
    if have_home:
        v["fetched-home"] = ("memory", "fetched", "home", None, False)
    return v


def evaluate(models: dict, p: Probing, ec: EvalConfig, log=print,
             names: tuple[str, ...] | None = None) -> dict:
    """Probe every model variant on every domain's prompts; perplexity and diagnostics.
    names: only these variants, and no training-phrasing check (training/scaling.py)."""
    mix, router, tok, eos, embedder = p.mix, p.router, p.tokenizer, p.eos, p.embedder
    mentions = name_counts([s for probe in mix.probes.values() for s in probe.subjects], mix.texts)
    rows = []
    for name, probe in mix.probes.items():
        bucket = buckets_by_mentions(probe.subjects, mentions)
        rows += [{"domain": name, "subject": s, "answer": a, "mentions": mentions[s],
                  "bucket": bucket[s], "prompt": probe.prompt(s)} for s, a in probe.pairs]
    emb = embedder.encode([r["prompt"] for r in rows], batch_size=128)
    paths = router.route(emb)
    routes = {"path": router.node_ids(paths),
              "blocked": router.node_ids(router.route(emb, avoid_level1=paths[:, 0]))}
    if router.routing != "centroid":
        routes["centroid"] = router.node_ids(router.route(emb, routing="centroid"))
    home = home_leaves(p)
    have_home = any(r["subject"] in home.get(r["domain"], {}) for r in rows)
    if have_home:
        routes["home"] = np.stack([
            leaf_node_ids(router, home.get(r["domain"], {}).get(r["subject"], -1))
            if r["subject"] in home.get(r["domain"], {}) else routes["path"][i]
            for i, r in enumerate(rows)])
    prompt_ids = [tok.encode(r["prompt"]).ids for r in rows]
    variants = variant_table(router.depth, router.routing, ec.rag, have_home)
    if names is not None:
        variants = {k: v for k, v in variants.items() if k in names}
    rag_ids, rag_tokens = None, []
    if ec.rag:
        docs = rag_documents(p, emb, routes["path"][:, -1])
        rag_ids, rag_tokens = rag_prompts(tok, [mix.texts[d] for d in docs],
                                          [r["prompt"] for r in rows],
                                          p.seq_len - ec.max_new_tokens)
    for name, (which, mode, route, levels, rag) in tqdm(variants.items(), desc="probe",
                                                          unit="variant"):
        mem = memory_fn(models[which], mode, routes[route], levels)
        outs = greedy(models[which].model, rag_ids if rag else prompt_ids, mem, ec.max_new_tokens,
                      eos)
        for r, out_ids in zip(rows, outs):
            if route == "home" and r["subject"] not in home.get(r["domain"], {}):
                continue
            text = tok.decode(out_ids)
            r[name] = {"text": text, "correct": mix.probes[r["domain"]].correct(r["answer"], text)}
    capacity = (train_phrasing_accuracy(models["anchor"], mix, rows, tok, eos, ec)
                if names is None else {})

    # held-out perplexity: each document routed by its whole text, as the paper does for LM
    ppl = {}
    if mix.heldout:
        hdocs = [e.ids for e in tok.encode_batch(mix.heldout)]
        hemb = embedder.encode(mix.heldout)
        hpaths = router.route(hemb)
        hroutes = {"path": router.node_ids(hpaths),
                   "blocked": router.node_ids(router.route(hemb, avoid_level1=hpaths[:, 0]))}
        for name, (which, mode, route, levels, rag) in tqdm(variants.items(), desc="perplexity",
                                                              unit="model"):
            if rag or route not in hroutes:
                continue
            ppl[name] = perplexity(models[which].model, hdocs,
                                   memory_fn(models[which], mode, hroutes[route], levels),
                                   p.seq_len, eos)
    for i, r in enumerate(rows):
        r["path"] = routes["path"][i].tolist()
        r["blocked_path"] = routes["blocked"][i].tolist()
    return {"rows": rows, "perplexity": ppl, "variants": list(variants),
            "routing": routing_diagnostics(p, rows, routes, home),
            "rag_extra_tokens": float(np.mean(rag_tokens)) if rag_tokens else None,
            "capacity": capacity,
            "int8": int8_report(models["memory"], routes["path"]) if names is None else {}}


def rag_documents(p: Probing, q_emb: np.ndarray, q_leaves: np.ndarray) -> np.ndarray:
    """Per query, the nearest training document (same embedder) among the documents of its
    routed leaf. A nearest-document router routed to that document's leaf: it is the document."""
    if p.router.routing == "nearest-document":
        return p.router.nearest_documents(q_emb)
    out = np.zeros(len(q_emb), dtype=np.int64)
    leaves = p.doc_nodes[:, -1]
    for leaf in np.unique(q_leaves):
        qs, ds = np.flatnonzero(q_leaves == leaf), np.flatnonzero(leaves == leaf)
        if len(ds):     # an empty leaf: no document to prepend (document 0 stands in)
            out[qs] = ds[(q_emb[qs] @ p.doc_emb[ds].T).argmax(axis=1)]
    return out


def rag_prompts(tok, docs: list[str], prompts: list[str],
                budget: int) -> tuple[list[list[int]], list[int]]:
    """Each prompt with its document before it in the same text (the document's tokens cut so
    the whole fits `budget`); returns the token ids and the extra tokens each costs."""
    ids, extra = [], []
    for doc, prompt in zip(docs, prompts):
        q = tok.encode(" " + prompt).ids
        d = tok.encode(doc).ids[:max(0, budget - len(q))]
        ids.append(d + q)
        extra.append(len(d + q) - len(tok.encode(prompt).ids))
    return ids, extra


def train_phrasing_accuracy(anchor: Trainer, mix: Mix, rows: list[dict], tok, eos: int,
                            ec: EvalConfig) -> dict:
    """The anchor asked each fact in the training text's own phrasings (probe train_templates):
    the share of (subject, phrasing) answered in the rarest and the most common bucket (NaN for
    the others). Whether the anchor holds the rare facts at all, the held-out template aside;
    domains without train templates are left out."""
    asks = [(r, t) for r in rows if r["bucket"] in (0, N_BUCKETS - 1)
            for t in mix.probes[r["domain"]].train_templates]
    if not asks:
        return {}
    outs = greedy(anchor.model,
                  [tok.encode(t.replace("{subject}", r["subject"])).ids for r, t in asks], None,
                  ec.max_new_tokens, eos)
    ok = [mix.probes[r["domain"]].correct(r["answer"], tok.decode(o))
          for (r, _), o in zip(asks, outs)]
    return {"anchor_train_phrasing_per_bucket": report.per_bucket([r for r, _ in asks], ok),
            "n_asked": len(asks)}


def home_leaves(p: Probing) -> dict[str, dict[str, int]]:
    """domain -> subject -> its home leaf: the leaf most of its training documents were routed
    to (subjects the corpus does not name are left out)."""
    by: dict[tuple[str, str], list[int]] = {}
    for d, s, leaf in zip(p.mix.domains, p.mix.subjects, p.doc_nodes[:, -1].tolist()):
        if s:
            by.setdefault((d, s), []).append(leaf)
    out: dict[str, dict[str, int]] = {}
    for (d, s), leaves in by.items():
        out.setdefault(d, {})[s] = int(np.bincount(leaves).argmax())
    return out


def leaf_node_ids(router: Router, leaf: int) -> np.ndarray:
    """A leaf's global index -> (depth,) node index per level (its ancestors, then itself)."""
    return np.array([leaf // router.branching ** (router.depth - 1 - l)
                     for l in range(router.depth)])


def routing_diagnostics(p: Probing, rows: list[dict], routes: dict, home: dict) -> dict:
    """Level-1 domain agreement (the probe's level-1 node holds documents of its own domain),
    and per level and bucket the share of probes on their subject's home path, for the
    routing used and (with an index) for centroid descent."""
    level1_domains: dict[int, set[str]] = {}
    counts: dict[int, dict[str, int]] = {}
    for d, node in zip(p.mix.domains, p.doc_nodes[:, 0].tolist()):
        level1_domains.setdefault(node, set()).add(d)
        counts.setdefault(node, {}).setdefault(d, 0)
        counts[node][d] += 1
    # purity: the share of a level-1 node's documents that belong to its largest domain,
    # averaged over documents (1.0: every domain sits in nodes of its own)
    purity = sum(max(c.values()) for c in counts.values()) / max(1, len(p.mix.domains))
    out = {"level1_in_domain": float(np.mean([
               r["domain"] in level1_domains.get(int(routes["path"][i, 0]), ())
               for i, r in enumerate(rows)])),
           "level1_purity": float(purity),
           "level1_nodes_per_domain": {d: sorted(n for n, c in counts.items() if d in c)
                                       for d in p.mix.probes}}
    subj_leaves: dict[tuple[str, str], set[int]] = {}
    for d, s, leaf in zip(p.mix.domains, p.mix.subjects, p.doc_nodes[:, -1].tolist()):
        if s:
            subj_leaves.setdefault((d, s), set()).add(leaf)
    for rule in ("path", "centroid"):
        if rule not in routes:
            continue
        label = "routed" if rule == "path" else "centroid"
        nodes = routes[rule]
        idx = [i for i, r in enumerate(rows) if r["subject"] in home.get(r["domain"], {})]
        if not idx:
            continue
        per_level = []
        for level in range(p.router.depth):
            hit = [int(nodes[i, level])
                   == int(leaf_node_ids(p.router,
                                        home[rows[i]["domain"]][rows[i]["subject"]])[level])
                   for i in idx]
            per_level.append({"overall": float(np.mean(hit)),
                              "per_bucket": report.per_bucket([rows[i] for i in idx], hit)})
        any_leaf = [int(nodes[i, -1]) in subj_leaves[(rows[i]["domain"], rows[i]["subject"])]
                    for i in idx]
        out[label] = {"home_per_level": per_level,
                      "leaf_holds_subject": float(np.mean(any_leaf)),
                      "leaf_holds_subject_per_bucket": report.per_bucket([rows[i] for i in idx],
                                                                         any_leaf)}
    return out


def int8_report(trainer: Trainer, node_ids: np.ndarray) -> dict:
    """Bytes of one path native vs int8, per level, from the formulas and checked on the trained
    bank's real blocks (the first probe's path encoded as ingest would), and the int8 error."""
    cfg = trainer.config
    dtype = cfg.memory.dtype
    levels = []
    for l, level in enumerate(trainer.bank, start=1):
        if not level.shape[3]:
            continue
        shape = tuple(level.shape[1:])                                    # (L, n_mats, r, W)
        native, int8 = block_nbytes(shape, dtype), quant.encoded_nbytes(shape, quant.INT8, dtype)
        block = level[int(node_ids[0, l - 1])].detach()
        payload = quant.encode_int8(block.to(torch.float32).numpy())
        if len(payload) != int8:
            raise AssertionError(f"level {l}: encoded {len(payload)} bytes, formula {int8}")
        deq = torch.from_numpy(quant.dequantize(payload, shape))
        rel = float((deq - block.float()).norm() / block.float().norm().clamp_min(1e-30))
        levels.append({"level": l, "shape": list(shape), "native_bytes": native, "int8_bytes": int8,
                       "ratio": int8 / native, "relative_l2_error": rel})
    total_n, total_q = sum(x["native_bytes"] for x in levels), sum(x["int8_bytes"] for x in levels)
    return {"dtype": dtype, "levels": levels, "path_native_bytes": total_n,
            "path_int8_bytes": total_q, "path_ratio": total_q / total_n,
            "path_saved_fraction": 1 - total_q / total_n}


# ---------------------------------------------------------------------------------------------
# the whole evaluation


def run_dirs(out_dir: str | Path, ec: EvalConfig) -> list[Path]:
    """Where each seed's run lives: OUT itself for one seed, OUT/seed-S for several."""
    out = Path(out_dir)
    return [out] if len(ec.seeds) == 1 else [out / f"seed-{s}" for s in ec.seeds]


def run_eval(out_dir: str | Path, ec: EvalConfig, *, domains: list[DomainFiles] | None = None,
             results: str | Path | None = None, preset: str = "custom", log=print,
             reuse_only: bool = False) -> dict:
    """Build the corpus, train the three runs, probe every variant, write the results; once per
    seed in `ec.seeds`, pooled over seeds.

    domains: the user's own domains, mixed with the built-in ones of ec.corpus["domains"] (an
    empty tuple there: the user's alone). results: path of the JSON (the Markdown and the PNG go
    beside it; per-prompt answers to OUT/prompts.jsonl.gz). reuse_only: probe the finished
    checkpoints under out_dir, never train (ValueError if any run of any seed is missing)."""
    from membank.nn.embed import Embedder
    from training.embeddings import EmbeddingStore

    t_start = time.perf_counter()
    if not ec.seeds:
        raise ValueError("the evaluation needs at least one seed")
    domains = list(domains or [])
    if not domains and not LongTailConfig(**ec.corpus).domains:
        raise ValueError("no domains: give --domain CORPUS:PROBE, or keep some built-in domains")
    dirs = run_dirs(out_dir, ec)
    if reuse_only:    # fail before building any corpus, not after
        missing = [str(d / r) for d in dirs for r in ("memory", "anchor", "dense")
                   if checkpoint.latest(d / r) is None]
        if missing:
            raise ValueError(f"no checkpoints under {', '.join(missing)}; run the evaluation "
                             f"without reuse_only to train them")
    torch.set_num_threads(ec.threads)
    store = EmbeddingStore(Path(out_dir) / "embeddings", Embedder())
    if ec.jobs > 1 and len(ec.seeds) > 1 and not reuse_only:
        train_in_children(dirs, ec, domains, store, log)
        reuse_only = True                # the children trained every seed: probe only
    runs = []
    for seed, run_dir in zip(ec.seeds, dirs):
        log(f"-- seed {seed} ({run_dir})")
        runs.append(_run_one(run_dir, ec, seed, domains, store, log, reuse_only))

    result = report.build(runs, ec, preset, machine=report.machine(torch.get_num_threads()),
                          total_s=time.perf_counter() - t_start)
    results_path = Path(results) if results else Path(out_dir) / "longtail.json"
    report.write(result, results_path, Path(out_dir) / "prompts.jsonl.gz",
                 report.pooled_rows(runs))
    log(report.markdown(result))
    log(f"results: {results_path} (+ .md, .png); total {result['timings_s']['total']:.0f} s")
    return result


def train_in_children(dirs: list[Path], ec: EvalConfig, domains: list[DomainFiles], store,
                      log) -> None:
    """Prepare every seed's data here (the embedding store is not shared across processes),
    then train the seeds in ec.jobs child processes at a time; ValueError with the log's tail if
    one fails."""
    child_ec = dataclasses.replace(ec, jobs=1, threads=max(1, ec.threads // ec.jobs))
    for seed, run_dir in zip(ec.seeds, dirs):
        prepare_seed(run_dir, ec, seed, domains, store, log)
    log(f"training {len(ec.seeds)} seeds, {ec.jobs} at a time, {child_ec.threads} thread(s) each")
    pending, running = list(zip(ec.seeds, dirs)), []
    try:
        _run_children(pending, running, child_ec, domains, ec.jobs, log)
    finally:                             # an error or Ctrl-C here: no child outlives us
        for _, _, proc, _ in running:
            proc.terminate()
        for _, _, proc, _ in running:
            proc.wait()


def _run_children(pending: list, running: list, child_ec: EvalConfig,
                  domains: list[DomainFiles], jobs: int, log) -> None:
    with tqdm(total=len(pending), desc="seeds trained", unit="seed", disable=None) as bar:
        while pending or running:
            while pending and len(running) < jobs:
                seed, run_dir = pending.pop(0)
                job = run_dir / "train-job.json"
                artifacts.atomic_write_bytes(job, json.dumps(
                    {"eval": dataclasses.asdict(child_ec), "seed": seed, "run_dir": str(run_dir),
                     "domains": [[str(d.corpus), str(d.probe),
                                  str(d.heldout) if d.heldout else None] for d in domains]}
                ).encode())
                with open(run_dir / "train.log", "wb") as logf:
                    proc = subprocess.Popen([sys.executable, "-m", "training.evaluate",
                                             "--train-seed", str(job)],
                                            stdout=logf, stderr=subprocess.STDOUT)
                running.append((seed, run_dir, proc, time.perf_counter()))
            time.sleep(0.5)
            for item in [r for r in running if r[2].poll() is not None]:
                seed, run_dir, proc, t0 = item
                running.remove(item)
                if proc.returncode != 0:         # the caller stops the others
                    tail = (run_dir / "train.log").read_text(errors="replace")[-2000:]
                    raise ValueError(f"seed {seed}: training failed (exit {proc.returncode}); "
                                     f"{run_dir / 'train.log'} ends:\n{tail}")
                log(f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s")
                bar.update(1)


def _train_seed_job(job_path: Path) -> None:
    """The child of train_in_children: one seed's three training runs, nothing probed."""
    job = json.loads(Path(job_path).read_text())
    fields = job["eval"]                 # JSON turned the tuples into lists: back to tuples
    corpus = {k: tuple(v) if isinstance(v, list) else v for k, v in fields["corpus"].items()}
    ec = EvalConfig(**{**fields, "seeds": tuple(fields["seeds"]), "corpus": corpus})
    domains = [DomainFiles(Path(c), Path(p), Path(h) if h else None)
               for c, p, h in job["domains"]]
    torch.set_num_threads(ec.threads)
    run_dir = Path(job["run_dir"])
    s = prepare_seed(run_dir, ec, job["seed"], domains, None, print)
    trained = train_models(run_dir, s.tc, s.data, log=print)
    # the parent only re-loads the checkpoints: these are the training times it reports
    artifacts.atomic_write_bytes(run_dir / "train-timings.json",
                                 json.dumps(trained["timings"]).encode())


@dataclass
class Seed:
    """One seed's inputs: the mixed corpus, its training config and prepared data."""
    mix: Mix
    tc: TrainConfig
    config: Config
    data: object                 # training.prepare.Data
    seconds: float


def prepare_seed(out: Path, ec: EvalConfig, seed: int, user_domains: list[DomainFiles], store,
                 log) -> Seed:
    """The corpus of one seed (built-in domains drawn with this seed, plus the user's), its
    tokenizer, embeddings, router and packed sequences under `out`."""
    from training import longtail
    from training.prepare import prepare_data

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    lt = LongTailConfig(**{**ec.corpus, "seed": seed})
    builtin = [DomainFiles(p["corpus"], p["probe"], p["heldout"])
               for p in longtail.write(out / "domains", lt).values()] if lt.domains else []
    mix = mix_domains(builtin + user_domains, seed)
    corpus_path = out / "corpus.jsonl"
    artifacts.atomic_write_bytes(
        corpus_path, "".join(json.dumps({"text": t}) + "\n" for t in mix.texts).encode())
    tc = ec.train_config(corpus_path, seed=seed)
    config = tc.model_config()
    data = prepare_data(out, tc, config, log=log, store=store)
    seconds = time.perf_counter() - t0
    log(f"seed {seed}: data in {seconds:.0f} s ({len(mix.texts):,} documents, "
        f"{len(mix.probes)} domains, "
        f"{sum(len(p.pairs) for p in mix.probes.values()):,} probes)")
    return Seed(mix, tc, config, data, seconds)


def probing_for(out: Path, s: Seed) -> Probing:
    from membank.nn.static_embed import embedder_for
    from training.tokenizer import EOS, load_tokenizer

    tok = load_tokenizer(s.data.tokenizer_path)
    doc_emb = np.asarray(np.load(out / "embeddings.npy", mmap_mode="r"))
    # the training documents' own paths: the tree's, whatever rule queries use
    doc_nodes = s.data.router.node_ids(s.data.router.route(doc_emb, routing="centroid"))
    return Probing(s.mix, s.data.router, doc_emb, doc_nodes, tok, tok.token_to_id(EOS),
                   s.tc.seq_len, embedder_for(s.data.router.embedder, out))


def _run_one(out: Path, ec: EvalConfig, seed: int, user_domains: list[DomainFiles], store, log,
             reuse_only: bool) -> dict:
    """One seed: corpus (drawn with this seed), data, the three training runs, the probes."""
    t_start = time.perf_counter()
    s = prepare_seed(out, ec, seed, user_domains, store, log)
    trained = train_models(out, s.tc, s.data, log=log, reuse_only=reuse_only)
    if reuse_only and (out / "train-timings.json").is_file():     # trained by a child (jobs)
        trained["timings"] = json.loads((out / "train-timings.json").read_text())
    log(f"seed {seed}: training in {sum(trained['timings'].values()):.0f} s "
        + ", ".join(f"{k} {v:.0f} s" for k, v in trained["timings"].items()))
    models = {k: trained[k] for k in ("memory", "anchor", "dense")}
    for m in models.values():
        m.model.eval()
    t0 = time.perf_counter()
    ev = evaluate(models, probing_for(out, s), ec, log=log)
    t_eval = time.perf_counter() - t0
    log(f"seed {seed}: probing in {t_eval:.0f} s")

    config = s.config
    sizes = config.memory.sizes(config.model)
    params = report.runtime_params(trained["anchor"].model.num_params(),
                                   trained["dense"].model.num_params(), sizes,
                                   config.memory.depth, ev["variants"])
    return {"seed": seed, "ev": ev, "params": params, "config": config,
            "train_config": s.tc.to_dict(), "sizes": sizes, "data": s.data.meta,
            "dense_added_neurons": trained["dense_added_neurons"],
            "timings": {"data": s.seconds, **trained["timings"], "eval": t_eval,
                        "total": time.perf_counter() - t_start}}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--train-seed":
        _train_seed_job(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m training.evaluate --train-seed JOB.json "
                 "(run by `membank eval --jobs N`)")
