"""BankClient: the device's synchronous gRPC client for a bank server.

    with BankClient("127.0.0.1:50051") as client:
        manifest = client.get_manifest("demo")                  # current version
        blocks = client.fetch("demo", manifest.version, manifest.path_blocks(path), manifest)
        # blocks[(level, node)] is a bytearray in block format (membank/blocks.py)

`fetch` asks for every block in ONE FetchBlocks call and reassembles the streamed chunks into
one preallocated bytearray per block. A block is returned only when it is complete, its header
agrees with the manifest, and its bytes hash to the MANIFEST's digest (`Manifest.block_check`:
the signed BLAKE3 digest, or the xxh3 checksum of a manifest without digests; the header's
checksum comes from the same server as the bytes, so it proves nothing on its own). Whether the
manifest itself is trusted (signed by a pinned key) is the device's check, above the transports
(cached_bank.py, membank/signing.py). Anything else raises
BlockIntegrityError; server statuses raise BankError with the status name
(services/model_client/bank.py).

`fetch(..., encoding="int8")` asks for the int8 payloads ingest stored (membank/quant.py),
verified against the manifest's `encodings["int8"]` checksums; the caller dequantizes them
(MemoryModel.attach). Arguments the manifest refuses (a version without that encoding, a bad
level or node: membank/fetch.py `check_fetch`, the server's own check) raise BankError with the
code and message the server would answer, before any RPC.

Security (both optional): `token=` sends `authorization: Bearer TOKEN` with every call (a
server with auth on answers UNAUTHENTICATED without it); `tls_ca=` (a PEM path or bytes, or
True for the system roots) connects over TLS and checks the server certificate against it.
A token never travels in the clear (issue 16): with a token and no CA the client uses TLS with
the system roots (`tls_for_token`); only `allow_insecure_token=True` (an explicit setting, for
a loopback or test bank) sends it over a plaintext channel.

    BankClient("bank.example:50051", token=os.environ["MEMBANK_TOKEN"], tls_ca="ca.pem")
"""
from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from membank import quant, wire
from membank.blocks import hasher
from membank.fetch import FetchError, check_fetch
from membank.manifest import Manifest
from membank.v1 import bank_pb2
from services.model_client.bank import BankError, BlockIntegrityError, destination

_SERVICE = "membank.v1.BankService"


def tls_for_token(tls_ca, token: str | None, allow_insecure_token: bool):
    """The TLS setting a client with `token` must use: `tls_ca` when it names one; with a token
    and no CA the system roots (True), so a token is never sent in cleartext, even when the
    server happens to speak TLS; None (plaintext) only without a token or when
    `allow_insecure_token` says so explicitly."""
    if tls_ca is None or tls_ca is False:
        return True if token and not allow_insecure_token else None
    return tls_ca


class BankClient:
    def __init__(self, target: str, timeout_s: float = 10.0, *,
                 max_receive_bytes: int = wire.CHUNK_BYTES + (64 << 10),
                 token: str | None = None, tls_ca: str | Path | bytes | bool | None = None,
                 tls_server_name: str | None = None, channel_options: list | None = None,
                 allow_insecure_token: bool = False):
        """`max_receive_bytes` bounds one message: a chunk (1 MiB + header) or a manifest.
        `tls_server_name` overrides the name checked in the server certificate;
        `channel_options` are extra grpc channel arguments (they win over the defaults);
        `allow_insecure_token`: send `token` over a plaintext channel (never by default)."""
        self.target = target
        tls_ca = tls_for_token(tls_ca, token, allow_insecure_token)
        self.timeout_s = timeout_s
        options = [("grpc.max_receive_message_length", max_receive_bytes),
                   # an 8 MiB initial HTTP/2 stream window: the server streams several 1 MiB
                   # chunks without waiting for window updates; with the 64 KiB default the
                   # first chunks of every stream wait for round trips (BENCHMARKS.md,
                   # "Fetch": membank vs membank-untuned)
                   ("grpc.http2.lookahead_bytes", 8 << 20)]
        if channel_options:
            names = {k for k, _ in channel_options}
            options = [o for o in options if o[0] not in names] + list(channel_options)
        if tls_ca is None or tls_ca is False:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            roots = None if tls_ca is True else (
                tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes())
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            self.channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
        # plain metadata rather than call credentials (refused on insecure channels): the token
        # reaches a plaintext channel only with allow_insecure_token (tls_for_token above)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._call_kw = {"metadata": self._metadata} if token else {}
        self._get_manifest = self.channel.unary_unary(
            f"/{_SERVICE}/GetManifest",
            request_serializer=bank_pb2.GetManifestRequest.SerializeToString,
            response_deserializer=bank_pb2.GetManifestResponse.FromString,
        )
        self._fetch_blocks = self.channel.unary_stream(
            f"/{_SERVICE}/FetchBlocks",
            request_serializer=bank_pb2.FetchBlocksRequest.SerializeToString,
            # raw bytes: wire.parse_chunk reads them without copying the block body
            response_deserializer=None,
        )
        self._route = self.channel.unary_unary(
            f"/{_SERVICE}/Route",
            request_serializer=bank_pb2.RouteRequest.SerializeToString,
            response_deserializer=bank_pb2.RouteResponse.FromString,
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)

    # -- RPCs -------------------------------------------------------------------------------
    def get_manifest(self, bank: str, version: str = "", *,
                     timeout_s: float | None = None) -> Manifest:
        """The manifest of `bank` at `version` ("" = the currently published version).
        `timeout_s` overrides the client's deadline for this call."""
        try:
            resp = self._get_manifest(bank_pb2.GetManifestRequest(bank=bank, version=version),
                                      timeout=self.timeout_s if timeout_s is None else timeout_s,
                                      **self._call_kw)
        except grpc.RpcError as e:
            raise _bank_error(e) from None
        manifest = Manifest.from_json(resp.manifest_json)
        if manifest.bank != bank or (version and manifest.version != version):
            raise BankError("INTERNAL",
                            f"asked for {bank}/{version or 'current'}, got "
                            f"{manifest.bank}/{manifest.version}")
        return manifest

    def fetch(self, bank: str, version: str, blocks: list[tuple[int, int]],
              manifest: Manifest, *, out: dict | None = None, timeout_s: float | None = None,
              on_call=None, encoding: str = "") -> dict[tuple[int, int], bytearray]:
        """Fetch `blocks` [(level, node), ...] of bank/version in one RPC, verified.

        `manifest` must be the manifest of that version (its checksums are what is trusted);
        an empty `version` means the manifest's version.
        `out` (optional) maps (level, node) to a writable buffer of the block's size (a
        bytearray, a memoryview, a numpy/torch uint8 view, ...) or a Scatter of pieces
        (services/model_client/bank.py): chunks are copied straight into
        it and it is what is returned, so a caller that reuses buffers allocates nothing. On an
        error the content of those buffers is undefined (never verified).
        `timeout_s` overrides the client's deadline for this call; `on_call(call)` is given the
        grpc call before the first chunk is read, so another thread can `call.cancel()` it (the
        sharded fetcher cancels the losing replica of a hedged request; this fetch then raises
        BankError CANCELLED).
        `encoding`: "" (or "native") for the bank dtype, "int8" for the int8 payloads (their
        size: manifest.block_nbytes(level, "int8")).
        """
        version = version or manifest.version
        if bank != manifest.bank or version != manifest.version:
            raise ValueError(f"manifest is {manifest.bank}/{manifest.version}, "
                             f"not {bank}/{version}")
        encoding = quant.normalize(encoding)
        ids = [(int(level), int(node)) for level, node in blocks]
        try:
            check_fetch(manifest, ids, encoding)
        except FetchError as e:
            raise BankError(e.code, e.message) from None
        request = bank_pb2.FetchBlocksRequest(
            bank=bank, version=version, encoding=encoding,
            blocks=[bank_pb2.BlockId(level=l, node=n) for l, n in ids])

        bufs: list = [None] * len(ids)
        received = [0] * len(ids)
        # hashed chunk by chunk as they arrive (while grpc receives the next one), so the
        # checksum is not a pass over the whole block after the last chunk
        hashers: list = [None] * len(ids)
        try:
            call = self._fetch_blocks(request, timeout=self.timeout_s if timeout_s is None
                                      else timeout_s, **self._call_kw)
            if on_call is not None:
                on_call(call)
            for chunk in call:
                self._take_chunk(chunk, ids, bufs, received, manifest, out, hashers, encoding)
        except grpc.RpcError as e:
            raise _bank_error(e) from None

        result: dict[tuple[int, int], bytearray] = {}
        for i, (level, node) in enumerate(ids):
            buf = bufs[i]
            if buf is None or received[i] != len(buf):
                got = 0 if buf is None else received[i]
                raise BlockIntegrityError(f"block ({level}, {node}) incomplete: {got} of "
                                          f"{manifest.block_nbytes(level, encoding)} bytes")
            algo, want = manifest.block_check(level, node, encoding)
            if hashers[i].hexdigest() != want:
                raise BlockIntegrityError(f"block ({level}, {node}) fails its manifest {algo} "
                                          f"hash")
            result[(level, node)] = buf.result
        return result

    def route(self, bank: str, embedding,
              version: str = "") -> tuple[list[int], list[tuple[int, int]], str]:
        """Server-side routing (for clients without the router): (path, blocks, version)."""
        request = bank_pb2.RouteRequest(bank=bank, version=version,
                                        embedding=[float(x) for x in embedding])
        try:
            resp = self._route(request, timeout=self.timeout_s, **self._call_kw)
        except grpc.RpcError as e:
            raise _bank_error(e) from None
        return list(resp.path), [(b.level, b.node) for b in resp.blocks], resp.version

    def health(self, timeout_s: float = 1.0) -> bool:
        """True when the server answers SERVING for the bank service."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=_SERVICE),
                                      timeout=timeout_s)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    # -- reassembly -------------------------------------------------------------------------
    @staticmethod
    def _take_chunk(chunk, ids: list[tuple[int, int]], bufs: list, received: list[int],
                    manifest: Manifest, out: dict | None = None,
                    hashers: list | None = None, encoding: str = "") -> None:
        """Copy one chunk into its block's buffer, checking it fits what was asked for.

        `chunk` is the BlockChunk's wire bytes (parsed without copying the body) or a parsed
        BlockChunk message.
        """
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            try:
                i, h, start, data = wire.parse_chunk(chunk)
            except wire.ChunkFormatError as e:
                raise BlockIntegrityError(f"malformed chunk: {e}") from None
        else:
            i, start, data = chunk.index, chunk.offset, chunk.data
            h = chunk.header if chunk.HasField("header") else None
        if i >= len(ids):
            raise BlockIntegrityError(f"chunk for block index {i}, only {len(ids)} requested")
        level, node = ids[i]
        if h is not None:
            if bufs[i] is not None:
                raise BlockIntegrityError(f"block ({level}, {node}): second header")
            # every id passed check_fetch (fetch), so the manifest has a header for it
            want = manifest.block_header(level, node, encoding)
            nbytes = want.nbytes
            got = (h.level, h.node, h.version, h.checksum, h.nbytes, h.dtype, tuple(h.shape))
            if got != want:
                raise BlockIntegrityError(f"block ({level}, {node}) header {got} does not match "
                                          f"the manifest {tuple(want)}")
            dest = None if out is None else out.get((level, node))
            # the caller's buffer / Scatter, else one new buffer; chunks are copied into it
            bufs[i] = destination(dest, nbytes, (level, node))
            if hashers is not None:
                # the signed digest's algorithm, or xxh3 for a manifest without digests
                hashers[i] = hasher(manifest.block_check(level, node, encoding)[0])
        buf = bufs[i]
        if buf is None:
            raise BlockIntegrityError(f"block ({level}, {node}): data before its header")
        # chunks of a block arrive in order on one stream: each must start where the last ended
        n = len(data)
        if start != received[i] or start + n > len(buf):
            raise BlockIntegrityError(f"block ({level}, {node}): chunk at offset {start} with "
                                      f"{n} bytes does not follow byte {received[i]} "
                                      f"of {len(buf)}")
        buf.write(start, data)
        if hashers is not None:
            hashers[i].update(data)
        received[i] += n

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "BankClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bank_error(e: grpc.RpcError) -> BankError:
    """The RpcError as a BankError with its status name (the only place grpc's codes are read)."""
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return BankError(code.name if code is not None else "UNKNOWN", details or "")
