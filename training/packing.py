"""Packing as the paper does it (PAPER.md section 6), and the order sequences are drawn in.

Documents of one leaf cluster are packed into fixed-length sequences that carry the leaf's path
(node ids per level); attention is masked per document (`doc_ids`); sequences are shuffled
globally, so a batch mixes paths.

`Sampler` is the data order: a fresh permutation per epoch, seeded by (seed, epoch), so its
whole state is two integers (epoch, position) and a checkpoint restores it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@dataclass
class Packed:
    tokens: torch.Tensor    # (N, T+1) int64, EOS-separated documents of one leaf
    doc_ids: torch.Tensor   # (N, T+1) int64, document index within the sequence, -1 = padding
    node_ids: torch.Tensor  # (N, p) int64, the sequence's path as node ids per level

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, mask: torch.Tensor) -> "Packed":
        return Packed(self.tokens[mask], self.doc_ids[mask], self.node_ids[mask])

    def subtree(self, subtree: int) -> "Packed":
        """Only the sequences whose path starts at level-1 node `subtree`."""
        return self.select(self.node_ids[:, 0] == subtree)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        save_file({"tokens": self.tokens, "doc_ids": self.doc_ids, "node_ids": self.node_ids},
                  str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Packed":
        t = load_file(str(path))
        return cls(t["tokens"], t["doc_ids"], t["node_ids"])


def pack(doc_tokens: list[list[int]], doc_nodes: np.ndarray, seq_len: int, eos: int) -> Packed:
    """Pack the documents of each leaf into sequences of seq_len + 1 tokens (input + shift).

    doc_nodes: (n_docs, p) node ids per level; the last column (the leaf) fixes the path.
    The tail of each leaf's stream is padded with EOS and its targets ignored.
    """
    leaves: dict[int, list[int]] = {}
    for i, leaf in enumerate(doc_nodes[:, -1].tolist()):
        leaves.setdefault(leaf, []).append(i)
    tokens, docs, nodes = [], [], []
    width = seq_len + 1
    for leaf, members in sorted(leaves.items()):
        stream, ids = [], []
        for j, d in enumerate(members):
            stream += doc_tokens[d] + [eos]
            ids += [j] * (len(doc_tokens[d]) + 1)
        pad = (-len(stream)) % width
        stream += [eos] * pad
        ids += [-1] * pad  # padding is its own "document", never attended by real tokens
        t = torch.tensor(stream).view(-1, width)
        tokens.append(t)
        docs.append(torch.tensor(ids).view(-1, width))
        nodes.append(torch.as_tensor(doc_nodes[members[0]]).expand(t.shape[0], -1))
    return Packed(torch.cat(tokens), torch.cat(docs), torch.cat(nodes).long())


class Sampler:
    """Global batches of sequence indices: epoch e is randperm(n) seeded by (seed, e); batches
    are consecutive slices of it and the incomplete tail is dropped (unless n < batch_size:
    then every batch is the whole permutation)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, pos: int = 0):
        if n == 0:
            raise ValueError("no training sequences")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.epoch, self.pos = epoch, pos
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            self._perm = (epoch,
                          torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)))
        return self._perm[1]

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self.permutation(self.epoch)[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
