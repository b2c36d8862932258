"""What a block fetch may ask of a manifest, checked the same way by the server and the device.

`check_fetch(manifest, blocks, encoding)` raises `FetchError(code, message)` for the first
argument the manifest refuses; `code` is a gRPC status *name*, so neither grpc nor protobuf is
imported here. The bank server (services/bank_server/fetchplan.py) runs it before it reads a
byte and answers with that code and message on either transport; the device's clients
(services/model_client/bank_client.py, dataplane_client.py) run it before they send a request,
so a fetch their manifest already refuses fails at once with the answer the server would give.

    check_fetch(manifest, [(1, 3), (2, 13)], "int8")      # None, or FetchError

The checks, in order (README, "Bad input and the answer it gets"):
  NOT_FOUND         the version has no blocks in `encoding` (the message lists what it has)
  then per block, in request order:
  INVALID_ARGUMENT  a block listed a second time (a request may not repeat a block: one
                    request of 64 copies of a 27.5 MB block would cost 64 sends)
  INVALID_ARGUMENT  a level outside 1..depth, or a level without blocks (r = 0)
  NOT_FOUND         a node outside 0..k^level-1
Run its tests: .venv/bin/python -m pytest -q tests/unit/test_manifest.py
"""
from __future__ import annotations

from typing import Iterable

from membank.manifest import Manifest
from membank.quant import NATIVE


class FetchError(Exception):
    """A fetch refused or failed: `code` is a gRPC status name, `message` the one-line detail."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def check_fetch(manifest: Manifest, blocks: Iterable[tuple[int, int]],
                encoding: str = NATIVE) -> None:
    """FetchError unless every (level, node) of `blocks` is a block `manifest` holds in
    `encoding` (a normalized name: "" native, or "int8")."""
    if not manifest.has_encoding(encoding):
        # NOT_FOUND, not FAILED_PRECONDITION: every replica holds the same manifest, and
        # clients read FAILED_PRECONDITION as "wrong shard, try another one"
        raise FetchError("NOT_FOUND", manifest.missing_encoding(encoding))
    seen: set[tuple[int, int]] = set()
    for level, node in blocks:
        # one block listed many times would make a tiny request cost many block sends
        if (level, node) in seen:
            raise FetchError("INVALID_ARGUMENT", f"block ({level}, {node}) is listed twice; "
                                                 f"ask for each block once")
        seen.add((level, node))
        if not 1 <= level <= manifest.depth or manifest.ranks[level - 1] == 0:
            raise FetchError("INVALID_ARGUMENT",
                             f"level {level} has no blocks in {manifest.bank}/{manifest.version} "
                             f"(levels with blocks: "
                             f"{[l for l, r in enumerate(manifest.ranks, 1) if r > 0]})")
        # node < 0 cannot come over gRPC (uint64) but can over the data plane's JSON
        if not 0 <= node < manifest.n_nodes(level):
            raise FetchError("NOT_FOUND", f"no node {node} at level {level} (it has "
                                          f"{manifest.n_nodes(level)} nodes)")
