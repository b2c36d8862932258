"""What a block fetch checks before it sends a byte, and how it reads one block: transport-free.

Both block transports use it: the gRPC FetchBlocks RPC (servicer.py) and the raw-TCP data plane
(dataplane.py). It speaks in gRPC status *names* ("NOT_FOUND", ...) so that neither grpc nor
protobuf is imported here; each transport turns a `FetchError` (membank/fetch.py) into its own
error (a gRPC abort, a data-plane error frame). The checks that need only the manifest are
membank/fetch.py's `check_fetch`, which the device's clients run too; the headers are
`Manifest.block_header`.

    plan = plan_fetch(store, bank, version, [(level, node), ...],
                      max_blocks_per_request=64, shard_id="", encoding="")
    for b in plan.blocks:                       # request order; b.index is the position
        with read_block(blocks, store, plan.manifest, b) as buf:
            send(b.header, buf)                 # buf: the verified bytes, valid inside the with

`plan_fetch` checks, in this order, and raises FetchError(code, message) on the first failure
(the codes, with the rest of the server's: README.md, "Bad input and the answer it gets"):
  INVALID_ARGUMENT     an unknown encoding name; no blocks; more than max_blocks_per_request;
                       empty bank name or a name that is not membank.keys.NAME (a letter or
                       digit, then up to 127 of [A-Za-z0-9._-], matched whole)
  NOT_FOUND            unknown bank; unknown version
  check_fetch          an encoding the version lacks, a block listed twice, a bad level, a bad
                       node (membank/fetch.py)
  FAILED_PRECONDITION  a block this shard does not own (`shard_id` set), naming the owner(s)
Every id is checked before anything is sent, so a bad id never follows a half-sent reply.
`admit_bytes(limiter, client, plan)` then charges the plan's bytes to the client's byte budget
(RESOURCE_EXHAUSTED when spent): both transports call it after plan_fetch.
`read_block` then raises, for one block:
  DATA_LOSS            the stored block is missing or fails its manifest checksum (never sent)
  NOT_FOUND            the version was garbage-collected while this fetch was reading it (gc
                       deletes the manifest before the blocks, so a missing block whose manifest
                       is gone too is a collected version, not a lost block)
Both raise UNAVAILABLE when the LMDB cannot be read at all (store.StoreUnavailable: its grown map
could not be adopted; health is NOT_SERVING then).
Run its tests: .venv/bin/python -m pytest -q tests/unit/test_fetchplan.py
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

from membank import quant
from membank.fetch import FetchError, check_fetch
from membank.keys import valid_name
from membank.manifest import BlockHeader, Manifest
from services.bank_server.store import (
    BlockStore,
    CorruptBlock,
    Expect,
    LMDBStore,
    StoreUnavailable,
    read_from,
)

log = logging.getLogger("services.bank_server.servicer")   # one logger for both transports

# the default of settings.max_blocks_per_request: bounds the work (and memory) one request can
# ask for; a whole root-to-leaf path is depth blocks
MAX_BLOCKS_PER_REQUEST = 64
# encodings a fetch may ask for: "" = the bank's own dtype, or one that ingest stored beside
# it (membank/quant.py: "int8"); a version has only the encodings it was ingested with
ENCODINGS = ("", *quant.ENCODINGS)


class PlannedBlock(NamedTuple):
    """One block of a planned fetch: where it is, what it must be, and its header."""
    index: int            # position in the request (the client's order)
    level: int
    node: int
    key: bytes            # storage key (membank/keys.py), the same in LMDB, the LRU and Redis
    expect: Expect        # size and manifest checksum the stored bytes must match
    header: BlockHeader   # level, node, version, checksum, nbytes, dtype, shape


@dataclass(frozen=True)
class FetchPlan:
    manifest: Manifest
    blocks: list[PlannedBlock]
    encoding: str = ""

    @property
    def nbytes(self) -> int:
        return sum(b.expect.nbytes for b in self.blocks)


def resolve_manifest(store: LMDBStore, bank: str, version: str) -> Manifest:
    """The manifest of (bank, version or current), or FetchError INVALID_ARGUMENT / NOT_FOUND
    (UNAVAILABLE: the store cannot be read)."""
    try:
        return _resolve_manifest(store, bank, version)
    except StoreUnavailable as e:
        raise FetchError("UNAVAILABLE", str(e)) from None


def _resolve_manifest(store: LMDBStore, bank: str, version: str) -> Manifest:
    if not bank:
        raise FetchError("INVALID_ARGUMENT", "empty bank name")
    if not valid_name(bank):
        raise FetchError("INVALID_ARGUMENT", f"invalid bank name {bank[:64]!r}")
    if not version:
        version = store.current_version(bank)
        if version is None:
            raise FetchError("NOT_FOUND", f"unknown bank {bank!r}")
    manifest = store.manifest(bank, version)
    if manifest is None:
        if store.current_version(bank) is None:
            raise FetchError("NOT_FOUND", f"unknown bank {bank!r}")
        raise FetchError("NOT_FOUND", f"unknown version {version[:64]!r} of bank {bank!r} (never "
                                      f"completely ingested, or garbage-collected)")
    return manifest


def plan_fetch(store: LMDBStore, bank: str, version: str, blocks: Sequence[tuple[int, int]], *,
               max_blocks_per_request: int = MAX_BLOCKS_PER_REQUEST, shard_id: str = "",
               encoding: str = "") -> FetchPlan:
    """Check a fetch request completely (module docstring) and plan its block reads."""
    if encoding not in ENCODINGS:
        raise FetchError("INVALID_ARGUMENT", f"unknown encoding {str(encoding)[:32]!r} (known: "
                                             f"\"\" for native, {', '.join(quant.ENCODINGS)})")
    blocks = [(int(level), int(node)) for level, node in blocks]
    if not blocks:
        raise FetchError("INVALID_ARGUMENT", "no blocks requested")
    if len(blocks) > max_blocks_per_request:
        raise FetchError("INVALID_ARGUMENT", f"{len(blocks)} blocks requested, at most "
                                             f"{max_blocks_per_request} per request")
    manifest = resolve_manifest(store, bank, version)
    check_fetch(manifest, blocks, encoding)
    if shard_id:
        for level, node in blocks:
            owners = manifest.owners(level, node)
            if shard_id not in owners:
                raise FetchError("FAILED_PRECONDITION",
                                 f"block ({level}, {node}) of {manifest.bank}/{manifest.version} "
                                 f"is on shard {', '.join(owners)}, not on this shard ({shard_id})")
    planned = []
    for index, (level, node) in enumerate(blocks):
        header = manifest.block_header(level, node, encoding)
        expect = Expect(header.nbytes, header.checksum)
        # the encoding is part of the key: every tier caches native and int8 blocks apart
        key = manifest.storage_key(level, node, encoding)
        planned.append(PlannedBlock(index, level, node, key, expect, header))
    return FetchPlan(manifest, planned, encoding)


def admit_bytes(limiter, client: str, plan: FetchPlan) -> None:
    """Charge a planned fetch's block bytes to `client`'s byte budget, before its first byte
    is sent: FetchError RESOURCE_EXHAUSTED when the budget is spent. `limiter`: the server's
    bytes/s security.RateLimiter (settings rate_limit_mb_s), one for both transports; None: no
    byte limit. The request limit counts requests, and one request may ask for 64 blocks of
    27.5 MB: this counts what they cost. `client`: the limiter key ("peer:ADDRESS")."""
    if limiter is None:
        return
    wait = limiter.take(client, plan.nbytes)
    if wait > 0:
        raise FetchError("RESOURCE_EXHAUSTED",
                         f"byte rate limit exceeded ({limiter.rate / 1e6:g} MB/s per client, "
                         f"burst {limiter.burst / 1e6:g} MB; this fetch is "
                         f"{plan.nbytes / 1e6:.3g} MB); retry in {wait:.2f} s")


@contextmanager
def read_block(blocks: BlockStore, store: LMDBStore, manifest: Manifest,
               block: PlannedBlock) -> Iterator[memoryview]:
    """The verified bytes of one planned block, read through the tiers (store.BlockStore.read).

    Yields a buffer valid only inside the `with` (for LMDB, a view INTO the memory map: send it
    from there and it is never copied in user space). The tiers check the bytes against the
    manifest checksum before yielding (a corrupt cache entry is evicted and LMDB read instead);
    only a corrupt or missing block in LMDB is DATA_LOSS. Blocking: call it off an event loop.
    """
    enc = "" if block.header.dtype == manifest.dtype else f" {block.header.dtype}"
    where = f"block ({block.level}, {block.node}){enc} of {manifest.bank}/{manifest.version}"
    try:
        with read_from(blocks, block.key, block.expect) as buf:
            if buf is None:
                # gc deletes a version's manifest (one commit) before its blocks: if the
                # manifest is gone now, the version was collected after this fetch resolved
                # it (NOT_FOUND: the client re-reads the manifest); if it is still there, the
                # block is lost (DATA_LOSS)
                if store.manifest(manifest.bank, manifest.version) is None:
                    log.info("NOT_FOUND version %s of %s collected during a fetch",
                             manifest.version, manifest.bank)
                    raise FetchError("NOT_FOUND", f"version {manifest.version!r} of bank "
                                                  f"{manifest.bank!r} was garbage-collected "
                                                  f"during this fetch; fetch the current manifest")
                log.error("DATA_LOSS %s is missing from the store", where)
                raise FetchError("DATA_LOSS", f"{where} is missing from the store")
            yield buf
    except CorruptBlock:
        log.error("DATA_LOSS %s fails its manifest checksum", where)
        raise FetchError("DATA_LOSS", f"{where} fails its manifest checksum") from None
    except StoreUnavailable as e:
        raise FetchError("UNAVAILABLE", str(e)) from None
