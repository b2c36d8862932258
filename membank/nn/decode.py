"""Decoding with a KV cache: the one decode loop, and batched greedy decoding built on it.

    out = greedy(model, [[5, 9, 2], [7, 1, 4]], mem, max_new_tokens=6, eos=0)  # [[...], [...]]
    for nxt in decode_steps(model, ids, mem, 16, choose):   # ids (B, T); nxt (B,) per step
        ...                                                  # the device: sampling, streaming

`decode_steps` prefills (B, T) prompts of one length, then per step picks every row's next
token with `choose(logits (B, V)) -> (B,)`, yields it and feeds it back; the next forward runs
only when the consumer asks for the next token, so a streamed token goes out before it.
The evaluation (greedy, below) and the device (services/model_client/memory_model.py, one
prompt, sampling) both decode with it: the same operations in the same order.

Prompts of different lengths are grouped by length, so no row is ever padded: RoPE positions,
attention and the numbers of every row are exactly those of the prompt decoded alone. A row
stops at EOS (not included); the batch stops when every row has. `mem` is one memory per prompt
(N, L, n, R, W) in prompt order, one memory for all (1, ...), None (the anchor alone), or a
function from a list of prompt indices to their memories (so N memories need not all exist at
once: 12,000 fetched paths of a small bank are gigabytes).
The long-tail evaluation (training/evaluate.py) probes thousands of prompts with it.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from membank.nn.model import KVCache, Transformer


def decode_steps(model: Transformer, ids: torch.Tensor, mem: torch.Tensor | None,
                 max_new_tokens: int, choose: Callable[[torch.Tensor], torch.Tensor],
                 timings: dict[str, float] | None = None) -> Iterator[torch.Tensor]:
    """The chosen next tokens (B,) of prompts `ids` (B, T), step by step, at most
    `max_new_tokens` of them and never past the model's context (nothing when it is full).
    `mem` (B or 1, L, n, R, W) or None stays fixed. `timings` (optional) gets "prefill" and
    "decode" in ms: model work and `choose` only, not the consumer's time between tokens."""
    steps = min(max_new_tokens, model.cfg.max_seq_len - ids.shape[1])
    if steps <= 0:
        return
    dtype = model.tok_emb.weight.dtype           # keys and values in the model's dtype
    cache = KVCache.empty(model.cfg, ids.shape[0], ids.shape[1] + steps, dtype=dtype)
    t0 = time.perf_counter()
    logits = model(ids, mem=mem, cache=cache)[:, -1]                 # (B, V)
    if timings is not None:
        timings["prefill"] = (time.perf_counter() - t0) * 1e3
        timings["decode"] = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        nxt = choose(logits)                                         # (B,)
        if timings is not None:
            timings["decode"] += (time.perf_counter() - t0) * 1e3
        yield nxt
        if step + 1 < steps:   # run once the consumer asks for the next token
            t0 = time.perf_counter()
            logits = model(nxt[:, None], mem=mem, cache=cache)[:, -1]
            if timings is not None:
                timings["decode"] += (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def greedy(model: Transformer, prompts: list[list[int]], mem, max_new_tokens: int, eos: int,
           batch_size: int = 256) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, EOS and what follows it dropped)."""
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        by_len.setdefault(len(p), []).append(i)
    for length, rows in sorted(by_len.items()):
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            m = (mem(chunk) if callable(mem) else None if mem is None
                 else mem if mem.shape[0] == 1 else mem[chunk])
            for i, ids in zip(chunk, _greedy_block(model, [prompts[i] for i in chunk], m,
                                                   max_new_tokens, eos)):
                out[i] = ids
    return out


def _greedy_block(model: Transformer, prompts: list[list[int]], mem: torch.Tensor | None,
                  max_new_tokens: int, eos: int) -> list[list[int]]:
    """Prompts of one length: (B, T) prefill, then one token per step for all rows, until
    every row has reached EOS."""
    new = []
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for nxt in decode_steps(model, torch.tensor(prompts), mem, max_new_tokens,
                            lambda logits: logits.argmax(-1)):
        new.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
    if not new:
        return [[] for _ in prompts]
    tokens = torch.stack(new, 1).tolist()                            # (B, steps)
    return [row[:row.index(eos)] if eos in row else row for row in tokens]
