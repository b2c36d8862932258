"""The device's one bank interface: what MemoryModel, the HTTP server and the CLI ask of a bank.

    bank: Bank = targets.open_bank("10.0.0.1:50051+50052", timeout_s=5)
    manifest = bank.get_manifest("demo")                      # "" version: the published one
    blocks = bank.fetch("demo", manifest.version, manifest.path_blocks(path), manifest,
                        encoding="int8")                     # {(level, node): verified bytes}

Three implementations, one per transport or topology: BankClient (gRPC, bank_client.py),
DataPlaneClient (block bodies over raw TCP, dataplane_client.py) and ShardedFetcher (many
shards: placement, hedging, failover; fetcher.py). `targets.open_bank` picks one for a target
string. A fetch returns every block verified against the manifest's checksums, or raises.

Every failure is a `BankError` whose `code` is a gRPC status *name* ("NOT_FOUND",
"UNAVAILABLE", ...): the codes of the README's bad-input table, the same names the bank server
raises (`membank.fetch.FetchError`, which BankError extends), so code above the transports
never imports grpc.
"""
from __future__ import annotations

from typing import Protocol

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


class Bank(Protocol):
    def get_manifest(self, bank: str, version: str = "") -> Manifest:
        """The manifest of `bank` at `version` ("": the published version), or BankError."""
        ...

    def fetch(self, bank: str, version: str, blocks: list[Block], manifest: Manifest, *,
              encoding: str = "") -> dict[Block, bytearray]:
        """Every block of `blocks`, each verified against `manifest` (its checksums in
        `encoding`: "" native or "int8"), or BankError."""
        ...

    def health(self, timeout_s: float = 1.0) -> bool:
        """True when the bank answers SERVING."""
        ...

    def close(self) -> None:
        ...
