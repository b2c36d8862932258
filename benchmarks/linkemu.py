"""Emulated device links: a network namespace behind a rate-limited veth pair, plus a delay relay.

    with Link(rtt_ms=20, rate_mbit=100) as link:          # needs root and `ip netns`
        target = link.forward("127.0.0.1:50051")           # "198.18.x.1:PORT", dialled from inside
        link.run([sys.executable, "device.py", "--bank", target])   # runs inside the namespace
        print(link.validate())                             # measured RTT / throughput vs configured

    .venv/bin/python -m benchmarks.linkemu check --rtt-ms 80 --rate-mbit 20   # validate one link
    .venv/bin/python -m benchmarks.linkemu cleanup                            # stale namespaces

Why this shape: netem does not work in this kernel, tbf and htb do. So the link is built from
  - a namespace `membank-link-<pid>-<n>` (the "device") joined to the default namespace (the
    "bank side") by a veth pair with a /30 from 198.18.0.0/15 (RFC 2544's benchmarking range:
    never routed anywhere, traffic stays on this machine);
  - tbf on BOTH veth ends: each end shapes its egress, so the host end limits bank -> device
    (downlink) and the namespace end device -> bank (uplink), each at `rate_mbit` (tbf counts
    whole frames: TCP payload reaches about 95% of it);
  - a user-space TCP relay (testkit.net.Relay) in the default namespace, listening on the host
    veth address: every byte the device sends crosses the shaped veth, waits in the relay, and
    goes on over loopback to the upstream (the bank server); answers come back the same way.
    Each direction
    holds a chunk until `arrival + rtt/2` and then sends it: order and throughput are preserved
    (a reader thread timestamps, a writer thread releases; never one sleep per chunk in line).
The relay splits the TCP connection (as a proxy does): the device's TCP sees the RTT only in
what the application waits for (requests, HTTP/2 window updates), not in its own slow start.
Teardown (exit, error, Ctrl-C, atexit) stops the relays, kills what still runs inside the
namespace, and deletes it (which deletes both veth ends). `cleanup_stale()` removes namespaces
left by a process that no longer exists (kill -9).
"""
from __future__ import annotations

import argparse
import atexit
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from testkit.net import Relay

NS_PREFIX = "membank-link-"
IF_PREFIX = "mbl"                          # interface names: at most 15 characters
NET = ipaddress.ip_network("198.18.0.0/15")
_counter = itertools.count()
_live: set["Link"] = set()


class LinkUnavailable(RuntimeError):
    """This process cannot build links (not root, no `ip`/`tc`, namespaces not permitted)."""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.returncode}")
    return out


def unavailable_reason() -> str | None:
    """Why links cannot be built here, or None when they can (tries a namespace for real)."""
    if os.geteuid() != 0:
        return "emulated links need root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"`{tool}` is not installed"
    name = f"{NS_PREFIX}probe-{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if out.returncode != 0:
        return f"`ip netns add` failed: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = NS_PREFIX) -> list[str]:
    """Delete namespaces (and their veth pairs) named `prefix<pid>-<n>` whose pid is gone, and
    host veth ends `mbl<pid>n<n>h` left without a namespace; returns what was removed."""
    removed = []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(prefix) + r"(\d+)-\d+", name)
        if m and not _alive(int(m.group(1))):
            _kill_inside(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for m in re.finditer(rf"^\d+: ({IF_PREFIX}(\d+)n\d+h)[@:]", links, re.M):
        if not _alive(int(m.group(2))):
            subprocess.run(["ip", "link", "del", m.group(1)], capture_output=True)
            removed.append(m.group(1))
    return removed


def _kill_inside(ns: str) -> None:
    """SIGKILL the processes still inside namespace `ns` (ours: we started them there)."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of NET not assigned on any interface of the default namespace."""
    used = set(re.findall(r"inet (198\.1[89]\.\d+\.\d+)/",
                          subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True,
                                         text=True).stdout))
    n_subnets = NET.num_addresses // 4
    start = (os.getpid() * 7919 + next(_counter) * 104729) % n_subnets
    for i in range(n_subnets):
        net = ipaddress.ip_network((int(NET.network_address) + 4 * ((start + i) % n_subnets), 30))
        if str(net[1]) not in used:
            return net
    raise RuntimeError("no free /30 left in 198.18.0.0/15")


# -- the link ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkSpec:
    rtt_ms: float
    rate_mbit: float

    @property
    def label(self) -> str:
        return f"{self.rtt_ms:g}ms/{self.rate_mbit:g}Mbit"

    @classmethod
    def parse(cls, text: str) -> "LinkSpec":
        """"20/100" or "20ms/100Mbit" -> LinkSpec(20, 100)."""
        m = re.fullmatch(r"\s*([\d.]+)\s*(?:ms)?\s*/\s*([\d.]+)\s*(?:mbit)?\s*", text, re.I)
        if not m:
            raise ValueError(f"link {text!r}: expected RTT_MS/RATE_MBIT, e.g. 20/100")
        return cls(float(m.group(1)), float(m.group(2)))


class Link:
    """A device namespace behind an emulated link (see the module docstring)."""

    def __init__(self, rtt_ms: float, rate_mbit: float, *, queue_ms: float = 200.0):
        if rtt_ms < 0 or rate_mbit <= 0:
            raise ValueError(f"link needs rtt_ms >= 0 and rate_mbit > 0, got {rtt_ms}, {rate_mbit}")
        self.spec = LinkSpec(rtt_ms, rate_mbit)
        self.queue_ms = queue_ms
        n = next(_counter)
        self.ns = f"{NS_PREFIX}{os.getpid()}-{n}"
        self.host_if, self.dev_if = (f"{IF_PREFIX}{os.getpid()}n{n}h",
                                     f"{IF_PREFIX}{os.getpid()}n{n}d")
        self.relays: list[Relay] = []
        self.host_ip = self.dev_ip = ""
        self._up = False

    # -- lifecycle --
    def __enter__(self) -> "Link":
        reason = unavailable_reason()
        if reason:
            raise LinkUnavailable(reason)
        cleanup_stale()
        _live.add(self)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        net = _free_subnet()
        self.host_ip, self.dev_ip = str(net[1]), str(net[2])
        _ip("ip", "netns", "add", self.ns)
        self._up = True
        _ip("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.dev_if)
        _ip("ip", "link", "set", self.dev_if, "netns", self.ns)
        _ip("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("ip", "link", "set", self.host_if, "up")
        _ip("ip", "addr", "add", f"{self.dev_ip}/30", "dev", self.dev_if, ns=self.ns)
        _ip("ip", "link", "set", self.dev_if, "up", ns=self.ns)
        _ip("ip", "link", "set", "lo", "up", ns=self.ns)
        # tbf: the bucket must hold at least one (GSO) frame and a timer tick's worth of bytes;
        # the queue holds `queue_ms` at the rate before dropping (a modem's buffer)
        rate_bps = self.spec.rate_mbit * 1e6
        burst = max(64 << 10, int(rate_bps / 8 / 250))
        limit = max(2 * burst, int(rate_bps / 8 * self.queue_ms / 1e3))
        for dev, ns in ((self.host_if, None), (self.dev_if, self.ns)):
            _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                f"{self.spec.rate_mbit}mbit", "burst", str(burst), "limit", str(limit), ns=ns)

    def close(self) -> None:
        """Stop the relays, kill what still runs inside, delete the namespace (idempotent)."""
        for r in self.relays:
            r.close()
        self.relays = []
        if self._up:
            _kill_inside(self.ns)
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
            self._up = False
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)  # if half-built
        _live.discard(self)

    # -- use --
    def forward(self, upstream: str) -> str:
        """Relay the device's connections to `upstream` ("host:port" in the default namespace)
        with the link's delay; returns the address to dial from inside the namespace."""
        relay = Relay(upstream, listen_host=self.host_ip, delay_s=self.spec.rtt_ms / 2e3,
                      chunk_bytes=1 << 18)
        self.relays.append(relay)
        return relay.address

    def argv(self, argv: list[str]) -> list[str]:
        """`argv` run inside the device namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(argv), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kw)

    def exists(self) -> bool:
        return self.ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                         text=True).stdout.split()

    def validate(self, pings: int = 20, bulk_bytes: int | None = None,
                 timeout: float = 120.0) -> dict:
        """Measure the link from inside: TCP ping-pong RTT (64 B each way, p50 over `pings`) and
        downlink / uplink throughput (a bulk transfer, 2 s at the configured rate by default),
        side by side with the configured figures."""
        bulk = bulk_bytes or int(self.spec.rate_mbit * 1e6 / 8 * 2)
        with ProbeServer() as server:
            target = self.forward(server.address)
            out = self.run([sys.executable, "-m", "benchmarks.linkemu", "probe", "--target",
                            target, "--pings", str(pings), "--bulk-bytes", str(bulk)],
                           capture_output=True, text=True, timeout=timeout,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if out.returncode != 0:
            raise RuntimeError(f"link probe failed: {out.stderr.strip()[-500:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        return {"link": self.spec.label, "rtt_ms_configured": self.spec.rtt_ms,
                "rtt_ms_measured": round(got["rtt_ms_p50"], 2),
                "rtt_ms_min": round(got["rtt_ms_min"], 2),
                "rate_mbit_configured": self.spec.rate_mbit,
                "down_mbit_measured": round(got["down_mbit"], 2),
                "up_mbit_measured": round(got["up_mbit"], 2), "bulk_bytes": bulk}


@atexit.register
def _close_all() -> None:
    for link in list(_live):
        link.close()


# -- probe: a server in the default namespace and a client inside the link --------------------
# one request: 1 byte op + 8 bytes n. "P": echo n bytes; "D": server sends n bytes (downlink);
# "U": client sends n bytes, server answers one byte when all arrived (uplink)
_HDR = struct.Struct("!cQ")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


class ProbeServer:
    """Echo / bulk server on loopback for `Link.validate` and the tests."""

    def __init__(self, host: str = "127.0.0.1"):
        self.listener = socket.create_server((host, 0))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = bytes(1 << 20)
        try:
            while True:
                op, n = _HDR.unpack(_recv_exact(conn, _HDR.size))
                if op == b"P":
                    conn.sendall(_recv_exact(conn, n))
                elif op == b"D":
                    while n > 0:
                        conn.sendall(payload[:min(n, len(payload))])
                        n -= min(n, len(payload))
                elif op == b"U":
                    while n > 0:
                        chunk = conn.recv(min(n, 1 << 20))
                        if not chunk:
                            raise ConnectionError("peer closed")
                        n -= len(chunk)
                    conn.sendall(b"k")
        except (OSError, ConnectionError, struct.error):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()

    def __enter__(self) -> "ProbeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe(target: str, pings: int, bulk_bytes: int) -> dict:
    """Client side: RTT samples and throughput both ways (payload bits / seconds; the downlink
    clock starts at the first byte received, so the request's own round trip is not counted)."""
    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    rtts = []
    for _ in range(pings):
        t0 = time.perf_counter()
        s.sendall(_HDR.pack(b"P", len(msg)) + msg)
        _recv_exact(s, len(msg))
        rtts.append((time.perf_counter() - t0) * 1e3)
    s.sendall(_HDR.pack(b"D", bulk_bytes))
    first = s.recv(1 << 20)
    t0, got = time.perf_counter(), len(first)
    while got < bulk_bytes:
        got += len(s.recv(1 << 20))
    down = (bulk_bytes - len(first)) * 8 / (time.perf_counter() - t0) / 1e6
    chunk = bytes(1 << 16)
    t0 = time.perf_counter()
    s.sendall(_HDR.pack(b"U", bulk_bytes))
    left = bulk_bytes
    while left > 0:
        s.sendall(chunk[:min(left, len(chunk))])
        left -= min(left, len(chunk))
    _recv_exact(s, 1)
    # the ack comes back after the last byte arrived (+ one delay back): count half an RTT less
    up_s = time.perf_counter() - t0 - statistics.median(rtts) / 2e3
    s.close()
    return {"rtt_ms_p50": statistics.median(rtts), "rtt_ms_min": min(rtts),
            "down_mbit": down, "up_mbit": bulk_bytes * 8 / max(up_s, 1e-9) / 1e6}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="build a link, measure it, tear it down")
    c.add_argument("--rtt-ms", type=float, default=20.0)
    c.add_argument("--rate-mbit", type=float, default=100.0)
    c.add_argument("--pings", type=int, default=20)
    sub.add_parser("cleanup", help="delete namespaces left by dead processes")
    p = sub.add_parser("probe", help="(internal) the client side of `check`, run inside a link")
    p.add_argument("--target", required=True)
    p.add_argument("--pings", type=int, default=20)
    p.add_argument("--bulk-bytes", type=int, default=1 << 22)
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        print(json.dumps(probe(args.target, args.pings, args.bulk_bytes)))
    elif args.cmd == "cleanup":
        print(json.dumps({"removed": cleanup_stale()}))
    else:
        with Link(args.rtt_ms, args.rate_mbit) as link:
            print(json.dumps(link.validate(pings=args.pings)))


if __name__ == "__main__":
    main()
