"""Signed manifests: the operator's Ed25519 key signs each version's manifest; devices pin keys.

    key_path, pub_path = write_key_pair("keys/")          # `membank keygen --out keys/`
    signed = sign_manifest(manifest, load_signing_key(key_path))     # ingest --signing-key
    trust = Trust(TrustedKeys.load(["keys/"]))            # the device's `trusted_keys`
    trust.check(signed)                                   # SignatureError(reason) if not trusted

Why: a block is checked against the manifest, and the manifest comes from the same shard (or
any cache or relay between device and bank). Signed at ingest with a key only the operator
holds, and listing a cryptographic digest of every block (membank/manifest.py `digests`), the
manifest lets any path serve blocks: a device attaches a block only when its manifest verifies
under a pinned public key and the block's bytes hash to the signed digest.

Keys: Ed25519 (the `cryptography` package). Private key: PKCS#8 PEM, unencrypted, written with
mode 0600 (`<name>-<key id>.key`); public key: SubjectPublicKeyInfo PEM (`<name>-<key id>.pub`).
A key id is 16 hex digits of the SHA-256 of the raw 32-byte public key; a signature names the
key id that made it, so a device can pin several keys at once (rotation: pin new + old, sign
with new, unpin old; deploy/README.md "Signing keys").

Policy (`Trust`): an unsigned manifest is refused unless `allow_unsigned` (development only;
blocks are then checked against whatever the manifest lists); a signature by an unpinned key or
one that does not verify is refused always. Torch-free and grpc-free (the contract floor).
"""
from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from membank.manifest import Manifest, ManifestSignature

PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".key", ".pub"


class SignatureError(ValueError):
    """A manifest the device must not trust, or a key file that cannot be used; the message
    is the one-line reason."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_key_pair(out_dir: str | Path, name: str = "membank",
                   key: Ed25519PrivateKey | None = None) -> tuple[Path, Path]:
    """Write a new key pair (or `key`) into `out_dir` (created, 0700 when new); return (private,
    public) paths. The private key file is created 0600 and never overwritten."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = key or generate_key()
    kid = key_id(key.public_key())
    priv, pub = out / f"{name}-{kid}{PRIVATE_SUFFIX}", out / f"{name}-{kid}{PUBLIC_SUFFIX}"
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # O_EXCL: an existing key is never replaced; 0600 from the first byte (no chmod window)
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The private key in PEM file `path`, or in the one `*.key` file of directory `path` (a
    keys volume whose file name carries the key id)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{PRIVATE_SUFFIX}"))
        if len(found) != 1:
            raise SignatureError(f"{path} holds {len(found)} *{PRIVATE_SUFFIX} files; name the "
                                 f"signing key's file")
        path = found[0]
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot read signing key {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot read public key {path}: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a device pins, by key id."""
    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey]) -> "TrustedKeys":
        return cls({key_id(k): k for k in keys})

    @classmethod
    def load(cls, paths: Iterable[str | Path]) -> "TrustedKeys":
        """Public key PEM files, or directories whose `*.pub` files are all pinned."""
        keys = []
        for p in map(Path, paths):
            if p.is_dir():
                files = sorted(p.glob(f"*{PUBLIC_SUFFIX}"))
                if not files:
                    raise SignatureError(f"no *{PUBLIC_SUFFIX} public keys in {p}")
                keys += [load_public_key(f) for f in files]
            else:
                keys.append(load_public_key(p))
        return cls.of(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """`manifest` signed by `key` (any earlier signature replaced). Ed25519 is deterministic:
    the same manifest and key give the same signature (an ingest rerun stores equal bytes)."""
    unsigned = manifest.unsigned()
    sig = key.sign(unsigned.signed_bytes())
    signature = ManifestSignature(key_id=key_id(key.public_key()),
                                  value=base64.b64encode(sig).decode("ascii"))
    # re-validated, not model_copy: a signed manifest must list its digests (Manifest check)
    return Manifest.model_validate({**unsigned.model_dump(), "signature": signature.model_dump()})


def verify_manifest(manifest: Manifest, trusted: TrustedKeys, *, allow_unsigned: bool) -> bool:
    """True when `manifest` is signed by a key in `trusted` and the signature verifies; False
    when it is unsigned and `allow_unsigned`; SignatureError (the reason) otherwise."""
    name = f"{manifest.bank}/{manifest.version}"
    sig = manifest.signature
    if sig is None:
        if allow_unsigned:
            return False
        raise SignatureError(f"manifest {name} is not signed (pin the operator's public key with "
                       f"trusted_keys and ingest with --signing-key; allow_unsigned is for "
                       f"development only)")
    public = trusted.keys.get(sig.key_id)
    if public is None:
        pinned = ", ".join(sorted(trusted.keys)) or "none"
        raise SignatureError(f"manifest {name} is signed by key {sig.key_id}, which is not pinned "
                       f"(pinned: {pinned})")
    try:
        public.verify(base64.b64decode(sig.value), manifest.signed_bytes())
    except (InvalidSignature, ValueError):
        raise SignatureError(f"manifest {name}: the signature of key {sig.key_id} does not verify "
                       f"(altered or mis-signed)")
    return True


@dataclass(frozen=True)
class Trust:
    """A device's trust policy: the pinned keys and whether unsigned manifests are allowed."""
    keys: TrustedKeys = field(default_factory=TrustedKeys)
    allow_unsigned: bool = False

    @classmethod
    def load(cls, paths: Iterable[str | Path], *, allow_unsigned: bool = False) -> "Trust":
        return cls(TrustedKeys.load(paths), allow_unsigned)

    def check(self, manifest: Manifest) -> bool:
        """verify_manifest under this policy: True signed, False unsigned and allowed."""
        return verify_manifest(manifest, self.keys, allow_unsigned=self.allow_unsigned)
