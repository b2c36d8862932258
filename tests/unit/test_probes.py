"""Fact probes (training/probes.py) and the long-tail corpus (training/longtail.py)."""
import json

import numpy as np
import pytest

from training import longtail
from training.probes import Probe, atomic_number_probe, load_probe, match


def test_atomic_number_probe_has_118_elements_in_order():
    probe = atomic_number_probe()
    assert len(probe.pairs) == 118
    assert probe.pairs[0] == ("Hydrogen", "1") and probe.pairs[-1] == ("Oganesson", "118")
    assert probe.prompt("Gold") == "The atomic number of Gold is"
    assert probe.matcher == "int"


@pytest.mark.parametrize("matcher,answer,text,ok", [
    ("int", "44", " 44. Ruthenium is", True),
    ("int", "44", " 441", False),
    ("int", "4", " 44", False),
    ("int", "44", " about 44", True),
    ("int", "44", " the element", False),
    ("string", "Au", " Au.", True),
    ("string", "Au", "Au", True),
    ("string", "Au", " Aurum", False),
    ("string", "Paris", " paris", False),
])
def test_matchers(matcher, answer, text, ok):
    assert match(matcher, answer, text) is ok


def test_probe_from_json_and_csv(tmp_path):
    j = tmp_path / "capitals.json"
    j.write_text(json.dumps({"template": "The capital of {subject} is", "pairs": [["France", "Paris"], ["Peru", "Lima"]]}))
    p = load_probe(str(j))
    assert p.name == "capitals" and p.prompts()[1] == ("The capital of Peru is", "Lima") and p.matcher == "string"
    c = tmp_path / "years.csv"
    c.write_text("subject,answer\nRome,753\n\nCarthage,814\n")
    p = load_probe(str(c), template="{subject} was founded in", matcher="int")
    assert p.pairs == (("Rome", "753"), ("Carthage", "814"))


@pytest.mark.parametrize("content,suffix,message", [
    ('{"template": "no placeholder", "pairs": [["a", "b"]]}', ".json", "exactly once"),
    ('{"template": "{subject} is", "pairs": []}', ".json", "has no"),
    ('{"template": "{subject} is", "pairs": [["a", "b"], ["a", "c"]]}', ".json", "more than once"),
    ('{"template": "{subject} is", "pairs": [["a"]]}', ".json", "pair 0"),
    ('not json', ".json", "not valid JSON"),
    ("name,value\na,b\n", ".csv", "header"),
])
def test_bad_probe_files_are_one_line_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"probe{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_probe(str(path), template="{subject} is" if suffix == ".csv" else None)


def test_int_matcher_needs_integer_answers():
    with pytest.raises(ValueError, match="not an integer"):
        Probe("p", "{subject} is", (("a", "b"),), "int")


def test_unknown_probe_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a built-in probe"):
        load_probe("no-such-probe")


def test_longtail_corpus_holds_out_the_template_and_follows_zipf():
    lt = longtail.LongTailConfig(max_docs=40, zipf=1.0, min_docs=1, heldout_docs=10)
    corpus = longtail.build(lt)
    probe = atomic_number_probe()
    pattern = probe.held_out_pattern()
    assert pattern.search("The atomic number of Gold is 79.")  # the pattern does catch it
    assert not any(pattern.search(t) for t in corpus["train"])
    assert len(corpus["train"]) == len(corpus["train_subjects"]) == sum(s["documents"] for s in corpus["subjects"])
    docs = np.array([s["documents"] for s in sorted(corpus["subjects"], key=lambda s: s["rank"])])
    assert docs[0] == 40 and docs[-1] == 1 and np.all(np.diff(docs) <= 0)
    # every subject's atomic number is stated somewhere, in other words than the probe's
    for s in corpus["subjects"][:20]:
        z = dict(probe.pairs)[s["subject"]]
        texts = [t for t, subj in zip(corpus["train"], corpus["train_subjects"]) if subj == s["subject"]]
        assert any(z in t for t in texts)
    # mention counts grow with popularity
    ranked = sorted(corpus["subjects"], key=lambda s: s["rank"])
    assert ranked[0]["mentions"] > ranked[-1]["mentions"] >= 1
    assert len(corpus["heldout"]) == 10


def test_longtail_is_deterministic_per_seed():
    lt = longtail.LongTailConfig(max_docs=10, heldout_docs=4)
    assert longtail.build(lt)["train"] == longtail.build(lt)["train"]
    other = longtail.build(longtail.LongTailConfig(max_docs=10, heldout_docs=4, seed=1))["train"]
    assert other != longtail.build(lt)["train"]


def test_name_counts_whole_words_only():
    counts = longtail.name_counts(["Tin", "Iron"], ["Tin and Iron.", "Tinned Ironing", "Tin!"])
    assert counts == {"Tin": 2, "Iron": 1}
