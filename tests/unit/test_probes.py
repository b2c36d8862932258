"""Fact probes (training/probes.py) and the long-tail corpus (training/longtail.py)."""
import dataclasses
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
    j.write_text(json.dumps({"template": "The capital of {subject} is",
                             "pairs": [["France", "Paris"], ["Peru", "Lima"]]}))
    p = load_probe(str(j))
    assert (p.name == "capitals" and p.prompts()[1] == ("The capital of Peru is", "Lima")
            and p.matcher == "string")
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


def test_longtail_domains_hold_out_templates_and_follow_zipf():
    lt = longtail.LongTailConfig(subjects=40, max_docs=20, zipf=1.0, min_docs=2, heldout_docs=5)
    built = longtail.build(lt)
    assert set(built) == set(longtail.DOMAINS)
    names = {}
    for name, d in built.items():
        probe = d["probe"]
        pattern = probe.held_out_pattern()
        assert pattern.search(probe.prompt("X") + " Y.")            # the pattern does catch it
        assert not any(pattern.search(t) for t, _ in d["train"])
        counts = np.array([s["documents"] for s in sorted(d["subjects"], key=lambda s: s["rank"])])
        assert counts[0] == 20 and counts[-1] == 2 and np.all(np.diff(counts) <= 0)
        assert len(d["train"]) == counts.sum() and len(d["heldout"]) == 5
        # every drawn subject is probed, and its answer is stated in each of its documents
        answers = dict(probe.pairs)
        assert {s["subject"] for s in d["subjects"]} == set(answers)
        for text, subject in d["train"][:200]:
            assert answers[subject] in text and subject in text
        # the probe template is a training phrasing with one word swapped
        assert probe.train_templates and all("{subject}" in t for t in probe.train_templates)
        for s in answers:
            names.setdefault(s, set()).add(name)
    assert all(len(domains) == 1 for domains in names.values())   # names unique across domains


def test_longtail_documents_are_stable_across_seeds():
    lt0 = longtail.LongTailConfig(subjects=200, max_docs=10, heldout_docs=4,
                                  domains=("elements", "cities"))
    a, b = longtail.build(lt0), longtail.build(lt0)
    assert all(a[n]["train"] == b[n]["train"] for n in a)
    c = longtail.build(dataclasses.replace(lt0, seed=1))
    assert a["cities"]["train"] != c["cities"]["train"]             # another draw and popularity
    # document j of a subject is the same text in every seed (so embeddings are shared): all
    # 118 elements are drawn in both seeds, with other popularity ranks
    first = lambda d: {s: t for t, s in reversed(d)}  # noqa: E731  subject -> its document 0
    ea, ec = first(a["elements"]["train"]), first(c["elements"]["train"])
    assert len(ea) == len(ec) == 118 and ea == ec
    assert a["elements"]["subjects"] != c["elements"]["subjects"]


def test_name_counts_finds_names_ending_in_punctuation():
    texts = ["Eton (Cameroon) is a language.", "St. Kitts lies here; St. Kitts again.",
             "Eton (Cameroon)."]
    counts = longtail.name_counts(["Eton (Cameroon)", "St. Kitts", "Eton"], texts)
    assert counts == {"Eton (Cameroon)": 2, "St. Kitts": 2, "Eton": 0}


def test_name_counts_whole_words_only():
    counts = longtail.name_counts(["Tin", "Iron"], ["Tin and Iron.", "Tinned Ironing", "Tin!"])
    assert counts == {"Tin": 2, "Iron": 1}
