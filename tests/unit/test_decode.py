"""membank/nn/decode.py: batched greedy decoding equals decoding each prompt alone."""
import pytest
import torch

from membank.config import get_preset
from membank.nn.decode import greedy
from membank.nn.model import Transformer


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("tiny")
    model = Transformer(cfg).eval()
    return model, cfg


def memories(cfg, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *cfg.memory.mem_shape(cfg.model)[1:], generator=g) * 0.5


def one_by_one(model, ids, mem, n_new, eos):
    """Reference: no cache, one prompt at a time, full forward per token."""
    out = list(ids)
    new = []
    for _ in range(n_new):
        t = int(model(torch.tensor([out]), mem=mem)[0, -1].argmax())
        if t == eos:
            break
        new.append(t)
        out.append(t)
    return new


def test_batched_greedy_equals_each_prompt_alone_with_per_prompt_memory():
    model, cfg = tiny_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, cfg.model.vocab_size, (n,), generator=g).tolist()
               for n in (3, 5, 3, 7, 5, 1)]
    mem = memories(cfg, len(prompts))
    got = greedy(model, prompts, mem, max_new_tokens=6, eos=0, batch_size=2)
    want = [one_by_one(model, p, mem[i:i + 1], 6, 0) for i, p in enumerate(prompts)]
    assert got == want
    # memories given as a function of the prompt rows, and one memory for all, and none
    assert greedy(model, prompts, lambda rows: mem[rows], 6, 0) == want
    shared = greedy(model, prompts, mem[:1], 6, 0)
    assert shared == [one_by_one(model, p, mem[:1], 6, 0) for p in prompts]
    assert greedy(model, prompts, None, 6, 0) == [one_by_one(model, p, None, 6, 0) for p in prompts]


def test_greedy_stops_at_eos_and_at_the_context_limit():
    model, cfg = tiny_model()
    prompt = [5, 6, 7]
    first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    assert greedy(model, [prompt], None, 4, eos=first) == [[]]      # EOS first: nothing
    long = [1] * (cfg.model.max_seq_len - 2)
    assert len(greedy(model, [long], None, 10, eos=-1)[0]) == 2      # only 2 positions left
    with pytest.raises(ValueError, match="empty"):
        greedy(model, [[]], None, 3, 0)
