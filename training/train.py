"""The training pipeline: corpus -> tokenizer -> embed + cluster -> pack -> train -> export.

    python -m membank.cli train --config demo --out runs/demo

Recipe (PAPER.md section 6, at CPU scale): pretrain the anchor alone, then co-train anchor and
bank. Documents of one leaf cluster are packed into fixed-length sequences that carry the leaf's
path; attention is masked per document; sequences are shuffled globally, so a batch mixes paths
and the bank gathers one memory per sample.

Everything the run produces lands in `out/`; `out/export/` is the hand-off to the bank (blocks)
and to devices (anchor, tokenizer, router, manifest).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from membank.config import Config, get_preset
from membank.memory import MemoryBank
from membank.model import Transformer
from membank.router import Router

IGNORE = -100  # target id of padding positions


@dataclass
class TrainConfig:
    preset: str = "demo"
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 128
    anchor_steps: int = 300        # phase 1: anchor alone
    cotrain_steps: int = 300       # phase 2: anchor + bank
    warmup_steps: int = 30
    anchor_lr: float = 3e-3        # paper: 5e-3 peak at 1M-token batches
    anchor_wd: float = 0.05
    # The paper's memory LR (1e-4) is for billions of tokens; a few minutes on a CPU needs more.
    memory_lr: float = 3e-3
    memory_wd: float = 1e-3        # low decay helps memorisation (PAPER.md sec. 6)
    grad_clip: float = 1.0
    bank: str = "demo"
    version: str = "v1"
    threads: int = 0               # torch threads; 0 = torch's default

    def fingerprint(self) -> str:
        """Identifies a run's inputs, so a cached run is reused only when nothing changed."""
        blob = json.dumps({"train": dataclasses.asdict(self), "model": get_preset(self.preset).to_dict(),
                           "code": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# packing


@dataclass
class Packed:
    tokens: torch.Tensor    # (N, T+1) int64, EOS-separated documents of one leaf
    doc_ids: torch.Tensor   # (N, T+1) int64, document index within the sequence
    node_ids: torch.Tensor  # (N, p) int64, the sequence's path as node ids per level


def pack(doc_tokens: list[list[int]], doc_nodes: np.ndarray, seq_len: int, eos: int) -> Packed:
    """Pack the documents of each leaf into sequences of seq_len + 1 tokens (input + shift).

    doc_nodes: (n_docs, p) node ids per level; the last column (the leaf) fixes the path.
    The tail of each leaf's stream is padded with EOS and its targets ignored.
    """
    leaves: dict[int, list[int]] = {}
    for i, leaf in enumerate(doc_nodes[:, -1].tolist()):
        leaves.setdefault(leaf, []).append(i)
    tokens, docs, nodes = [], [], []
    width = seq_len + 1
    for leaf, members in sorted(leaves.items()):
        stream, ids = [], []
        for j, d in enumerate(members):
            stream += doc_tokens[d] + [eos]
            ids += [j] * (len(doc_tokens[d]) + 1)
        pad = (-len(stream)) % width
        stream += [eos] * pad
        ids += [-1] * pad  # padding is its own "document", never attended by real tokens
        t = torch.tensor(stream).view(-1, width)
        tokens.append(t)
        docs.append(torch.tensor(ids).view(-1, width))
        nodes.append(torch.as_tensor(doc_nodes[members[0]]).expand(t.shape[0], -1))
    return Packed(torch.cat(tokens), torch.cat(docs), torch.cat(nodes).long())


def batches(packed: Packed, batch_size: int, gen: torch.Generator):
    """Endless batches of globally shuffled sequences."""
    n = packed.tokens.shape[0]
    while True:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) == batch_size or n < batch_size:
                yield packed.tokens[idx], packed.doc_ids[idx], packed.node_ids[idx]


def lm_loss(model: Transformer, tokens, doc_ids, mem=None) -> torch.Tensor:
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    d = doc_ids[:, :-1]
    y[doc_ids[:, 1:] < 0] = IGNORE  # no loss on padding
    logits = model(x, mem=mem, doc_ids=d)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor_ratio: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_phase(name: str, model: Transformer, bank: MemoryBank | None, packed: Packed,
                tc: TrainConfig, steps: int, gen: torch.Generator) -> list[float]:
    """One phase of training. bank=None trains the anchor alone; otherwise anchor + bank."""
    groups = [{"params": list(model.parameters()), "lr": tc.anchor_lr, "weight_decay": tc.anchor_wd,
               "peak": tc.anchor_lr}]
    if bank is not None:
        groups.append({"params": list(bank.parameters()), "lr": tc.memory_lr,
                       "weight_decay": tc.memory_wd, "peak": tc.memory_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    params = [p for g in groups for p in g["params"]]
    losses = []
    data = batches(packed, tc.batch_size, gen)
    bar = tqdm(range(steps), desc=name, unit="step", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, g["peak"], tc.warmup_steps)
        tokens, doc_ids, node_ids = next(data)
        mem = bank.gather(node_ids) if bank is not None else None
        loss = lm_loss(model, tokens, doc_ids, mem)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


# ---------------------------------------------------------------------------------------------
# the whole run


def run(out_dir: str | Path, tc: TrainConfig, *, reuse: bool = True, log=print) -> Path:
    """Train and export; returns the export directory. Reuses a finished run with the same inputs."""
    from training.cluster import build_router
    from training.data import build_documents
    from training.export import export, save_checkpoint
    from training.tokenizer import EOS, train_tokenizer
    from membank.embed import Embedder

    out = Path(out_dir)
    export_dir = out / "export"
    stamp = out / "run.json"
    if reuse and stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == tc.fingerprint() \
            and (export_dir / "manifest.json").exists():
        log(f"reusing cached run {out} (fingerprint {tc.fingerprint()})")
        return export_dir
    out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    config: Config = get_preset(tc.preset)
    if tc.seq_len > config.model.max_seq_len:
        raise ValueError(f"seq_len {tc.seq_len} exceeds the model's max_seq_len {config.model.max_seq_len}")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    docs = build_documents(seed=tc.seed)
    texts = [d.text for d in docs]
    tokenizer = train_tokenizer(texts, config.model.vocab_size, out / "tokenizer.json")
    eos = tokenizer.token_to_id(EOS)
    doc_tokens = [e.ids for e in tokenizer.encode_batch(texts)]
    timings["data_s"] = time.perf_counter() - t0
    log(f"corpus: {len(docs)} documents, {sum(map(len, doc_tokens)):,} tokens, "
        f"vocab {tokenizer.get_vocab_size()}")

    t0 = time.perf_counter()
    emb = Embedder().encode(texts, progress=True)
    router: Router = build_router(emb, config.memory.branching, config.memory.depth, seed=tc.seed)
    paths = router.route(emb)
    node_ids = router.node_ids(paths).numpy()
    timings["cluster_s"] = time.perf_counter() - t0
    leaf_sizes = np.bincount(node_ids[:, -1], minlength=config.memory.n_nodes(config.memory.depth))
    log(f"router: k={router.branching} depth={router.depth}, documents per leaf {leaf_sizes.tolist()}")

    packed = pack(doc_tokens, node_ids, tc.seq_len, eos)
    log(f"packed: {packed.tokens.shape[0]} sequences of {tc.seq_len} tokens")
    gen = torch.Generator().manual_seed(tc.seed)
    model = Transformer(config)
    bank = MemoryBank(config)
    sizes = config.memory.sizes(config.model)
    log(f"anchor {model.num_params():,} params; bank {sizes['bank_params']:,}; "
        f"fetch {sizes['fetch_params']:,} per path")

    t0 = time.perf_counter()
    losses = {"anchor": train_phase("anchor", model, None, packed, tc, tc.anchor_steps, gen)}
    save_checkpoint(out / "ckpt-anchor.safetensors", model, None, {"phase": "anchor", "step": tc.anchor_steps})
    losses["cotrain"] = train_phase("anchor+bank", model, bank, packed, tc, tc.cotrain_steps, gen)
    save_checkpoint(out / "ckpt-cotrain.safetensors", model, bank, {"phase": "cotrain", "step": tc.cotrain_steps})
    timings["train_s"] = time.perf_counter() - t0

    export(export_dir, config, model, bank, out / "tokenizer.json", router, bank_id=tc.bank,
           version=tc.version)
    stamp.write_text(json.dumps({"fingerprint": tc.fingerprint(), "train": dataclasses.asdict(tc),
                                 "timings": timings, "losses": losses}, indent=1))
    log(f"exported to {export_dir} (data {timings['data_s']:.1f}s, embed+cluster "
        f"{timings['cluster_s']:.1f}s, train {timings['train_s']:.1f}s)")
    return export_dir
