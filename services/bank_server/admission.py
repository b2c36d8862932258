"""Admission control for gRPC: who may hold how many RPC slots at once (issue 16, point 1).

    admission = Admission(max_rpcs=256, max_rpcs_per_peer=64, max_watches=64,
                          max_watches_per_peer=2)
    release = admission.acquire("rpc", "10.0.0.7")   # None: refused (admission.refusal(...))
    ...
    release()

Why not grpc's own `maximum_concurrent_rpcs`: it counts every RPC, health checks included, so
one client holding the slots (never-ending `Health/Watch` streams, a fetch that never reads)
made `Health.Check` answer RESOURCE_EXHAUSTED and the liveness probe restart the pod. Here:
  - "rpc" slots: every RPC except health, at most `max_rpcs` in all and `max_rpcs_per_peer` per
    client IP, so one client can never take all of them;
  - "watch" slots: `Health/Watch` streams (they never end by themselves), at most `max_watches`
    in all and `max_watches_per_peer` per client IP;
  - `Health/Check` takes no slot at all: it always answers (the probe's view of the server).
A slot is held until the RPC's handler returns, including a FetchBlocks stream parked after a
stall while its final status waits for the client (servicer.py), so a client that stops reading
keeps using its own slots, never anybody else's.

The interceptor (security.py) calls it on the event loop only: no lock.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Literal

Kind = Literal["rpc", "watch"]


class Admission:
    def __init__(self, *, max_rpcs: int | None, max_rpcs_per_peer: int | None,
                 max_watches: int, max_watches_per_peer: int):
        self.limits = {"rpc": (max_rpcs, max_rpcs_per_peer),
                       "watch": (max_watches, max_watches_per_peer)}
        self.total: Counter[str] = Counter()            # kind -> slots held
        self.held: dict[str, Counter[str]] = {"rpc": Counter(), "watch": Counter()}

    def acquire(self, kind: Kind, peer: str) -> Callable[[], None] | None:
        """A slot of `kind` for `peer`: its release function, or None when a limit is reached."""
        total, per_peer = self.limits[kind]
        held = self.held[kind]
        if total is not None and self.total[kind] >= total:
            return None
        if per_peer is not None and held[peer] >= per_peer:
            return None
        self.total[kind] += 1
        held[peer] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total[kind] -= 1
            held[peer] -= 1
            if held[peer] <= 0:
                del held[peer]        # the map holds only peers with slots: bounded by them
        return release

    def refusal(self, kind: Kind, peer: str) -> str:
        """The one-line RESOURCE_EXHAUSTED message for a refused `acquire(kind, peer)`."""
        total, per_peer = self.limits[kind]
        what = "concurrent RPCs" if kind == "rpc" else "Health/Watch streams"
        if per_peer is not None and self.held[kind][peer] >= per_peer:
            return f"too many {what} from this client (at most {per_peer} per client)"
        return f"too many {what} on this server (at most {total}); retry later"

    def stats(self) -> dict:
        return {kind: {"held": self.total[kind], "peers": len(self.held[kind])}
                for kind in self.limits}
