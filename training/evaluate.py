"""The long-tail evaluation: does fetched memory hold the rare facts a small anchor forgets?

    membank eval --preset small --out runs/eval-small     # results/longtail.{json,md,png}
    make eval-longtail                                    # the same, the published numbers

PAPER.md section 7 in miniature. One corpus (training/longtail.py: Zipf-distributed subjects,
the probe's template held out), one tokenizer, one router, one anchor pretraining run; then
three continuations that see the same number of training tokens from that same anchor:

  memory   co-training anchor + bank (the paper's recipe), with the generic memory used by
           1/17 of the samples, so one run gives both "fetched" and "generic";
  anchor   the anchor alone, same steps, same learning-rate schedule;
  dense    the anchor widened by as many FFN neurons as one fetch adds (the new neurons start
           with zero output weights, so it starts as exactly the same function), same steps.

Five models are compared on the probe (greedy decoding, exact match) and on held-out perplexity:

  1. anchor     anchor only
  2. generic    the co-trained anchor + the generic memory (the paper's fair baseline)
  3. fetched    the co-trained anchor + the blocks on the prompt's routed path
  4. dense      the dense model with the runtime parameters of anchor + fetch
  5. blocked    as 3, with the query's level-1 subtree blocked: the router may not enter the
                best-matching level-1 node and descends into the next-best one instead (the
                paper's "blocking the best-matching 1/16 of the bank"; 1/k here). Replacing the
                blocked blocks by zeros instead is exactly the co-trained anchor with no memory
                (reported as "cotrained-anchor"); by the generic memory, exactly model 2.

Also reported: "fetched-int8", model 3 with every fetched block passed through the int8 block
encoding (membank/quant.py quantize -> dequantize: the bytes a device with `--encoding int8`
attaches), and the bytes one path costs native vs int8 (`int8` in the JSON).

Subjects are split into 5 buckets of equal size by how often their name appears in the
training text (rarest first). With several seeds (`EvalConfig.seeds`, `--seeds 0,1`; the small
preset uses two) each seed is a whole run of its own (corpus draw, tree, training) under
OUT/seed-S, and the results pool every seed's prompts (per-seed tables in `per_seed`).

Diagnostics beside the comparison (`routing` in the JSON): how often a probe reaches its
subject's home leaf (the leaf most of its training documents were routed to), per bucket, and
the fetched model's accuracy when every probe is sent to its home leaf instead, which tells a
routing miss from knowledge the memory does not hold. Every training run checkpoints (training/checkpoint.py): a rerun
of the same command resumes or reuses it; `run_eval(..., reuse_only=True)` only re-probes
finished checkpoints and refuses to train (benchmarks/int8.py uses it).
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from membank import artifacts, quant
from membank.blocks import block_nbytes
from membank.config import Config
from membank.model import KVCache, Transformer
from membank.router import Router
from training import checkpoint
from training.config import TrainConfig
from training.longtail import LongTailConfig, name_counts
from training.probes import Probe, load_probe
from training.train import Trainer, lm_loss

MODELS = ("anchor", "generic", "fetched", "dense", "blocked")
EXTRA = ("cotrained-anchor", "fetched-int8")
N_BUCKETS = 5


@dataclass
class EvalConfig:
    train: dict                  # TrainConfig fields: shapes, batch, anchor_steps (pretraining),
                                 # cotrain_steps (the continuation every model gets), rates
    corpus: dict = field(default_factory=dict)  # LongTailConfig fields
    max_new_tokens: int = 4      # greedy tokens generated per probe prompt
    threads: int = 0             # torch threads (0: torch's default)
    seeds: tuple[int, ...] = (0,)  # one whole run per seed (corpus draw, tree, training)

    def train_config(self, corpus_path: Path, seed: int | None = None) -> TrainConfig:
        tc = TrainConfig(**{**self.train, "corpus": str(corpus_path),
                            **({"seed": seed} if seed is not None else {})})
        if tc.frozen_steps or not (tc.anchor_steps and tc.cotrain_steps):
            raise ValueError("the evaluation needs anchor_steps (pretraining) and cotrain_steps "
                             "(the continuation), and no frozen_steps")
        if tc.cotrain_anchor_lr not in (None, tc.anchor_lr):
            raise ValueError("the evaluation keeps one anchor schedule: leave cotrain_anchor_lr unset")
        return tc.validate()


EVAL_PRESETS: dict[str, EvalConfig] = {
    # make test: checks the pipeline end to end in well under a minute, not the accuracy
    "smoke": EvalConfig(
        train=dict(preset="tiny", bank="longtail-smoke", batch_size=8, seq_len=32, anchor_steps=6,
                   cotrain_steps=6, warmup_steps=2, anchor_lr=1e-2, anchor_min_lr=1e-3,
                   memory_lr=1e-2, memory_min_lr=1e-3),
        corpus=dict(max_docs=12, zipf=1.0, heldout_docs=16), max_new_tokens=3),
    # the published comparison: under 45 minutes on 2 CPU cores. The bank must be much larger
    # than the anchor's FFN for rare facts to have room in it (the paper's 160M: 29x): here
    # 4 x 32 + 16 x 64 = 1,152 bank neurons per layer vs the anchor's 256 (4.5x); a fetch adds
    # 96 (0.375x). With d_ff 512 and ranks (32, 32) (bank 1.25x) fetched memory only tied the
    # anchor (README, "Long-tail results"). Memory rate 1e-2: a leaf block is updated only on
    # its own cluster's sequences, a few hundred steps in all.
    "small": EvalConfig(
        train=dict(preset="demo", bank="longtail-small", batch_size=16, seq_len=128,
                   model=dict(vocab_size=2048, n_layer=4, d_model=128, d_ff=256),
                   memory=dict(branching=4, ranks=[32, 64]),
                   anchor_steps=600, cotrain_steps=900, warmup_steps=60,
                   anchor_lr=3e-3, anchor_min_lr=3e-4, memory_lr=1e-2, memory_min_lr=1e-3),
        # min_docs 2: a subject seen in one document states its atomic number in one phrasing
        # only, and no model (anchor, memory or dense) answered the held-out template for any
        # of them (README, "Long-tail results"); two seeds, pooled: 48 subjects per bucket
        corpus=dict(max_docs=300, zipf=1.2, min_docs=2, heldout_docs=120), threads=2, seeds=(0, 1)),
    # k=4, depth 2: measured on this corpus, a probe reaches the leaf holding its subject's
    # documents for 69% of subjects (depth 3: 60%; k=8, depth 2: 49%); see the README
}


def corpus_override(corpus: dict, item: str) -> dict:
    """`corpus.KEY=VALUE` -> a copy of the corpus fields with KEY set (checked against
    LongTailConfig; VALUE as JSON)."""
    from training.longtail import LongTailConfig

    key, sep, raw = item.removeprefix("corpus.").partition("=")
    fields = {f.name: f.type for f in dataclasses.fields(LongTailConfig) if f.name != "seed"}
    if not sep or key not in fields:
        raise ValueError(f"bad corpus override {item!r}: use corpus.KEY=VALUE with KEY one of "
                         f"{', '.join(fields)} (seeds: --seeds)")
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
def widen_from(dense: Transformer, anchor_state: dict[str, torch.Tensor]) -> None:
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
            raise ValueError(f"{label}: no finished checkpoint under {root} "
                             f"({'none' if latest is None else f'{latest} is at step {trainer.global_step}'}); "
                             f"run the evaluation without reuse_only to train it")
        trainer.train(root)
    return trainer


def train_models(out: Path, ec: EvalConfig, tc: TrainConfig, data, log=print,
                 reuse_only: bool = False) -> dict:
    """The memory run (pretraining + co-training), the anchor-only and dense continuations."""
    config = tc.model_config()
    t = {}
    t0 = time.perf_counter()
    memory = _train(Trainer(config, tc, data.packed, data_fingerprint=data.fingerprint, log=log),
                    out / "memory", "memory", log, reuse_only)
    t["memory_s"] = time.perf_counter() - t0
    pretrained = out / "memory" / "anchor-end"

    # the continuations: the same number of steps as co-training, one anchor-phase schedule
    cont = dataclasses.replace(tc, anchor_steps=tc.cotrain_steps, cotrain_steps=0)
    t0 = time.perf_counter()
    anchor = _train(Trainer(config, cont, data.packed, data_fingerprint=data.fingerprint,
                            init=pretrained, log=log), out / "anchor", "anchor", log, reuse_only)
    t["anchor_s"] = time.perf_counter() - t0

    dcfg, added = dense_config(config)
    dtc = dataclasses.replace(cont, model={**tc.model, "d_ff": dcfg.model.d_ff})
    t0 = time.perf_counter()
    dense = Trainer(dcfg, dtc, data.packed, data_fingerprint=data.fingerprint, log=log)
    tensors, _ = checkpoint.load(pretrained)
    widen_from(dense.model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    dense = _train(dense, out / "dense", "dense", log, reuse_only)
    t["dense_s"] = time.perf_counter() - t0
    return {"memory": memory, "anchor": anchor, "dense": dense, "dense_added_neurons": added, "timings": t}


# ---------------------------------------------------------------------------------------------
# routing, memories, probing, perplexity


def reroute_blocked(router: Router, emb: torch.Tensor) -> torch.Tensor:
    """(N, 384) -> (N, depth) paths that avoid each row's best level-1 node: the next-best
    level-1 child, then the usual greedy descent below it."""
    best = router.route(emb)                                   # (N, depth)
    c1 = router.centroids[0][0]                                # (k, dim): the root's children
    x = emb.to(torch.float32)
    dist = (c1[None] - x[:, None]).square().sum(-1)            # (N, k)
    dist[torch.arange(len(x)), best[:, 0]] = float("inf")
    first = dist.argmin(1)
    paths = [first]
    node = first
    from membank.router import nearest_child
    for level in range(1, router.depth):
        child = nearest_child(x, router.centroids[level], node)
        paths.append(child)
        node = node * router.branching + child
    return torch.stack(paths, 1)


def memories(mode: str, trainer: Trainer, node_ids: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """(n, L, n_mats, R, W) memory per sample for a mode, or None for no memory."""
    if mode == "none":
        return None
    if mode == "generic":
        return trainer.generic.detach().expand(n, *trainer.generic.shape[1:])
    parts = [level[node_ids[:, l]] for l, level in enumerate(trainer.bank) if level.shape[3]]
    mem = torch.cat(parts, dim=3)
    if mode == "fetched-int8":
        # per row (sample, layer, matrix, neuron) over W: exactly the rows of the blocks, so
        # this is each block through the bank's int8 encoding and the device's decoding
        return quant.roundtrip(mem)
    return torch.zeros_like(mem) if mode == "zeros" else mem


@torch.no_grad()
def greedy(model: Transformer, ids: list[int], mem: torch.Tensor | None, n_new: int, eos: int,
           batch: int = 1) -> list[list[int]]:
    """Greedy continuations of one prompt under `batch` memories (batch, L, n, R, W) (or None)
    at once, with a KV cache; each stops at EOS."""
    cache = KVCache.empty(model.cfg, batch, len(ids) + n_new)
    logits = model(torch.tensor([ids] * batch), mem=mem, cache=cache)[:, -1]
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    for _ in range(n_new):
        nxt = logits.argmax(-1)                                     # (batch,)
        for b, t in enumerate(nxt.tolist()):
            done[b] = done[b] or t == eos
            if not done[b]:
                out[b].append(t)
        if all(done):
            break
        logits = model(nxt[:, None], mem=mem, cache=cache)[:, -1]
    return out


@torch.no_grad()
def perplexity(model: Transformer, docs: list[list[int]], mems: torch.Tensor | None, seq_len: int,
               eos: int, batch: int = 32) -> float:
    """exp(mean next-token NLL) over documents (each truncated to seq_len + 1 tokens)."""
    nll, count = 0.0, 0
    for s in range(0, len(docs), batch):
        chunk = [d[:seq_len + 1] for d in docs[s:s + batch]]
        width = max(map(len, chunk))
        tokens = torch.full((len(chunk), width), eos, dtype=torch.long)
        doc_ids = torch.full((len(chunk), width), -1, dtype=torch.long)
        for i, d in enumerate(chunk):
            tokens[i, :len(d)] = torch.tensor(d)
            doc_ids[i, :len(d)] = 0
        mem = mems[s:s + batch] if mems is not None else None
        targets = int((doc_ids[:, 1:] >= 0).sum())
        nll += float(lm_loss(model, tokens, doc_ids, mem, normalizer=1))
        count += targets
    return float(np.exp(nll / max(count, 1)))


# model name -> (which trained model, which memory, which route). For FFN memories, blocking
# with zeros is exactly the co-trained anchor without memory, and blocking with the generic
# memory is exactly "generic" (every block of the path lies in the blocked subtree), so those
# two blocking variants are "cotrained-anchor" and "generic".
VARIANTS = {
    "anchor": ("anchor", "none", "path"),
    "generic": ("memory", "generic", "path"),
    "fetched": ("memory", "fetched", "path"),
    "dense": ("dense", "none", "path"),
    "blocked": ("memory", "fetched", "blocked"),
    "cotrained-anchor": ("memory", "zeros", "path"),
}
# evaluated apart from VARIANTS (not in the memory model's batch), so that adding it changes
# none of the other variants' numbers
INT8_VARIANTS = {"fetched-int8": ("memory", "fetched-int8", "path")}
ALL_VARIANTS = {**VARIANTS, **INT8_VARIANTS}
HOME_ROUTE = "fetched-home-route"  # diagnostic (see evaluate)


def buckets_by_mentions(subjects: list[str], mentions: dict[str, int], n: int = N_BUCKETS) -> dict[str, int]:
    """Subject -> bucket 0 (rarest) .. n-1 (most common): equal-size groups by mention count."""
    order = sorted(subjects, key=lambda s: (mentions[s], s))
    return {s: b for b, group in enumerate(np.array_split(np.array(order, dtype=object), n)) for s in group}


def evaluate(models: dict, probe: Probe, data, heldout: list[str], mentions: dict[str, int],
             ec: EvalConfig, tc: TrainConfig, log=print) -> dict:
    from membank.embed import Embedder
    from training.tokenizer import EOS, load_tokenizer

    tok = load_tokenizer(data.tokenizer_path)
    eos = tok.token_to_id(EOS)
    router = data.router
    embedder = Embedder()
    pairs = probe.prompts()
    emb = torch.from_numpy(embedder.encode([p for p, _ in pairs]))
    paths = {"path": router.node_ids(router.route(emb)), "blocked": router.node_ids(reroute_blocked(router, emb))}
    bucket = buckets_by_mentions(probe.subjects, mentions)
    # diagnostic, not one of the compared models: the memory model with each probe sent to its
    # subject's home leaf instead of where the prompt's embedding routes it, to tell routing
    # misses from knowledge the memory does not hold
    home = home_leaves(data, probe)

    rows = []
    for i, ((prompt, answer), subject) in enumerate(tqdm(list(zip(pairs, probe.subjects)), desc="probe", unit="prompt")):
        ids = tok.encode(prompt).ids
        row = {"subject": subject, "answer": answer, "mentions": mentions[subject], "bucket": bucket[subject],
               "path": paths["path"][i].tolist(), "blocked_path": paths["blocked"][i].tolist()}
        for which in ("anchor", "dense", "memory"):  # the memory model's variants in one batch
            names = [n for n, v in VARIANTS.items() if v[0] == which]
            mems = [memories(VARIANTS[n][1], models[which], paths[VARIANTS[n][2]][i:i + 1], 1) for n in names]
            mem = torch.cat(mems) if mems[0] is not None else None
            outs = greedy(models[which].model, ids, mem, ec.max_new_tokens, eos, batch=len(names))
            for name, out_ids in zip(names, outs):
                text = tok.decode(out_ids)
                row[name] = {"text": text, "correct": probe.correct(answer, text)}
        for name, (which, mode, route) in INT8_VARIANTS.items():
            mem = memories(mode, models[which], paths[route][i:i + 1], 1)
            out_ids = greedy(models[which].model, ids, mem, ec.max_new_tokens, eos)[0]
            text = tok.decode(out_ids)
            row[name] = {"text": text, "correct": probe.correct(answer, text)}
        if subject in home:
            mem = memories("fetched", models["memory"], leaf_node_ids(router, home[subject]), 1)
            text = tok.decode(greedy(models["memory"].model, ids, mem, ec.max_new_tokens, eos)[0])
            row[HOME_ROUTE] = {"text": text, "correct": probe.correct(answer, text)}
        rows.append(row)

    # held-out perplexity: each document routed by its whole text, as the paper does for LM
    docs = [e.ids for e in tok.encode_batch(heldout)]
    demb = torch.from_numpy(embedder.encode(heldout))
    dpaths = {"path": router.node_ids(router.route(demb)), "blocked": router.node_ids(reroute_blocked(router, demb))}
    ppl = {}
    for name, (which, mode, route) in tqdm(ALL_VARIANTS.items(), desc="perplexity", unit="model"):
        trainer = models[which]
        ppl[name] = perplexity(trainer.model, docs, memories(mode, trainer, dpaths[route], len(docs)),
                               tc.seq_len, eos)
    return {"rows": rows, "perplexity": ppl, "routing": routing_agreement(rows, home, router),
            "int8": int8_report(models["memory"], paths["path"])}


def int8_report(trainer: Trainer, node_ids: torch.Tensor) -> dict:
    """Bytes of one path native vs int8, per level, from the formulas and checked on the trained
    bank's real blocks (the first probe's path encoded as ingest would), and the int8 error."""
    cfg = trainer.config
    dtype = cfg.memory.dtype
    levels, errs = [], []
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
        errs.append(rel)
        levels.append({"level": l, "shape": list(shape), "native_bytes": native, "int8_bytes": int8,
                       "ratio": int8 / native, "relative_l2_error": rel})
    total_n, total_q = sum(x["native_bytes"] for x in levels), sum(x["int8_bytes"] for x in levels)
    return {"dtype": dtype, "levels": levels, "path_native_bytes": total_n, "path_int8_bytes": total_q,
            "path_ratio": total_q / total_n, "path_saved_fraction": 1 - total_q / total_n}


def home_leaves(data, probe: Probe) -> dict[str, int]:
    """Subject -> its home leaf: the leaf that most of its training documents were routed to
    (empty when the corpus does not record each document's subject, e.g. a user's corpus)."""
    meta_path = Path(data.tokenizer_path).parent / "corpus_subjects.json"
    emb_path = Path(data.tokenizer_path).parent / "embeddings.npy"
    if not meta_path.exists() or not emb_path.exists():
        return {}
    doc_subjects = json.loads(meta_path.read_text())
    emb = torch.from_numpy(np.array(np.load(emb_path, mmap_mode="r")))
    leaves = data.router.node_ids(data.router.route(emb))[:, -1].numpy()
    by_subject: dict[str, list[int]] = {}
    for leaf, s in zip(leaves.tolist(), doc_subjects):
        by_subject.setdefault(s, []).append(leaf)
    return {s: int(np.bincount(by_subject[s]).argmax()) for s in probe.subjects if s in by_subject}


def leaf_node_ids(router: Router, leaf: int) -> torch.Tensor:
    """A leaf's global index -> (1, depth) node index per level (its ancestors, then itself)."""
    return torch.tensor([[leaf // router.branching ** (router.depth - 1 - l) for l in range(router.depth)]])


def routing_agreement(rows: list[dict], home: dict[str, int], router: Router) -> dict:
    """How often a probe prompt reaches its subject's home leaf (and its level-1 subtree),
    overall and per frequency bucket (rarest first)."""
    if not home:
        return {}
    top = router.branching ** (router.depth - 1)
    rs = [r for r in rows if r["subject"] in home]
    leaf = lambda r: r["path"][-1] == home[r["subject"]]  # noqa: E731
    l1 = lambda r: r["path"][0] == home[r["subject"]] // top  # noqa: E731
    per_bucket = lambda f: [float(np.mean([f(r) for r in rs if r["bucket"] == b])) for b in range(N_BUCKETS)]  # noqa: E731
    return {"probe_in_home_leaf": float(np.mean([leaf(r) for r in rs])),
            "probe_in_home_level1": float(np.mean([l1(r) for r in rs])),
            "probe_in_home_leaf_per_bucket": per_bucket(leaf),
            "probe_in_home_level1_per_bucket": per_bucket(l1)}


# ---------------------------------------------------------------------------------------------
# summary, table, plot


def home_route_accuracy(rows: list[dict]) -> dict:
    """The fetched model's accuracy with every probe sent to its subject's home leaf."""
    rs = [r for r in rows if HOME_ROUTE in r]
    if not rs:
        return {}
    return {"fetched_home_route_per_bucket": [float(np.mean([r[HOME_ROUTE]["correct"] for r in rs if r["bucket"] == b]))
                                              for b in range(N_BUCKETS)],
            "fetched_home_route_overall": float(np.mean([r[HOME_ROUTE]["correct"] for r in rs]))}


def summarize(ev: dict) -> dict:
    rows = ev["rows"]
    names = list(ALL_VARIANTS)
    acc = {name: [float(np.mean([r[name]["correct"] for r in rows if r["bucket"] == b])) for b in range(N_BUCKETS)]
           for name in names}
    overall = {name: float(np.mean([r[name]["correct"] for r in rows])) for name in names}
    spans = [[min(r["mentions"] for r in rows if r["bucket"] == b), max(r["mentions"] for r in rows if r["bucket"] == b)]
             for b in range(N_BUCKETS)]
    rare = acc["fetched"][0], acc["anchor"][0], acc["generic"][0]
    gain = overall["fetched"] - overall["anchor"]
    kept = (overall["blocked"] - overall["anchor"]) / gain if gain > 0 else None
    targets = {
        "rarest_fetched_ge_3x_anchor": rare[0] >= 3 * rare[1] and rare[0] > 0,
        "rarest_fetched_gt_generic": rare[0] > rare[2],
        "blocking_loses_most_of_gain": kept is not None and kept < 0.5,
        "fetched_ge_dense_rarest_two": all(acc["fetched"][b] >= acc["dense"][b] for b in (0, 1)),
    }
    return {"accuracy_per_bucket": acc, "accuracy_overall": overall, "bucket_mentions": spans,
            "gain_fetched_vs_generic_per_bucket": [f - g for f, g in zip(acc["fetched"], acc["generic"])],
            "blocked_keeps_fraction_of_gain": kept, "targets": targets, "perplexity": ev["perplexity"],
            "routing": {**ev["routing"], **home_route_accuracy(rows)}, "int8": {
                **ev["int8"],
                "accuracy_change": overall["fetched-int8"] - overall["fetched"],
                "accuracy_change_per_bucket": [q - f for q, f in zip(acc["fetched-int8"], acc["fetched"])],
                "perplexity_change": ev["perplexity"]["fetched-int8"] - ev["perplexity"]["fetched"],
                "answers_changed": sum(r["fetched-int8"]["text"] != r["fetched"]["text"] for r in rows),
                "n_prompts": len(rows)}}


def markdown(summary: dict, params: dict, per_seed: list[dict] | None = None) -> str:
    acc, spans = summary["accuracy_per_bucket"], summary["bucket_mentions"]
    head = ["model", "runtime params"] + [f"bucket {b + 1} ({lo}-{hi})" for b, (lo, hi) in enumerate(spans)] + \
        ["overall", "held-out ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in MODELS + EXTRA:
        cells = [name, f"{params.get(name, 0):,}"] + [f"{100 * a:.1f}%" for a in acc[name]] + \
            [f"{100 * summary['accuracy_overall'][name]:.1f}%", f"{summary['perplexity'][name]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Buckets: subjects split into 5 equal groups by how often their name appears in the "
                 "training text (mentions in parentheses), rarest first.")
    if per_seed:
        lines.append(f"Pooled over {len(per_seed)} seeds (each its own corpus draw, tree and training "
                     f"runs; every bucket holds its share of each seed's subjects). Per seed, rarest "
                     f"bucket / overall:")
        lines.append("")
        lines.append("| seed | " + " | ".join(MODELS) + " |")
        lines.append("|---|" + "---|" * len(MODELS))
        for r in per_seed:
            lines.append(f"| {r['seed']} | " + " | ".join(
                f"{100 * r['accuracy_per_bucket'][m][0]:.1f}% / {100 * r['accuracy_overall'][m]:.1f}%"
                for m in MODELS) + " |")
    lines.append("")
    lines.append("| target | met |")
    lines.append("|---|---|")
    for name, ok in summary["targets"].items():
        lines.append(f"| {name} | {'yes' if ok else 'no'} |")
    r = summary.get("routing") or {}
    pct = lambda xs: " / ".join(f"{100 * x:.0f}%" for x in xs)  # noqa: E731
    if "probe_in_home_leaf_per_bucket" in r:
        lines.append("")
        lines.append(f"Routing (diagnostic): probes reaching their subject's home leaf, per bucket: "
                     f"{pct(r['probe_in_home_leaf_per_bucket'])} ({100 * r['probe_in_home_leaf']:.0f}% overall); "
                     f"home level-1 subtree: {pct(r['probe_in_home_level1_per_bucket'])}.")
    if "fetched_home_route_per_bucket" in r:
        lines.append(f"Fetched memory with every probe sent to its subject's home leaf, per bucket: "
                     f"{pct(r['fetched_home_route_per_bucket'])} ({100 * r['fetched_home_route_overall']:.1f}% overall).")
    q = summary.get("int8")
    if q:
        lines.append("")
        lines.append(f"fetched-int8: the fetched blocks through the int8 encoding (per-row scales). One path: "
                     f"{q['path_native_bytes']:,} B {q['dtype']} -> {q['path_int8_bytes']:,} B int8 "
                     f"({100 * q['path_saved_fraction']:.1f}% saved); accuracy "
                     f"{100 * q['accuracy_change']:+.1f} points, held-out ppl {q['perplexity_change']:+.4f}, "
                     f"{q['answers_changed']} of {q['n_prompts']} answers changed.")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, title: str, per_seed: list[dict] | None = None) -> None:
    """Accuracy per bucket, one bar group per bucket (the paper's Figure 1); with several
    seeds, each bar is the pooled accuracy and its whisker spans the seeds' own values."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import io

    acc, spans = summary["accuracy_per_bucket"], summary["bucket_mentions"]
    fig = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(N_BUCKETS)
    width = 0.8 / len(MODELS)
    for i, name in enumerate(MODELS):
        err = None
        if per_seed:
            lo = [100 * min(r["accuracy_per_bucket"][name][b] for r in per_seed) for b in range(N_BUCKETS)]
            hi = [100 * max(r["accuracy_per_bucket"][name][b] for r in per_seed) for b in range(N_BUCKETS)]
            mid = [100 * a for a in acc[name]]
            err = [[m - l for m, l in zip(mid, lo)], [h - m for m, h in zip(mid, hi)]]
        ax.bar(x + (i - (len(MODELS) - 1) / 2) * width, [100 * a for a in acc[name]], width, label=name,
               yerr=err, capsize=2 if err else 0, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, [f"{'rarest' if b == 0 else 'common' if b == N_BUCKETS - 1 else ''}\n{lo}-{hi} mentions"
                      for b, (lo, hi) in enumerate(spans)])
    ax.set_ylabel("probe accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(ncols=len(MODELS), fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    artifacts.atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# the whole evaluation


def run_dirs(out_dir: str | Path, ec: EvalConfig) -> list[Path]:
    """Where each seed's run lives: OUT itself for one seed, OUT/seed-S for several."""
    out = Path(out_dir)
    return [out] if len(ec.seeds) == 1 else [out / f"seed-{s}" for s in ec.seeds]


def run_eval(out_dir: str | Path, ec: EvalConfig, *, probe: Probe | None = None, corpus: str | None = None,
             heldout: str | None = None, results: str | Path | None = None, preset: str = "custom",
             log=print, reuse_only: bool = False) -> dict:
    """Build (or take) the corpus, train the three runs, probe five models, write the results;
    once per seed in `ec.seeds` (each seed its own corpus draw and training runs), the results
    pooled over seeds (every bucket then holds 24 subjects per seed) and given per seed too.

    corpus/heldout: JSONL files of the user's own data (default: the long-tail element corpus;
    with your own corpus, seeds vary the tree and the training runs only).
    results: path of the JSON (the Markdown table and the PNG go beside it).
    reuse_only: probe the finished checkpoints under out_dir, never train (ValueError if any
    of the three runs of any seed is missing or unfinished)."""
    t_start = time.perf_counter()
    if not ec.seeds:
        raise ValueError("the evaluation needs at least one seed")
    dirs = run_dirs(out_dir, ec)
    if reuse_only:    # fail before building any corpus, not after
        missing = [str(d / r) for d in dirs for r in ("memory", "anchor", "dense")
                   if checkpoint.latest(d / r) is None]
        if missing:
            raise ValueError(f"no checkpoints under {', '.join(missing)}; run the evaluation "
                             f"without reuse_only to train them")
    if ec.threads:
        torch.set_num_threads(ec.threads)
    probe = probe or load_probe("atomic-number")
    runs = []
    for seed, run_dir in zip(ec.seeds, dirs):
        if len(dirs) > 1:
            log(f"-- seed {seed} ({run_dir})")
        runs.append(_run_one(run_dir, ec, seed, probe, corpus, heldout, log, reuse_only))

    rows = [{**row, "seed": seed} for seed, r in zip(ec.seeds, runs) for row in r["ev"]["rows"]]
    ev = {"rows": rows, "perplexity": _mean_dicts([r["ev"]["perplexity"] for r in runs]),
          "routing": _mean_dicts([r["ev"]["routing"] for r in runs]), "int8": runs[0]["ev"]["int8"]}
    summary = summarize(ev)
    first = runs[0]
    params = first["params"]
    result = {
        "preset": preset, "probe": probe.name, "template": probe.template, "n_subjects": len(probe.pairs),
        "seeds": list(ec.seeds),
        "eval_config": dataclasses.asdict(ec), "model_config": first["config"].to_dict(),
        "bank_params": first["sizes"]["bank_params"], "fetch_params": first["sizes"]["fetch_params"],
        "runtime_params": params, "dense_added_neurons": first["dense_added_neurons"],
        "data": first["data"] if len(runs) == 1 else [r["data"] for r in runs],
        "timings_s": {**first["timings"], "total": time.perf_counter() - t_start} if len(runs) == 1 else
                     {"per_seed": [r["timings"] for r in runs], "total": time.perf_counter() - t_start},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads()},
        **summary,
        "per_seed": [{"seed": seed, **{k: v for k, v in summarize(r["ev"]).items()
                                       if k in ("accuracy_per_bucket", "accuracy_overall", "bucket_mentions",
                                                "targets", "routing")}}
                     for seed, r in zip(ec.seeds, runs)],
        "prompts": rows,
    }
    results_path = Path(results) if results else Path(out_dir) / "longtail.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(results_path, json.dumps(result, indent=1).encode())
    table = markdown(summary, params, per_seed=result["per_seed"] if len(runs) > 1 else None)
    artifacts.atomic_write_bytes(results_path.with_suffix(".md"), table.encode())
    seeds_note = f", {len(runs)} seeds pooled" if len(runs) > 1 else ""
    plot(summary, results_path.with_suffix(".png"),
         f"{probe.name} probe: accuracy per frequency bucket ({preset} preset{seeds_note})",
         per_seed=result["per_seed"] if len(runs) > 1 else None)
    log(table)
    log(f"results: {results_path} (+ .md, .png); total {result['timings_s']['total']:.0f} s")
    return result


def _mean_dicts(dicts: list[dict]) -> dict:
    """Key-wise mean of dicts of numbers or equal-length lists of numbers (keys of the first)."""
    out = {}
    for k, v in dicts[0].items():
        vals = [d[k] for d in dicts if k in d]
        out[k] = [float(np.mean(x)) for x in zip(*vals)] if isinstance(v, list) else float(np.mean(vals))
    return out


def _run_one(out: Path, ec: EvalConfig, seed: int, probe: Probe, corpus: str | None,
             heldout: str | None, log, reuse_only: bool) -> dict:
    """One seed: corpus (drawn with this seed), data, the three training runs, the probe."""
    from training import longtail
    from training.data import read_jsonl_corpus
    from training.prepare import prepare_data

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    doc_subjects = None
    if corpus is None:
        lt = LongTailConfig(**{**ec.corpus, "seed": seed})
        built = longtail.build(lt, probe)
        paths = longtail.write(out / "corpus", built)
        corpus, heldout = str(paths["train"]), str(paths["heldout"])
        doc_subjects = built["train_subjects"]
    elif heldout is None:
        raise ValueError("a custom corpus needs a held-out JSONL file too (--heldout) for perplexity")
    train_texts, heldout_texts = read_jsonl_corpus(corpus), read_jsonl_corpus(heldout)
    leaks = [t[:60] for t in train_texts if probe.held_out_pattern().search(t)]
    if leaks:
        raise ValueError(f"the training corpus contains the probe's template ({len(leaks)} documents, "
                         f"e.g. {leaks[0]!r}): the probe would test memorised strings")
    mentions = name_counts(probe.subjects, train_texts)

    tc = ec.train_config(Path(corpus), seed=seed)
    config = tc.model_config()
    data_dir = out / "data"
    data = prepare_data(data_dir, tc, config, log=log)
    if doc_subjects is not None:
        artifacts.atomic_write_bytes(data_dir / "corpus_subjects.json", json.dumps(doc_subjects).encode())
    t_data = time.perf_counter() - t_start

    trained = train_models(out, ec, tc, data, log=log, reuse_only=reuse_only)
    models = {k: trained[k] for k in ("memory", "anchor", "dense")}
    for m in models.values():
        m.model.eval()
    t0 = time.perf_counter()
    ev = evaluate(models, probe, data, heldout_texts, mentions, ec, tc, log=log)
    t_eval = time.perf_counter() - t0

    anchor_params = trained["anchor"].model.num_params()
    sizes = config.memory.sizes(config.model)
    params = {"anchor": anchor_params, "cotrained-anchor": anchor_params, "dense": trained["dense"].model.num_params()}
    for name in ("generic", "fetched", "blocked", "fetched-int8"):
        params[name] = anchor_params + sizes["fetch_params"]
    return {"ev": ev, "params": params, "config": config, "sizes": sizes, "data": data.meta,
            "dense_added_neurons": trained["dense_added_neurons"],
            "timings": {"data": t_data, **trained["timings"], "eval": t_eval,
                        "total": time.perf_counter() - t_start}}
