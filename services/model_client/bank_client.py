"""BankClient: the device's synchronous gRPC client for a bank server.

    with BankClient("127.0.0.1:50051") as client:
        manifest = client.get_manifest("demo")                  # current version
        blocks = client.fetch("demo", manifest.version, manifest.path_blocks(path), manifest)
        # blocks[(level, node)] is a bytearray in block format (membank/blocks.py)

`fetch` asks for every block in ONE FetchBlocks call and reassembles the streamed chunks into
one preallocated bytearray per block. A block is returned only when it is complete, its header
agrees with the manifest, and its bytes hash to the MANIFEST's checksum (the header's checksum
comes from the same server as the bytes, so it proves nothing on its own). Anything else raises
BlockIntegrityError; server statuses raise BankError with the gRPC code.
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from membank import wire
from membank.blocks import checksum
from membank.manifest import Manifest
from membank.v1 import bank_pb2

_SERVICE = "membank.v1.BankService"


class BankError(Exception):
    """A bank RPC failed; `code` is the grpc.StatusCode, `message` the server's details."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class BlockIntegrityError(BankError):
    """A received block is incomplete, inconsistent, or fails its manifest checksum."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.DATA_LOSS, message)


class BankClient:
    def __init__(self, target: str, timeout_s: float = 10.0, *,
                 max_receive_bytes: int = wire.CHUNK_BYTES + (64 << 10)):
        """`max_receive_bytes` bounds one message: a chunk (1 MiB + header) or a manifest."""
        self.target = target
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_receive_bytes),
        ])
        self._get_manifest = self.channel.unary_unary(
            f"/{_SERVICE}/GetManifest",
            request_serializer=bank_pb2.GetManifestRequest.SerializeToString,
            response_deserializer=bank_pb2.GetManifestResponse.FromString,
        )
        self._fetch_blocks = self.channel.unary_stream(
            f"/{_SERVICE}/FetchBlocks",
            request_serializer=bank_pb2.FetchBlocksRequest.SerializeToString,
            response_deserializer=bank_pb2.BlockChunk.FromString,
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)

    # -- RPCs -------------------------------------------------------------------------------
    def get_manifest(self, bank: str, version: str = "") -> Manifest:
        """The manifest of `bank` at `version` ("" = the currently published version)."""
        try:
            resp = self._get_manifest(bank_pb2.GetManifestRequest(bank=bank, version=version),
                                      timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _bank_error(e) from None
        manifest = Manifest.from_json(resp.manifest_json)
        if manifest.bank != bank or (version and manifest.version != version):
            raise BankError(grpc.StatusCode.INTERNAL,
                            f"asked for {bank}/{version or 'current'}, got "
                            f"{manifest.bank}/{manifest.version}")
        return manifest

    def fetch(self, bank: str, version: str, blocks: list[tuple[int, int]],
              manifest: Manifest) -> dict[tuple[int, int], bytearray]:
        """Fetch `blocks` [(level, node), ...] of bank/version in one RPC, verified.

        `manifest` must be the manifest of that version (its checksums are what is trusted);
        an empty `version` means the manifest's version.
        """
        version = version or manifest.version
        if bank != manifest.bank or version != manifest.version:
            raise ValueError(f"manifest is {manifest.bank}/{manifest.version}, "
                             f"not {bank}/{version}")
        ids = [(int(level), int(node)) for level, node in blocks]
        request = bank_pb2.FetchBlocksRequest(
            bank=bank, version=version,
            blocks=[bank_pb2.BlockId(level=l, node=n) for l, n in ids])

        bufs: list[bytearray | None] = [None] * len(ids)
        received = [0] * len(ids)
        try:
            for chunk in self._fetch_blocks(request, timeout=self.timeout_s):
                self._take_chunk(chunk, ids, bufs, received, manifest)
        except grpc.RpcError as e:
            raise _bank_error(e) from None

        out: dict[tuple[int, int], bytearray] = {}
        for i, (level, node) in enumerate(ids):
            buf = bufs[i]
            if buf is None or received[i] != len(buf):
                got = 0 if buf is None else received[i]
                raise BlockIntegrityError(f"block ({level}, {node}) incomplete: {got} of "
                                          f"{manifest.block_nbytes(level)} bytes")
            if checksum(buf) != manifest.checksum(level, node):
                raise BlockIntegrityError(f"block ({level}, {node}) fails its manifest checksum")
            out[(level, node)] = buf
        return out

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
    def _take_chunk(chunk: bank_pb2.BlockChunk, ids: list[tuple[int, int]],
                    bufs: list[bytearray | None], received: list[int], manifest: Manifest) -> None:
        """Copy one chunk into its block's buffer, checking it fits what was asked for."""
        i = chunk.index
        if i >= len(ids):
            raise BlockIntegrityError(f"chunk for block index {i}, only {len(ids)} requested")
        level, node = ids[i]
        if chunk.HasField("header"):
            if bufs[i] is not None:
                raise BlockIntegrityError(f"block ({level}, {node}): second header")
            h = chunk.header
            if not manifest.has_block(level, node):
                raise BlockIntegrityError(f"server sent block ({level}, {node}), which the "
                                          f"manifest does not have")
            nbytes = manifest.block_nbytes(level)
            want = ((level, node, manifest.version, manifest.checksum(level, node), nbytes,
                     manifest.dtype, tuple(manifest.block_shape(level))))
            got = (h.level, h.node, h.version, h.checksum, h.nbytes, h.dtype, tuple(h.shape))
            if got != want:
                raise BlockIntegrityError(f"block ({level}, {node}) header {got} does not match "
                                          f"the manifest {want}")
            # the one allocation per block; chunks are copied straight into it
            bufs[i] = bytearray(nbytes)
        buf = bufs[i]
        if buf is None:
            raise BlockIntegrityError(f"block ({level}, {node}): data before its header")
        data = chunk.data  # read the field once: each access may build a new bytes object
        # chunks of a block arrive in order on one stream: each must start where the last ended
        start = chunk.offset
        if start != received[i] or start + len(data) > len(buf):
            raise BlockIntegrityError(f"block ({level}, {node}): chunk at offset {start} with "
                                      f"{len(data)} bytes does not follow byte {received[i]} "
                                      f"of {len(buf)}")
        buf[start:start + len(data)] = data
        received[i] += len(data)

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "BankClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bank_error(e: grpc.RpcError) -> BankError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return BankError(code, details or "")
