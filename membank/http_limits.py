"""Per-connection limits for the two uvicorn (h11) servers: the bank server's admin HTTP API and
the device's HTTP API. Torch-free and server-free, so both floors above can use it.

uvicorn bounds neither how many connections one peer holds nor how long a request may take to
arrive (its keep-alive timeout runs only between requests, and stops at the first byte), so a
client sending its headers or body a byte a second holds a connection, an fd and a task for as
long as it likes, and enough of them hold every fd. `ConnectionLimits(...).uvicorn_options()`
gives uvicorn an `http=` protocol (H11Protocol underneath) that

  - refuses a connection over `max_connections` in all, or over `max_per_peer` from one IP:
    `503` with `Retry-After`, `Connection: close`, written at once, nothing read;
  - answers `408` and closes a connection whose request (head and body) is not whole within
    `request_timeout_s` of the server starting to wait for it (the connection opening, or the
    previous response ending); a request already handed to the app (its body still arriving)
    is cut off (the app sees a disconnect);
  - closes a connection whose client takes no response bytes for `send_timeout_s` once the
    write buffer is full (a reader that stopped reading holds nothing for long);
  - caps a request head at `max_header_bytes` (h11's own limit: 400 beyond it).
`BodyLimit` (an ASGI middleware) caps a request body: 413, read no further.

One peer is one IP: clients behind one proxy or NAT share a peer's limits.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256
    max_per_peer: int = 32
    request_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    max_header_bytes: int = 16 << 10

    def uvicorn_options(self) -> dict:
        """The keyword arguments of `uvicorn.Config` that put these limits in force."""
        return {"http": limited_h11(self), "h11_max_incomplete_event_size": self.max_header_bytes}


def _plain(status: int, reason: str, text: str, retry_after: int | None = None) -> bytes:
    body = (text + "\n").encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: text/plain; charset=utf-8",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def limited_h11(limits: ConnectionLimits) -> type[H11Protocol]:
    """An H11Protocol class enforcing `limits` (uvicorn builds one instance per connection)."""

    class LimitedH11Protocol(H11Protocol):
        _refused = False
        _request_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            peer = (transport.get_extra_info("peername") or ("?",))[0]
            mine = sum(1 for c in self.connections if getattr(c, "peer", None) == peer)
            if len(self.connections) >= limits.max_connections or mine >= limits.max_per_peer:
                # refused before uvicorn counts it: nothing of it is read or kept
                self._refused, self.transport = True, transport
                which = ("this client" if mine >= limits.max_per_peer else "the server")
                transport.write(_plain(503, "Service Unavailable",
                                       f"too many connections from {which}; retry later", 1))
                transport.close()
                return
            self.peer = peer
            super().connection_made(transport)
            self._arm_request_timer()

        def connection_lost(self, exc) -> None:
            if self._refused:
                return
            self._cancel_timers()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            self._request_whole_check()

        def on_response_complete(self) -> None:
            # the wait for the next request on this connection starts now
            self._arm_request_timer()
            super().on_response_complete()
            self._request_whole_check()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(limits.send_timeout_s, self._stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        # -- timers -------------------------------------------------------------------------
        def _arm_request_timer(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
            self._request_timer = self.loop.call_later(limits.request_timeout_s, self._too_slow)

        def _request_whole_check(self) -> None:
            # their side is DONE once the whole request (head and body) has been read
            if self._request_timer is not None and self.conn.their_state in (h11.DONE,
                                                                             h11.MUST_CLOSE):
                self._request_timer.cancel()
                self._request_timer = None

        def _cancel_timers(self) -> None:
            for timer in (self._request_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            self._request_timer = self._send_timer = None

        def _too_slow(self) -> None:
            self._request_timer = None
            if self.transport.is_closing():
                return
            if self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE:
                # no request reached the app yet: say why before closing
                self.transport.write(_plain(408, "Request Timeout",
                                            f"request not received whole within "
                                            f"{limits.request_timeout_s:g} s"))
            self.transport.close()

        def _stalled(self) -> None:
            self._send_timer = None
            if not self.transport.is_closing():
                self.transport.abort()   # the buffered bytes will never be taken

    return LimitedH11Protocol


# -- request bodies: read whole, up to a cap, before the app sees them -------------------------
class BodyLimit:
    """ASGI middleware: a request body is read here, as it arrives, up to `max_bytes` (a
    declared `Content-Length` over it: 413 at once; more bytes than that arriving: 413 at the
    first one over), then handed to the app from memory. Frameworks read a body whole into
    memory without a limit; this puts one in front of them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        body = await read_body(scope, receive, send, self.max_bytes)
        if body is not None:
            await self.app(scope, replay(body, receive), send)


async def read_body(scope, receive, send, cap: int) -> bytes | None:
    """The whole body, read as it arrives; None once a 413 / 400 (or a disconnect) ended it."""
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                declared = -1
            if declared < 0:
                await refuse(send, 400, "malformed Content-Length")
                return None
            if declared > cap:
                await refuse(send, 413, f"request body over {cap} bytes")
                return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            await refuse(send, 413, f"request body over {cap} bytes")
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """An ASGI `receive` that gives `body` once, then waits on the real one (a disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive_again


async def refuse(send, status: int, detail: str, headers: dict | None = None) -> None:
    """A one-line JSON error (`{"detail": ...}`) that also closes the connection, so a body
    left unread is never read."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
