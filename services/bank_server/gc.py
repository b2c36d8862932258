"""Garbage collection of a bank's old versions in one (shard's) LMDB.

    python -m services.bank_server.gc --lmdb data/bank.lmdb --bank B [--keep 2] [--dry-run]
        [--orphans] [--grace-s 0]

GC keeps `current` and the `keep` newest complete versions, deletes the other versions'
manifests (and routers) in one transaction (servers answer NOT_FOUND for them from then on),
leaving a tombstone `t/{bank}/{version}` for each (membank/keys.py) so that the name is never
ingested or published again: a server, a Redis tier or a device that cached the old version
by its name must never meet other content under it. Then their blocks in batches; blocks
shared with a kept version (rebalance; for versions stored by content, every block whose digest
a kept version lists: one copy serves every version that lists it) stay, and on a shard, blocks
the shard no longer owns under any kept version go. `orphans=True` also deletes blocks of
versions that never completed (a killed ingest nobody reran; do not run it while an ingest is
writing: that ingest would then fail its completeness check, never publish half a version).
Blocks stored by content are shared across versions, so an ingest writing a new version may be
relying on any of them before its manifest lists them: ingest (and rebalance) hold a lease
`w/{bank}/{version}` while writing, renewed with every batch. gc refuses to start while a lease
younger than `lease_s` exists (GCError: rerun once it completes; a killed ingest's lease
expires), and stops deleting content blocks when one appears during its run
(`content_deferred`; what is left shows as orphans). `orphan_content_blocks` / `_bytes` count
content blocks no complete version lists (deleted with `orphans=True`).
LMDB reuses the freed pages for later versions; the file does not shrink (`mdb_copy -c`).
Prints the report as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import lmdb

from membank.blocks import checksum
from membank.keys import (
    SHARD_KEY,
    content_prefix,
    current_key,
    lease_prefix,
    manifest_key,
    manifest_prefix,
    parse_block_key,
    tombstone_key,
    version_info_key,
)
from membank.manifest import Manifest
from membank.placement import shard_blocks
from services.bank_server.router_store import router_key
from services.bank_server.settings import LMDBSettings
from services.bank_server.store import acquire_env, list_versions, release_env

log = logging.getLogger(__name__)


class GCError(RuntimeError):
    """The collection was refused (e.g. `current` moved to a doomed version meanwhile)."""


def gc(lmdb_path: str | Path, bank: str, *, keep: int = 2, dry_run: bool = False,
       orphans: bool = False, grace_s: float = 0.0, batch_keys: int = 256,
       map_size: int = 64 << 30, lease_s: float = 3600.0) -> dict:
    """Delete old versions of `bank`: keep `current` and the `keep` newest complete versions.

    Returns {"kept", "deleted", "blocks_deleted", "bytes_freed", "orphan_versions", "dry_run"}.
    `grace_s`: wait between deleting the manifests (new requests get NOT_FOUND) and deleting
    the blocks, so fetches already past the manifest lookup can finish. `lease_s`: an ingest
    lease renewed within it is live (module docstring); a killed ingest's lease expires.
    """
    if keep < 0:
        raise ValueError("keep must be >= 0")
    env = acquire_env(lmdb_path, map_size, readonly=False)
    try:
        with env.begin() as txn:
            current = txn.get(current_key(bank))
            current = current.decode() if current is not None else None
            shard = txn.get(SHARD_KEY)
            shard = shard.decode() if shard is not None else None
        versions = [v for v, _ in list_versions(env, bank)]            # oldest first
        kept = set(versions[len(versions) - keep:] if keep else [])
        if current is not None:
            kept.add(current)
        doomed = [v for v in versions if v not in kept]
        manifests: dict[str, Manifest] = {}
        raw_manifests: dict[str, bytes] = {}
        with env.begin() as txn:
            for v in versions:
                raw_manifests[v] = txn.get(manifest_key(bank, v))
                manifests[v] = Manifest.from_json(raw_manifests[v])
        content_pre = content_prefix(bank)
        versioned = {v: m for v, m in manifests.items() if m.block_store == "version"}
        complete_bvs = {m.block_version for m in versioned.values()}
        kept_bvs = {versioned[v].block_version for v in kept if v in versioned}
        # blocks a kept version needs on this LMDB: (block version, level, node) of versions
        # stored by version, storage keys of those stored by content
        needed, needed_content = set(), set()
        for v in kept:
            m = manifests[v]
            if m.block_store == "version":
                needed.update((m.block_version, l, n) for l, n in shard_blocks(m, shard))
            else:
                needed_content |= m.storage_keys(shard_blocks(m, shard))
        # content keys some complete version lists: a key no manifest lists is an orphan (a
        # killed ingest's, or one being written now), deleted only with `orphans`
        listed_content = set()
        for m in manifests.values():
            if m.block_store == "content":
                listed_content |= m.storage_keys()

        def doomed_block(key: bytes) -> bool:
            if key.startswith(content_pre):
                return key not in needed_content and (key in listed_content or orphans)
            _, bv, level, node = parse_block_key(key)
            if bv in kept_bvs:
                return (bv, level, node) not in needed       # moved off this shard
            return bv in complete_bvs or orphans

        def live_leases(txn) -> list[str]:
            """Versions an ingest or rebalance is writing now (keys.lease_key, renewed within
            `lease_s`): it may be sharing any content block, unlisted until its manifest."""
            out, cur, now = [], txn.cursor(), time.time()
            pre = lease_prefix(bank)
            if cur.set_range(pre):
                for k, raw in cur:
                    if not bytes(k).startswith(pre):
                        break
                    try:
                        renewed = float(json.loads(bytes(raw))["renewed_at"])
                    except (ValueError, KeyError, TypeError):
                        renewed = now                    # unreadable: assume it is live
                    if now - renewed < lease_s:
                        out.append(bytes(k)[len(pre):].decode())
            return out

        def newly_needed(txn) -> set[bytes] | None:
            """Content keys of versions ingested since the manifests were read: an ingest
            that completed meanwhile may share a block this gc was about to delete (its
            completeness check and these deletes are serialised by LMDB's write lock, so one
            of the two sees the other). None while an ingest holds a live lease: delete no
            content key at all."""
            if live_leases(txn):
                return None
            out, cur = set(), txn.cursor()
            pre = manifest_prefix(bank)
            if cur.set_range(pre):
                for k, raw in cur:
                    if not bytes(k).startswith(pre):
                        break
                    if bytes(k)[len(pre):].decode() not in manifests:
                        m = Manifest.from_json(bytes(raw))
                        if m.block_store == "content":
                            out |= m.storage_keys(shard_blocks(m, shard))
            return out

        report = {"kept": sorted(kept), "deleted": doomed, "blocks_deleted": 0,
                  "bytes_freed": 0, "orphan_versions": [], "dry_run": dry_run,
                  "content_deferred": False}
        with env.begin() as txn:
            writing = live_leases(txn)
        if writing and not dry_run:
            raise GCError(f"{bank}: {', '.join(writing)} being written (ingest lease, renewed "
                          f"within {lease_s:g} s); blocks stored by content may be shared with "
                          f"it: rerun gc once it completes")
        if not dry_run and doomed:
            with env.begin(write=True) as txn:
                now = txn.get(current_key(bank))
                if now is not None and now.decode() in doomed:
                    raise GCError(f"{bank}: current moved to {now.decode()} during gc; rerun")
                now_s = time.time()
                for v in doomed:
                    txn.delete(manifest_key(bank, v))
                    txn.delete(version_info_key(bank, v))
                    txn.delete(router_key(bank, v))
                    txn.put(tombstone_key(bank, v), json.dumps({
                        "manifest_checksum": checksum(raw_manifests[v]),
                        "collected_at": now_s}).encode())
            if grace_s > 0:
                time.sleep(grace_s)
        # then the blocks, in batches, scanning the bank's block keys in order: versioned, then
        # by content
        orphan_bvs: set[str] = set()
        for prefix in (f"b/{bank}/".encode(), content_pre):
            _collect(env, prefix, doomed_block, newly_needed, orphan_bvs, complete_bvs, report,
                     batch_keys=batch_keys, dry_run=dry_run)
        report["orphan_versions"] = sorted(orphan_bvs)
        # content blocks no complete version lists (a killed ingest's; --orphans deletes them)
        report["orphan_content_blocks"], report["orphan_content_bytes"] = _unlisted(
            env, content_pre, listed_content)
    finally:
        release_env(env)
    log.info("gc %s in %s: kept %s, deleted %s, %d blocks, %.1f MB%s", bank, lmdb_path,
             report["kept"], report["deleted"], report["blocks_deleted"],
             report["bytes_freed"] / 1e6, " (dry run)" if dry_run else "")
    return report


def _collect(env, prefix: bytes, doomed_block, newly_needed, orphan_bvs: set[str],
             complete_bvs: set[str], report: dict, *, batch_keys: int, dry_run: bool) -> None:
    """Delete the doomed blocks under `prefix`, in batches of `batch_keys` (one write
    transaction each, so a server's readers are never held up long)."""
    content = prefix.startswith(b"h/")
    start = prefix
    while True:
        batch: list[tuple[bytes, int]] = []
        with env.begin(buffers=True) as txn:
            cur = txn.cursor()
            if not cur.set_range(start):
                break
            last = None
            for k, v in cur:
                k = bytes(k)
                if not k.startswith(prefix):
                    break
                last = k
                if not content:
                    bv = parse_block_key(k)[1]
                    if bv not in complete_bvs:
                        orphan_bvs.add(bv)
                if doomed_block(k):
                    batch.append((k, len(v)))
                    if len(batch) >= batch_keys:
                        break
        full = len(batch) >= batch_keys
        if batch and not dry_run:
            with env.begin(write=True) as txn:
                if content:
                    keep = newly_needed(txn)
                    if keep is None:         # an ingest started meanwhile: stop here
                        report["content_deferred"] = True
                        break
                    batch = [(k, n) for k, n in batch if k not in keep]
                for k, _ in batch:
                    txn.delete(k)
        report["blocks_deleted"] += len(batch)
        report["bytes_freed"] += sum(n for _, n in batch)
        if last is None or not full:
            break
        start = last + b"\x00"      # resume after the last key seen


def _unlisted(env, prefix: bytes, listed: set[bytes]) -> tuple[int, int]:
    """(count, bytes) of the keys under `prefix` not in `listed`."""
    n = nbytes = 0
    with env.begin(buffers=True) as txn:
        cur = txn.cursor()
        if cur.set_range(prefix):
            for k, v in cur:
                if not bytes(k).startswith(prefix):
                    break
                if bytes(k) not in listed:
                    n, nbytes = n + 1, nbytes + len(v)
    return n, nbytes


def _map_size(gb: float | None) -> int:
    """The flag, else the servers' own map size setting (settings.LMDBSettings)."""
    return int(gb * (1 << 30)) if gb is not None else LMDBSettings().map_size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.bank_server.gc",
                                description="Delete old versions of a bank from an LMDB.")
    p.add_argument("--lmdb", required=True)
    p.add_argument("--bank", required=True)
    p.add_argument("--keep", type=int, default=2, help="newest complete versions kept "
                   "besides current (default 2)")
    p.add_argument("--dry-run", action="store_true", help="report only")
    p.add_argument("--orphans", action="store_true",
                   help="also delete blocks of versions that never completed")
    p.add_argument("--grace-s", type=float, default=0.0,
                   help="seconds between deleting the manifests and deleting the blocks")
    p.add_argument("--lease-s", type=float, default=3600.0,
                   help="an ingest lease renewed within this many seconds is live: content "
                        "blocks wait for it (default 3600; a killed ingest's lease expires)")
    p.add_argument("--map-size-gb", type=float,
                   help="LMDB map size (default: the servers' MEMBANK_SERVER_MAP_SIZE_GB, 64)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = gc(args.lmdb, args.bank, keep=args.keep, dry_run=args.dry_run,
                    orphans=args.orphans, grace_s=args.grace_s,
                    map_size=_map_size(args.map_size_gb), lease_s=args.lease_s)
    except (GCError, ValueError, lmdb.Error) as e:
        print(f"gc failed: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
