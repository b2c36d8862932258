"""Publish (or roll back to) an ingested version: point `c/{bank}` at it, in one transaction.

    python -m services.bank_server.publish --lmdb data/bank.lmdb BANK VERSION

The one way a bank's current version moves: ingest's last step (`set_current`), the local
cluster's rollout, this command, and the admin operation behind `BankAdmin.Publish` (gRPC) and
`POST /v1/publish` (admin HTTP). A server holds its LMDB read-only, and LMDB forbids opening
one environment twice in a process, so the server runs this module as a short child process
(`publish`): the write transaction happens outside the serving process. The next request reads
the new `current` (the store reads it afresh on every request).
The command prints the version it replaced on stdout ("" when none; the server reads it) and a
line for people on stderr. Refused (one line on stderr) when the version was never completely
ingested (exit 2) or was garbage-collected (exit 3: gc's tombstone, membank/keys.py).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import lmdb

from membank.keys import NAME, current_key, manifest_key, tombstone_key, valid_name
from services.bank_server.store import acquire_env, release_env

PUBLISH_TIMEOUT_S = 30.0
# the command's exit status for each refusal (the server reads it back into a PublishError)
_EXIT_KIND = {2: "not_found", 3: "gone"}


class PublishError(Exception):
    """`kind` is "invalid" (bad names), "not_found" (no such complete version), "gone" (a
    garbage-collected version: its name is never used again) or "failed"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Published:
    bank: str
    version: str
    previous: str   # "" when the bank had no current version


def check_names(bank: str, version: str) -> None:
    for what, value in (("bank", bank), ("version", version)):
        if not valid_name(value):
            raise PublishError("invalid", f"invalid {what} name {str(value)[:64]!r} "
                                          f"(names match {NAME.pattern})")


def set_current(env, bank: str, version: str) -> str:
    """Switch `c/{bank}` to `version` in one write transaction of the open LMDB `env`; return
    the previous version ("" when none). PublishError "not_found" when `version` has no
    manifest (never completely ingested), "gone" when gc collected it."""
    with env.begin(write=True) as txn:
        if txn.get(tombstone_key(bank, version)) is not None:
            raise PublishError("gone", f"{bank} version {version} was garbage-collected; "
                               f"version names are never reused")
        if txn.get(manifest_key(bank, version)) is None:
            raise PublishError("not_found", f"{bank} version {version} was never completely "
                               f"ingested")
        previous = txn.get(current_key(bank))
        txn.put(current_key(bank), version.encode())
    return previous.decode() if previous is not None else ""


def publish_in_env(lmdb_path: str | Path, bank: str, version: str, map_size: int) -> str:
    """`set_current` in the LMDB at `lmdb_path`; return the previous version."""
    env = acquire_env(lmdb_path, map_size, readonly=False)
    try:
        return set_current(env, bank, version)
    finally:
        release_env(env)


async def publish(lmdb_path: str | Path, bank: str, version: str, map_size: int) -> Published:
    """Run the publish in a child process (see module doc); raise PublishError on refusal."""
    check_names(bank, version)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.bank_server.publish", "--lmdb", str(lmdb_path),
        # "--": the names are positionals whatever they look like (they are checked above;
        # this keeps a name from ever being parsed as an option, "-h" included)
        "--map-size", str(map_size), "--", bank, version,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parents[2]))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PUBLISH_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise PublishError("failed", f"publish did not finish in {PUBLISH_TIMEOUT_S:.0f} s")
    line = (err.decode().strip().splitlines() or [""])[-1]
    if proc.returncode in _EXIT_KIND:
        raise PublishError(_EXIT_KIND[proc.returncode], line)
    if proc.returncode != 0:
        raise PublishError("failed", line or f"publish exited with {proc.returncode}")
    return Published(bank, version, out.decode().strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.bank_server.publish",
                                description="Point a bank's current version at an ingested one.")
    p.add_argument("--lmdb", required=True)
    p.add_argument("--map-size", type=int, default=64 << 30)
    p.add_argument("bank")
    p.add_argument("version")
    args = p.parse_args(argv)
    try:
        check_names(args.bank, args.version)
        previous = publish_in_env(args.lmdb, args.bank, args.version, args.map_size)
    except PublishError as e:
        print(f"publish: {e}", file=sys.stderr)
        return 3 if e.kind == "gone" else 2
    except lmdb.Error as e:
        print(f"publish: {e}", file=sys.stderr)
        return 2
    print(previous)   # stdout: the previous version, for the caller
    print(f"published {args.bank} version {args.version} in {args.lmdb}"
          + (f" (was {previous})" if previous else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
