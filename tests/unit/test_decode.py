"""membank/nn/decode.py: batched greedy decoding equals decoding each prompt alone, and the one
loop it is built on gives the evaluation and the device exactly the tokens their own loops gave."""
import pytest
import torch

from membank.config import get_preset
from membank.nn.decode import decode_steps, greedy
from membank.nn.model import KVCache, Transformer
from services.model_client.sampling import SamplingParams, select_token


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


# -- one loop for the evaluation and the device ------------------------------------------------
# The two loops as they were before they were merged into decode_steps, kept verbatim as
# references: the merge must not change a single token (the published evaluation is reproduced
# from them) nor a logit.
def old_greedy_block(model, prompts, mem, max_new_tokens, eos):
    ids = torch.tensor(prompts)
    steps = min(max_new_tokens, model.cfg.max_seq_len - ids.shape[1])
    if steps <= 0:
        return [[] for _ in prompts]
    cache = KVCache.empty(model.cfg, len(prompts), ids.shape[1] + steps)
    logits = model(ids, mem=mem, cache=cache)[:, -1]
    new = []
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for step in range(steps):
        nxt = logits.argmax(-1)
        new.append(nxt)
        done |= nxt == eos
        if bool(done.all()) or step == steps - 1:
            break
        logits = model(nxt[:, None], mem=mem, cache=cache)[:, -1]
    tokens = torch.stack(new, 1).tolist()
    return [row[:row.index(eos)] if eos in row else row for row in tokens]


def old_device_decode(model, ids, mem, params, eos, seen):
    """MemoryModel.decode_tokens before the merge; `seen` collects each step's logits."""
    max_new = min(params.max_tokens, model.cfg.max_seq_len - len(ids))
    cache = KVCache.empty(model.cfg, 1, len(ids) + max_new)
    gen = None if params.greedy else params.generator()
    logits = model(torch.tensor([ids]), mem=mem, cache=cache)[0, -1]
    out, nxt = [], -1
    for i in range(max_new):
        if i:
            logits = model(torch.tensor([[nxt]]), mem=mem, cache=cache)[0, -1]
        seen.append(logits.clone())
        nxt = select_token(logits, params, gen)
        out.append(nxt)
        if nxt == eos:
            break
    return out


def varied_prompts(cfg, lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg.model.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_gives_the_tokens_of_the_loop_it_replaced(seed):
    model, cfg = tiny_model(seed)
    prompts = varied_prompts(cfg, (3, 5, 3, 7, 5, 1, 9, 2), seed=seed + 3)
    mem = memories(cfg, len(prompts), seed=seed + 1) * 4       # strong: answers differ by row
    eos = 0
    for m in (None, mem[:1], mem):
        got = greedy(model, prompts, m, 10, eos, batch_size=3)
        want = [old_greedy_block(model, [p], None if m is None else m[i:i + 1] if len(m) > 1
                                 else m, 10, eos)[0]
                for i, p in enumerate(prompts)]
        assert got == want
    # batched as greedy batches them (equal lengths together), row for row
    same = [p for p in prompts if len(p) == 3] + [p for p in prompts if len(p) == 5]
    assert greedy(model, same[:2], mem[:2], 10, eos) == old_greedy_block(model, same[:2], mem[:2],
                                                                         10, eos)


def test_the_device_decodes_with_the_evaluation_loop(tiny_model_export):
    from services.model_client.memory_model import MemoryModel
    from tests.conftest import ConstantEmbedder

    mm = MemoryModel.from_pretrained(tiny_model_export, embedder=ConstantEmbedder())
    cfg = mm.config
    prompts = varied_prompts(cfg, (4, 2, 6, 4, 1))
    mem = memories(cfg, len(prompts)) * 4
    for m in (None, mem):
        rows = [None if m is None else m[i:i + 1] for i in range(len(prompts))]
        evaluated = greedy(mm.model, prompts, m, 8, mm.eos, batch_size=2)
        for i, p in enumerate(prompts):
            for params in (SamplingParams(max_tokens=8),
                           SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=i)):
                seen, timings = [], {}
                want = old_device_decode(mm.model, p, rows[i], params, mm.eos, seen)
                got = list(mm.decode_tokens(p, rows[i], params, timings))
                assert got == want and set(timings) == {"prefill", "decode"}
                if params.greedy:   # the device's greedy answer is the evaluation's
                    assert [t for t in got if t != mm.eos] == evaluated[i]
            # and every logit along the way, bit for bit
            seen = []
            old_device_decode(mm.model, p, rows[i], SamplingParams(max_tokens=8), mm.eos, seen)
            logits = []
            for _ in decode_steps(mm.model, torch.tensor([p]), rows[i], 8,
                                  lambda x: logits.append(x[0].clone()) or x.argmax(-1)):
                pass
            assert len(logits) >= len(seen) and all(torch.equal(a, b)
                                                    for a, b in zip(seen, logits))
