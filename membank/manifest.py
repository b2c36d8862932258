"""The bank manifest: everything a reader needs to trust and place a bank version.

One JSON document (`membank.manifest/1`), written by export, stored beside the blocks in LMDB,
served by GetManifest and checked by the client. Clients attach a block only if its bytes hash
to the checksum listed here.

`encodings` (optional) lists the other encodings ingest stored for every block, with their own
checksum table, e.g. {"int8": [[xxh3 per node] per level]} (membank/quant.py); absent or empty:
native blocks only. It is left out of the JSON when empty, so a native-only manifest stays
readable by readers that forbid unknown fields.

Trust (membank/signing.py): ingest lists a cryptographic digest of every block in every
encoding (`digest_algo`, `digests`: {"native": table, "int8": table}, laid out as `checksums`)
and signs the manifest with the operator's Ed25519 key (`signature`). The signature covers
`signed_bytes()`: the canonical JSON (`canonical_json`) of the manifest without its signature
and without fields at their defaults, so a field added later (with a default) leaves old
signatures valid. The device pins the operator's public key(s) and checks a block against its
signed digest (`block_check`); the xxh3 checksums stay the bank server's accident check.
Left out of the JSON when absent, like `encodings`.
"""
from __future__ import annotations

import json
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from membank.blocks import CHECKSUM_ALGO, DIGEST_ALGO, block_nbytes
from membank.config import N_MATS
from membank.keys import block_key, content_key
from membank.placement import owners
from membank.quant import NATIVE, encoded_nbytes, label


class BlockHeader(NamedTuple):
    """A block's header, the fields of `BlockHeader` in bank.proto and of the data plane's H
    frame, in their order. The server sends what `Manifest.block_header` gives; a device takes
    a block only when the header it receives equals the one its own manifest gives."""
    level: int
    node: int
    version: str
    checksum: str         # xxh3_64 hex of the block's bytes in `dtype`
    nbytes: int
    dtype: str            # the bank dtype, or the encoding's name ("int8")
    shape: tuple[int, ...]


def canonical_json(value) -> bytes:
    """The one canonical JSON encoding (what a manifest signature covers): keys sorted, no
    whitespace, ASCII only (non-ASCII as \\u escapes), UTF-8. Only strings, integers, booleans,
    null, lists and string-keyed objects: floats are refused (their text is not canonical
    across languages) and so are other key types."""
    def check(v) -> None:
        if isinstance(v, float):
            raise ValueError(f"canonical JSON has no floats ({v!r})")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"canonical JSON keys are strings, not {k!r}")
                check(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                check(x)
    check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


class ManifestSignature(BaseModel):
    """An Ed25519 signature of `Manifest.signed_bytes()` by the key `key_id` (membank/signing.py
    `key_id`: 16 hex digits of the SHA-256 of the raw public key), base64 (64 bytes)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    algo: Literal["ed25519"] = "ed25519"
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    value: str = Field(pattern=r"^[A-Za-z0-9+/]{86}==$")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["membank.manifest/1"] = "membank.manifest/1"
    bank: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    dtype: Literal["float32", "bfloat16"]
    d_model: int = Field(gt=0)
    # memory kind and the width of a block row (membank/config.py `block_layout`); the defaults
    # are FFN memories, whose rows are d_model wide, so manifests written before them still load
    kind: Literal["ffn", "lora-qk", "lora-ov", "lora-ffn", "kv"] = "ffn"
    block_width: int | None = Field(default=None, gt=0)
    mem_layers: list[int]
    branching: int = Field(ge=2)
    ranks: list[int]                      # r_l for levels 1..p; 0 = the level has no blocks
    checksum_algo: Literal["xxh3_64"] = CHECKSUM_ALGO
    checksums: list[list[str]]            # checksums[l-1][node]; empty list for r_l = 0
    shards: list[str] = ["shard-0"]
    replication: int = Field(default=1, ge=1)
    placement_level: int = Field(default=1, ge=1)
    # a version re-placed onto another shard set (services/bank_server/rebalance.py) keeps the
    # block keys of the version it was re-placed from, so only moved blocks are copied;
    # None: its blocks are stored under its own version (membank/keys.py)
    shares_blocks_of: str | None = Field(default=None, min_length=1, max_length=64,
                                         pattern=r"^[A-Za-z0-9._-]+$")
    # encoding -> checksums[l-1][node] of every block in that encoding (same layout as
    # `checksums`); written by ingest together with the encoded blocks
    encodings: dict[Literal["int8"], list[list[str]]] = Field(default_factory=dict)
    # cryptographic digest of every block per encoding ("native", "int8"), each table laid out as
    # `checksums`; what the device checks a block against when the manifest is signed
    digest_algo: Literal["blake3", "sha256"] = DIGEST_ALGO
    digests: dict[Literal["native", "int8"], list[list[str]]] = Field(default_factory=dict)
    # where the bank server stores the blocks (membank/keys.py): "content", under their digest
    # (a block a later version leaves unchanged is stored, cached and fetched once), or
    # "version", under (version, level, node) as every ingest before content addressing did
    block_store: Literal["version", "content"] = "version"
    # the anchor these blocks were trained with: `anchor_id` of its weights file (membank/
    # artifacts.py); a device whose anchor differs refuses the version (None: not recorded)
    anchor: str | None = Field(default=None, pattern=r"^(blake3|sha256)-[0-9a-f]{64}$")
    signature: ManifestSignature | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if self.kind == "ffn" and self.block_width not in (None, self.d_model):
            raise ValueError(f"FFN memory blocks are d_model={self.d_model} wide, "
                             f"not {self.block_width}")
        if self.kind != "ffn" and self.block_width is None:
            raise ValueError(f"a {self.kind} bank needs block_width")
        if len(self.checksums) != len(self.ranks):
            raise ValueError(f"checksums has {len(self.checksums)} levels, ranks {len(self.ranks)}")
        for level, (r, sums) in enumerate(zip(self.ranks, self.checksums), start=1):
            want = self.n_nodes(level) if r > 0 else 0
            if len(sums) != want:
                raise ValueError(f"level {level}: {len(sums)} checksums, expected {want}")
        for enc, table in self.encodings.items():
            if len(table) != len(self.checksums) or \
                    any(len(a) != len(b) for a, b in zip(table, self.checksums)):
                raise ValueError(f"encodings[{enc!r}] must have one checksum per block, laid out "
                                 f"as checksums ({[len(c) for c in self.checksums]} per level)")
        for enc, table in self.digests.items():
            if enc != "native" and enc not in self.encodings:
                raise ValueError(f"digests[{enc!r}] lists an encoding the version does not hold")
            if len(table) != len(self.checksums) or \
                    any(len(a) != len(b) for a, b in zip(table, self.checksums)):
                raise ValueError(f"digests[{enc!r}] must have one digest per block, laid out "
                                 f"as checksums ({[len(c) for c in self.checksums]} per level)")
        if self.signature is not None and \
                set(self.digests) != {"native", *self.encodings}:
            # a signature vouches for block bytes only through digests: every encoding a device
            # may fetch needs its table
            raise ValueError("a signed manifest needs digests for native and every encoding "
                             f"({['native', *sorted(self.encodings)]}), has {sorted(self.digests)}")
        if self.block_store == "content" and set(self.digests) != {"native", *self.encodings}:
            raise ValueError("blocks stored by content need digests for native and every "
                             f"encoding, has {sorted(self.digests)}")
        if not self.shards or len(set(self.shards)) != len(self.shards):
            raise ValueError("shards must be a non-empty list of distinct ids")
        return self

    # -- shapes -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.ranks)

    def n_nodes(self, level: int) -> int:
        return self.branching ** level

    def block_shape(self, level: int) -> tuple[int, int, int, int]:
        """(L, n_mats, r_l, width): for FFN memories (L, 3, r_l, d_model)."""
        return (len(self.mem_layers), N_MATS[self.kind], self.ranks[level - 1],
                self.block_width or self.d_model)

    def block_nbytes(self, level: int, encoding: str = NATIVE) -> int:
        """Bytes of a level's block as stored and sent in `encoding` ("" = the bank dtype)."""
        if encoding == NATIVE:
            return block_nbytes(self.block_shape(level), self.dtype)
        return encoded_nbytes(self.block_shape(level), encoding, self.dtype)

    def block_dtype(self, encoding: str = NATIVE) -> str:
        """The dtype a block header names for `encoding`: the bank dtype, or "int8"."""
        return self.dtype if encoding == NATIVE else encoding

    def has_encoding(self, encoding: str) -> bool:
        return encoding == NATIVE or encoding in self.encodings

    @property
    def available_encodings(self) -> list[str]:
        """Readable names of what this version holds, e.g. ["native", "int8"]."""
        return ["native", *sorted(self.encodings)]

    def missing_encoding(self, encoding: str) -> str:
        """The one-line reason a fetch in `encoding` cannot be served by this version."""
        return (f"{self.bank}/{self.version} has no {label(encoding)} blocks (available: "
                f"{', '.join(self.available_encodings)}); ingest it with --encodings {encoding}")

    @property
    def block_version(self) -> str:
        """The version part of this version's block keys (`b/{bank}/{block_version}/...`)."""
        return self.shares_blocks_of or self.version

    def has_block(self, level: int, node: int) -> bool:
        return (1 <= level <= self.depth and self.ranks[level - 1] > 0
                and 0 <= node < self.n_nodes(level))

    def checksum(self, level: int, node: int, encoding: str = NATIVE) -> str:
        """The xxh3 of a block in `encoding`; KeyError when the version lacks that encoding."""
        if encoding == NATIVE:
            return self.checksums[level - 1][node]
        return self.encodings[encoding][level - 1][node]

    def block_check(self, level: int, node: int, encoding: str = NATIVE) -> tuple[str, str]:
        """(hash algorithm, hex) a received block in `encoding` must hash to: its cryptographic
        digest when the manifest lists one (always, when signed), else its xxh3 checksum."""
        table = self.digests.get("native" if encoding == NATIVE else encoding)
        if table is not None:
            return self.digest_algo, table[level - 1][node]
        return self.checksum_algo, self.checksum(level, node, encoding)

    def content_id(self, level: int, node: int, encoding: str = NATIVE) -> str:
        """What a block in `encoding` is, by content: "{algo}-{hex}" of `block_check`. Two
        versions of a bank that list the same id hold the same bytes there, so the device cache
        and the attached levels keep a block across a publish that left it unchanged."""
        return "-".join(self.block_check(level, node, encoding))

    def storage_key(self, level: int, node: int, encoding: str = NATIVE) -> bytes:
        """The LMDB / Redis key of a block in `encoding` (membank/keys.py): its content key
        when the version is stored by content, else its versioned key."""
        if self.block_store == "content":
            return content_key(self.bank, self.content_id(level, node, encoding))
        return block_key(self.bank, self.block_version, level, node, encoding)

    def storage_keys(self, blocks=None) -> set[bytes]:
        """The storage keys of `blocks` [(level, node)] (None: every block), in every encoding
        the version holds (what gc must keep for it)."""
        blocks = self.blocks() if blocks is None else blocks
        return {self.storage_key(level, node, enc)
                for level, node in blocks for enc in (NATIVE, *self.encodings)}

    def block_header(self, level: int, node: int, encoding: str = NATIVE) -> BlockHeader:
        """The header of a block this version holds in `encoding` (membank/fetch.py
        check_fetch says whether it does)."""
        return BlockHeader(level, node, self.version, self.checksum(level, node, encoding),
                           self.block_nbytes(level, encoding), self.block_dtype(encoding),
                           self.block_shape(level))

    def blocks(self):
        """Every (level, node) the bank holds, shallow levels first."""
        for level in range(1, self.depth + 1):
            if self.ranks[level - 1] > 0:
                for node in range(self.n_nodes(level)):
                    yield level, node

    def path_blocks(self, path: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
        """(level, node) of each block on a root-to-leaf path of child indices (c_1..c_p)."""
        out, node = [], 0
        for level, child in enumerate(path, start=1):
            node = node * self.branching + child
            if self.ranks[level - 1] > 0:
                out.append((level, node))
        return out

    def owners(self, level: int, node: int) -> list[str]:
        return owners(self.bank, level, node, shards=self.shards, replication=self.replication,
                      placement_level=self.placement_level, branching=self.branching)

    # -- serialisation --------------------------------------------------------------------
    def to_json(self) -> str:
        # no "encodings" / digest / signature keys when there are none: readers that forbid
        # unknown fields still read a native-only, unsigned manifest
        exclude = set()
        if not self.encodings:
            exclude.add("encodings")
        if not self.digests:
            exclude |= {"digest_algo", "digests"}
        if self.signature is None:
            exclude.add("signature")
        if self.anchor is None:      # like encodings: old readers forbid unknown fields
            exclude.add("anchor")
        if self.block_store == "version":
            exclude.add("block_store")
        return self.model_dump_json(exclude=exclude or None)

    def signed_bytes(self) -> bytes:
        """What the signature covers: the canonical JSON of every field not at its default,
        the signature left out, `format` always in (module docstring)."""
        fields = self.model_dump(mode="json", exclude_defaults=True, exclude={"signature"})
        fields["format"] = self.format
        if self.digests:     # named even at its default: the digests mean nothing without it
            fields["digest_algo"] = self.digest_algo
        return canonical_json(fields)

    def unsigned(self) -> "Manifest":
        """This manifest without its signature (before changing and re-signing it)."""
        return self.model_copy(update={"signature": None})

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        return cls.model_validate_json(text)
