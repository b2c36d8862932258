"""Token selection, stop strings, incremental detokenisation, and streaming on a tiny model.

Run: .venv/bin/pytest -q tests/unit/test_sampling.py
"""
import pytest
import torch
from tokenizers import pre_tokenizers

from services.model_client.detokenize import REPLACEMENT, IncrementalDecoder
from services.model_client.memory_model import MemoryModel
from services.model_client.sampling import SamplingParams, StopMatcher, select_token


def logits(seed: int, vocab: int = 512) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


# -- select_token --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    x = logits(seed)
    assert select_token(x, SamplingParams()) == int(x.argmax())


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_and_tiny_top_p_are_greedy_at_any_temperature(seed):
    x = logits(seed)
    for p in (SamplingParams(temperature=1.5, top_k=1),
              SamplingParams(temperature=1.5, top_p=1e-6)):
        g = p.generator()
        assert {select_token(x, p, g) for _ in range(20)} == {int(x.argmax())}


def test_top_k_only_draws_from_the_k_largest():
    x = logits(1)
    p = SamplingParams(temperature=5.0, top_k=3, seed=0)
    g = p.generator()
    drawn = {select_token(x, p, g) for _ in range(300)}
    assert drawn <= set(x.topk(3).indices.tolist()) and len(drawn) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    g = p.generator()
    assert {select_token(x, p, g) for _ in range(300)} == {0, 1}   # 0.5 < 0.7 <= 0.8


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    x = logits(2)

    def draw(seed):
        p = SamplingParams(temperature=1.0, seed=seed)
        g = p.generator()
        return [select_token(x, p, g) for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_tiny_temperature_does_not_produce_nan():
    x = logits(3)
    assert select_token(x, SamplingParams(temperature=1e-30)) == int(x.argmax())


@pytest.mark.parametrize("kw, message", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed"),
    (dict(seed=2 ** 64), r"below 2\*\*64"),
    (dict(stop=("",)), "stop"), (dict(stop=("x" * 500,)), "stop"), (dict(stop=("a",) * 9), "stop"),
    (dict(stop=(3,)), "stop"),
])
def test_bad_params_raise_one_line_value_errors(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)


def test_a_single_stop_string_is_not_split_into_characters():
    assert SamplingParams(stop="END").stop == ("END",)


# -- stop strings ----------------------------------------------------------------------------
def run_stop(stops, pieces):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    return out + ("" if m.stopped else m.flush()), m.stopped


def test_stop_string_across_piece_boundaries_is_cut_and_not_emitted():
    assert run_stop(("###",), ["ab#", "#", "#cd"]) == ("ab", True)
    assert run_stop(("\n\n", "END"), ["x E", "N", "D\n\nmore"]) == ("x ", True)


def test_the_earliest_stop_wins_and_text_after_it_is_dropped():
    assert run_stop(("b", "a"), ["xxab"]) == ("xx", True)


def test_held_back_text_that_never_becomes_a_stop_is_flushed():
    m = StopMatcher(("###",))
    assert m.feed("ab##") == "ab"       # "##" could start "###"
    assert m.feed("c") == "##c"
    assert m.feed("#") == ""
    assert m.flush() == "#" and not m.stopped


def test_no_stop_strings_pass_everything_through():
    assert run_stop((), ["a", "b"]) == ("ab", False)


# -- incremental detokenisation ------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_model_export):
    return MemoryModel.from_pretrained(tiny_model_export)


def byte_token(tokenizer, byte: int) -> int:
    """The id of the single-byte token for `byte` (byte-level BPE keeps all 256)."""
    return tokenizer.token_to_id(_byte_chars()[byte])


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE uses for its alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = dict(zip(bs, map(chr, cs)))
    assert set(chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return chars


def test_multibyte_characters_are_never_split_across_pieces(model):
    tok = model.tokenizer
    text = "é日本 ok"
    ids = [byte_token(tok, b) for b in text.encode()]  # one token per byte: worst case
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert all(REPLACEMENT not in p for p in pieces)
    assert pieces[:2] == ["", "é"]  # the first byte of é alone gives nothing


def test_an_incomplete_last_character_is_flushed_as_a_replacement(model):
    tok = model.tokenizer
    ids = [byte_token(tok, b) for b in "aé".encode()[:-1]]
    dec = IncrementalDecoder(tok)
    assert [dec.push(i) for i in ids] == ["a", ""]
    assert dec.flush() == REPLACEMENT


# -- streaming generation on the tiny model --------------------------------------------------
def test_stream_pieces_join_to_generate_text_and_to_the_decoded_ids(model):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=5)
    stream = model.generate_stream("Gold has", use_memory=False, params=params)
    pieces = list(stream)
    result = model.generate("Gold has", use_memory=False, params=params)
    assert "".join(pieces) == stream.result.text == result.text
    ids = model.decode("Gold has", None, 24, temperature=1.0, seed=5)
    assert result.text == model.tokenizer.decode(ids) and result.new_tokens == len(ids)
    assert all(REPLACEMENT != p[-1] for p in pieces[:-1])
    assert ({"embed", "route", "fetch", "attach", "prefill", "decode", "ttft"}
            <= set(result.timings_ms))
    assert result.memory is False and result.anchor_only_reason == "memory disabled"


def test_generate_stops_before_a_stop_string(model):
    full = model.generate("The atomic number of", use_memory=False, max_new_tokens=20)
    assert full.finish_reason == "length" and full.new_tokens == 20 and len(full.text) > 4
    cut = full.text[2:5]  # a stop string from inside the greedy text, likely spanning tokens
    stopped = model.generate("The atomic number of", use_memory=False, max_new_tokens=20,
                             stop=(cut,))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(cut)]


def test_max_tokens_is_cut_at_the_model_context(model):
    limit = model.config.model.max_seq_len
    n_prompt = len(model.encode_prompt("Gold"))
    r = model.generate("Gold", use_memory=False, max_new_tokens=10 * limit)
    assert r.new_tokens <= limit - n_prompt


def test_empty_or_too_long_prompt_is_refused_before_streaming(model):
    with pytest.raises(ValueError, match="empty prompt"):
        model.generate_stream("", use_memory=False)
    with pytest.raises(ValueError, match="limit"):
        model.generate_stream("Gold " * 500, use_memory=False)
