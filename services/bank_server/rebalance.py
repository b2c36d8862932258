r"""Rebalance: re-place a bank version onto another shard set, copying only the blocks that move.

    python -m services.bank_server.rebalance --bank B --version v1 --new-version v1-s4 \
        --shards s0,s1,s2,s3 --lmdb s0=/data/s0 --lmdb s1=/data/s1 --lmdb s2=/data/s2 \
        --lmdb s3=/data/s3 [--replication R] [--list | --dry-run] [--no-publish]

The shard map is part of the manifest, and manifests are immutable, so a new shard set is a
new version: its manifest is the old one with the new `shards` (and `replication`) and
`shares_blocks_of` = the old version's block version. Its blocks keep their keys
(`b/{bank}/{old block version}/...`), so nothing is rewritten where placement did not change.
Rendezvous hashing moves a placement group only when a new shard outranks its owners, so adding
one shard to n moves about replication / (n + 1) of the groups, each to the new shard only;
`moves` (membank/placement.py) lists them and only those are copied.

Steps: (1) read the old manifest from the old shards' LMDBs (they must agree); (2) copy every
moved block from an old owner (checksum verified) into each shard that gains it (batched,
resumable: a rerun skips blocks already copied); (3) on every shard of the new set, the
completeness check + manifest write of ingest; (4) with publish, switch `current` on each
shard. Old versions stay servable until GC: clients holding the old manifest keep asking the
old owners, which still hold the blocks; gc (gc.py) on an old shard later deletes the blocks it
no longer owns under any kept version.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Mapping

import lmdb

from membank.blocks import checksum
from membank.keys import manifest_key
from membank.manifest import Manifest
from membank.placement import moves
from membank.signing import load_signing_key, sign_manifest
from services.bank_server.ingest import IngestError, _Target
from services.bank_server.settings import LMDBSettings
from services.bank_server.store import acquire_env, release_env

log = logging.getLogger(__name__)


def replaced(manifest: Manifest, new_version: str, shards: list[str],
             replication: int | None = None, signing_key=None) -> Manifest:
    """The manifest of `manifest` re-placed onto `shards`, sharing its blocks; signed with
    `signing_key` (issue 16: the old signature no longer covers it), else unsigned."""
    new = Manifest.model_validate({
        **manifest.model_dump(), "version": new_version, "shards": list(shards),
        "replication": replication or manifest.replication,
        "shares_blocks_of": manifest.block_version, "signature": None})
    return sign_manifest(new, signing_key) if signing_key is not None else new


def read_manifest(lmdbs: Mapping[str, str | Path], bank: str, version: str,
                  map_size: int = 64 << 30) -> Manifest:
    """The manifest of (bank, version), identical on every listed LMDB that holds it."""
    found: Manifest | None = None
    for shard, path in lmdbs.items():
        if not (Path(path) / "data.mdb").exists():
            continue
        env = acquire_env(path, map_size, readonly=False)
        try:
            with env.begin() as txn:
                raw = txn.get(manifest_key(bank, version))
        finally:
            release_env(env)
        if raw is None:
            continue
        m = Manifest.from_json(raw)
        if found is not None and m != found:
            raise IngestError(f"{bank}/{version}: the manifest in {path} differs from another "
                              f"shard's")
        found = m
    if found is None:
        raise IngestError(f"{bank}/{version} is in none of {list(lmdbs.values())}")
    return found


def rebalance(lmdbs: Mapping[str, str | Path], bank: str, version: str, new_version: str,
              shards: list[str], *, replication: int | None = None, publish: bool = True,
              dry_run: bool = False, batch_bytes: int = 64 << 20,
              map_size: int = 64 << 30, signing_key=None) -> dict:
    """Re-place (bank, version) as `new_version` onto `shards`; `lmdbs` maps every old and new
    shard id to its LMDB directory. Returns a report; `report["moves"]` lists every moved block
    as [level, node, old owners, receiving shards]."""
    old = read_manifest(lmdbs, bank, version, map_size)
    missing = [s for s in set(old.shards) | set(shards) if s not in lmdbs]
    if missing:
        raise IngestError(f"no LMDB given for shard(s) {sorted(missing)}")
    new = replaced(old, new_version, shards, replication, signing_key)
    moved = moves(old, new)
    per_shard: dict[str, int] = {s: 0 for s in shards}
    for _, _, _, gained in moved:
        for s in gained:
            per_shard[s] += 1
    groups = {(min(l, old.placement_level), n // old.branching ** max(0, l - old.placement_level))
              for l, n, _, _ in moved}
    report = {"bank": bank, "from": version, "to": new_version, "shards": list(shards),
              "blocks_moved": len(moved),
              "bytes_copied": sum(old.block_nbytes(l, e) * len(g) for l, _, _, g in moved
                                  for e in ("", *old.encodings)),
              "groups_moved": len(groups), "received": per_shard, "dry_run": dry_run,
              "moves": [[l, n, o, g] for l, n, o, g in moved]}
    if dry_run:
        return report

    targets: dict[str, _Target] = {}
    try:
        for shard in shards:
            targets[shard] = _Target(lmdbs[shard], shard, map_size=map_size,
                                     batch_bytes=batch_bytes, resume=True)
            targets[shard].start_lease(bank, new_version)   # gc spares what it copies
        sources = {s: acquire_env(lmdbs[s], map_size, readonly=False) for s in old.shards}
        try:
            for level, node, owners, gained in moved:
                # the block and each of its encodings (e.g. int8): the re-placed manifest keeps
                # the `encodings` table, so the receiving shard must hold them all
                for enc in ("", *old.encodings):
                    key = old.storage_key(level, node, enc)
                    want = old.checksum(level, node, enc)
                    data = None
                    for src in owners:
                        with sources[src].begin(buffers=True) as txn:
                            buf = txn.get(key)
                            if buf is not None and len(buf) == old.block_nbytes(level, enc) \
                                    and checksum(buf) == want:
                                data = bytes(buf)   # the batch outlives this read transaction
                                break
                        log.warning("block (%d, %d)%s missing or corrupt on %s; trying another "
                                    "owner", level, node, f" {enc}" if enc else "", src)
                    if data is None:
                        raise IngestError(f"block ({level}, {node}){' ' + enc if enc else ''} "
                                          f"of {bank}/{version} is intact on none of its owners "
                                          f"{owners}")
                    for shard in gained:
                        targets[shard].put(key, data, want)
        finally:
            for env in sources.values():
                release_env(env)
        for target in targets.values():
            target.finish(new, publish)
        report["written"] = {s: t.written for s, t in targets.items()}
    finally:
        for target in targets.values():
            target.close()
    log.info("rebalanced %s/%s -> %s on %s: %d blocks (%d groups, %.1f MB) copied", bank,
             version, new_version, shards, len(moved), len(groups), report["bytes_copied"] / 1e6)
    return report


def _map_size(gb: float | None) -> int:
    """The flag, else the servers' own map size setting (settings.LMDBSettings)."""
    return int(gb * (1 << 30)) if gb is not None else LMDBSettings().map_size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.bank_server.rebalance",
                                description="Re-place a bank version onto a new shard set, "
                                            "copying only the blocks that move.")
    p.add_argument("--bank", required=True)
    p.add_argument("--version", required=True, help="the version to re-place")
    p.add_argument("--new-version", required=True, help="name of the re-placed version")
    p.add_argument("--shards", required=True, help="the new shard set, comma-separated")
    p.add_argument("--lmdb", action="append", default=[], metavar="SHARD=PATH",
                   help="every old and new shard's LMDB (repeat)")
    p.add_argument("--replication", type=int)
    p.add_argument("--dry-run", action="store_true", help="report what would move")
    p.add_argument("--list", action="store_true", help="dry run, and print every move")
    p.add_argument("--no-publish", action="store_true")
    p.add_argument("--map-size-gb", type=float,
                   help="LMDB map size (default: the servers' MEMBANK_SERVER_MAP_SIZE_GB, 64)")
    p.add_argument("--signing-key", help="the operator's Ed25519 private key: sign the re-placed "
                                         "version's manifest (else it is stored unsigned)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        lmdbs = dict(item.split("=", 1) for item in args.lmdb)
        report = rebalance(lmdbs, args.bank, args.version, args.new_version,
                           args.shards.split(","), replication=args.replication,
                           publish=not args.no_publish, dry_run=args.dry_run or args.list,
                           map_size=_map_size(args.map_size_gb),
                           signing_key=load_signing_key(args.signing_key)
                           if args.signing_key else None)
    except (IngestError, ValueError, lmdb.Error) as e:
        print(f"rebalance failed: {e}", file=sys.stderr)
        raise SystemExit(1)
    if args.list:
        for level, node, owners, gained in report["moves"]:
            print(f"({level}, {node}) {','.join(owners)} -> {','.join(gained)}")
    del report["moves"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
