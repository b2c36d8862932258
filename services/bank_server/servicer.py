"""The BankService implementation (grpc.aio): GetManifest and FetchBlocks.

Registered as a generic handler rather than through the generated servicer base class so that
  - requests are parsed with `wire.safe_parser`: malformed bytes become INVALID_ARGUMENT (the
    generated code would let grpc answer INTERNAL), and
  - FetchBlocks yields bytes already encoded by `wire.iter_block_chunks` and sent as they are:
    the block body never passes through a protobuf message.
Protobuf stops here: requests become small domain objects, and the store sees only keys.

Status codes (as in proto/membank/v1/bank.proto):
  INVALID_ARGUMENT  malformed bytes, empty bank, no blocks, > max_blocks_per_request blocks,
                    a level outside 1..depth or a level without blocks (r = 0)
  NOT_FOUND         unknown bank, unknown version, node >= k^level, or the version was
                    garbage-collected while the fetch was reading it (gc deletes the
                    manifest before the blocks, so a missing block whose manifest is gone
                    too is a collected version, not a lost block)
  FAILED_PRECONDITION  a block this shard does not own (`shard_id` set); the message names the
                    owner(s) from the manifest's placement
  DATA_LOSS         a stored block is missing or fails its manifest checksum (never sent)

Use `add_bank_service(server, store, blocks)`; `server.py` does.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

import grpc

from membank import wire
from membank.keys import block_key
from membank.manifest import Manifest
from membank.v1 import bank_pb2
from services.bank_server.store import BlockStore, CorruptBlock, Expect, LMDBStore, read_from

log = logging.getLogger(__name__)

# "membank.v1.BankService", taken from the generated descriptor so it cannot drift
SERVICE_NAME = bank_pb2.DESCRIPTOR.services_by_name["BankService"].full_name
# the default of settings.max_blocks_per_request: bounds the work (and memory) one request can
# ask for; a whole root-to-leaf path is depth blocks
MAX_BLOCKS_PER_REQUEST = 64
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")   # the manifest's pattern for bank ids


@dataclass(frozen=True)
class FetchRequest:
    """FetchBlocksRequest without protobuf."""
    bank: str
    version: str          # "" = current
    blocks: tuple[tuple[int, int], ...]   # (level, node)


class DataLoss(Exception):
    """A stored block is missing or does not hash to its manifest checksum."""


class VersionGone(Exception):
    """The version being fetched was garbage-collected after its manifest was resolved."""


class BankServicer:
    def __init__(self, store: LMDBStore, blocks: BlockStore, *,
                 max_blocks_per_request: int = MAX_BLOCKS_PER_REQUEST):
        self.store = store      # manifests and the current pointer
        self.blocks = blocks    # block bytes (LMDB, or Redis in front of it)
        self.max_blocks_per_request = max_blocks_per_request
        self.metrics = None     # metrics.ServerMetrics (set by server.serve) or None
        self.shard_id = ""      # this server's shard (set by server.serve); "": serves every block

    # -- RPCs -------------------------------------------------------------------------------
    async def get_manifest(self, request: bank_pb2.GetManifestRequest | None,
                           context: grpc.aio.ServicerContext) -> bank_pb2.GetManifestResponse:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed GetManifestRequest")
        manifest = await self._resolve(context, request.bank, request.version)
        return bank_pb2.GetManifestResponse(manifest_json=manifest.to_json())

    async def fetch_blocks(self, request: bank_pb2.FetchBlocksRequest | None,
                           context: grpc.aio.ServicerContext):
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed FetchBlocksRequest")
        req = FetchRequest(request.bank, request.version,
                           tuple((b.level, b.node) for b in request.blocks))
        if not req.blocks:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no blocks requested")
        if len(req.blocks) > self.max_blocks_per_request:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(req.blocks)} blocks requested, at most "
                                f"{self.max_blocks_per_request} per request")
        manifest = await self._resolve(context, req.bank, req.version)
        # check every id before sending anything, so a bad id never follows a half-sent reply
        for level, node in req.blocks:
            if not 1 <= level <= manifest.depth or manifest.ranks[level - 1] == 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"level {level} has no blocks in {manifest.bank}/"
                                    f"{manifest.version} (levels with blocks: "
                                    f"{[l for l, r in enumerate(manifest.ranks, 1) if r > 0]})")
            if node >= manifest.n_nodes(level):
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"no node {node} at level {level} (it has "
                                    f"{manifest.n_nodes(level)} nodes)")

        # -- shard ownership (storage) -----------------------------------------------------
        if self.shard_id:
            for level, node in req.blocks:
                owners = manifest.owners(level, node)
                if self.shard_id not in owners:
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"block ({level}, {node}) of {manifest.bank}/{manifest.version} is on "
                        f"shard {', '.join(owners)}, not on this shard ({self.shard_id})")
        # -- end shard ownership --------------------------------------------------------------

        loop = asyncio.get_running_loop()
        for index, (level, node) in enumerate(req.blocks):
            t0 = time.perf_counter()
            await _check_deadline(context)
            # LMDB/Redis reads and the checksum are blocking: keep them off the event loop so
            # health checks and other streams go on meanwhile
            try:
                chunks = await loop.run_in_executor(None, self._read_chunks, manifest, index,
                                                    level, node)
            except DataLoss as e:
                log.error("DATA_LOSS %s", e)
                await context.abort(grpc.StatusCode.DATA_LOSS, str(e))
            except VersionGone as e:
                log.info("NOT_FOUND %s", e)
                await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            for chunk in chunks:
                await _check_deadline(context)
                yield chunk
            if self.metrics is not None:
                self.metrics.block_sent(level, manifest.block_nbytes(level),
                                        time.perf_counter() - t0)

    # -- helpers ----------------------------------------------------------------------------
    async def _resolve(self, context, bank: str, version: str) -> Manifest:
        """The manifest of (bank, version or current), or abort with the right status."""
        if not bank:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty bank name")
        if not _NAME.match(bank):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"invalid bank name {bank[:64]!r}")
        if not version:
            version = self.store.current_version(bank)
            if version is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown bank {bank!r}")
        manifest = self.store.manifest(bank, version)
        if manifest is None:
            if self.store.current_version(bank) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown bank {bank!r}")
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown version {version[:64]!r} of bank {bank!r} (never "
                                f"completely ingested, or garbage-collected)")
        return manifest

    # -- block reads through the tiers (storage) ----------------------------------------------
    def _read_chunks(self, manifest: Manifest, index: int, level: int, node: int) -> list[bytes]:
        """One block's encoded BlockChunks, read through the tiers (store.BlockStore.read).

        The chunks are encoded while the tier's buffer is held, so a block from LMDB goes from
        the memory map straight into the chunk bytes (one copy, no intermediate `bytes`). The
        tiers check the bytes against the manifest checksum (a corrupt cache entry is evicted
        and LMDB read instead); only a corrupt or missing block in LMDB is DATA_LOSS.
        """
        key = block_key(manifest.bank, manifest.block_version, level, node)
        where = f"block ({level}, {node}) of {manifest.bank}/{manifest.version}"
        expect = Expect(manifest.block_nbytes(level), manifest.checksum(level, node))
        try:
            with read_from(self.blocks, key, expect) as buf:
                if buf is None:
                    # gc deletes a version's manifest (one commit) before its blocks: if the
                    # manifest is gone now, the version was collected after this fetch
                    # resolved it (NOT_FOUND: the client re-reads the manifest); if it is
                    # still there, the block is lost (DATA_LOSS)
                    if self.store.manifest(manifest.bank, manifest.version) is None:
                        raise VersionGone(f"version {manifest.version!r} of bank "
                                          f"{manifest.bank!r} was garbage-collected during "
                                          f"this fetch; fetch the current manifest")
                    raise DataLoss(f"{where} is missing from the store")
                header = {
                    "level": level, "node": node, "version": manifest.version,
                    "checksum": expect.checksum, "nbytes": expect.nbytes,
                    "dtype": manifest.dtype, "shape": list(manifest.block_shape(level)),
                }
                return list(wire.iter_block_chunks(index, header, buf))
        except CorruptBlock:
            raise DataLoss(f"{where} fails its manifest checksum") from None

    # -- end block reads ------------------------------------------------------------------------


async def _check_deadline(context: grpc.aio.ServicerContext) -> None:
    """Stop with DEADLINE_EXCEEDED between blocks and chunks once the client's deadline passed
    (grpc cancels such a call too, but only notices at the next write)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while sending")


def bank_service_handler(servicer: BankServicer) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "GetManifest": grpc.unary_unary_rpc_method_handler(
            servicer.get_manifest,
            request_deserializer=wire.safe_parser(bank_pb2.GetManifestRequest),
            response_serializer=bank_pb2.GetManifestResponse.SerializeToString,
        ),
        "FetchBlocks": grpc.unary_stream_rpc_method_handler(
            servicer.fetch_blocks,
            request_deserializer=wire.safe_parser(bank_pb2.FetchBlocksRequest),
            # identity: the handler yields BlockChunk wire bytes already
            response_serializer=_identity,
        ),
    })


def _identity(b: bytes) -> bytes:
    return b


def add_bank_service(server: grpc.aio.Server, store: LMDBStore, blocks: BlockStore, *,
                     max_blocks_per_request: int = MAX_BLOCKS_PER_REQUEST) -> BankServicer:
    servicer = BankServicer(store, blocks, max_blocks_per_request=max_blocks_per_request)
    server.add_generic_rpc_handlers((bank_service_handler(servicer),))
    return servicer
