"""The BankService implementation (grpc.aio): GetManifest and FetchBlocks.

Registered as a generic handler rather than through the generated servicer base class so that
  - requests are parsed with `wire.safe_parser`: malformed bytes become INVALID_ARGUMENT (the
    generated code would let grpc answer INTERNAL), and
  - FetchBlocks yields bytes already encoded by `wire.iter_block_chunks` and sent as they are:
    the block body never passes through a protobuf message.
Protobuf stops here: requests become small domain objects, and the store sees only keys.

Encodings: `FetchBlocksRequest.encoding` "int8" serves the int8 payloads ingest stored beside
the native blocks (membank/quant.py), read through the same tiers under their own keys (so a
cache never mixes the two) and checked against the manifest's `encodings["int8"]` checksums;
the header's dtype says "int8". The server never quantizes: what was not ingested is not served.

Status codes: malformed bytes are INVALID_ARGUMENT here; every other answer is a `FetchError`
from fetchplan.py (its docstring lists the checks in order). What each bad input gets:
README.md, "Bad input and the answer it gets".

Use `add_bank_service(server, store, blocks)`; `server.py` does.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from membank import wire
from membank.fetch import FetchError
from membank.manifest import Manifest
from membank.v1 import bank_pb2
from services.bank_server.fetchplan import (
    MAX_BLOCKS_PER_REQUEST,
    PlannedBlock,
    admit_bytes,
    plan_fetch,
    read_block,
    resolve_manifest,
)
from services.bank_server.security import peer_host
from services.bank_server.store import BlockStore, LMDBStore

log = logging.getLogger(__name__)

# "membank.v1.BankService", taken from the generated descriptor so it cannot drift
SERVICE_NAME = bank_pb2.DESCRIPTOR.services_by_name["BankService"].full_name


class BankServicer:
    """FetchBlocks and GetManifest over gRPC. What a fetch checks and how a block is read live in
    fetchplan.py, shared with the raw-TCP data plane (dataplane.py): the two transports give the
    same answer, code and message to the same request."""

    def __init__(self, store: LMDBStore, blocks: BlockStore, *,
                 max_blocks_per_request: int = MAX_BLOCKS_PER_REQUEST):
        self.store = store      # manifests and the current pointer
        self.blocks = blocks    # block bytes (LMDB, or Redis in front of it)
        self.max_blocks_per_request = max_blocks_per_request
        self.metrics = None     # metrics.ServerMetrics (set by server.serve) or None
        self.shard_id = ""      # this server's shard (set by server.serve); "": serves every block
        self.byte_limiter = None  # block bytes/s per client (set by server.serve); None: off

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
        # every id is checked before anything is sent, so a bad id never follows a half-sent reply
        try:
            plan = plan_fetch(self.store, request.bank, request.version,
                              [(b.level, b.node) for b in request.blocks],
                              max_blocks_per_request=self.max_blocks_per_request,
                              shard_id=self.shard_id, encoding=request.encoding)
            admit_bytes(self.byte_limiter, f"peer:{peer_host(context.peer())}", plan)
        except FetchError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)

        loop = asyncio.get_running_loop()
        for block in plan.blocks:
            t0 = time.perf_counter()
            await _check_deadline(context)
            # LMDB/Redis reads and the checksum are blocking: keep them off the event loop so
            # health checks and other streams go on meanwhile
            try:
                chunks = await loop.run_in_executor(None, self._read_chunks, plan.manifest, block)
            except FetchError as e:       # DATA_LOSS (never sent) or NOT_FOUND (version gone)
                await context.abort(getattr(grpc.StatusCode, e.code), e.message)
            for chunk in chunks:
                await _check_deadline(context)
                yield chunk
            if self.metrics is not None:
                self.metrics.block_sent(block.level, block.expect.nbytes, time.perf_counter() - t0)

    # -- helpers ----------------------------------------------------------------------------
    async def _resolve(self, context, bank: str, version: str) -> Manifest:
        """The manifest of (bank, version or current), or abort with the right status."""
        try:
            return resolve_manifest(self.store, bank, version)
        except FetchError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)

    def _read_chunks(self, manifest: Manifest, block: PlannedBlock) -> list[bytes]:
        """One block's encoded BlockChunks. They are encoded while the tier's buffer is held, so
        a block from LMDB goes from the memory map straight into the chunk bytes (one copy, no
        intermediate `bytes`)."""
        with read_block(self.blocks, self.store, manifest, block) as buf:
            return list(wire.iter_block_chunks(block.index, block.header._asdict(), buf))


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
