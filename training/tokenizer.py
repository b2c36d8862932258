"""Byte-level BPE tokenizer trained on the corpus with the `tokenizers` library.

Saved as `tokenizer.json` beside the model; devices load it with `Tokenizer.from_file`.
Id 0 is `<|endoftext|>`, which separates packed documents and stops generation.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int, path: str | Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, "
                         f"model vocab is {vocab_size}")
    tmp = Path(str(path) + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))
