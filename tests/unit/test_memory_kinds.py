"""Memory kinds (FFN, LoRA-QK/OV/FFN, KV), placement, and the paper's anchors (membank/nn/memory.py,
membank/nn/model.py, membank/config.py).

Run: .venv/bin/python -m pytest -q tests/unit/test_memory_kinds.py
"""
import copy
import math

import pytest
import torch

from membank.config import LORA_ALPHA, LORA_TARGETS, MEMORY_KINDS, Config, get_preset, linear_dims
from membank.manifest import Manifest
from membank.nn.memory import MemoryBank, kv_memory
from membank.nn.model import Attention, KVCache, Transformer, rope_tables

KINDS = list(MEMORY_KINDS)


def kind_config(kind: str, **memory) -> Config:
    """The tiny preset with heads of 12 (attention width 24 != d_model 32) and the given kind."""
    d = get_preset("tiny").to_dict()
    d["model"]["head_dim_"] = 12
    d["memory"].update(kind=kind, **memory)
    return Config.from_dict(d)


def trained_like(bank: MemoryBank, seed: int = 1) -> MemoryBank:
    """Non-zero everywhere, as after training (a fresh memory has no effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.levels:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return bank


@pytest.mark.parametrize("kind", KINDS)
def test_block_shape_agrees_between_bank_config_and_manifest(kind):
    cfg = kind_config(kind)
    mc, m = cfg.memory, cfg.model
    bank = MemoryBank(cfg)
    manifest = Manifest(bank="b", version="v", checksums=[["x"] * 2, ["y"] * 4],
                        **mc.manifest_fields(m))
    n_mats, width = {"ffn": (3, 32), "lora-qk": (2, 32 + 24), "lora-ov": (2, 24 + 32),
                     "lora-ffn": (3, 32 + 64), "kv": (2, 24)}[kind]
    for level in (1, 2):
        shape = (2, n_mats, mc.ranks[level - 1], width)
        assert mc.block_shape(m, level) == manifest.block_shape(level) == shape
        assert tuple(bank.levels[level - 1].shape) == (2 ** level, *shape)
    assert mc.sizes(m)["fetch_params"] == 2 * n_mats * width * sum(mc.ranks)
    assert tuple(bank.gather(torch.tensor([[0, 1]])).shape) == mc.mem_shape(m)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_memory_has_no_effect_and_its_output_side_is_zero(kind):
    torch.manual_seed(0)
    cfg = kind_config(kind)
    model, bank = Transformer(cfg), MemoryBank(cfg)
    lvl = bank.levels[0]
    if kind in LORA_TARGETS:  # each target's [A | B^T]: A random, B = 0
        for i, name in enumerate(LORA_TARGETS[kind]):
            d_in = linear_dims(name, 32, 24, 64)[0]
            assert (lvl[:, :, i, :, :d_in].abs().sum() > 0
                    and lvl[:, :, i, :, d_in:].abs().sum() == 0)
    else:  # ffn: W3m (index 2) zero; kv: values (index 1) zero
        out = 2 if kind == "ffn" else 1
        assert lvl[:, :, out].abs().sum() == 0 and lvl[:, :, 0].abs().sum() > 0
    idx = torch.randint(0, cfg.model.vocab_size, (3, 10))
    nodes = torch.tensor([[0, 1], [1, 2], [1, 3]])
    torch.testing.assert_close(model(idx, mem=bank.gather(nodes)), model(idx), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_paths_equal_per_sample_forward(kind):
    torch.manual_seed(0)
    cfg = kind_config(kind)
    model, bank = Transformer(cfg), trained_like(MemoryBank(cfg))
    idx = torch.randint(0, cfg.model.vocab_size, (4, 9))
    nodes = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 3]])  # four different paths in one batch
    doc_ids = torch.tensor([[0] * 5 + [1] * 4] * 4)  # packed documents, as in training
    batched = model(idx, mem=bank.gather(nodes), doc_ids=doc_ids)
    for b in range(4):
        single = model(idx[b:b + 1], mem=bank.gather(nodes[b:b + 1]), doc_ids=doc_ids[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], single, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched, model(idx, doc_ids=doc_ids), atol=1e-4)  # memory does act


@pytest.mark.parametrize("kind", ["lora-qk", "lora-ov", "lora-ffn"])
def test_lora_memory_equals_dense_model_with_patched_weights(kind):
    torch.manual_seed(0)
    cfg = kind_config(kind)
    model, bank = Transformer(cfg), trained_like(MemoryBank(cfg))
    mem = bank.gather(torch.tensor([[1, 2]]))  # (1, L, n, R, in + out)
    R = mem.shape[3]
    dense = copy.deepcopy(model)
    m = cfg.model
    for j, layer in enumerate(cfg.memory.mem_layers(m.n_layer)):
        block = dense.layers[layer]
        for i, name in enumerate(LORA_TARGETS[kind]):
            lin = getattr(block.attn if name in ("wq", "wk", "wv", "wo") else block.ffn, name)
            d_in, d_out = linear_dims(name, m.d_model, m.attn_dim, m.d_ff)
            a, b = mem[0, j, i, :, :d_in], mem[0, j, i, :, d_in:].T  # A (R, d_in), B (d_out, R)
            assert lin.weight.shape == (d_out, d_in)
            with torch.no_grad():
                lin.weight += (LORA_ALPHA / R) * b @ a
    idx = torch.randint(0, m.vocab_size, (2, 8))
    torch.testing.assert_close(model(idx, mem=mem), dense(idx), rtol=1e-5, atol=1e-5)


def test_kv_memory_equals_attention_computed_by_hand():
    torch.manual_seed(0)
    cfg = kind_config("kv")
    m = cfg.model
    attn, (B, T, R, H, D) = Attention(m), (3, 6, 5, m.n_head, m.head_dim)
    x, mem = torch.randn(B, T, m.d_model), torch.randn(B, 2, R, H * D)
    cos, sin = rope_tables(T, D, m.rope_base)
    out = attn(x, cos, sin, kv_mem=mem)

    heads = lambda t: t.view(B, -1, H, D).transpose(1, 2)  # noqa: E731  (B, n, H*D) -> (B, H, n, D)
    q, k, v = heads(attn.q_norm(attn.wq(x))), heads(attn.k_norm(attn.wk(x))), heads(attn.wv(x))
    # causal self-attention with RoPE
    rot = lambda t: torch.cat([t[..., :D // 2] * cos - t[..., D // 2:] * sin,  # noqa: E731
                               t[..., :D // 2] * sin + t[..., D // 2:] * cos], -1)
    s = rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = s.softmax(-1) @ v
    # memory slots: the unrotated query against keys Km, every slot visible, own softmax
    km, vm = heads(mem[:, 0]), heads(mem[:, 1])  # (B, H, R, D)
    y = y + (q @ km.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ vm
    torch.testing.assert_close(out, attn.wo(y.transpose(1, 2).reshape(B, T, H * D)), rtol=1e-5,
                               atol=1e-5)
    # the memory is position-free: a query's memory read does not depend on where it stands
    q1 = torch.randn(1, H, 1, D)
    torch.testing.assert_close(kv_memory(q1.expand(1, H, 4, D).contiguous(), mem[:1])[:, :, 3:],
                               kv_memory(q1, mem[:1]))


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_decoding_matches_full_forward(kind):
    torch.manual_seed(0)
    cfg = kind_config(kind)
    model, bank = Transformer(cfg).eval(), trained_like(MemoryBank(cfg))
    mem = bank.gather(torch.tensor([[1, 2]]))  # fixed for the whole prompt
    idx = torch.randint(0, cfg.model.vocab_size, (1, 12))
    full = model(idx, mem=mem)
    cache = KVCache.empty(cfg.model, 1, 12)
    steps = [model(idx[:, :7], mem=mem, cache=cache)]
    steps += [model(idx[:, t:t + 1], mem=mem, cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_memory_of_another_kind_is_refused():
    model, bank = Transformer(kind_config("lora-ffn")), MemoryBank(kind_config("ffn"))
    with pytest.raises(ValueError, match=r"lora-ffn memory must be \(B, 2, 3, R, 96\)"):
        model(torch.zeros(1, 4, dtype=torch.long), mem=bank.gather(torch.tensor([[0, 0]])))


def test_placement_first_middle_last_and_explicit():
    mc = get_preset("tiny").memory
    assert mc.mem_layers(35) == list(range(35))
    for placement, want in [("first", [0, 1, 2]), ("middle", [16, 17, 18]), ("last", [32, 33, 34])]:
        mc.placement, mc.n_layers = placement, 3
        assert mc.mem_layers(35) == want
    mc.placement, mc.n_layers = "middle", 2
    assert mc.mem_layers(5) == [1, 2]


@pytest.mark.parametrize("over, match", [
    ({"placement": "last"}, "needs n_layers"),
    ({"placement": "last", "n_layers": 3}, "needs n_layers"),       # tiny has 2 layers
    ({"placement": "last", "n_layers": 1, "layers": [0]}, "not both"),
    ({"placement": "early"}, "placement must be"),
    ({"kind": "lora-xx"}, "memory kind"),
])
def test_bad_memory_configs_are_refused(over, match):
    d = get_preset("tiny").to_dict()
    d["memory"].update(over)
    with pytest.raises(ValueError, match=match):
        Config.from_dict(d)


@pytest.mark.parametrize("kind", ["ffn", "kv"])
def test_memory_in_the_last_layer_only(kind):
    torch.manual_seed(0)
    cfg = kind_config(kind, placement="last", n_layers=1)
    model, bank = Transformer(cfg), trained_like(MemoryBank(cfg))
    mem = bank.gather(torch.tensor([[0, 3]]))
    assert mem.shape[1] == 1 and model.mem_layers == [1]
    idx = torch.randint(0, cfg.model.vocab_size, (2, 6))
    seen = {}
    model.layers[0].register_forward_hook(lambda mod, args, out: seen.setdefault(len(seen), out))
    with_mem, anchor = model(idx, mem=mem), model(idx)
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)  # layer 0 carries no memory
    assert not torch.allclose(with_mem, anchor, atol=1e-4)


@pytest.mark.parametrize("name, params", [
    ("paper-160m", 163_510_016), ("paper-410m", 411_665_408), ("paper-1.4b", 1_439_893_504)])
def test_paper_anchor_parameter_counts(name, params):
    cfg = get_preset(name)
    with torch.device("meta"):  # shapes only: no memory is allocated
        model = Transformer(cfg)
    assert model.tok_emb.weight.is_meta
    assert model.num_params() == params


@pytest.mark.parametrize("name, bank_b, fetch_m", [
    ("paper-410m", 12.68, 49.55), ("paper-1.4b", 21.14, 153.35)])
def test_paper_hierarchy_sizes(name, bank_b, fetch_m):
    cfg = get_preset(name)
    sizes = cfg.memory.sizes(cfg.model)
    assert cfg.memory.branching == 16 and cfg.memory.depth == 4
    assert round(sizes["bank_params"] / 1e9, 2) == bank_b
    assert round(sizes["fetch_params"] / 1e6, 2) == fetch_m


def test_config_cli_prints_params_and_sizes(capsys):
    from membank_cli.cli import main

    main(["config", "paper-160m"])
    out = capsys.readouterr().out
    assert "163,510,016" in out and "4,624,220,160" in out and "18,063,360" in out
    assert "35x3x256x512" in out and "13,762,560" in out


def test_ffn_memory_at_batch_one_equals_the_batched_maths():
    # the device's path (one sequence, one memory: plain matmuls) against the bmm maths the
    # batched path runs: the same float32 bits, and bfloat16 within its rounding
    import torch.nn.functional as F

    from membank.nn.memory import ffn_memory
    torch.manual_seed(0)
    for T, R, C in ((1, 72, 96), (5, 144, 96), (9, 336, 512)):
        x, mem = torch.randn(1, T, C), torch.randn(1, 3, R, C) * 0.05
        w1, w2, w3 = mem.unbind(1)                                  # (1, R, C) each
        ref = torch.bmm(F.silu(torch.bmm(x, w1.transpose(1, 2)))
                        * torch.bmm(x, w2.transpose(1, 2)), w3)
        assert torch.equal(ffn_memory(x, mem), ref)
        half = ffn_memory(x.bfloat16(), mem.bfloat16()).float()
        assert torch.allclose(half, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
