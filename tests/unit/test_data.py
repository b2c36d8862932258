"""Unit tests for training/data.py (the element corpus) and, marked slow, membank/nn/embed.py.

Run: .venv/bin/python -m pytest -q tests/unit/test_data.py   (add -m "not slow" to skip MiniLM)
"""
import numpy as np
import pytest

from training.data import KINDS, Document, build_documents, probe_prompts


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return build_documents()


def test_all_118_elements(docs):
    assert len({d.subject for d in docs}) == 118
    assert sum(d.kind == "facts" for d in docs) == 118
    assert 600 <= len(docs) <= 900


def test_atomic_number_sentence(docs):
    ruthenium = " ".join(d.text for d in docs if d.subject == "Ruthenium")
    assert "The atomic number of Ruthenium is 44." in ruthenium
    assert "Ruthenium has the chemical symbol Ru." in ruthenium
    # every element's fact sheet carries its probe answer
    answers = dict((prompt, z) for prompt, z in probe_prompts())
    for d in docs:
        if d.kind == "facts":
            assert (f"The atomic number of {d.subject} is "
                    f"{answers[f'The atomic number of {d.subject} is']}." in d.text)


def test_documents_are_clean(docs):
    for d in docs:
        assert d.text and d.text == d.text.strip() and "  " not in d.text and "\n" not in d.text
        assert "nan" not in d.text.split() and "None" not in d.text
        assert d.kind in KINDS and d.subject in d.text


def test_deterministic(docs):
    assert build_documents() == docs
    assert build_documents(seed=0) == docs


def test_probe_prompts():
    prompts = probe_prompts()
    assert len(prompts) == 118
    assert prompts[0] == ("The atomic number of Hydrogen is", "1")
    assert ("The atomic number of Ruthenium is", "44") in prompts
    assert [int(z) for _, z in prompts] == list(range(1, 119))


@pytest.mark.slow
def test_minilm_embeddings():
    from membank.nn.embed import Embedder

    emb = Embedder().encode(["The atomic number of Ruthenium is 44.",
                             "Ruthenium has atomic number 44.",
                             "I had pasta for dinner yesterday."])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
