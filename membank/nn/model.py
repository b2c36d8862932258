"""The anchor decoder: an OpenLM/DCLM-style transformer whose layers can take fetched memory.

Pre-norm, no biases, gain-only RMSNorm, QK-norm, RoPE (base 1e5), SwiGLU, optionally tied
embeddings (PAPER.md section 5). Every layer in `MemoryConfig.mem_layers(n_layer)` accepts a
memory; with FFN memories (the default) its FFN then computes

    y = W3 [silu(W1 x) * W2 x] + W3m [silu(W1m x) * W2m x]           (membank/nn/memory.py)

LoRA memories patch the targeted linears (W x + (alpha/R) B A x) and KV memories add attention
over learned key/value slots to the attention output; membank/nn/memory.py has the maths.

Shapes used throughout: B batch, T time, C d_model, H heads, D head_dim, A = H*D attention
width, R memory rank per layer (the sum of r_l over the fetched path), L memory layers,
n/W the kind's matrices per layer and row width (membank/config.py `block_layout`).

    mem: (B, L, n, R, W)   one memory per sample (B may be 1 and broadcast over the batch);
                           FFN memories: (B, L, 3, R, C)

Training passes a different path per sample; a device passes one memory for the whole prompt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from membank.config import Config, ModelConfig
from membank.nn.memory import ffn_memory, kv_memory, lora_delta, lora_patches


def linear(lin: nn.Linear, x: torch.Tensor, patches: dict[str, torch.Tensor],
           name: str) -> torch.Tensor:
    """lin(x), plus the LoRA memory's update when `patches` holds factors for `name`."""
    y = lin(x)
    return y + lora_delta(x, patches[name]) if name in patches else y


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
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32,
              device: torch.device | str | None = None) -> "KVCache":
        shape = (batch, cfg.n_head, max_len, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)])


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

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0,
                lora: dict[str, torch.Tensor] | None = None, kv_mem: torch.Tensor | None = None):
        """x (B, T, C) -> (B, T, C). lora: {"wq"|"wk"|"wv"|"wo": (B, R, in+out)};
        kv_mem (B, 2, R, A)."""
        B, T, _ = x.shape
        lora = lora or {}

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, A) -> (B, H, T, D)
            return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        q = heads(self.q_norm(linear(self.wq, x, lora, "wq")))
        k = heads(self.k_norm(linear(self.wk, x, lora, "wk")))
        v = heads(linear(self.wv, x, lora, "wv"))
        q_mem = q  # KV memories see the query without RoPE: memory slots have no position
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, D)
        if cache is not None:
            start = cache.pos
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k, v = cache.k[layer][:, :, :start + T], cache.v[layer][:, :, :start + T]
            if T > 1:  # prefill after earlier tokens: causal over the new block, all of the past
                mask = torch.ones(T, start + T, dtype=torch.bool,
                                  device=x.device).tril(diagonal=start)
        if mask is None and cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if kv_mem is not None:  # a second softmax over the memory slots, added: (B, H, T, D)
            y = y + kv_memory(q_mem, kv_mem)
        return linear(self.wo, y.transpose(1, 2).reshape(B, T, -1), lora, "wo")


class FeedForward(nn.Module):
    """SwiGLU: W3 [silu(W1 x) * W2 x], the anchor's own neurons."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # gate
        self.w2 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)  # up
        self.w3 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None,
                lora: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). mem: FFN memory (B, 3, R, C);
        lora: {"w1"|"w2"|"w3": factors}."""
        lora = lora or {}
        h = F.silu(linear(self.w1, x, lora, "w1")) * linear(self.w2, x, lora, "w2")  # (B, T, F)
        y = linear(self.w3, h, lora, "w3")
        if mem is not None:  # extra neurons fetched from the bank, (B, 3, R, C)
            y = y + ffn_memory(x, mem)
        return y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mem_kind: str = "ffn"):
        super().__init__()
        self.mem_kind = mem_kind
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, mem=None, cache=None, layer=0):
        """x (B, T, C); mem: this layer's memory (B, n, R, W) of kind self.mem_kind, or None."""
        kind = self.mem_kind if mem is not None else None
        lora = lora_patches(self.mem_kind, mem)  # {} unless a LoRA kind
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, lora,
                          mem if kind == "kv" else None)
        return x + self.ffn(self.ffn_norm(x), mem if kind == "ffn" else None, lora)


class Transformer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        cfg = config.model
        self.cfg = cfg
        self.mem_layers = config.memory.mem_layers(cfg.n_layer)
        self.mem_kind = config.memory.kind
        self.mem_layout = config.memory.layout(cfg)  # (n_mats, W) of this kind
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, self.mem_kind) for _ in range(cfg.n_layer))
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
        mem: torch.Tensor | None = None,        # (B or 1, L, n, R, W) or None: anchor only
        doc_ids: torch.Tensor | None = None,    # (B, T): attention stays within a document
        cache: KVCache | None = None,
    ) -> torch.Tensor:                          # logits (B, T, vocab)
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        if mem is not None and (mem.dim() != 5 or mem.shape[1] != len(self.mem_layers)
                                or (mem.shape[2], mem.shape[4]) != self.mem_layout):
            n, w = self.mem_layout
            raise ValueError(f"{self.mem_kind} memory must be "
                             f"(B, {len(self.mem_layers)}, {n}, R, {w}), "
                             f"got {tuple(mem.shape)}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        mask = None
        if doc_ids is not None:  # causal and block-diagonal over packed documents: (B, 1, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
            mask = mask[:, None]
        x = self.tok_emb(idx)
        # split the memory per layer once: indexing mem[:, j] in every layer would make backward
        # build a full-size zero gradient per layer
        per_layer = dict(zip(self.mem_layers, mem.unbind(1))) if mem is not None else {}
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, per_layer.get(i), cache, i)  # memory (B, n, R, W) or None
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
