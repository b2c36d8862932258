"""Storage keys. Block keys are immutable and versioned; `current` is the only mutable key.

    c/{bank}                          -> version string of the published version
    m/{bank}/{version}                -> manifest JSON of that version
    b/{bank}/{version}/{level}/{node} -> block bytes

A new version is written beside the old one and becomes visible by one write of `c/{bank}`.
The same keys name blocks in the Redis hot tier, so a cached block can never be stale.
"""
from __future__ import annotations


def current_key(bank: str) -> bytes:
    return f"c/{bank}".encode()


def manifest_key(bank: str, version: str) -> bytes:
    return f"m/{bank}/{version}".encode()


def block_key(bank: str, version: str, level: int, node: int) -> bytes:
    return f"b/{bank}/{version}/{level}/{node}".encode()
