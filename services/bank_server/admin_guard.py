"""Admission to the admin HTTP API: who may make a request, and how much body it may send.

An ASGI middleware in front of the FastAPI app (admin.py), so that it decides from the request
head alone, before any route runs: FastAPI reads and parses a body before it solves a route's
dependencies, so a token check written as a dependency would let anyone make the server read
and parse an unbounded body (and answer 422, not 401, to bad JSON without a token).

    app = AdminGuard(fastapi_app, auth_token="r", admin_token="a",
                     failures=AuthFailures(rate=1, burst=10), max_body_bytes=16 << 10)

Access by route (secure by default: a route not named here needs the read token):
  - open: /healthz, /metrics, /docs, /openapi.json (probes, scrapers, the API's description);
  - /readyz: open, but only `{"ready": ...}` without a valid read token while read auth is
    on (the details name banks and versions); a token given must be valid;
  - any method other than GET / HEAD: the admin token (none configured: 403);
  - everything else: the read token when one is configured (the admin token is accepted too).
Missing token -> 401, wrong -> 403, both with `Connection: close` and the body never read.
Each 401/403 takes a token from the peer's (IP's) bucket in `failures`; while its bucket is
empty, every request of that peer that would need a token answers 429 with `Retry-After`
before its token is looked at, so guessing tokens is rate limited and an empty bucket is no
oracle. Bodies: a declared `Content-Length` over `max_body_bytes` -> 413 at once; otherwise the
body is read here in chunks as it arrives and refused with 413 at the first byte over the cap.
The route then reads the body from memory. `scope["state"]["read_access"]` tells routes whether
the request showed a valid read (or admin) token.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

from membank.http_limits import read_body, refuse, replay
from services.bank_server.security import RateLimiter, token_matches

OPEN_PATHS = frozenset({"/healthz", "/metrics", "/docs", "/docs/oauth2-redirect",
                        "/openapi.json"})
PROBE_PATHS = frozenset({"/readyz"})


class AuthFailures:
    """Failed authentications per peer: a token bucket each (security.RateLimiter), and the
    time until which a peer whose bucket ran dry is refused outright."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000):
        self.limiter = RateLimiter(rate, burst, max_clients=max_clients)
        self.max_clients = max_clients
        self._blocked: OrderedDict[str, float] = OrderedDict()   # peer -> monotonic time
        self._lock = threading.Lock()

    def blocked_for(self, peer: str, now: float | None = None) -> float:
        """Seconds this peer is still refused (0.0: not refused)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            until = self._blocked.get(peer)
            if until is None:
                return 0.0
            if until <= now:
                del self._blocked[peer]
                return 0.0
            return until - now

    def failed(self, peer: str, now: float | None = None) -> float:
        """Count one failure: 0.0 while the peer is within its budget, else the seconds it is
        refused from now on."""
        now = time.monotonic() if now is None else now
        wait = self.limiter.take(f"peer:{peer}", now=now)
        if wait > 0:
            with self._lock:
                self._blocked[peer] = now + wait
                self._blocked.move_to_end(peer)
                while len(self._blocked) > self.max_clients:
                    self._blocked.popitem(last=False)
        return wait


def bearer_token(headers) -> str | None:
    """The token of `Authorization: Bearer TOKEN`; "" when malformed, None when absent."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class AdminGuard:
    def __init__(self, app, *, auth_token: str | None, admin_token: str | None,
                 failures: AuthFailures, max_body_bytes: int):
        self.app = app
        self.auth_token, self.admin_token = auth_token, admin_token
        self.failures, self.max_body_bytes = failures, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        peer = (scope.get("client") or ("?",))[0]
        headers = scope.get("headers") or []
        token = bearer_token(headers)
        state = scope.setdefault("state", {})
        if path in OPEN_PATHS and method in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if path in PROBE_PATHS and method in ("GET", "HEAD") and token is None:
            state["read_access"] = self.auth_token is None
            return await self.app(scope, receive, send)

        blocked = self.failures.blocked_for(peer)
        if blocked > 0:
            return await _too_many(send, blocked)
        admin = method not in ("GET", "HEAD")
        denial = self._denial(token, admin)
        if denial is not None:
            blocked = self.failures.failed(peer)
            if blocked > 0:   # this failure ran the peer's budget dry
                return await _too_many(send, blocked)
            status, detail = denial
            extra = {"www-authenticate": "Bearer"} if status == 401 else {}
            return await refuse(send, status, detail, extra)
        state["read_access"] = True
        if not admin:
            return await self.app(scope, receive, send)

        body = await read_body(scope, receive, send, self.max_body_bytes)
        if body is not None:
            await self.app(scope, replay(body, receive), send)

    def _denial(self, token: str | None, admin: bool) -> tuple[int, str] | None:
        if admin:
            if self.admin_token is None:
                return 403, ("admin operations are disabled on this server "
                             "(no admin token configured)")
            accepted = (self.admin_token,)
        elif self.auth_token is not None:
            accepted = (self.auth_token, self.admin_token)
        else:
            return None
        if not token:
            return 401, "missing `Authorization: Bearer <token>`"
        if not any(token_matches(token, t) for t in accepted):
            return 403, "token not valid for this endpoint"
        return None


async def _too_many(send, blocked: float) -> None:
    await refuse(send, 429, f"too many failed authentications from this client; retry in "
                  f"{blocked:.1f} s", {"retry-after": str(math.ceil(blocked))})
