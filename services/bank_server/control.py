"""The RPCs beside block serving: `BankService.Route` and `BankAdmin.Publish`.

    control = add_control_services(server, bank_servicer, settings)

Route: server-side routing for clients that cannot run the router (no embedding model of their
own is needed on the server: the client sends the embedding). The router is the one ingest
stored beside the version (router_store.py); the answer is the path and the path's blocks, which
the client then fetches with FetchBlocks exactly as a routing client would.

Publish (admin token required, see security.py): switch the bank's current version.

Status codes of both: README.md, "Bad input and the answer it gets" (the Route and Publish rows).

Both are registered as their own generic handlers (Route under the BankService name, beside
servicer.py's handler, which keeps GetManifest and FetchBlocks), so this module and
servicer.py can change independently.
"""
from __future__ import annotations

import asyncio
import logging
import math

import grpc

from membank import wire
from membank.v1 import bank_pb2
from services.bank_server.publish import PublishError, publish
from services.bank_server.router_store import RouterCache, RouterFormatError

log = logging.getLogger(__name__)

SERVICE_NAME = bank_pb2.DESCRIPTOR.services_by_name["BankService"].full_name
ADMIN_SERVICE_NAME = bank_pb2.DESCRIPTOR.services_by_name["BankAdmin"].full_name
MAX_EMBEDDING_DIM = 8192   # MiniLM: 384; bounds the work one Route request can ask for

_PUBLISH_CODES = {"invalid": grpc.StatusCode.INVALID_ARGUMENT,
                  "not_found": grpc.StatusCode.NOT_FOUND,
                  "gone": grpc.StatusCode.FAILED_PRECONDITION,   # gc'd: the name is never reused
                  "failed": grpc.StatusCode.INTERNAL}


class ControlServicer:
    def __init__(self, bank_servicer, settings):
        self.bank = bank_servicer            # servicer.BankServicer: manifests, name checks
        self.settings = settings
        self.routers = RouterCache(bank_servicer.store)

    async def route(self, request: bank_pb2.RouteRequest | None,
                    context: grpc.aio.ServicerContext) -> bank_pb2.RouteResponse:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed RouteRequest")
        manifest = await self.bank._resolve(context, request.bank, request.version)
        n = len(request.embedding)
        if not 0 < n <= MAX_EMBEDDING_DIM:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"embedding has {n} values (1..{MAX_EMBEDDING_DIM} accepted)")
        embedding = list(request.embedding)
        if not all(math.isfinite(v) for v in embedding):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "embedding has NaN or inf")
        loop = asyncio.get_running_loop()
        try:
            router = await loop.run_in_executor(None, self.routers.get, manifest.bank,
                                                manifest.version)
        except RouterFormatError as e:
            log.error("DATA_LOSS router of %s/%s: %s", manifest.bank, manifest.version, e)
            await context.abort(grpc.StatusCode.DATA_LOSS, f"stored router is unreadable: {e}")
        if router is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no router stored for {manifest.bank}/{manifest.version} "
                                f"(ingest an export that has router.safetensors)")
        if (router.branching, router.depth) != (manifest.branching, manifest.depth):
            await context.abort(grpc.StatusCode.DATA_LOSS,
                                f"stored router is k={router.branching}, depth={router.depth}; "
                                f"the manifest is k={manifest.branching}, depth={manifest.depth}")
        if n != router.dim:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"embedding has {n} values, the router of {manifest.bank}/"
                                f"{manifest.version} expects {router.dim}")
        path = router.path(embedding)
        return bank_pb2.RouteResponse(
            path=path, version=manifest.version,
            blocks=[bank_pb2.BlockId(level=l, node=b) for l, b in manifest.path_blocks(path)])

    async def publish(self, request: bank_pb2.PublishRequest | None,
                      context: grpc.aio.ServicerContext) -> bank_pb2.PublishResponse:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed PublishRequest")
        try:
            done = await publish(self.settings.lmdb_path, request.bank, request.version,
                                 self.settings.map_size)
        except PublishError as e:
            await context.abort(_PUBLISH_CODES[e.kind], str(e))
        log.warning("published %s version %s (was %r) via the admin RPC from %s", done.bank,
                    done.version, done.previous, context.peer())
        return bank_pb2.PublishResponse(bank=done.bank, version=done.version,
                                        previous=done.previous)


def add_control_services(server: grpc.aio.Server, bank_servicer, settings) -> ControlServicer:
    control = ControlServicer(bank_servicer, settings)
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Route": grpc.unary_unary_rpc_method_handler(
                control.route,
                request_deserializer=wire.safe_parser(bank_pb2.RouteRequest),
                response_serializer=bank_pb2.RouteResponse.SerializeToString),
        }),
        grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, {
            "Publish": grpc.unary_unary_rpc_method_handler(
                control.publish,
                request_deserializer=wire.safe_parser(bank_pb2.PublishRequest),
                response_serializer=bank_pb2.PublishResponse.SerializeToString),
        }),
    ))
    return control
