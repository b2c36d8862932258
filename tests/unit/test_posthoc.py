"""membank/nn/posthoc.py: FFN memories on a frozen, tiny, randomly initialised Hugging Face Llama.

No download: the model is built from a LlamaConfig. Run:
.venv/bin/python -m pytest -q tests/unit/test_posthoc.py
"""
import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from membank.config import MemoryConfig  # noqa: E402
from membank.nn.posthoc import PosthocMemory  # noqa: E402


@pytest.fixture
def base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_fresh_memory_leaves_logits_unchanged(base):
    ids = torch.randint(0, 128, (3, 10))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        pm = PosthocMemory(base, MemoryConfig(branching=2, ranks=(8, 4)))
        assert pm.bank.levels[0].shape == (2, 2, 3, 8, 32)
        after = pm(ids, node_ids=torch.tensor([[0, 1], [1, 2], [1, 3]])).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_training_changes_only_memory(base):
    pm = PosthocMemory(base, MemoryConfig(branching=2, ranks=(8, 4), placement="last", n_layers=1))
    assert pm.mem_layers == [1]
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    bank0 = [p.detach().clone() for p in pm.bank.levels]
    assert all(not p.requires_grad for p in base.parameters())
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    ids, nodes = torch.randint(0, 128, (2, 12)), torch.tensor([[0, 1], [1, 3]])
    losses = []
    pm.train()
    for _ in range(4):
        loss = pm(ids, node_ids=nodes, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not base.training and losses[-1] < losses[0]
    for k, v in base.state_dict().items():  # the base, bit for bit
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None for p in base.parameters())
    assert (not torch.equal(pm.bank.levels[0], bank0[0])
            and not torch.equal(pm.bank.levels[1], bank0[1]))
    # trained memory now acts, and HF's own KV cache decodes with it attached
    with torch.no_grad(), pm.attached(pm.bank.gather(nodes[:1])):
        full = base(input_ids=ids[:1]).logits
        past = base(input_ids=ids[:1, :8], use_cache=True)
        # transformers >= 5.2x names it `cache`, earlier versions `past_key_values`
        name = ("cache" if "cache" in inspect.signature(base.forward).parameters
                else "past_key_values")
        step = base(input_ids=ids[:1, 8:], **{name: past[name]}).logits
    torch.testing.assert_close(torch.cat([past.logits, step], 1), full, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(full, base(input_ids=ids[:1]).logits, atol=1e-4)
    assert pm.remove() is base and set(base.state_dict()) == set(frozen)
