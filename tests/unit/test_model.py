"""The anchor model and its FFN memories (membank/nn/model.py, membank/nn/memory.py)."""
import pytest
import torch

from membank.blocks import checksum
from membank.config import Config, get_preset
from membank.nn.memory import MemoryBank, ffn_memory
from membank.nn.model import FeedForward, KVCache, Transformer
from membank.nn.tensors import tensor_from_buffer, tensor_to_bytes


@pytest.fixture
def config() -> Config:
    return get_preset("tiny")


def trained_like_bank(config: Config) -> MemoryBank:
    """A bank whose output side is non-zero, as after training."""
    torch.manual_seed(1)
    bank = MemoryBank(config)
    with torch.no_grad():
        for p in bank.levels:
            p.normal_(std=0.1)
    return bank


def test_ffn_memory_equals_dense_ffn_with_concatenated_weights(config):
    torch.manual_seed(0)
    ffn = FeedForward(config.model)
    C, R = config.model.d_model, 12
    mem = torch.randn(1, 3, R, C) * 0.1  # (B, 3, R, C)
    x = torch.randn(2, 5, C)
    dense = FeedForward(config.model)
    dense.w1.weight = torch.nn.Parameter(torch.cat([ffn.w1.weight, mem[0, 0]]))       # (F+R, C)
    dense.w2.weight = torch.nn.Parameter(torch.cat([ffn.w2.weight, mem[0, 1]]))       # (F+R, C)
    dense.w3.weight = torch.nn.Parameter(torch.cat([ffn.w3.weight, mem[0, 2].T], 1))  # (C, F+R)
    torch.testing.assert_close(ffn(x, mem), dense(x), rtol=1e-5, atol=1e-6)


def test_zero_init_memory_leaves_anchor_unchanged(config):
    torch.manual_seed(0)
    model = Transformer(config)
    bank = MemoryBank(config)
    assert bank.levels[0][:, :, 2].abs().sum() == 0 and bank.levels[0][:, :, :2].abs().sum() > 0
    idx = torch.randint(0, config.model.vocab_size, (3, 10))
    nodes = torch.tensor([[0, 1], [1, 2], [1, 3]])
    torch.testing.assert_close(model(idx, mem=bank.gather(nodes)), model(idx), rtol=0, atol=0)


def test_batched_paths_equal_per_sample_forward(config):
    torch.manual_seed(0)
    model, bank = Transformer(config), trained_like_bank(config)
    idx = torch.randint(0, config.model.vocab_size, (4, 9))
    nodes = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 3]])  # four different paths in one batch
    batched = model(idx, mem=bank.gather(nodes))
    for b in range(4):
        single = model(idx[b:b + 1], mem=bank.gather(nodes[b:b + 1]))
        torch.testing.assert_close(batched[b:b + 1], single, rtol=1e-5, atol=1e-5)
    # and memory really changes the output once it is trained
    assert not torch.allclose(batched, model(idx), atol=1e-4)


def test_gather_concatenates_levels_in_order(config):
    bank = trained_like_bank(config)
    mem = bank.gather(torch.tensor([[1, 3]]))  # (1, L, 3, R, C)
    r1 = config.memory.ranks[0]
    torch.testing.assert_close(mem[0, :, :, :r1], bank.levels[0][1])
    torch.testing.assert_close(mem[0, :, :, r1:], bank.levels[1][3])


def test_ffn_memory_broadcasts_one_memory_over_batch(config):
    C = config.model.d_model
    mem, x = torch.randn(1, 3, 6, C), torch.randn(3, 4, C)
    out = ffn_memory(x, mem)
    torch.testing.assert_close(out, ffn_memory(x, mem.expand(3, -1, -1, -1)))
    assert out.shape == (3, 4, C)


def test_kv_cache_decoding_matches_full_forward(config):
    torch.manual_seed(0)
    model, bank = Transformer(config).eval(), trained_like_bank(config)
    mem = bank.gather(torch.tensor([[1, 2]]))
    idx = torch.randint(0, config.model.vocab_size, (1, 12))
    full = model(idx, mem=mem)
    cache = KVCache.empty(config.model, 1, 12)
    steps = [model(idx[:, :7], mem=mem, cache=cache)]
    steps += [model(idx[:, t:t + 1], mem=mem, cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_document_mask_isolates_packed_documents(config):
    torch.manual_seed(0)
    model = Transformer(config)
    a, b = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 4))
    packed = model(torch.cat([a, b], 1), doc_ids=torch.tensor([[0] * 5 + [1] * 4]))
    torch.testing.assert_close(packed[:, 5:], model(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_buffer_tensor_round_trip_is_exact(dtype):
    t = torch.randn(2, 3, 8, 32)
    buf = tensor_to_bytes(t, dtype)
    back = tensor_from_buffer(bytearray(buf), (2, 3, 8, 32), dtype)
    assert torch.equal(back, t.to(back.dtype))
    assert (tensor_to_bytes(back, dtype) == buf
            and checksum(buf) == checksum(tensor_to_bytes(back, dtype)))
    with pytest.raises(ValueError, match="expected"):
        tensor_from_buffer(bytearray(buf[:-1]), (2, 3, 8, 32), dtype)


def test_paper_160m_sizes():
    cfg = get_preset("paper-160m")
    sizes = cfg.memory.sizes(cfg.model)
    assert sizes["bank_params"] == 4_624_220_160 and sizes["fetch_params"] == 18_063_360


def test_config_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown config"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        Config.from_dict({"model": {"d_modle": 3}})
    with pytest.raises(ValueError, match="divisible"):
        Config.from_dict({"model": {"d_model": 30, "n_head": 4}})
