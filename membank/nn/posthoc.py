"""Post-hoc memories: FFN memories on a frozen Hugging Face Llama-family model.

Every memory layer's MLP gets a forward hook, so with a memory attached it computes

    y = mlp(x) + W3m [silu(W1m x) * W2m x]              (membank/nn/memory.py `ffn_memory`)

which is the paper's FFN memory on a SwiGLU MLP whose weights we do not own. The base model is
frozen (requires_grad False) and its modules and state_dict keys are untouched (hooks, not
wrappers), so only the bank's blocks train and `base.save_pretrained` still writes a plain model.

    base = LlamaForCausalLM.from_pretrained(...)         # or any model with .model.layers[i].mlp
    pm = PosthocMemory(base, MemoryConfig(branching=16, ranks=(64, 16)))
    out = pm(input_ids, node_ids=node_ids, labels=input_ids)  # per-sample paths (B, p)
    torch.optim.AdamW(pm.trainable_parameters(), lr=1e-4)
    with pm.attached(pm.bank.gather(path)):               # memory fixed for the whole prompt
        base.generate(input_ids, max_new_tokens=16)        # HF's own KV cache works as usual

This module never imports `transformers`: it needs only `base.config` (hidden_size,
num_hidden_layers, num_attention_heads, intermediate_size, vocab_size) and the MLP modules.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from membank.config import Config, MemoryConfig, ModelConfig
from membank.nn.memory import MemoryBank, ffn_memory


def model_config_from_hf(hf_config) -> ModelConfig:
    """The anchor shape of a Hugging Face Llama-family config, as a membank ModelConfig."""
    n_head = hf_config.num_attention_heads
    return ModelConfig(vocab_size=hf_config.vocab_size, n_layer=hf_config.num_hidden_layers,
                       n_head=n_head, d_model=hf_config.hidden_size,
                       head_dim_=(getattr(hf_config, "head_dim", None)
                                  or hf_config.hidden_size // n_head),
                       d_ff=hf_config.intermediate_size,
                       max_seq_len=getattr(hf_config, "max_position_embeddings", 2048),
                       tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)))


def decoder_layers(base: nn.Module) -> nn.ModuleList:
    """The decoder layers of a *ForCausalLM (base.model.layers) or a bare model (base.layers)."""
    inner = getattr(base, "model", base)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(base).__name__} has no .model.layers: not a Llama-family model")
    return inner.layers


class PosthocMemory(nn.Module):
    """A frozen base model plus a trainable MemoryBank whose FFN memories hook into its MLPs."""

    def __init__(self, base: nn.Module, memory: MemoryConfig, init_std: float = 0.02):
        super().__init__()
        if memory.kind != "ffn":
            raise ValueError(f"post-hoc memories are FFN memories; got kind {memory.kind!r}")
        self.config = Config(model_config_from_hf(base.config), memory).validate()
        self.base = base.requires_grad_(False).eval()
        self.bank = MemoryBank(self.config, init_std)  # levels (k^l, L, 3, r_l, hidden)
        self.mem_layers = memory.mem_layers(self.config.model.n_layer)
        self._mem: torch.Tensor | None = None       # (B or 1, L, 3, R, hidden) while attached
        layers = decoder_layers(base)
        self._hooks = [layers[i].mlp.register_forward_hook(self._hook(slot))
                       for slot, i in enumerate(self.mem_layers)]

    def _hook(self, slot: int):
        def add_memory(module, args, output):  # args[0]: the MLP's input x (B, T, hidden)
            if self._mem is None:
                return None                        # no memory attached: the base's own output
            x = args[0]
            return output + ffn_memory(x, self._mem[:, slot].to(x.dtype))
        return add_memory

    @contextmanager
    def attached(self, mem: torch.Tensor | None):
        """Attach memory (B or 1, L, 3, R, hidden) to every base forward inside the block."""
        prev, self._mem = self._mem, mem
        try:
            yield self
        finally:
            self._mem = prev

    def forward(self, input_ids: torch.Tensor, node_ids: torch.Tensor | None = None,
                mem: torch.Tensor | None = None, **kwargs):
        """The base model's output with each sample's path memory; node_ids (B, p) or mem."""
        if node_ids is not None:
            mem = self.bank.gather(node_ids)
        with self.attached(mem):
            return self.base(input_ids=input_ids, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bank.parameters())

    def train(self, mode: bool = True) -> "PosthocMemory":
        """Only the bank changes mode; the frozen base stays in eval (no dropout)."""
        self.training = mode
        self.bank.train(mode)
        return self

    def remove(self) -> nn.Module:
        """Detach the hooks and hand back the untouched base model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.base
