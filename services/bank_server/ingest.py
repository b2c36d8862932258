"""Ingest: write a bank version into a (shard's) LMDB and publish it.

    python -m services.bank_server.ingest EXPORT_DIR --lmdb data/bank.lmdb \
        [--version V] [--no-publish] [--shard-id S] [--shards a,b,c] [--replication R]
        [--placement-level P] [--encodings int8] [--signing-key KEY.key]

Publishing another version later (or rolling back) is services/bank_server/publish.py; deleting
old versions is services/bank_server/gc.py.

Sources: an export directory (`ingest`, blocks read straight from the safetensors files with a
memory map by `membank.artifacts.iter_blocks`, no torch), or any iterable of (level, node,
bytes) (`ingest_stream`: generators, other stores, the paper-scale benchmark), written into one
LMDB per shard in one pass.

Order of writes, so that a reader never sees a half-written version:
  1. every block under its content key `h/{bank}/blake3-{digest}` (membank/keys.py), in
     batched write transactions (each block checked against its manifest checksum first;
     `--shard-id`: only the blocks placement gives that shard); with `--encodings int8`,
     beside it the block's int8 payload (membank/quant.py, made here once, never per request)
     under its own digest. A key that is there already is not written again: a block an
     earlier version left unchanged (continued training touches only the blocks it fetched)
     costs nothing to publish (`report`: bytes written vs shared). A version stored before
     content addressing keeps its versioned keys `b/{bank}/{version}/{level}/{node}[/int8]`;
  2. one transaction that checks every block the shard owns is present with the right size
     (in every encoding), then writes the manifest `m/{bank}/{version}` (with every block's
     checksum, and per encoding the encoded blocks' checksums in `encodings`: the server
     verifies each block against them on every read) and `i/{bank}/{version}` (ingest info);
     a version without a manifest does not exist for the server, so a version with int8 blocks
     is visible only once all of them are written too;
  3. with publish, one transaction that points `c/{bank}` at the version (publish.py).
Signing (issue 16; membank/signing.py): the manifest lists a BLAKE3 digest of every block in
every encoding (`digests`, computed here as the blocks stream by, beside the xxh3 checksums the
server keeps checking against accidents), and with a signing key (`--signing-key`, the
operator's Ed25519 private key) it is signed before it is stored; devices pinning the public
key refuse anything else. Without a key the version is stored unsigned (logged): devices refuse
it unless they allow unsigned manifests.
Killing ingest at any moment (kill -9) leaves the published version untouched: LMDB commits are
atomic and durable, the new version's manifest is a new key, and `current` moves last. A rerun
skips the blocks already written (same key, same checksum) and completes the version.
Versions are immutable: re-ingesting the same version with the same content is a no-op; a
different manifest under an existing version is refused, and so is a different set of
encodings (add int8 to a bank by ingesting it as a new version). A version gc collected left a
tombstone (gc.py): its name is refused for good, whatever the content, before anything is written.

Map size: `--map-size-gb` defaults to the server's own setting (MEMBANK_SERVER_MAP_SIZE_GB,
settings.LMDBSettings), so ingest and the servers map the same size. A map that fills up fails
the ingest with one line (IngestError, exit 1) before the version's manifest is written: the
version does not exist, `current` is untouched, and a rerun with a larger map completes it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Literal, Mapping

import lmdb
from tqdm import tqdm

from membank import quant
from membank.artifacts import iter_blocks, load_manifest
from membank.blocks import checksum, digest
from membank.keys import (
    SHARD_KEY,
    block_key,
    content_key,
    lease_key,
    manifest_key,
    tombstone_key,
    version_info_key,
)
from membank.manifest import Manifest
from membank.placement import shard_blocks
from membank.signing import SignatureError, load_signing_key, sign_manifest
from services.bank_server.publish import PublishError, set_current
from services.bank_server.router_store import store_router
from services.bank_server.settings import LMDBSettings
from services.bank_server.store import acquire_env, release_env

log = logging.getLogger(__name__)
BlockStore = Literal["content", "version"]        # Manifest.block_store


class IngestError(RuntimeError):
    """The source cannot be ingested (corrupt block, conflicting version, wrong shard)."""


# -- the writer -------------------------------------------------------------------------------
class _Target:
    """One shard's LMDB receiving one version: batched puts, then finish (check + manifest)."""

    def __init__(self, path: str | Path, shard: str | None, *, map_size: int, batch_bytes: int,
                 resume: bool, writemap: bool = False):
        self.path, self.shard = Path(path), shard
        self.env = acquire_env(path, map_size, readonly=False, writemap=writemap)
        self.batch: list[tuple[bytes, object, str]] = []
        self.pending = 0
        self.batch_bytes = batch_bytes
        self.resume = resume
        self.written = self.skipped = self.bytes = self.skipped_bytes = 0
        self.lease: bytes | None = None      # keys.lease_key of the version being written
        with self.env.begin(write=True) as txn:
            marker = txn.get(SHARD_KEY)
            marker = marker.decode() if marker is not None else None
            if marker != shard:
                if marker is not None:
                    raise IngestError(f"{path} holds shard {marker!r}, not {shard!r}")
                if shard is not None:
                    txn.put(SHARD_KEY, shard.encode())

    def start_lease(self, bank: str, version: str) -> None:
        """Tell gc a version is being written here (renewed with every batch, removed with the
        manifest write or on close): it deletes no shared content block meanwhile."""
        self.lease = lease_key(bank, version)
        with self.env.begin(write=True) as txn:
            self._renew(txn)

    def _renew(self, txn) -> None:
        if self.lease is not None:
            txn.put(self.lease, json.dumps({"renewed_at": time.time(),
                                            "host": socket.gethostname(),
                                            "pid": os.getpid()}).encode())

    def put(self, key: bytes, data, want: str) -> None:
        self.batch.append((key, data, want))
        self.pending += memoryview(data).nbytes
        if self.pending >= self.batch_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        with self.env.begin(write=True, buffers=True) as txn:
            self._renew(txn)
            for key, data, want in self.batch:
                if self.resume:
                    have = txn.get(key)
                    if have is not None and len(have) == memoryview(data).nbytes \
                            and checksum(have) == want:
                        # stored by an earlier version (content keys) or killed run
                        self.skipped += 1
                        self.skipped_bytes += len(have)
                        continue
                txn.put(key, data)
                self.written += 1
                self.bytes += memoryview(data).nbytes
        self.batch, self.pending = [], 0

    def finish(self, manifest: Manifest, publish: bool) -> None:
        self.flush()
        bank, ver = manifest.bank, manifest.version
        with self.env.begin(write=True, buffers=True) as txn:
            if txn.get(tombstone_key(bank, ver)) is not None:    # collected meanwhile
                raise IngestError(_collected(manifest, where=f" in {self.path}"))
            existing = txn.get(manifest_key(bank, ver))
            if existing is not None and Manifest.from_json(bytes(existing)) != manifest:
                raise IngestError(_conflict(Manifest.from_json(bytes(existing)), manifest,
                                            tuple(manifest.encodings), where=f" in {self.path}")
                                  or f"{bank} version {ver} already exists in {self.path} "
                                     f"signed otherwise (or unsigned); versions are immutable, "
                                     f"ingest under a new version to sign with another key")
            n = nbytes = 0
            encoded = {enc: 0 for enc in manifest.encodings}     # encoding -> bytes
            for level, node in shard_blocks(manifest, self.shard):
                for enc in ("", *manifest.encodings):
                    buf = txn.get(manifest.storage_key(level, node, enc))
                    if buf is None or len(buf) != manifest.block_nbytes(level, enc):
                        raise IngestError(
                            f"block ({level}, {node}){' ' + enc if enc else ''} of {bank}/{ver} "
                            f"is missing from {self.path}; not publishing an incomplete version "
                            f"(was it garbage-collected meanwhile? rerun ingest)")
                    if enc:
                        encoded[enc] += len(buf)
                n += 1
                nbytes += manifest.block_nbytes(level)
            if existing is None:
                info = {"completed_at": time.time(), "shard": self.shard, "blocks": n,
                        "bytes": nbytes, "host": socket.gethostname()}
                if encoded:
                    info["encoded_bytes"] = encoded
                txn.put(manifest_key(bank, ver), manifest.to_json().encode())
                txn.put(version_info_key(bank, ver), json.dumps(info).encode())
            if self.lease is not None:       # the manifest lists its blocks now
                txn.delete(self.lease)
                self.lease = None
        if publish:
            # the one mutable key, switched in its own transaction: readers see old or new
            set_current(self.env, bank, ver)

    def close(self) -> None:
        if self.env is not None and self.lease is not None:   # failed: its blocks are orphans
            try:
                with self.env.begin(write=True) as txn:
                    txn.delete(self.lease)
            except lmdb.Error as e:
                log.warning("could not remove the ingest lease %r: %s", self.lease, e)
        if self.env is not None:
            release_env(self.env)
            self.env = None


def _with_placement(manifest: Manifest, *, version: str | None = None,
                    shards: list[str] | None = None, replication: int | None = None,
                    placement_level: int | None = None) -> Manifest:
    update = {k: v for k, v in dict(version=version, shards=shards, replication=replication,
                                     placement_level=placement_level).items() if v is not None}
    if not update:
        return manifest
    # re-validate rather than model_copy(update=...), which would skip validation
    return Manifest.model_validate({**manifest.model_dump(), **update})


def _collected(manifest: Manifest, where: str = "") -> str:
    return (f"{manifest.bank} version {manifest.version} was garbage-collected{where}; version "
            f"names are never reused, ingest under a new version")


def _refusal(txn, manifest: Manifest, encodings: tuple[str, ...], *, content: bool,
             where: str = "") -> str | None:
    """Why `manifest` may not be written into this LMDB, or None: its name was collected by gc,
    or (`content`: the manifest's checksums are known) the name holds other content."""
    if txn.get(tombstone_key(manifest.bank, manifest.version)) is not None:
        return _collected(manifest, where)
    existing = txn.get(manifest_key(manifest.bank, manifest.version)) if content else None
    if existing is not None:
        return _conflict(Manifest.from_json(bytes(existing)), manifest, encodings, where)
    return None


def _refuse(lmdb_path: str | Path, shard: str | None, manifest: Manifest,
            encodings: tuple[str, ...], map_size: int) -> None:
    """Another shard's LMDB, or a `_refusal`, before anything (the router included) is
    written into `lmdb_path`."""
    env = acquire_env(lmdb_path, map_size, readonly=False)
    try:
        with env.begin() as txn:
            marker = txn.get(SHARD_KEY)
            if marker is not None and marker.decode() != shard:
                raise IngestError(f"{lmdb_path} holds shard {marker.decode()!r}, not {shard!r}")
            why = _refusal(txn, manifest, encodings, content=True)
    finally:
        release_env(env)
    if why:
        raise IngestError(why)


@contextmanager
def _map_full_is_ingest_error(map_size: int):
    """LMDB's MapFullError as one IngestError line: the write transaction that hit it was
    aborted, and the version's manifest (written last) is not there, so nothing is visible."""
    try:
        yield
    except lmdb.MapFullError:
        raise IngestError(f"the LMDB map ({map_size / (1 << 30):.3g} GiB) is full; nothing "
                          f"published: rerun with a larger --map-size-gb (the servers' "
                          f"MEMBANK_SERVER_MAP_SIZE_GB, set it for both)") from None


def _native_part(manifest: Manifest) -> Manifest:
    # digests, signature and the storage layout are made by every ingest from the bytes it
    # writes (_write)
    return manifest.model_copy(update={"encodings": {}, "digests": {}, "signature": None,
                                       "block_store": "version"})


def _conflict(existing: Manifest, manifest: Manifest, encodings: tuple[str, ...],
              where: str = "") -> str | None:
    """Why `manifest` (to be stored with `encodings`) cannot go where `existing` is, or None."""
    if _native_part(existing) != _native_part(manifest):
        return (f"{manifest.bank} version {manifest.version} already exists{where} with "
                f"different content; versions are immutable, ingest under a new version")
    if set(existing.encodings) != set(encodings) or \
            any(existing.encodings[e] != manifest.encodings.get(e, existing.encodings[e])
                for e in existing.encodings):
        return (f"{manifest.bank} version {manifest.version} already exists{where} with "
                f"encodings {existing.available_encodings}, not "
                f"{['native', *sorted(encodings)]}; versions are immutable, ingest under a new "
                f"version to add or drop an encoding")
    return None


def _encodings(encodings) -> tuple[str, ...]:
    """The extra encodings to store, checked and de-duplicated ("native" is always stored)."""
    out = []
    for e in encodings or ():
        e = quant.normalize(e)
        if e and e not in out:
            out.append(e)
    return tuple(sorted(out))


def _check_shards(manifest: Manifest, targets: Mapping[str | None, str | Path]) -> None:
    for shard in targets:
        if shard is not None and shard not in manifest.shards:
            raise IngestError(f"shard {shard!r} is not in the manifest's shards {manifest.shards}")


def ingest(export_dir: str | Path, lmdb_path: str | Path, *, version: str | None = None,
           publish: bool = True, shard_id: str | None = None, shards: list[str] | None = None,
           replication: int | None = None, placement_level: int | None = None,
           batch_bytes: int = 64 << 20, map_size: int = 64 << 30, progress: bool = True,
           resume: bool = True, max_bytes_per_s: float | None = None,
           writemap: bool = False, encodings: tuple[str, ...] = (),
           signing_key=None, report: dict | None = None,
           block_store: BlockStore = "content") -> Manifest:
    """Write the export's bank (or, with `shard_id`, the blocks that shard owns) into the LMDB
    at `lmdb_path`; return the stored manifest.

    `encodings` (e.g. ("int8",)): also store every block in these encodings (membank/quant.py),
    in the same all-or-nothing version. `signing_key` (an Ed25519 private key,
    membank/signing.py): sign the stored manifest; None: store it unsigned. `report`: filled
    per shard with the blocks and bytes written, and those shared with versions already stored
    (content addressing: a block an earlier version holds is not written again).
    `block_store` "version": the layout of ingests before content addressing (for tests of
    LMDBs written then; a version that exists already keeps its layout).

    `version` overrides the export's manifest version (e.g. a deployment tag); `shards`,
    `replication` and `placement_level` override its placement (every shard's ingest must be
    given the same ones: they are part of the manifest). `max_bytes_per_s` throttles the
    writes (ingest into a shard that is serving competes with it for the disk).
    """
    # an export holds native blocks only: encodings are made here (and listed by _write)
    manifest = _with_placement(_native_part(load_manifest(export_dir)), version=version,
                               shards=shards, replication=replication,
                               placement_level=placement_level)
    targets = {shard_id: lmdb_path}
    _check_shards(manifest, targets)
    encodings = _encodings(encodings)
    # refused before anything, the router below included, is written
    _refuse(lmdb_path, shard_id, manifest, encodings, map_size)
    # the router rides with the version (for the Route RPC); invisible until `current` switches
    with _map_full_is_ingest_error(map_size):
        store_router(lmdb_path, export_dir, manifest.bank, manifest.version, map_size=map_size)
    # the manifest lists every block's digest (and checksum in every encoding), and every shard
    # must store the same (signed) manifest: a shard's ingest reads and hashes every block (and
    # stores, as always, only those placement gives it)
    total = sum(manifest.block_nbytes(l) for l, _ in manifest.blocks())
    blocks = iter_blocks(export_dir, manifest)
    with _map_full_is_ingest_error(map_size):
        return _write(manifest, blocks, targets, verify=True, publish=publish,
                      progress=progress, total_bytes=total, batch_bytes=batch_bytes,
                      map_size=map_size, resume=resume, source=str(export_dir),
                      max_bytes_per_s=max_bytes_per_s, writemap=writemap, encodings=encodings,
                      signing_key=signing_key, report=report, block_store=block_store)


def ingest_stream(targets: Mapping[str | None, str | Path], header: Manifest | Mapping,
                  blocks: Iterable[tuple[int, int, object]], *, publish: bool = True,
                  batch_bytes: int = 64 << 20, map_size: int = 64 << 30, progress: bool = True,
                  resume: bool = True, max_bytes_per_s: float | None = None,
                  writemap: bool = False, encodings: tuple[str, ...] = (),
                  signing_key=None, report: dict | None = None,
                  block_store: BlockStore = "content") -> Manifest:
    """Streaming ingest: blocks from any iterable, written into one LMDB per shard in one pass.

    `targets` maps shard id -> LMDB path ({None: path}: one LMDB holding every block).
    `header` holds the manifest's fields except `checksums` (or is a manifest whose checksums
    are ignored); the checksums are computed from the blocks as they stream by and the manifest
    written last. Each (level, node) must come exactly once, in any order; each block goes to
    the shards placement gives it (with its `encodings` copies, as for `ingest`).
    """
    fields = header.model_dump() if isinstance(header, Manifest) else dict(header)
    for name in ("encodings", "digests", "signature", "block_store"):
        fields.pop(name, None)       # computed here, like the checksums
    fields["checksums"] = [[""] * ((fields["branching"] ** l) if r else 0)
                           for l, r in enumerate(fields["ranks"], start=1)]
    skeleton = Manifest.model_validate(fields)
    _check_shards(skeleton, targets)
    total = sum(skeleton.block_nbytes(l) for l, _ in skeleton.blocks())
    with _map_full_is_ingest_error(map_size):
        return _write(skeleton, blocks, targets, verify=False, publish=publish, progress=progress,
                      total_bytes=total, batch_bytes=batch_bytes, map_size=map_size, resume=resume,
                      source="stream", max_bytes_per_s=max_bytes_per_s, writemap=writemap,
                      encodings=_encodings(encodings), signing_key=signing_key,
                      report=report, block_store=block_store)


def _write(manifest: Manifest, blocks, targets, *, verify: bool, publish: bool, progress: bool,
           total_bytes: int, batch_bytes: int, map_size: int, resume: bool,
           source: str, max_bytes_per_s: float | None = None,
           writemap: bool = False, encodings: tuple[str, ...] = (),
           signing_key=None, report: dict | None = None,
           block_store: BlockStore = "content") -> Manifest:
    bank, ver = manifest.bank, manifest.version
    sums = [list(level) for level in manifest.checksums]
    # "native" / encoding -> the cryptographic digests the signed manifest lists (issue 16)
    digests = {e: [[""] * len(level) for level in manifest.checksums]
               for e in ("native", *encodings)}
    # encoding -> checksums laid out as manifest.checksums, filled as the blocks stream by
    enc_sums = {e: [[""] * len(level) for level in manifest.checksums] for e in encodings}
    seen: set[tuple[int, int]] = set()
    opened: dict[str | None, _Target] = {}
    # blocks are stored by content (their digest), unless this version exists already in the
    # layout of an earlier ingest (re-ingesting it stays a no-op)
    store = block_store
    try:
        for shard, path in targets.items():
            opened[shard] = _Target(path, shard, map_size=map_size, batch_bytes=batch_bytes,
                                    resume=resume, writemap=writemap)
            # refuse a collected name (and, for an export, other content under the name)
            # before writing anything; a stream's checksums are known only at finish
            with opened[shard].env.begin() as txn:
                why = _refusal(txn, manifest, encodings, content=verify)
                existing = txn.get(manifest_key(bank, ver))
            if why:
                raise IngestError(why)
            if existing is not None:
                store = Manifest.from_json(existing).block_store
            opened[shard].start_lease(bank, ver)
        for target in opened.values():
            # a content key that is there already holds these bytes (a block an earlier version
            # shares): never written twice, whatever `resume` says
            target.resume = resume or store == "content"
        algo = manifest.digest_algo

        def key_of(level: int, node: int, enc: str, dg: str) -> bytes:
            if store == "content":
                return content_key(bank, f"{algo}-{dg}")
            return block_key(bank, manifest.block_version, level, node, enc)
        log.info("ingest %s/%s from %s into %s: writing", bank, ver, source,
                 ", ".join(f"{s or 'all'}={p}" for s, p in targets.items()))
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"ingest {bank}/{ver}",
                   disable=not progress, mininterval=0.5)
        t_start, done = time.monotonic(), 0
        for level, node, data in blocks:
            if not manifest.has_block(level, node) or (level, node) in seen:
                raise IngestError(f"unexpected or repeated block ({level}, {node}) "
                                  f"for {bank}/{ver}")
            seen.add((level, node))
            n = memoryview(data).nbytes
            if n != manifest.block_nbytes(level):
                raise IngestError(f"block ({level}, {node}) has {n} bytes, the manifest's shape "
                                  f"needs {manifest.block_nbytes(level)}")
            got = checksum(data)
            if verify and got != manifest.checksum(level, node):
                raise IngestError(f"block ({level}, {node}) of {source} does not match its "
                                  f"manifest checksum {manifest.checksum(level, node)}; the "
                                  f"source is corrupt")
            sums[level - 1][node] = got
            digests["native"][level - 1][node] = dg = digest(data, algo)
            owners = manifest.owners(level, node)
            key = key_of(level, node, "", dg)
            wanted = [shard for shard in opened if shard is None or shard in owners]
            for shard in wanted:
                opened[shard].put(key, data, got)
            for enc in encodings:
                # made once here; the server only ever reads it (no per-request quantizing)
                try:
                    payload = quant.encode_block(data, manifest.block_shape(level),
                                                 manifest.dtype, enc)
                except ValueError as e:
                    raise IngestError(f"block ({level}, {node}) of {source}: cannot encode "
                                      f"{enc}: {e}") from None
                enc_sums[enc][level - 1][node] = esum = checksum(payload)
                digests[enc][level - 1][node] = edg = digest(payload, algo)
                ekey = key_of(level, node, enc, edg)
                for shard in wanted:
                    opened[shard].put(ekey, payload, esum)
            bar.update(n)
            done += n
            if max_bytes_per_s:     # throttle: never ahead of the allowed rate
                ahead = done / max_bytes_per_s - (time.monotonic() - t_start)
                if ahead > 0:
                    time.sleep(ahead)
        bar.close()
        if not verify:
            missing = [b for b in manifest.blocks() if b not in seen]
            if missing:
                raise IngestError(f"the stream ended with {len(missing)} blocks missing, e.g. "
                                  f"{missing[:3]}; nothing published")
            manifest = Manifest.model_validate({**manifest.model_dump(), "checksums": sums})
        if encodings:
            manifest = Manifest.model_validate({**manifest.model_dump(), "encodings": enc_sums})
        manifest = Manifest.model_validate({**manifest.model_dump(), "digests": digests,
                                            "block_store": store})
        if signing_key is not None:
            manifest = sign_manifest(manifest, signing_key)
        else:
            log.warning("%s/%s is stored unsigned (no --signing-key): devices that pin keys "
                        "refuse it", bank, ver)
        for target in opened.values():
            target.finish(manifest, publish)
        for shard, target in opened.items():
            log.info("%s/%s %s: %d blocks written (%.1f MB), %d already there (%.1f MB)", bank,
                     ver, shard or "all", target.written, target.bytes / 1e6, target.skipped,
                     target.skipped_bytes / 1e6)
            if report is not None:
                report[shard] = {"written": target.written, "bytes_written": target.bytes,
                                 "shared": target.skipped, "bytes_shared": target.skipped_bytes}
    finally:
        for target in opened.values():
            target.close()
    log.info("ingested %s version %s%s", bank, ver,
             " and published it" if publish else " (not published)")
    return manifest


# -- CLI --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _ingest_main(argv)
    except (IngestError, PublishError, SignatureError, FileNotFoundError, ValueError,
            RuntimeError, lmdb.Error) as e:
        print(f"ingest failed: {e}", file=sys.stderr)
        raise SystemExit(1)


def _encodings_arg(value: str) -> tuple[str, ...]:
    try:
        return _encodings(v.strip() for v in value.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ingest_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m services.bank_server.ingest",
        description="Ingest an export's bank into a bank LMDB (publish another version: "
                    "services.bank_server.publish; delete old ones: services.bank_server.gc).")
    p.add_argument("export_dir")
    p.add_argument("--lmdb", required=True, help="LMDB directory (created if missing)")
    p.add_argument("--version", help="store under this version instead of the manifest's")
    p.add_argument("--no-publish", action="store_true", help="write the version, keep current")
    p.add_argument("--shard-id", help="write only the blocks this shard owns")
    p.add_argument("--shards", help="comma-separated shard ids (overrides the manifest's)")
    p.add_argument("--replication", type=int)
    p.add_argument("--placement-level", type=int)
    p.add_argument("--batch-mb", type=int, default=64)
    p.add_argument("--map-size-gb", type=float,
                   help="LMDB map size (default: the servers' MEMBANK_SERVER_MAP_SIZE_GB, 64)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-mb-s", type=float, help="throttle writes to this many MB/s")
    p.add_argument("--encodings", default=(), type=_encodings_arg,
                   help="also store every block in these encodings, comma separated "
                        "(int8: per-row scales, dequantized on the device; default: native only)")
    p.add_argument("--writemap", action="store_true",
                   help="write through LMDB's writable map (sparse file of map size; see "
                        "store.open_env)")
    p.add_argument("--signing-key", type=Path,
                   help="the operator's Ed25519 private key (PEM, `membank keygen`): sign the "
                        "stored manifest (devices pin the public key); without it the version "
                        "is stored unsigned")
    args = p.parse_args(argv)
    # the servers' setting unless a flag says otherwise: both must map the same size
    map_size = (int(args.map_size_gb * (1 << 30)) if args.map_size_gb is not None
                else LMDBSettings().map_size)
    # read before any write: a bad key path fails the ingest up front
    key = load_signing_key(args.signing_key) if args.signing_key else None
    m = ingest(args.export_dir, args.lmdb, version=args.version, publish=not args.no_publish,
               shard_id=args.shard_id,
               shards=args.shards.split(",") if args.shards else None,
               replication=args.replication, placement_level=args.placement_level,
               batch_bytes=args.batch_mb << 20, map_size=map_size,
               progress=not args.no_progress,
               max_bytes_per_s=args.max_mb_s * 1e6 if args.max_mb_s else None,
               writemap=args.writemap, encodings=args.encodings, signing_key=key)
    print(f"ingested {m.bank} version {m.version} into {args.lmdb}"
          + (f" (shard {args.shard_id})" if args.shard_id else ""))


if __name__ == "__main__":
    main()
