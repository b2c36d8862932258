"""Ingest: copy an export's bank blocks and manifest into a bank LMDB, then publish.

    python -m services.bank_server.ingest EXPORT_DIR --lmdb data/bank.lmdb \
        [--version V] [--no-publish]

Order of writes, so that a reader never sees a half-written version:
  1. every block under its versioned key `b/{bank}/{version}/{level}/{node}`, in batched write
     transactions (each block's checksum is checked against the manifest first);
  2. the manifest under `m/{bank}/{version}` (a version without a manifest does not exist for
     the server);
  3. with publish, one transaction that points `c/{bank}` at the version.
Versions are immutable: re-ingesting the same version with the same content rewrites the same
bytes (idempotent); a different manifest under an existing version is refused.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from membank.artifacts import iter_blocks, load_manifest
from membank.blocks import checksum
from membank.keys import block_key, current_key, manifest_key
from membank.manifest import Manifest
from services.bank_server.store import open_env

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """The export cannot be ingested (corrupt block, conflicting version)."""


def ingest(export_dir: str | Path, lmdb_path: str | Path, *, version: str | None = None,
           publish: bool = True, batch_bytes: int = 64 << 20, map_size: int = 64 << 30,
           progress: bool = True) -> Manifest:
    """Write the export's bank into the LMDB at `lmdb_path`; return the stored manifest.

    `version` overrides the export's manifest version (e.g. a deployment tag).
    """
    manifest = load_manifest(export_dir)
    if version is not None and version != manifest.version:
        # re-validate rather than model_copy(update=...), which would skip validation
        manifest = Manifest.model_validate({**manifest.model_dump(), "version": version})
    bank, ver = manifest.bank, manifest.version
    manifest_json = manifest.to_json().encode()

    env = open_env(lmdb_path, map_size, readonly=False)
    try:
        with env.begin() as txn:
            existing = txn.get(manifest_key(bank, ver))
        if existing is not None and Manifest.from_json(existing) != manifest:
            raise IngestError(f"{bank} version {ver} already exists with different content; "
                              f"versions are immutable, ingest under a new version")

        n_blocks = sum(manifest.n_nodes(l) for l in range(1, manifest.depth + 1)
                       if manifest.ranks[l - 1] > 0)
        bar = tqdm(total=n_blocks, unit="block", desc=f"ingest {bank}/{ver}", disable=not progress)
        batch: list[tuple[bytes, bytes]] = []
        pending = 0
        for level, node, data in iter_blocks(export_dir, manifest):
            want = manifest.checksum(level, node)
            if len(data) != manifest.block_nbytes(level) or checksum(data) != want:
                raise IngestError(f"block ({level}, {node}) of {export_dir} does not match its "
                                  f"manifest checksum {want}; the export is corrupt")
            batch.append((block_key(bank, ver, level, node), data))
            pending += len(data)
            if pending >= batch_bytes:
                _write_batch(env, batch)
                bar.update(len(batch))
                batch, pending = [], 0
        _write_batch(env, batch)
        bar.update(len(batch))
        bar.close()

        # the manifest goes in after every block: its presence marks the version complete
        with env.begin(write=True) as txn:
            txn.put(manifest_key(bank, ver), manifest_json)
        if publish:
            # the one mutable key, switched in its own transaction: readers see old or new
            with env.begin(write=True) as txn:
                txn.put(current_key(bank), ver.encode())
    finally:
        env.close()
    log.info("ingested %s version %s into %s%s", bank, ver, lmdb_path,
             " and published it" if publish else " (not published)")
    return manifest


def publish_version(lmdb_path: str | Path, bank: str, version: str, *,
                    map_size: int = 64 << 30) -> None:
    """Point `current` of a bank at an already ingested version (e.g. to roll back)."""
    env = open_env(lmdb_path, map_size, readonly=False)
    try:
        with env.begin(write=True) as txn:
            if txn.get(manifest_key(bank, version)) is None:
                raise IngestError(f"{bank} version {version} was never fully ingested")
            txn.put(current_key(bank), version.encode())
    finally:
        env.close()


def _write_batch(env, batch: list[tuple[bytes, bytes]]) -> None:
    if not batch:
        return
    with env.begin(write=True) as txn:
        for key, data in batch:
            txn.put(key, data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.bank_server.ingest",
                                description="Ingest an export's bank into a bank LMDB.")
    p.add_argument("export_dir")
    p.add_argument("--lmdb", required=True, help="LMDB directory (created if missing)")
    p.add_argument("--version", help="store under this version instead of the manifest's")
    p.add_argument("--no-publish", action="store_true", help="write the version, keep current")
    p.add_argument("--batch-mb", type=int, default=64)
    p.add_argument("--map-size-gb", type=float, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        m = ingest(args.export_dir, args.lmdb, version=args.version, publish=not args.no_publish,
                   batch_bytes=args.batch_mb << 20, map_size=int(args.map_size_gb * (1 << 30)))
    except (IngestError, FileNotFoundError, ValueError) as e:
        print(f"ingest failed: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(f"ingested {m.bank} version {m.version} into {args.lmdb}")


if __name__ == "__main__":
    main()
