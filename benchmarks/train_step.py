"""Benchmark: a training step with memory vs anchor-only, same batch and sequence length.

    .venv/bin/python -m benchmarks.train_step [--configs demo,eval,medium] [--steps 20] \\
        [--threads 2]

For each config, two trainers (training/train.py) on the same synthetic packed data (random
tokens, random paths over the whole tree, full-length documents):

  anchor   the anchor phase: forward + backward + AdamW over the anchor
  memory   the co-training phase: per-sample gathered memory (fetched rows as leaf tensors),
           generic memory with p = 1/17, anchor AdamW + lazy AdamW over the fetched rows only

Steps alternate between the trainers after a warmup, so machine load hits both alike; the
median step time of each gives the ratio (target <= 1.3x; the paper's runtime FLOPs ratio is
1.1x) and tokens per second; the best (minimum) step times give a second ratio that is less
sensitive to other processes on a shared machine. A third row, `memory-dense`, is the naive
alternative for scale: the bank as dense parameters indexed directly (dense zero gradients for
every block) and torch.optim.AdamW over the whole bank at every step. Peak RSS
(resource.getrusage) of each variant comes from a separate short run in a fresh process, so the
figures do not mix.
Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from membank.config import Config
from membank.nn.memory import MemoryBank
from membank.nn.model import Transformer
from training.config import load_train_config
from training.packing import Packed
from training.train import Trainer, lm_loss

CONFIGS = {
    # the demo preset at its training shape: batch 16 x 128 tokens
    "demo": dict(shape=[], batch=16, seq=128),
    # the long-tail evaluation's small preset (training/evaluate.py): d 96, bank 21x the anchor
    # in the last 2 layers, a tenth of the samples without memory
    "eval": dict(shape=["model.d_model=96", "model.n_head=4", "model.d_ff=384",
                        "memory.branching=16", "memory.ranks=[32, 112]", "memory.placement=last",
                        "memory.n_layers=2", "no_memory_prob=0.1"], batch=32, seq=128),
    # a larger one that still fits a 2-core laptop: 8 layers, d 256, bank of 25M params (k 8)
    "medium": dict(shape=["model.vocab_size=4096", "model.n_layer=8", "model.n_head=8",
                          "model.d_model=256", "model.d_ff=1024", "model.max_seq_len=256",
                          "memory.branching=8", "memory.ranks=[128, 64]"], batch=8, seq=256),
}
VARIANTS = ("anchor", "memory", "memory-dense")


def synthetic(config: Config, n: int, seq: int, seed: int = 0) -> Packed:
    g = torch.Generator().manual_seed(seed)
    mc = config.memory
    tokens = torch.randint(1, config.model.vocab_size, (n, seq + 1), generator=g)
    leaf = torch.randint(0, mc.n_nodes(mc.depth), (n,), generator=g)
    nodes = torch.stack([leaf // mc.branching ** (mc.depth - 1 - l) for l in range(mc.depth)],
                        dim=1)
    return Packed(tokens, torch.zeros_like(tokens), nodes)


def train_config(name: str, variant: str = "memory"):
    spec = CONFIGS[name]
    phase = ["anchor_steps=100000", "cotrain_steps=0"] if variant == "anchor" else \
        ["anchor_steps=0", "cotrain_steps=100000"]
    return load_train_config("demo", [*spec["shape"], *phase, f"batch_size={spec['batch']}",
                                      f"seq_len={spec['seq']}", "warmup_steps=10"])


def trainer(name: str, variant: str) -> Trainer:
    tc = train_config(name, variant)
    config = tc.model_config()
    packed = synthetic(config, 64 * tc.batch_size, tc.seq_len)
    return Trainer(config, tc, packed, data_fingerprint="bench", log=lambda *a: None)


class DenseStep:
    """The naive memory step: MemoryBank parameters indexed directly, dense AdamW over all of it."""

    def __init__(self, name: str):
        spec = CONFIGS[name]
        config = train_config(name).model_config()
        torch.manual_seed(0)
        self.model, self.bank = Transformer(config), MemoryBank(config)
        self.packed, self.batch = synthetic(config, 64 * spec["batch"], spec["seq"]), spec["batch"]
        self.params = list(self.model.parameters()) + list(self.bank.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-3)
        self.i = 0

    def step(self) -> float:
        idx = torch.arange(self.i * self.batch, (self.i + 1) * self.batch) % len(self.packed)
        self.i += 1
        loss = lm_loss(self.model, self.packed.tokens[idx], self.packed.doc_ids[idx],
                       self.bank.gather(self.packed.node_ids[idx]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()


def make(name: str, variant: str):
    return DenseStep(name) if variant == "memory-dense" else trainer(name, variant)


def time_steps(runners: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    """Alternate one step of each runner; return per-step seconds after warmup."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(warmup + steps):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def rss_worker(name: str, variant: str, threads: int) -> None:
    torch.set_num_threads(threads)
    r = make(name, variant)
    for _ in range(3):
        r.step()
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(name: str, variant: str, threads: int) -> float:
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--rss-worker", name,
                          variant, "--threads", str(threads)],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="demo,eval,medium")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense-AdamW comparison")
    ap.add_argument("--rss-worker", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_worker:
        rss_worker(*args.rss_worker, args.threads)
        return
    torch.set_num_threads(args.threads)
    variants = [v for v in VARIANTS if not (args.no_dense and v == "memory-dense")]
    names = args.configs.split(",")
    # RSS first, while this process is still small: Linux carries the parent's peak RSS at
    # fork into a child's ru_maxrss, so a child forked from a grown parent would report that
    rss = {(n, v): peak_rss(n, v, args.threads) for n in names for v in variants}
    results = {}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} timed steps "
          f"after {args.warmup} warmup")
    print(f"{'config':<8} {'variant':<13} {'batch x seq':>11} {'step ms':>9} {'min ms':>8} "
          f"{'p10-p90 ms':>15} "
          f"{'tokens/s':>9} {'peak RSS MB':>12} {'vs anchor':>10} {'(min)':>6}")
    for name in names:
        spec = CONFIGS[name]
        config = train_config(name).model_config()
        sizes = config.memory.sizes(config.model)
        runners = {v: make(name, v) for v in variants}
        anchor_params = runners["anchor"].model.num_params()
        times = time_steps(runners, args.steps, args.warmup)
        del runners
        tokens = spec["batch"] * spec["seq"]
        row = {"anchor_params": anchor_params, "bank_params": sizes["bank_params"],
               "fetch_params": sizes["fetch_params"], "batch": spec["batch"],
               "seq_len": spec["seq"]}
        for v in variants:
            ts = sorted(times[v])
            med = statistics.median(ts)
            row[v] = {"step_ms": med * 1e3, "min_ms": ts[0] * 1e3,
                      "p10_ms": ts[len(ts) // 10] * 1e3,
                      "p90_ms": ts[(9 * len(ts)) // 10] * 1e3,
                      "tokens_per_s": tokens / med, "peak_rss_mb": rss[name, v]}
        for v in variants:
            r = row[v]
            ratio = r["step_ms"] / row["anchor"]["step_ms"]
            ratio_min = r["min_ms"] / row["anchor"]["min_ms"]
            print(f"{name:<8} {v:<13} {spec['batch']:>4} x {spec['seq']:<4} "
                  f"{r['step_ms']:>9.1f} {r['min_ms']:>8.1f} "
                  f"{r['p10_ms']:>7.1f}-{r['p90_ms']:<7.1f} {r['tokens_per_s']:>9.0f} "
                  f"{r['peak_rss_mb']:>12.0f} "
                  f"{ratio:>9.2f}x {ratio_min:>5.2f}x")
        row["memory_over_anchor"] = row["memory"]["step_ms"] / row["anchor"]["step_ms"]
        row["memory_over_anchor_min"] = row["memory"]["min_ms"] / row["anchor"]["min_ms"]
        print(f"{name}: anchor {anchor_params:,} params, bank {sizes['bank_params']:,}, fetch "
              f"{sizes['fetch_params']:,}; memory / anchor step time "
              f"{row['memory_over_anchor']:.2f}x median, "
              f"{row['memory_over_anchor_min']:.2f}x best (target <= 1.3x)")
        results[name] = row
    print(json.dumps({"benchmark": "train_step", "threads": args.threads, "steps": args.steps,
                      "results": results}))


if __name__ == "__main__":
    main()
