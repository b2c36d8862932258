"""One generation at a time on the device, shared fairly between peers, with bounded waiting.

The model holds shared state (the attached memory, one KV cache per generation), so
generations run one at a time. A plain FIFO lock lets one peer that queues many requests make
every other peer wait behind all of them; this gate serves peers in turn instead (round robin:
each peer with a request waiting gets one generation per round, in the order the peers first
came), and bounds the wait:

    gate = GenerationGate(max_waiting=32, max_per_peer=8, max_wait_s=30)
    await gate.acquire(peer)      # GateBusy(status, detail, retry_after) when it cannot wait
    try: ...generate...
    finally: gate.release(peer)

  - a peer (an IP) with `max_per_peer` requests waiting or running: 429;
  - `max_waiting` requests waiting in all: 503;
  - waiting longer than `max_wait_s`: 503.
All on one event loop (no locking needed).
"""
from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque


class GateBusy(Exception):
    def __init__(self, status: int, detail: str, retry_after: int = 1):
        super().__init__(detail)
        self.status, self.detail, self.retry_after = status, detail, retry_after


class GenerationGate:
    def __init__(self, *, max_waiting: int, max_per_peer: int, max_wait_s: float):
        self.max_waiting, self.max_per_peer, self.max_wait_s = (max_waiting, max_per_peer,
                                                                max_wait_s)
        self.holder: str | None = None
        self._queues: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()  # turn order
        self._count: Counter[str] = Counter()   # per peer: waiting + running
        self.waiting = 0

    @property
    def busy(self) -> bool:
        return self.holder is not None

    async def acquire(self, peer: str) -> None:
        if self._count[peer] >= self.max_per_peer:
            raise GateBusy(429, f"this client already has {self._count[peer]} requests waiting "
                                f"or running (at most {self.max_per_peer})")
        if self.holder is None and not self.waiting:
            self.holder = peer
            self._count[peer] += 1
            return
        if self.waiting >= self.max_waiting:
            raise GateBusy(503, f"busy: {self.waiting} requests are waiting already")
        fut = asyncio.get_running_loop().create_future()
        self._queues.setdefault(peer, deque()).append(fut)
        self.waiting += 1
        self._count[peer] += 1
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.max_wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self.release(peer)        # granted at the last moment: pass the turn on
            else:
                self._drop(peer, fut)     # gave up waiting: out of the queue
            if isinstance(e, asyncio.TimeoutError):
                raise GateBusy(503, f"busy: no turn within {self.max_wait_s:g} s",
                               max(1, round(self.max_wait_s))) from None
            raise

    def release(self, peer: str) -> None:
        self._count[peer] -= 1
        if self._count[peer] <= 0:
            del self._count[peer]
        self.holder = None
        while self._queues:
            turn, queue = next(iter(self._queues.items()))
            fut = queue.popleft()
            if queue:
                self._queues.move_to_end(turn)   # its next request waits for the others' turns
            else:
                del self._queues[turn]
            self.waiting -= 1
            self.holder = turn
            fut.set_result(None)
            return

    def _drop(self, peer: str, fut: asyncio.Future) -> None:
        queue = self._queues.get(peer)
        if queue is not None and fut in queue:
            queue.remove(fut)
            if not queue:
                del self._queues[peer]
            self.waiting -= 1
        self._count[peer] -= 1
        if self._count[peer] <= 0:
            del self._count[peer]
