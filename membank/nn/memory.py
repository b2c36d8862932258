"""Memories fetched from the bank, one interface for three kinds, and the bank that trains them.

A fetched memory is one tensor (B or 1, L, n_mats, R, width): per memory layer, n_mats matrices
with R rows, R = sum of r_l over the path's levels, concatenated along R in level order; nothing
is averaged or weighted (PAPER.md sec. 3). A block is one node's (L, n_mats, r_l, width) slice
(membank/blocks.py). The layout per kind is in membank/config.py; the maths, per layer:

    ffn       mem (3, R, C):        y_ffn += W3m [silu(W1m x) * W2m x]                 (the method)
    lora-*    mem (n, R, in + out): W x -> W x + (alpha / R) B (A x)  for each targeted linear,
                                    row i = [A[i, :] | B[:, i]], alpha = 2
    kv        mem (2, R, H*D):      o_h += softmax(q_h Km_h^T / sqrt(D)) Vm_h  per head h, a second
                                    softmax over the R memory slots only (q after QK-norm, no RoPE,
                                    no mask), added to the causal attention's output before W_o

Every kind starts with no effect (W3m = 0, B = 0, Vm = 0), so a fresh memory leaves the anchor's
output bit for bit unchanged. This is why KV memories use their own softmax: extra keys in the
causal softmax would take probability mass from the real keys even with zero values.
All functions take per-sample memory and use batched matmuls, so a batch may mix paths with no
Python loop over samples; a memory with batch 1 is broadcast over the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from membank.config import LORA_ALPHA, LORA_TARGETS, Config, linear_dims


def _batch(x: torch.Tensor, *ws: torch.Tensor) -> list[torch.Tensor]:
    """Expand memory matrices (1, ...) to x's batch size (no copy)."""
    return [w.expand(x.shape[0], *w.shape[1:]) if w.shape[0] != x.shape[0] else w for w in ws]


def ffn_memory(x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
    """W3m [silu(W1m x) * W2m x] for x (B, T, C) and per-sample memory mem (B or 1, 3, R, C)."""
    if x.shape[0] == mem.shape[0] == 1:
        # one sequence, one memory (the device): plain matmuls, as the anchor's own FFN. bmm
        # over a transposed view is 1.6-2.7x slower in bfloat16 on CPU; in float32 both give
        # the same bits at batch 1 (not above it, so batches keep bmm: the evaluation's bits)
        w1, w2, w3 = mem[0].unbind(0)              # each (R, C)
        return (F.silu(F.linear(x, w1)) * F.linear(x, w2)) @ w3     # (B, T, C)
    w1, w2, w3 = _batch(x, *mem.unbind(1))         # each (B, R, C)
    h = F.silu(torch.bmm(x, w1.transpose(1, 2))) * torch.bmm(x, w2.transpose(1, 2))  # (B, T, R)
    return torch.bmm(h, w3)                        # (B, T, C)


def lora_delta(x: torch.Tensor, factors: torch.Tensor, alpha: float = LORA_ALPHA) -> torch.Tensor:
    """(alpha / R) B (A x) for x (B, T, d_in) and factors (B or 1, R, d_in + d_out) = [A | B^T]."""
    d_in, R = x.shape[-1], factors.shape[-2]
    if R == 0:
        return x.new_zeros(*x.shape[:-1], factors.shape[-1] - d_in)
    a, bt = _batch(x, factors[..., :d_in], factors[..., d_in:])  # (B, R, d_in), (B, R, d_out)
    return torch.bmm(torch.bmm(x, a.transpose(1, 2)), bt) * (alpha / R)  # (B, T, d_out)


def kv_memory(q: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
    """softmax(q Km^T / sqrt(D)) Vm per head for q (B, H, T, D), mem (B or 1, 2, R, H*D).

    No mask and no RoPE: every position sees every memory slot, whatever its position.
    """
    B, H, T, D = q.shape
    if mem.shape[-2] == 0:
        return torch.zeros_like(q)
    km, vm = (w.unflatten(-1, (H, D)).transpose(1, 2) for w in mem.unbind(1))  # (B|1, H, R, D)
    km, vm = _batch(q, km, vm)
    return F.scaled_dot_product_attention(q, km, vm)  # (B, H, T, D)


def lora_patches(kind: str, mem: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A LoRA memory (B, n, R, in + out) as {linear name: factors (B, R, in + out)}; else {}."""
    if mem is None or kind not in LORA_TARGETS:
        return {}
    return dict(zip(LORA_TARGETS[kind], mem.unbind(1)))


def init_memory_(w: torch.Tensor, config: Config, init_std: float = 0.02) -> torch.Tensor:
    """Initialise memory (..., n_mats, r, width) in place so that it has no effect yet.

    ffn: W1m, W2m truncated normal (std init_std, cut at 2 std), W3m zero (PAPER.md sec. 4).
    lora-*: A uniform in +-1/sqrt(d_in) (the LoRA reference init), B zero.
    kv: keys truncated normal like W1m, values zero.
    """
    kind, m = config.memory.kind, config.model
    with torch.no_grad():
        w.zero_()
        if kind == "ffn":
            nn.init.trunc_normal_(w[..., :2, :, :], std=init_std, a=-2 * init_std, b=2 * init_std)
        elif kind == "kv":
            nn.init.trunc_normal_(w[..., 0, :, :], std=init_std, a=-2 * init_std, b=2 * init_std)
        else:
            for i, name in enumerate(LORA_TARGETS[kind]):
                d_in = linear_dims(name, m.d_model, m.attn_dim, m.d_ff)[0]
                bound = 1 / math.sqrt(d_in)
                nn.init.uniform_(w[..., i, :, :d_in], -bound, bound)
    return w


class MemoryBank(nn.Module):
    """The whole bank during training: one parameter per level of shape (k^l, L, n_mats, r_l, W).

    For FFN memories that is (k^l, L, 3, r_l, C). `levels[l-1][n]` is exactly node n's block at
    level l, so export writes these tensors as they are. Levels with r_l = 0 hold an empty tensor.
    """

    def __init__(self, config: Config, init_std: float = 0.02):
        super().__init__()
        mc = config.memory
        self.kind, self.branching, self.ranks = mc.kind, mc.branching, tuple(mc.ranks)
        self.levels = nn.ParameterList()
        for level, r in enumerate(mc.ranks, start=1):
            shape = mc.block_shape(config.model, level)            # (L, n_mats, r_l, W)
            w = torch.zeros(mc.n_nodes(level) if r else 0, *shape)
            self.levels.append(nn.Parameter(init_memory_(w, config, init_std)))

    @property
    def fetch_rank(self) -> int:
        return sum(self.ranks)

    def gather(self, node_ids: torch.Tensor) -> torch.Tensor:
        """Per-sample fetched memory for node ids (B, p) -> (B, L, n_mats, R, W).

        Indexing a parameter makes its gradient flow only into the gathered rows.
        """
        parts = [lvl[node_ids[:, i]] for i, lvl in enumerate(self.levels) if self.ranks[i] > 0]
        return torch.cat(parts, dim=3)
