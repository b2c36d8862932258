"""FFN memories: extra SwiGLU neurons fetched from the bank, and the bank that trains them.

A memory for one layer is a (3, R, C) tensor: W1m (gate), W2m (up) and W3m^T (down), each
(R, C), the same layout as a block (membank/blocks.py). The fetched memory of a path is the
concatenation of its levels' blocks along R; nothing is averaged or weighted (PAPER.md sec. 3).
The memory has the FFN's (B, T, C) -> (B, T, C) contract, and W3m starts at zero so a fresh
memory leaves the anchor's output unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from membank.config import Config


def ffn_memory(x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
    """W3m [silu(W1m x) * W2m x] for x (B, T, C) and per-sample memory mem (B or 1, 3, R, C).

    Batched matmuls over the sample dimension, so a batch may mix paths with no Python loop.
    """
    w1, w2, w3 = mem.unbind(1)                     # each (B, R, C)
    if w1.shape[0] != x.shape[0]:                  # one memory for the whole batch
        w1, w2, w3 = (w.expand(x.shape[0], -1, -1) for w in (w1, w2, w3))
    h = F.silu(torch.bmm(x, w1.transpose(1, 2))) * torch.bmm(x, w2.transpose(1, 2))  # (B, T, R)
    return torch.bmm(h, w3)                        # (B, T, C)


class MemoryBank(nn.Module):
    """The whole bank during training: one parameter per level of shape (k^l, L, 3, r_l, C).

    `levels[l-1][n]` is exactly node n's block at level l, so export writes these tensors as they
    are. Levels with r_l = 0 hold an empty tensor.
    """

    def __init__(self, config: Config, init_std: float = 0.02):
        super().__init__()
        mc, d = config.memory, config.model.d_model
        n_layers = len(mc.mem_layers(config.model.n_layer))
        self.branching, self.ranks = mc.branching, tuple(mc.ranks)
        self.levels = nn.ParameterList()
        for level, r in enumerate(mc.ranks, start=1):
            w = torch.zeros(mc.n_nodes(level) if r else 0, n_layers, 3, r, d)
            # W1m, W2m truncated normal; W3m (index 2) stays zero: the memory starts with no effect
            nn.init.trunc_normal_(w[:, :, :2], std=init_std, a=-2 * init_std, b=2 * init_std)
            self.levels.append(nn.Parameter(w))

    @property
    def fetch_rank(self) -> int:
        return sum(self.ranks)

    def gather(self, node_ids: torch.Tensor) -> torch.Tensor:
        """Per-sample fetched memory for node ids (B, p) -> (B, L, 3, R, C).

        Indexing a parameter makes its gradient flow only into the gathered rows.
        """
        parts = [lvl[node_ids[:, i]] for i, lvl in enumerate(self.levels) if self.ranks[i] > 0]
        return torch.cat(parts, dim=3)
