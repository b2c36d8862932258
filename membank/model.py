"""The anchor decoder: an OpenLM/DCLM-style transformer whose FFNs can take fetched memory.

Pre-norm, no biases, gain-only RMSNorm, QK-norm, RoPE (base 1e5), SwiGLU, tied embeddings
(PAPER.md section 5). Every layer listed in `MemoryConfig.layers` accepts a memory tensor; its FFN
then computes

    y = W3 [silu(W1 x) * W2 x] + W3m [silu(W1m x) * W2m x]           (membank/memory.py)

Shapes used throughout: B batch, T time, C d_model, H heads, D head_dim, R memory neurons per
layer (the sum of r_l over the fetched path), L memory layers.

    mem: (B, L, 3, R, C)   one memory per sample (B may be 1 and broadcast over the batch)

Training passes a different path per sample; a device passes one memory for the whole prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from membank.config import Config, ModelConfig
from membank.memory import ffn_memory


class RMSNorm(nn.Module):
    """Gain-only RMS norm (no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim/2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D) by angles (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@dataclass
class KVCache:
    """Preallocated keys and values for incremental decoding: (B, H, max_len, D) per layer."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0  # tokens already in the cache

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32) -> "KVCache":
        shape = (batch, cfg.n_head, max_len, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)],
                   [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.attn_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.attn_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.attn_dim, bias=False)
        self.wo = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)
        # QK-norm over the whole projection, as OpenLM does (gain vectors of size H*D)
        self.q_norm = RMSNorm(cfg.attn_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.attn_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.wk(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, D)
        if cache is not None:
            start = cache.pos
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
            if T > 1:  # prefill after earlier tokens: causal over the new block, all of the past
                mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
        if mask is None and cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: W3 [silu(W1 x) * W2 x], the anchor's own neurons."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # gate
        self.w2 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # up
        self.w3 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        y = self.w3(F.silu(self.w1(x)) * self.w2(x))
        if mem is not None:  # extra neurons fetched from the bank, (B, 3, R, C)
            y = y + ffn_memory(x, mem)
        return y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, mem=None, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.ffn(self.ffn_norm(x), mem)


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        cfg = config.model
        self.cfg = cfg
        self.mem_layers = config.memory.mem_layers(cfg.n_layer)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for block in self.layers:  # scaled init of residual outputs (GPT-2 style)
            for w in (block.attn.wo.weight, block.ffn.w3.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,                      # (B, T) token ids
        mem: torch.Tensor | None = None,        # (B or 1, L, 3, R, C) or None: anchor only
        doc_ids: torch.Tensor | None = None,    # (B, T): attention stays within a document
        cache: KVCache | None = None,
    ) -> torch.Tensor:                          # logits (B, T, vocab)
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None
        if doc_ids is not None:  # causal and block-diagonal over packed documents: (B, 1, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
            mask = mask[:, None]
        x = self.tok_emb(idx)
        slot = {layer: j for j, layer in enumerate(self.mem_layers)}
        for i, block in enumerate(self.layers):
            m = mem[:, slot[i]] if (mem is not None and i in slot) else None  # (B, 3, R, C)
            x = block(x, cos, sin, mask, m, cache, i)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
