"""The BankService implementation (grpc.aio): GetManifest and FetchBlocks.

Registered as a generic handler rather than through the generated servicer base class so that
  - requests are parsed with `wire.safe_parser`: malformed bytes become INVALID_ARGUMENT (the
    generated code would let grpc answer INTERNAL), and
  - FetchBlocks writes bytes already encoded by `wire.iter_block_chunks` and sent as they are:
    the block body never passes through a protobuf message. Chunks are sliced from the block's
    buffer one at a time as the stream goes (a stream holds one chunk, not a block), and each
    write has `stall_timeout_s` to leave: a client that stops reading (HTTP/2 flow control
    holds the write) gets DEADLINE_EXCEEDED instead of pinning the handler for good.
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
# the default of settings.stream_stall_timeout_s: a chunk not taken by then ends the stream
STALL_TIMEOUT_S = 30.0


class BankServicer:
    """FetchBlocks and GetManifest over gRPC. What a fetch checks and how a block is read live in
    fetchplan.py, shared with the raw-TCP data plane (dataplane.py): the two transports give the
    same answer, code and message to the same request."""

    def __init__(self, store: LMDBStore, blocks: BlockStore, *,
                 max_blocks_per_request: int = MAX_BLOCKS_PER_REQUEST,
                 stall_timeout_s: float | None = STALL_TIMEOUT_S):
        self.store = store      # manifests and the current pointer
        self.blocks = blocks    # block bytes (LMDB, or Redis in front of it)
        self.max_blocks_per_request = max_blocks_per_request
        self.stall_timeout_s = stall_timeout_s   # None: wait for a client as long as it takes
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
                           context: grpc.aio.ServicerContext) -> None:
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
        try:
            for block in plan.blocks:
                t0 = time.perf_counter()
                await _check_deadline(context)
                await self._send_block(context, plan.manifest, block)
                if self.metrics is not None:
                    self.metrics.block_sent(block.level, block.expect.nbytes,
                                            time.perf_counter() - t0)
        except _Stalled as e:
            # the block is released already; the status waits behind the chunk the client
            # does not take, so this returns once the client reads again or goes away (its
            # connection's max age bounds that), holding this RPC's slot meanwhile, so a client
            # that stops reading uses up its own slots only (admission.py)
            log.warning("FetchBlocks from %s stalled: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))

    async def _send_block(self, context: grpc.aio.ServicerContext, manifest: Manifest,
                          block: PlannedBlock) -> None:
        """Stream one block, chunk by chunk, each sliced from the tier's buffer just before it
        is written: a stream holds one chunk in flight, never a whole block (27.5 MB at paper
        scale) of chunks. The buffer (for LMDB, a view into the memory map inside a read
        transaction) is held while the block streams and released on every way out."""
        loop = asyncio.get_running_loop()
        reading = read_block(self.blocks, self.store, manifest, block)
        # the read and the checksum are blocking: off the event loop, so health checks and
        # other streams go on meanwhile
        opening = loop.run_in_executor(None, reading.__enter__)
        try:
            buf = await asyncio.shield(opening)
        except FetchError as e:       # DATA_LOSS (never sent) or NOT_FOUND (version gone)
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        except asyncio.CancelledError:   # the client went away mid-read: close what it opens
            opening.add_done_callback(_close_when_opened(reading))
            raise
        chunks = wire.iter_block_chunks(block.index, block.header._asdict(), buf)
        try:
            for chunk in chunks:
                await _check_deadline(context)
                await self._write(context, chunk)
        finally:
            chunks.close()                       # drops its view of the buffer first
            reading.__exit__(None, None, None)   # cheap: ends the read transaction

    async def _write(self, context: grpc.aio.ServicerContext, chunk: bytes) -> None:
        """One chunk, given at most `stall_timeout_s` to leave: grpc's write waits while HTTP/2
        flow control has no room, that is while the client reads nothing, and with no deadline
        it would wait for good, holding this handler and its block."""
        try:
            await asyncio.wait_for(context.write(chunk), self.stall_timeout_s)
        except asyncio.TimeoutError:
            raise _Stalled(f"the client took no data for {self.stall_timeout_s:g} s "
                           f"(stream_stall_timeout_s); stream ended") from None

    # -- helpers ----------------------------------------------------------------------------
    async def _resolve(self, context, bank: str, version: str) -> Manifest:
        """The manifest of (bank, version or current), or abort with the right status."""
        try:
            return resolve_manifest(self.store, bank, version)
        except FetchError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)


def _close_when_opened(reading):
    def close(opening: asyncio.Future) -> None:
        if not opening.cancelled() and opening.exception() is None:
            reading.__exit__(None, None, None)
    return close


class _Stalled(Exception):
    """A FetchBlocks client took no data for the stall timeout."""


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
                     max_blocks_per_request: int = MAX_BLOCKS_PER_REQUEST,
                     stall_timeout_s: float | None = STALL_TIMEOUT_S) -> BankServicer:
    servicer = BankServicer(store, blocks, max_blocks_per_request=max_blocks_per_request,
                            stall_timeout_s=stall_timeout_s)
    server.add_generic_rpc_handlers((bank_service_handler(servicer),))
    return servicer
