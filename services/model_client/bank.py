"""The device's one bank interface: what MemoryModel, the HTTP server and the CLI ask of a bank.

    bank: Bank = targets.open_bank("10.0.0.1:50051+50052", timeout_s=5)
    manifest = bank.get_manifest("demo")                      # "" version: the published one
    blocks = bank.fetch("demo", manifest.version, manifest.path_blocks(path), manifest,
                        encoding="int8")                     # {(level, node): verified bytes}

Three implementations, one per transport or topology: BankClient (gRPC, bank_client.py),
DataPlaneClient (block bodies over raw TCP, dataplane_client.py) and ShardedFetcher (many
shards: placement, hedging, failover; fetcher.py). `targets.open_bank` picks one for a target
string. A fetch returns every block verified against the manifest's checksums, or raises.

`out={(level, node): dest}` (every implementation) receives a block straight into the caller's
memory: `dest` is a writable buffer of the block's size, or a `Scatter` of pieces filled in order
(MemoryModel passes its preallocated room, so a block lands in place: no buffer, no copy). The
fetch returns `dest` itself for that block. Until the fetch returns, `dest` holds unverified
bytes: after an error its content is undefined, and nothing else may use it meanwhile.

Every failure is a `BankError` whose `code` is a gRPC status *name* ("NOT_FOUND",
"UNAVAILABLE", ...): the codes of the README's bad-input table, the same names the bank server
raises (`membank.fetch.FetchError`, which BankError extends), so code above the transports
never imports grpc.
"""
from __future__ import annotations

import bisect
from typing import Iterable, Protocol

from membank.fetch import FetchError
from membank.manifest import Manifest

Block = tuple[int, int]                 # (level, node)
# gRPC's status names (grpc.StatusCode), the only values `BankError.code` takes
CODES = frozenset({"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                   "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                   "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                   "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"})


class BankError(FetchError):
    """A bank call failed: `code` is a gRPC status name, `message` the one-line detail."""

    def __init__(self, code: str, message: str):
        if code not in CODES:       # e.g. a grpc.StatusCode: the device compares names
            raise ValueError(f"{code!r} is not a gRPC status name")
        super().__init__(code, message)


class BlockIntegrityError(BankError):
    """A received block is incomplete, inconsistent, or fails its manifest checksum."""

    def __init__(self, message: str):
        super().__init__("DATA_LOSS", message)


class UntrustedManifestError(BankError):
    """The bank's manifest is unsigned, signed by a key the device does not pin, or its
    signature does not verify (membank/signing.py): nothing of that version is attached."""

    def __init__(self, message: str):
        super().__init__("UNAUTHENTICATED", message)


class IncompatibleBankError(BankError):
    """The bank's manifest does not fit the device's model: other shapes, or blocks trained
    with another anchor (`Manifest.anchor`). Nothing of that version is attached."""

    def __init__(self, message: str):
        super().__init__("FAILED_PRECONDITION", message)


class Scatter:
    """One block's destination in pieces: writable byte views filled in order, the block's
    bytes split across them (MemoryModel: a level's slice of the room is (L, n, r, W) inside
    (L, n, R, W), so one contiguous piece per (layer, matrix)). len() is the block's size.
    `result`: what a fetch returns for the block (the Scatter itself, or the one buffer it
    wraps: `destination`)."""

    __slots__ = ("pieces", "nbytes", "result", "_starts")

    def __init__(self, pieces: Iterable, result=None):
        self.result = self if result is None else result
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        if any(p.readonly for p in self.pieces):
            raise ValueError("a Scatter piece must be writable")
        self._starts, n = [], 0            # byte offset of each piece in the block
        for p in self.pieces:
            self._starts.append(n)
            n += p.nbytes
        self.nbytes = n

    def __len__(self) -> int:
        return self.nbytes

    def write(self, offset: int, data) -> None:
        """Copy `data` to the block's bytes [offset, offset + len(data)), across pieces."""
        data = memoryview(data).cast("B")
        if offset < 0 or offset + data.nbytes > self.nbytes:
            raise ValueError(f"{data.nbytes} bytes at {offset} do not fit {self.nbytes}")
        i = bisect.bisect_right(self._starts, offset) - 1
        done = 0
        while done < data.nbytes:
            piece, at = self.pieces[i], offset + done - self._starts[i]
            k = min(piece.nbytes - at, data.nbytes - done)
            piece[at:at + k] = data[done:done + k]
            done += k
            i += 1

    def tobytes(self) -> bytes:
        return b"".join(self.pieces)


def destination(dest, nbytes: int, block: Block) -> Scatter:
    """Where a transport receives `block`: `out`'s entry for it (a buffer or a Scatter; None:
    a new bytearray, the one allocation per block) as a Scatter, checked to hold exactly
    `nbytes` (ValueError otherwise, before any I/O)."""
    if dest is None:
        dest = bytearray(nbytes)
    if not isinstance(dest, Scatter):
        if memoryview(dest).readonly:
            raise ValueError(f"out buffer for block {block} must be writable and {nbytes} bytes")
        dest = Scatter([dest], result=dest)
    if dest.nbytes != nbytes:
        raise ValueError(f"out buffer for block {block} must be writable and {nbytes} bytes")
    return dest


class Bank(Protocol):
    def get_manifest(self, bank: str, version: str = "") -> Manifest:
        """The manifest of `bank` at `version` ("": the published version), or BankError."""
        ...

    def fetch(self, bank: str, version: str, blocks: list[Block], manifest: Manifest, *,
              encoding: str = "", out: dict | None = None) -> dict[Block, bytearray]:
        """Every block of `blocks`, each verified against `manifest` (its checksums in
        `encoding`: "" native or "int8"), or BankError. `out`: destinations to receive
        blocks into (module docstring)."""
        ...

    def health(self, timeout_s: float = 1.0) -> bool:
        """True when the bank answers SERVING."""
        ...

    def close(self) -> None:
        ...
