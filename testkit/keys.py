"""The test operator's signing key: what tests, benchmarks and load tests sign banks with.

    ingest(export, lmdb, signing_key=signing_key())        # the stored manifest is signed
    MemoryModel.from_pretrained(export, bank=..., trust=trust())   # ... and the device pins it

A fixed key (from a fixed seed), so that every process of a test run (bank servers, ingest
subprocesses, devices) agrees on it without passing files around; `write_public_key` puts its
public half in a file for the entry points that take `--trusted-keys`. Never use it for a real
bank: its private key is in this source file.
"""
from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from membank.signing import Trust, TrustedKeys

_SEED = b"membank testkit signing key, v1."       # 32 bytes: an Ed25519 private key


def signing_key(seed: bytes = _SEED) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def trust(*, allow_unsigned: bool = False) -> Trust:
    """A device policy pinning the test key."""
    return Trust(TrustedKeys.of([signing_key().public_key()]), allow_unsigned)


def write_public_key(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(signing_key().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def write_private_key(path: str | Path) -> Path:
    """The test key as a PEM file (for `--signing-key` of an ingest subprocess)."""
    path = Path(path)
    path.write_bytes(signing_key().private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    path.chmod(0o600)
    return path
