"""Report every gRPC call of a sync channel to a callback shaped like locust's `events.request`.

No locust import here (tests/deploy/ use it with a plain list as the callback):

    client = InstrumentedBankClient("127.0.0.1:50051", report=environment.events.request.fire)
    client.fetch(...)   # reports {"request_type": "grpc", "name": "FetchBlocks L1+L2", ...}

The interceptor measures each call from its start to its last response message: for the
server-streaming FetchBlocks that is when the caller has drained the stream, so response_time
includes transfer of every chunk, and response_length is the block bytes received. FetchBlocks
calls are named by the levels they ask for ("FetchBlocks L2", "FetchBlocks L1+L2"), so the
locust report gives latency per level mix.
"""
from __future__ import annotations

import time
from typing import Callable

import grpc

from membank.v1 import bank_pb2
from services.model_client.bank_client import BankClient

Report = Callable[..., None]


def call_name(method: str, request) -> str:
    short = method.rsplit("/", 1)[-1]
    if isinstance(request, bank_pb2.FetchBlocksRequest):
        levels = sorted({b.level for b in request.blocks})
        return f"{short} " + "+".join(f"L{l}" for l in levels)
    return short


class _ReportingStream:
    """Wraps a response-stream call: iterating it counts bytes; its end (or error) reports."""

    def __init__(self, call, report: Report, name: str, start: float):
        self._call, self._report, self._name, self._start = call, report, name, start
        self._nbytes = 0
        self._done = False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            msg = next(self._call)
        except StopIteration:
            self._finish(None)
            raise
        except grpc.RpcError as e:
            self._finish(e)
            raise
        if isinstance(msg, (bytes, bytearray, memoryview)):   # BankClient reads raw chunks
            self._nbytes += len(msg)
        else:
            self._nbytes += len(msg.data) if hasattr(msg, "data") else msg.ByteSize()
        return msg

    def _finish(self, exc) -> None:
        if not self._done:
            self._done = True
            self._report(request_type="grpc", name=self._name,
                         response_time=(time.perf_counter() - self._start) * 1000.0,
                         response_length=self._nbytes, exception=exc, context={})

    def __getattr__(self, attr):   # cancel(), code(), details(), ... of the underlying call
        return getattr(self._call, attr)


class ReportingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, report: Report):
        self.report = report

    def intercept_unary_unary(self, continuation, client_call_details, request):
        name = call_name(client_call_details.method, request)
        start = time.perf_counter()
        call = continuation(client_call_details, request)
        exc, length = None, 0
        try:
            length = call.result().ByteSize()
        except grpc.RpcError as e:
            exc = e
        self.report(request_type="grpc", name=name,
                    response_time=(time.perf_counter() - start) * 1000.0,
                    response_length=length, exception=exc, context={})
        return call

    def intercept_unary_stream(self, continuation, client_call_details, request):
        start = time.perf_counter()
        call = continuation(client_call_details, request)
        return _ReportingStream(call, self.report, call_name(client_call_details.method, request),
                                start)


class InstrumentedBankClient(BankClient):
    """BankClient (reassembly, manifest checksums, errors) whose RPCs go through the interceptor.

    BankClient builds its multicallables from its channel in __init__; this rebuilds the two
    bank RPCs on an intercepted view of the same channel. The asserts make a rename in
    BankClient fail here, loudly, instead of silently sending uninstrumented calls.
    """

    def __init__(self, target: str, report: Report, timeout_s: float = 10.0, **client_kw):
        """`client_kw`: BankClient's keywords (token, tls_ca, tls_server_name, ...)."""
        super().__init__(target, timeout_s, **client_kw)
        assert hasattr(self, "_get_manifest") and hasattr(self, "_fetch_blocks"), \
            "BankClient internals changed: update loadtests/grpc_instrument.py"
        channel = grpc.intercept_channel(self.channel, ReportingInterceptor(report))
        service = "/membank.v1.BankService"
        self._get_manifest = channel.unary_unary(
            f"{service}/GetManifest",
            request_serializer=bank_pb2.GetManifestRequest.SerializeToString,
            response_deserializer=bank_pb2.GetManifestResponse.FromString)
        self._fetch_blocks = channel.unary_stream(
            f"{service}/FetchBlocks",
            request_serializer=bank_pb2.FetchBlocksRequest.SerializeToString,
            response_deserializer=bank_pb2.BlockChunk.FromString)
