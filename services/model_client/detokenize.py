"""Token ids -> text pieces, one piece per token as it is generated, never half a character.

A byte-level BPE token may hold only part of a multi-byte UTF-8 character (an "é" can be two
tokens); decoding it alone gives U+FFFD. `IncrementalDecoder` decodes a short window of recent ids
and holds the text back while it ends in an incomplete character, as text-generation-inference
does (prefix / read offsets). The pieces joined always equal `tokenizer.decode(all ids)`.

    dec = IncrementalDecoder(tokenizer)
    for token in tokens:
        print(dec.push(token), end="")
    print(dec.flush())
"""
from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted (kept as context)
        self.read = 0    # ids before this index have been emitted

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """The text of ids still held back (an incomplete last character decodes to U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
