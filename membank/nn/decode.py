"""Batched greedy decoding with a KV cache: many prompts, each with its own memory, at once.

    out = greedy(model, [[5, 9, 2], [7, 1, 4]], mem, max_new_tokens=6, eos=0)  # [[...], [...]]

Prompts of different lengths are grouped by length, so no row is ever padded: RoPE positions,
attention and the numbers of every row are exactly those of the prompt decoded alone. A row
stops at EOS (not included); the batch stops when every row has. `mem` is one memory per prompt
(N, L, n, R, W) in prompt order, one memory for all (1, ...), None (the anchor alone), or a
function from a list of prompt indices to their memories (so N memories need not all exist at
once: 12,000 fetched paths of a small bank are gigabytes).
The long-tail evaluation probes thousands of prompts with it.
"""
from __future__ import annotations

import torch

from membank.nn.model import KVCache, Transformer


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
    """Prompts of one length: (B, T) prefill, then one token per step for all rows."""
    ids = torch.tensor(prompts)
    steps = min(max_new_tokens, model.cfg.max_seq_len - ids.shape[1])
    if steps <= 0:
        return [[] for _ in prompts]
    cache = KVCache.empty(model.cfg, len(prompts), ids.shape[1] + steps)
    logits = model(ids, mem=mem, cache=cache)[:, -1]
    new = []
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for step in range(steps):
        nxt = logits.argmax(-1)                                      # (B,)
        new.append(nxt)
        done |= nxt == eos
        if bool(done.all()) or step == steps - 1:
            break
        logits = model(nxt[:, None], mem=mem, cache=cache)[:, -1]
    tokens = torch.stack(new, 1).tolist()                            # (B, steps)
    return [row[:row.index(eos)] if eos in row else row for row in tokens]
