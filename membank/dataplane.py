"""The block data plane's protocol: frame constants, framing, frame reading, request parsing.

The one copy that both ends speak: the bank server (services/bank_server/dataplane.py) and the
device's client (services/model_client/dataplane_client.py). The wire format is specified in
proto/membank/v1/dataplane.md; everything here is plain Python (json, struct, socket), with no
grpc, protobuf or torch. Errors are `membank.fetch.FetchError` with a gRPC status name: the
server answers them in an X frame, the client turns them into its own errors.

    sock.sendall(frame(REQUEST, {"bank": "demo", "blocks": [[1, 3]]}))
    kind, payload = read_frame(recv_exact)      # recv_exact(n): exactly n bytes, or raise
    req = parse_request(payload)                # the server's side: a typed DataPlaneRequest
Run its tests: .venv/bin/python -m pytest -q tests/unit/test_dataplane_protocol.py
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Callable

from membank.fetch import FetchError

MAGIC = b"MBD1"
PREFIX = struct.Struct(">4scI")          # magic, kind, payload length
REQUEST, HEADER, END, ERROR = b"Q", b"H", b"E", b"X"
MAX_FRAME = 64 << 10                     # a server frame's payload (header / end / error: ~200 B)
_KIND_NAMES = {REQUEST: "request", HEADER: "block header", END: "end", ERROR: "error"}


# -- frames ------------------------------------------------------------------------------------
def frame(kind: bytes, payload: dict | bytes) -> bytes:
    """One frame: prefix + payload (a dict is written as compact JSON, bytes as they are)."""
    body = payload if isinstance(payload, bytes) else \
        json.dumps(payload, separators=(",", ":")).encode()
    return PREFIX.pack(MAGIC, kind, len(body)) + body


def parse_prefix(buf, max_bytes: int = MAX_FRAME, *, kind: bytes | None = None,
                 offset: int = 0) -> tuple[bytes, int]:
    """(kind, payload length) of the prefix at `buf[offset:]`. FetchError INVALID_ARGUMENT for
    a bad magic or (with `kind`) another kind of frame, RESOURCE_EXHAUSTED for a payload over
    `max_bytes`: checked in that order, before a payload byte is read."""
    magic, got, n = PREFIX.unpack_from(buf, offset)
    if magic != MAGIC:
        raise FetchError("INVALID_ARGUMENT", f"not a membank data plane frame (magic "
                                             f"{bytes(magic)!r}, expected {MAGIC!r})")
    if kind is not None and got != kind:
        raise FetchError("INVALID_ARGUMENT", f"frame kind {bytes(got)!r} is not a "
                                             f"{_KIND_NAMES.get(kind, repr(kind))}")
    if n > max_bytes:
        raise FetchError("RESOURCE_EXHAUSTED", f"frame of {n} bytes, at most {max_bytes}")
    return got, n


def read_frame(recv_exact: Callable[[int], bytes],
               max_bytes: int = MAX_FRAME) -> tuple[bytes, bytes]:
    """The next frame, (kind, payload), read with `recv_exact(n)` (exactly n bytes, or an
    exception); a block body after an H frame is left for the caller to receive."""
    kind, n = parse_prefix(recv_exact(PREFIX.size), max_bytes)
    return kind, recv_exact(n)


# -- the request -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataPlaneRequest:
    bank: str
    version: str                         # "" = the current version
    blocks: tuple[tuple[int, int], ...]  # (level, node), in request order
    encoding: str                        # "" = native; the server checks the name
    token: str | None
    deadline_ms: float | None


def parse_request(payload: bytes) -> DataPlaneRequest:
    """A request frame's JSON, type-checked; FetchError INVALID_ARGUMENT when malformed."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError and JSONDecodeError too
        raise FetchError("INVALID_ARGUMENT", f"malformed request: not JSON "
                                             f"({type(e).__name__})") from None
    if type(obj) is not dict:
        raise FetchError("INVALID_ARGUMENT", "malformed request: a JSON object expected")
    # one pass of exact type tests (JSON makes only these types; bool is not an int here):
    # this runs for every request, so it stays flat; _field_error names the first bad field
    get = obj.get
    bank, version, encoding = get("bank", ""), get("version", ""), get("encoding", "")
    token, deadline_ms, raw = get("token"), get("deadline_ms"), get("blocks", [])
    if not (type(bank) is str and type(version) is str and type(encoding) is str
            and (token is None or type(token) is str)
            and (deadline_ms is None or type(deadline_ms) in _NUMBER)
            and type(raw) is list):
        raise _field_error(obj)
    # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 key, log line or token
    # comparison can encode: refuse them here (bank and encoding are checked by name later, but
    # one rule for every string field is simpler to trust)
    if not (_utf8(bank) and _utf8(version) and _utf8(encoding)
            and (token is None or _utf8(token))):
        name = next(n for n, v in (("bank", bank), ("version", version), ("encoding", encoding),
                                   ("token", token)) if v is not None and not _utf8(v))
        raise FetchError("INVALID_ARGUMENT", f"malformed request: {name!r} is not valid "
                                             f"Unicode (a lone surrogate)")
    if type(deadline_ms) is int:    # JSON ints are unbounded: clamp before any float math
        deadline_ms = float(max(-_MAX_DEADLINE_MS, min(deadline_ms, _MAX_DEADLINE_MS)))
    if deadline_ms is not None and math.isnan(deadline_ms):
        raise FetchError("INVALID_ARGUMENT", "malformed request: 'deadline_ms' is NaN")
    for b in raw:
        if type(b) is not list or len(b) != 2 or type(b[0]) is not int or type(b[1]) is not int:
            raise FetchError("INVALID_ARGUMENT", "malformed request: 'blocks' must be a list of "
                                                 "[level, node] integer pairs")
    return DataPlaneRequest(bank, version, tuple((b[0], b[1]) for b in raw), encoding, token,
                            deadline_ms)


_NUMBER = (int, float)
_MAX_DEADLINE_MS = 10 ** 12            # ~31 years: any longer deadline means none
_FIELDS = (("bank", (str,), "a string"), ("version", (str,), "a string"),
           ("encoding", (str,), "a string"), ("token", (str, type(None)), "a string"),
           ("deadline_ms", (int, float, type(None)), "a number"), ("blocks", (list,), "a list"))


def _utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (False: it holds a lone surrogate)."""
    if text.isascii():              # the usual case, without building the bytes
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _field_error(obj: dict) -> FetchError:
    """The error for the first field (in _FIELDS order) of the wrong type."""
    for name, kinds, what in _FIELDS:
        if name in obj and type(obj[name]) not in kinds:
            return FetchError("INVALID_ARGUMENT", f"malformed request: {name!r} must be {what}")
    raise AssertionError("no field of the wrong type")


# -- socket helpers both ends use --------------------------------------------------------------
def timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO; at least 1 ms (0 would mean none)."""
    seconds = max(seconds, 0.001)
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


def close_quietly(sock) -> None:
    """Close a socket, ignoring the errors of one already gone."""
    try:
        sock.close()
    except OSError:
        pass
