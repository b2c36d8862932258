"""Abuse (issue 16): one hostile peer against a shard and a device, while devices run a steady
load; what the legitimate clients lose, and what the shard holds.

    .venv/bin/python -m benchmarks.abuse                          # paper block sizes, 20 s + 20 s
    .venv/bin/python -m benchmarks.abuse --quick --blocks tiny     # smoke run (the test's)
    .venv/bin/python -m benchmarks.abuse --attacks dp_slots,slow_readers --phase-s 30

The shard: one real bank server subprocess (services/bank_server/launch.py) serving gRPC, the
data plane and the admin HTTP API, over one LMDB holding two banks: "abuse", a synthetic bank
with the paper's block sizes (`--blocks paper`: benchmarks/paper_scale.py `--scale small`, k 4,
levels of 27.5 / 6.9 / 1.7 MB blocks, 84 blocks; `--blocks tiny`: the same tree with one memory
layer instead of 35, blocks of 0.79 / 0.20 / 0.05 MB), and "test", the bank of a small random
model (testkit/models.py) for the device's HTTP server. Read and admin tokens on, a per-client
rate limit on, the caps small enough to reach from one machine (`--max-concurrent-rpcs`,
`--dataplane-max-connections`); everything else at its default. Shard RSS (VmRSS), open fds and
threads are sampled from /proc/PID every 0.2 s; the table shows each phase's maximum.

Both banks are signed with the test operator's key (testkit/keys.py); the device HTTP server pins
it. Everything runs on loopback without TLS, so the devices send their token in the clear by
explicit permission (`allow_insecure_token`), as a device never does by default.

Legitimate clients, all from 127.0.0.1:
  devices      `--devices` threads, each with the product's device bank (targets.py `open_bank`,
               target GRPC_PORT+DATAPLANE_PORT: manifest over gRPC, block bodies over the data
               plane) doing prompts in a loop: re-read the manifest when older than
               `--manifest-ttl-s` (as MemoryModel does), pick a random root-to-leaf path, fetch
               its blocks (one request, every block verified); every `--device-churn` prompts
               a device starts over with a new client (devices come and go: new connections).
               A prompt fails when anything raises or a block is missing (a device answering
               without memory has failed); fetch p50 / p99 are over the successful fetches.
  device HTTP  the device's HTTP server (services/model_client/http_server.py, the small model,
               its bank on the shard's data plane) asked POST /v1/generate in a loop; a prompt
               fails unless it answers 200 with memory attached.

The attacker, from 127.0.0.2 (each attack a function below, run in its own thread(s); gRPC
goes through a testkit Relay whose upstream side is bound to 127.0.0.2). It holds the read
token, as any device does (a device's token can be extracted), never the admin token:
  1 grpc_watch     `--watch-streams` Health/Watch streams (no token needed) kept open
    grpc_pin       `--pin-fetches` FetchBlocks of 27.5 MB blocks, no deadline, never read
  2 dp_slots       `--dp-junk-conns` data plane connections, each sending a request with a
                   wrong token every 0.5 s (a closed one opened again within 20 ms)
  3 slow_readers   `--slow-readers` data plane fetches of level-1 blocks, each reading 16 bytes
                   every 2 s through a 4 KiB receive buffer
  4 admin_body     POST /v1/publish without a token, a `--admin-body-mb` JSON body, in a loop
    admin_slowloris `--slowloris` admin HTTP connections sending one header line every 5 s
    admin_flood    GET /v1/stats and POST /v1/publish with wrong tokens, and GET /metrics,
                   back to back
  5 amplify        one request listing the same level-1 block `--amplify-ids` times (the most
                   the server takes), read as fast as it comes, in a loop: data plane and gRPC
  6 device_slow    `--device-slow-clients` new streamed generations a second (up to 8 times as
                   many kept open), each read a byte a second through a tiny receive buffer,
                   and as many requests whose body comes a byte a second
Phases, in one run: warm-up (not counted), `quiet` (the load alone, `--phase-s`), `attack` (the
same load and every attack at once, `--phase-s`; `--attacks` picks some, to see each alone).
Prints one table (phase x prompts ok / failed, fetch p50 / p99, shard RSS / fds / threads max,
device-HTTP prompts ok / failed / p50), the attack / quiet ratios against the issue's targets
(0 failed legitimate prompts, fetch p50 within 1.5x, RSS and fds bounded), the failures by code,
and ends with ONE JSON line (with what each attack did, and the top failure messages).
Everything is bounded: every socket and RPC has a timeout, attacks are stopped and joined,
servers terminated.
The smoke test: tests/integration/test_abuse_benchmark.py.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import secrets
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from testkit.stats import percentile

REPO = Path(__file__).resolve().parents[1]
ATTACKER = "127.0.0.2"          # the hostile peer's source address
DEVICE = "127.0.0.1"            # the legitimate clients'
BANK = "abuse"                  # the synthetic bank with the paper's block sizes
MODEL_BANK = "test"             # the small model's bank (testkit/models.py)
PHASES = ("quiet", "attack")
ATTACKS = ("grpc_watch", "grpc_pin", "dp_slots", "slow_readers", "admin_body",
           "admin_slowloris", "admin_flood", "amplify", "device_slow")


@dataclass(frozen=True)
class AbuseSettings:
    blocks: str = "paper"                 # paper: 27.5 / 6.9 / 1.7 MB blocks; tiny: 1/35 of it
    phase_s: float = 20.0                 # quiet, then attack
    warmup_s: float = 3.0
    devices: int = 2
    think_s: float = 0.2                  # a device's pause between prompts
    manifest_ttl_s: float = 1.0
    device_churn: int = 10                # a device opens a new bank client every N prompts
    device_timeout_s: float = 10.0        # a device's deadline per bank call
    device_http: bool = True
    http_timeout_s: float = 30.0          # a legitimate generate request's deadline
    # the shard
    rate_limit_rps: float = 100.0         # per client: enough for every legitimate 127.0.0.1 use
    rate_limit_burst: int = 200
    max_concurrent_rpcs: int = 64
    dataplane_max_connections: int = 16
    # the attacker
    attacks: tuple[str, ...] = ATTACKS
    watch_streams: int = 64
    pin_fetches: int = 8
    dp_junk_conns: int = 16
    slow_readers: int = 8
    admin_body_mb: float = 16.0
    slowloris: int = 200
    amplify_ids: int = 64
    device_slow_clients: int = 2
    seed: int = 0
    dir: str | None = None
    quick: bool = False


# -- the shard's data ---------------------------------------------------------------------------
def bank_header(blocks: str) -> dict:
    """The paper's bank at k 4 (benchmarks/paper_scale.py --scale small); tiny: one memory layer
    instead of 35 (the same tree, every block 1/35 of the paper's)."""
    from membank.config import get_preset

    cfg = get_preset("paper-160m")
    fields = {**cfg.memory.manifest_fields(cfg.model), "branching": 4}
    if blocks == "tiny":
        fields["mem_layers"] = fields["mem_layers"][:1]
    return {**fields, "bank": BANK, "version": "v1"}


def build_shard_data(lmdb: Path, work: Path, blocks: str, seed: int):
    """Ingest both banks into `lmdb`; (the synthetic bank's manifest, the model export)."""
    from benchmarks.paper_scale import block_bytes
    from membank.manifest import Manifest
    from services.bank_server.ingest import ingest, ingest_stream
    from testkit.keys import signing_key
    from testkit.models import make_model_export

    header = bank_header(blocks)
    skeleton = Manifest.model_validate({**header, "checksums": [
        [""] * (header["branching"] ** l if r else 0) for l, r in enumerate(header["ranks"], 1)]})
    # both banks signed with the test operator's key; the device HTTP server pins it
    manifest = ingest_stream({None: lmdb}, header, (
        (l, n, block_bytes(seed, l, n, skeleton.block_nbytes(l))) for l, n in skeleton.blocks()),
        progress=False, signing_key=signing_key())
    export = make_model_export(work / "model" / "export", seed=seed)
    ingest(export, lmdb, progress=False, signing_key=signing_key())
    return manifest, export


# -- what the legitimate clients saw ------------------------------------------------------------
@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    codes: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)  # "CODE: message" (digits as #)
    latencies: list = field(default_factory=list)     # seconds, successful prompts

    def summary(self) -> dict:
        p50, p99 = percentile(self.latencies, 0.5), percentile(self.latencies, 0.99)
        return {"ok": self.ok, "failed": self.failed, "codes": dict(self.codes),
                "messages": dict(self.messages.most_common(5)),
                "p50_ms": None if p50 is None else round(p50 * 1e3, 1),
                "p99_ms": None if p99 is None else round(p99 * 1e3, 1)}


class Run:
    """The shared state: the phase now, per-phase tallies, and the stop flags."""

    def __init__(self):
        self.phase: str | None = None         # None: warm-up (not counted)
        self.lock = threading.Lock()
        self.fetch = {p: Tally() for p in PHASES}
        self.http = {p: Tally() for p in PHASES}
        self.stop_load = threading.Event()
        self.stop_attack = threading.Event()

    def record(self, kind: str, phase: str | None, ok: bool, seconds: float,
               code: str | None = None, message: str = "") -> None:
        if phase is None:
            return
        t = (self.fetch if kind == "fetch" else self.http)[phase]
        with self.lock:
            if ok:
                t.ok += 1
                t.latencies.append(seconds)
            else:
                t.failed += 1
                t.codes[code or "?"] += 1
                # the same failure with other numbers (ports, waits) is one line
                line = "".join("#" if c.isdigit() else c for c in f"{code}: {message}")
                t.messages[re.sub("#+", "#", line)[:100]] += 1


def device_loop(run: Run, s: AbuseSettings, target: str, token: str, seed: int) -> None:
    """One device: prompts until stopped (each prompt counted in the phase it started in)."""
    from services.model_client.targets import open_bank

    rng = random.Random(seed)
    bank = open_bank(target, timeout_s=s.device_timeout_s, token=token,
                     allow_insecure_token=True)
    manifest, read_at, prompts = None, 0.0, 0
    try:
        while not run.stop_load.is_set():
            phase = run.phase
            prompts += 1
            if s.device_churn and prompts % s.device_churn == 0:
                # devices come and go (wake-ups, network changes): a new client, new connections
                bank.close()
                bank = open_bank(target, timeout_s=s.device_timeout_s, token=token,
                                 allow_insecure_token=True)
            try:
                if manifest is None or time.monotonic() - read_at > s.manifest_ttl_s:
                    manifest, read_at = bank.get_manifest(BANK), time.monotonic()
                depth = sum(1 for r in manifest.ranks if r)
                path = [rng.randrange(manifest.branching) for _ in range(depth)]
                want = manifest.path_blocks(path)
                t0 = time.perf_counter()
                got = bank.fetch(BANK, manifest.version, want, manifest)
                dt = time.perf_counter() - t0
                ok = all(b in got for b in want)
                run.record("fetch", phase, ok, dt, None if ok else "MISSING_BLOCKS")
            except Exception as e:     # BankError and anything else: a failed prompt
                run.record("fetch", phase, False, 0.0, getattr(e, "code", type(e).__name__),
                           getattr(e, "message", str(e)))
                run.stop_load.wait(0.1)     # a device backs off a little, not a hot loop
                continue
            run.stop_load.wait(s.think_s)
    finally:
        bank.close()


PROMPTS = ["The atomic number of {} is", "{} is a chemical element", "Tell me about {}",
           "Where is {} found?", "The melting point of {} is"]
ELEMENTS = ["Ruthenium", "Hydrogen", "Gold", "Iron", "Neon", "Carbon", "Zinc", "Argon",
            "Copper", "Helium", "Sodium", "Silver", "Tin", "Lead", "Boron", "Oxygen"]


def device_http_loop(run: Run, s: AbuseSettings, address: str, seed: int) -> None:
    """Legitimate generate requests (from 127.0.0.1): ok = 200 with memory attached."""
    rng = random.Random(seed)
    host, port = address.rsplit(":", 1)
    while not run.stop_load.is_set():
        phase = run.phase
        body = json.dumps({"prompt": rng.choice(PROMPTS).format(rng.choice(ELEMENTS)),
                           "max_tokens": 8}).encode()
        t0 = time.perf_counter()
        code = None
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=s.http_timeout_s,
                                              source_address=(DEVICE, 0))
            try:
                conn.request("POST", "/v1/generate", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
            finally:
                conn.close()
            if resp.status != 200:
                code = f"HTTP_{resp.status}"
            elif not json.loads(raw).get("memory"):
                code = "NO_MEMORY"
                raw = str(json.loads(raw).get("anchor_only_reason")).encode()
        except Exception as e:
            code = type(e).__name__
            raw = str(e).encode()
        run.record("http", phase, code is None, time.perf_counter() - t0, code,
                   "" if code is None else raw[:100].decode(errors="replace"))
        run.stop_load.wait(s.think_s if code is None else 0.1)


# -- the shard's footprint ----------------------------------------------------------------------
class Sampler:
    """VmRSS, open fds and threads of one process, sampled every `every_s`; max per phase."""

    def __init__(self, pid: int, run: Run, every_s: float = 0.2):
        self.pid, self.run, self.every_s = pid, run, every_s
        self.max: dict[str, dict] = {p: {"rss_mb": 0.0, "fds": 0, "threads": 0} for p in PHASES}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="sampler")
        self.thread.start()

    def sample(self) -> dict | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None
        values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {"rss_mb": int(values["VmRSS"].split()[0]) / 1024, "fds": fds,
                "threads": int(values["Threads"])}

    def _loop(self) -> None:
        while not self.done.wait(self.every_s):
            phase, now = self.run.phase, self.sample()
            if phase is None or now is None:
                continue
            m = self.max[phase]
            for k, v in now.items():
                m[k] = max(m[k], v)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)


# -- the attacker (127.0.0.2) -------------------------------------------------------------------
@dataclass
class Target:
    """What the attacker knows: the shard's and the device's addresses, the read token (as any
    device has), the bank's shape."""
    grpc: str
    dataplane: str
    admin: str
    device_http: str | None
    token: str
    branching: int
    settings: AbuseSettings
    stats: dict = field(default_factory=dict)       # attack -> Counter of what it did
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, attack: str, what: str, n: int = 1) -> None:
        with self.lock:
            self.stats.setdefault(attack, Counter())[what] += n


def attacker_socket(address: str, timeout: float = 2.0, rcvbuf: int | None = None
                    ) -> socket.socket:
    """A TCP connection to `address` from 127.0.0.2 (a small receive buffer if asked: set before
    connecting, so the window the server sees is small from the start)."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((ATTACKER, 0))
        sock.settimeout(timeout)
        sock.connect((host, int(port)))
    except OSError:
        sock.close()
        raise
    return sock


def _close(socks) -> None:
    for s in list(socks):
        try:
            s.close()
        except OSError:
            pass


def _dp_request(blocks: list, token: str | None) -> bytes:
    from membank.dataplane import REQUEST, frame
    return frame(REQUEST, {"bank": BANK, "version": "", "blocks": blocks, "token": token})


def _grpc_channel(t: Target, stack: ExitStack, *, hold: bool = False):
    """A gRPC channel to the shard from 127.0.0.2 (a Relay bound there upstream), its own
    connection (a local subchannel pool). With `hold`, the relay passes nothing back once the
    channel is up: a client that stops reading."""
    import grpc

    from testkit.net import Relay

    relay = stack.enter_context(Relay(t.grpc, source_host=ATTACKER))
    channel = grpc.insecure_channel(relay.address,
                                    options=[("grpc.use_local_subchannel_pool", 1)])
    stack.callback(channel.close)
    grpc.channel_ready_future(channel).result(timeout=10)
    relay.hold = hold
    return channel


def attack_grpc_watch(t: Target, stop: threading.Event) -> None:
    """Point 1: Health/Watch streams (no token needed) that never end, kept at `watch_streams`
    on one connection; refused ones are opened again every second."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with ExitStack() as stack:
        stub = health_pb2_grpc.HealthStub(_grpc_channel(t, stack))
        calls: list = []
        stack.callback(lambda: [c.cancel() for c in calls])
        while not stop.is_set():
            calls[:] = [c for c in calls if not c.done()]
            for _ in range(t.settings.watch_streams - len(calls)):
                calls.append(stub.Watch(health_pb2.HealthCheckRequest(service="")))
                t.count("grpc_watch", "streams_opened")
            stop.wait(1.0)


def attack_grpc_pin(t: Target, stop: threading.Event) -> None:
    """Point 1: FetchBlocks of level-1 blocks with no deadline from a client that never reads
    (its connection passes nothing back): each pins a server handler holding a block."""
    from membank.v1 import bank_pb2, bank_pb2_grpc

    with ExitStack() as stack:
        stub = bank_pb2_grpc.BankServiceStub(_grpc_channel(t, stack, hold=True))
        calls: list = []
        stack.callback(lambda: [c.cancel() for c in calls])
        auth = (("authorization", f"Bearer {t.token}"),)
        while not stop.is_set():
            calls[:] = [c for c in calls if not c.done()]
            for i in range(t.settings.pin_fetches - len(calls)):
                req = bank_pb2.FetchBlocksRequest(
                    bank=BANK, blocks=[bank_pb2.BlockId(level=1, node=i % t.branching)])
                calls.append(stub.FetchBlocks(req, metadata=auth))
                t.count("grpc_pin", "fetches_started")
            stop.wait(1.0)


def attack_dp_slots(t: Target, stop: threading.Event) -> None:
    """Point 2: `dp_junk_conns` data plane connections, each sending a request with a wrong
    token every 0.5 s; the answers are read and dropped; closed ones are opened again."""
    junk = _dp_request([[1, 0]], "not-the-token")
    socks: list[socket.socket] = []
    next_junk = 0.0
    try:
        while not stop.is_set():
            # a slot a device frees is taken within 20 ms
            while len(socks) < t.settings.dp_junk_conns and not stop.is_set():
                try:
                    socks.append(attacker_socket(t.dataplane, 1.0))
                    t.count("dp_slots", "connects")
                except OSError:
                    t.count("dp_slots", "connect_failed")
                    break
            junk_now = time.monotonic() >= next_junk
            if junk_now:
                next_junk = time.monotonic() + 0.5
            for s in list(socks):
                try:
                    s.settimeout(0.5)
                    if junk_now:
                        s.sendall(junk)
                        t.count("dp_slots", "requests")
                    _drain(s)       # refused (server full): an error frame, then the close
                except OSError:
                    socks.remove(s)
                    s.close()
            stop.wait(0.02)
    finally:
        _close(socks)


def _drain(sock: socket.socket) -> None:
    """Read whatever has arrived (without waiting); OSError when the peer closed."""
    while select.select([sock], [], [], 0)[0]:
        if not sock.recv(1 << 16):
            raise ConnectionError("closed by the server")


def attack_slow_readers(t: Target, stop: threading.Event) -> None:
    """Point 3: data plane fetches of level-1 blocks read 16 bytes every 2 s through a 4 KiB
    receive buffer (the server's send never quite stalls)."""
    socks: list[socket.socket] = []
    try:
        while not stop.is_set():
            for i in range(t.settings.slow_readers - len(socks)):
                try:
                    s = attacker_socket(t.dataplane, 2.0, rcvbuf=4096)
                    s.sendall(_dp_request([[1, i % t.branching]], t.token))
                    socks.append(s)
                    t.count("slow_readers", "fetches_started")
                except OSError:
                    t.count("slow_readers", "connect_failed")
                    break
            for s in list(socks):
                try:
                    s.settimeout(0.05)
                    if not s.recv(16):
                        raise ConnectionError("closed")
                    t.count("slow_readers", "bytes_read", 16)
                except socket.timeout:
                    pass
                except OSError:
                    socks.remove(s)
                    s.close()
                    t.count("slow_readers", "closed_by_server")
            stop.wait(2.0)
    finally:
        _close(socks)


def _http_head(method: str, path: str, length: int | None = None, token: str | None = None
               ) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: membank", "Content-Type: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_status(sock: socket.socket) -> str:
    """The status code of the response on `sock` ("timeout" / "closed" when none came)."""
    try:
        data = sock.recv(256)
    except socket.timeout:
        return "timeout"
    except OSError:
        return "closed"
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "closed"


def attack_admin_body(t: Target, stop: threading.Event) -> None:
    """Point 4: POST /v1/publish without a token, with a big JSON body (a long list of numbers,
    costly to parse), again and again."""
    n = max(1, int(t.settings.admin_body_mb * 1e6) // 2)
    body = b'{"bank":"x","version":"y","pad":[' + b"0," * (n - 1) + b'0]}'
    head = _http_head("POST", "/v1/publish", len(body))
    while not stop.is_set():
        try:
            with attacker_socket(t.admin, 10.0) as s:
                s.sendall(head)
                s.sendall(body)
                t.count("admin_body", "bodies_sent")
                t.count("admin_body", f"http_{_read_status(s)}")
        except OSError:
            t.count("admin_body", "failed")
            stop.wait(0.2)


def attack_admin_slowloris(t: Target, stop: threading.Event) -> None:
    """Point 4: `slowloris` admin HTTP connections, each sending one more header line every
    5 s (a request never finished); closed ones are opened again."""
    socks: list[socket.socket] = []
    try:
        while not stop.is_set():
            for _ in range(t.settings.slowloris - len(socks)):
                if stop.is_set():
                    break
                try:
                    s = attacker_socket(t.admin, 1.0)
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: membank\r\n")
                    socks.append(s)
                    t.count("admin_slowloris", "connects")
                except OSError:
                    t.count("admin_slowloris", "connect_failed")
                    break
            for s in list(socks):
                try:
                    s.settimeout(0.5)
                    s.sendall(b"X-Slow: 1\r\n")
                    _drain(s)
                except OSError:
                    socks.remove(s)
                    s.close()
                    t.count("admin_slowloris", "closed_by_server")
            stop.wait(5.0)
    finally:
        _close(socks)


def attack_admin_flood(t: Target, stop: threading.Event) -> None:
    """Point 4: wrong tokens (401/403 are not rate limited) and /metrics scrapes (mincore over
    the data file on the event loop gRPC shares), back to back on kept-alive connections."""
    host, port = t.admin.rsplit(":", 1)
    asks = [("GET", "/v1/stats", {"Authorization": "Bearer wrong"}, None),
            ("POST", "/v1/publish", {"Authorization": "Bearer wrong",
                                     "Content-Type": "application/json"},
             b'{"bank":"x","version":"y"}'),
            ("GET", "/metrics", {}, None)]
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=10,
                                                  source_address=(ATTACKER, 0))
            for method, path, headers, body in asks:
                conn.request(method, path, body, headers)
                resp = conn.getresponse()
                resp.read()
                t.count("admin_flood", f"http_{resp.status}")
        except (OSError, http.client.HTTPException):
            t.count("admin_flood", "failed")
            if conn is not None:
                conn.close()
            conn = None
            stop.wait(0.1)
    if conn is not None:
        conn.close()


def attack_amplify(t: Target, stop: threading.Event) -> None:
    """Point 5: one ~1 KB request naming the same level-1 block `amplify_ids` times, read at full
    speed and dropped, in a loop: over the data plane here, over gRPC in a second thread."""
    grpc_thread = threading.Thread(target=_amplify_grpc, args=(t, stop), daemon=True)
    grpc_thread.start()
    from membank.dataplane import END, ERROR, HEADER, PREFIX, parse_prefix

    request = _dp_request([[1, 0]] * t.settings.amplify_ids, t.token)
    sink = bytearray(1 << 20)
    sock = None
    try:
        while not stop.is_set():
            try:
                if sock is None:
                    # a short timeout: a stalled answer is given up, and the stop flag is
                    # seen within it
                    sock = attacker_socket(t.dataplane, 10.0)
                sock.sendall(request)
                while not stop.is_set():
                    kind, n = parse_prefix(_recv_exact(sock, PREFIX.size), 1 << 20)
                    payload = _recv_exact(sock, n)
                    if kind == HEADER:
                        _discard(sock, json.loads(payload)["nbytes"], sink)
                        t.count("amplify", "dp_blocks")
                    elif kind == END:
                        t.count("amplify", "dp_requests")
                        break
                    elif kind == ERROR:
                        t.count("amplify", f"dp_refused_{json.loads(payload)['code']}")
                        break
                else:
                    break
            except Exception:       # closed, refused, a timeout: connect again
                t.count("amplify", "dp_failed")
                _close([sock] if sock else [])
                sock = None
                stop.wait(0.2)
    finally:
        _close([sock] if sock else [])
        grpc_thread.join(15)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ConnectionError("closed")
        out += got
    return bytes(out)


def _discard(sock: socket.socket, n: int, sink: bytearray) -> None:
    view = memoryview(sink)
    while n:
        got = sock.recv_into(view[:min(n, len(sink))])
        if not got:
            raise ConnectionError("closed")
        n -= got


def _amplify_grpc(t: Target, stop: threading.Event) -> None:
    from membank.v1 import bank_pb2, bank_pb2_grpc

    with ExitStack() as stack:
        try:
            stub = bank_pb2_grpc.BankServiceStub(_grpc_channel(t, stack))
        except Exception:
            t.count("amplify", "grpc_failed")
            return
        req = bank_pb2.FetchBlocksRequest(
            bank=BANK, blocks=[bank_pb2.BlockId(level=1, node=0)] * t.settings.amplify_ids)
        auth = (("authorization", f"Bearer {t.token}"),)
        while not stop.is_set():
            call = stub.FetchBlocks(req, metadata=auth, timeout=60)
            try:
                for _ in call:
                    if stop.is_set():
                        call.cancel()
                        break
                t.count("amplify", "grpc_requests")
            except Exception:
                t.count("amplify", "grpc_failed")
                stop.wait(0.2)


def attack_device_slow(t: Target, stop: threading.Event) -> None:
    """Point 6: slow clients of the device's HTTP server: streamed generations (new ones every
    second) read one byte a second through a tiny receive buffer, and requests whose body comes
    one byte a second."""
    if t.device_http is None:
        return
    n = t.settings.device_slow_clients
    stream_body = json.dumps({"prompt": "The atomic number of Ruthenium is",
                              "max_tokens": 40, "stream": True}).encode()
    slow_body = json.dumps({"prompt": "Gold has", "max_tokens": 8}).encode()
    readers: list[socket.socket] = []
    senders: list[list] = []         # [socket, bytes sent]
    try:
        while not stop.is_set():
            # a new streamed request per slot every second (each takes the generation lock for a
            # whole generation), the oldest dropped past `8 n` open: the queue stays the
            # attacker's
            while len(readers) > 8 * n - n:
                readers.pop(0).close()
            for _ in range(n):
                try:
                    s = attacker_socket(t.device_http, 2.0, rcvbuf=1024)
                    s.sendall(_http_head("POST", "/v1/generate", len(stream_body)) + stream_body)
                    readers.append(s)
                    t.count("device_slow", "streams_started")
                except OSError:
                    t.count("device_slow", "connect_failed")
                    break
            for _ in range(n - len(senders)):
                try:
                    s = attacker_socket(t.device_http, 2.0)
                    s.sendall(_http_head("POST", "/v1/generate", len(slow_body)))
                    senders.append([s, 0])
                    t.count("device_slow", "slow_bodies_started")
                except OSError:
                    t.count("device_slow", "connect_failed")
                    break
            for s in list(readers):
                try:
                    s.settimeout(0.05)
                    if not s.recv(1):
                        raise ConnectionError("closed")
                except socket.timeout:
                    pass
                except OSError:     # the stream ended (or was cut): start another
                    readers.remove(s)
                    s.close()
            for pair in list(senders):
                s, sent = pair
                try:
                    if sent < len(slow_body):
                        s.settimeout(0.5)
                        s.sendall(slow_body[sent:sent + 1])
                        pair[1] += 1
                    else:
                        _drain(s)
                except OSError:
                    senders.remove(pair)
                    s.close()
            stop.wait(1.0)
    finally:
        _close(readers)
        _close([p[0] for p in senders])


ATTACK_FUNCS = {"grpc_watch": attack_grpc_watch, "grpc_pin": attack_grpc_pin,
                "dp_slots": attack_dp_slots, "slow_readers": attack_slow_readers,
                "admin_body": attack_admin_body, "admin_slowloris": attack_admin_slowloris,
                "admin_flood": attack_admin_flood, "amplify": attack_amplify,
                "device_slow": attack_device_slow}


def _guarded(name: str, fn, t: Target, stop: threading.Event) -> None:
    """An attack that breaks is counted, never a crash of the benchmark."""
    try:
        fn(t, stop)
    except Exception as e:
        t.count(name, f"crashed: {type(e).__name__}: {e}"[:120])


# -- the run ------------------------------------------------------------------------------------
def run_phase(run: Run, name: str, seconds: float) -> None:
    """Let the load run `seconds` in phase `name`, with a progress line."""
    run.phase = name
    t0 = time.monotonic()
    with tqdm(total=round(seconds), desc=f"{name:>6}", unit="s", file=sys.stderr,
              bar_format="{desc}: {n_fmt}/{total_fmt} s {postfix}") as bar:
        while (left := seconds - (time.monotonic() - t0)) > 0:
            time.sleep(min(1.0, left))
            bar.n = min(round(seconds), round(time.monotonic() - t0))
            f, h = run.fetch[name], run.http[name]
            bar.set_postfix_str(f"prompts ok {f.ok} failed {f.failed}; "
                                f"device HTTP ok {h.ok} failed {h.failed}")


def main(argv: list[str] | None = None) -> dict:
    s = parse_args(argv)
    from services.bank_server import launch
    from services.model_client.dataplane_client import dataplane_target
    from testkit.keys import write_public_key
    from testkit.models import run_device_server

    work = Path(tempfile.mkdtemp(prefix="membank-abuse-", dir=s.dir))
    read_token, admin_token = secrets.token_hex(16), secrets.token_hex(16)
    (work / "read.token").write_text(read_token)
    (work / "admin.token").write_text(admin_token)
    run = Run()
    report: dict = {"benchmark": "abuse", "settings": {**asdict(s), "attacks": list(s.attacks)},
                    "cpus": os.cpu_count()}
    try:
        print(f"building the shard's banks ({s.blocks} blocks) in {work}", file=sys.stderr,
              flush=True)
        manifest, export = build_shard_data(work / "lmdb", work, s.blocks, s.seed)
        report["block_mb"] = [round(manifest.block_nbytes(l) / 1e6, 2)
                              for l, r in enumerate(manifest.ranks, 1) if r]
        with ExitStack() as stack:
            address, proc = stack.enter_context(launch.run_bank_server(
                work / "lmdb", "--auth-token-file", str(work / "read.token"),
                "--admin-token-file", str(work / "admin.token"),
                "--rate-limit-rps", str(s.rate_limit_rps),
                "--rate-limit-burst", str(s.rate_limit_burst),
                "--max-concurrent-rpcs", str(s.max_concurrent_rpcs),
                "--dataplane-port", "0",
                "--dataplane-max-connections", str(s.dataplane_max_connections),
                "--log-level", "WARNING", log_path=work / "shard.log", cwd=REPO, timeout=120))
            target = dataplane_target(address, proc.dataplane_address.rsplit(":", 1)[1])
            device_address = None
            if s.device_http:
                device_address, _ = stack.enter_context(run_device_server(
                    export, "--bank", target, "--token-file", str(work / "read.token"),
                    "--allow-insecure-token",
                    "--trusted-keys", str(write_public_key(work / "operator.pub")),
                    "--timeout", str(s.device_timeout_s), "--max-tokens", "40",
                    "--log-level", "WARNING", log_path=work / "device.log"))
            sampler = Sampler(proc.pid, run)
            stack.callback(sampler.close)
            loaders = [threading.Thread(target=device_loop, args=(run, s, target, read_token,
                                                                  s.seed * 1000 + i),
                                        daemon=True, name=f"device-{i}")
                       for i in range(s.devices)]
            if device_address:
                loaders.append(threading.Thread(target=device_http_loop,
                                                args=(run, s, device_address, s.seed),
                                                daemon=True, name="device-http"))
            for th in loaders:
                th.start()

            def stop_load() -> None:
                run.stop_load.set()
                for th in loaders:
                    th.join(s.device_timeout_s + s.http_timeout_s + 5)
            stack.callback(stop_load)

            time.sleep(s.warmup_s)
            run_phase(run, "quiet", s.phase_s)
            t = Target(grpc=address, dataplane=proc.dataplane_address, admin=proc.admin_address,
                       device_http=device_address, token=read_token,
                       branching=manifest.branching, settings=s)
            attackers = [threading.Thread(target=_guarded, args=(a, ATTACK_FUNCS[a], t,
                                                                 run.stop_attack),
                                          daemon=True, name=f"attack-{a}") for a in s.attacks]
            for th in attackers:
                th.start()
            try:
                run_phase(run, "attack", s.phase_s)
            finally:
                run.phase = None            # the teardown is not measured
                run.stop_attack.set()
                for th in attackers:
                    th.join(30)
            report["attack_threads_left"] = [th.name for th in attackers if th.is_alive()]
            report["attacks"] = {k: dict(v) for k, v in sorted(t.stats.items())}
        report["phases"] = {p: {"prompts": run.fetch[p].summary(),
                                "device_http": run.http[p].summary() if s.device_http else None,
                                "shard": {k: round(v, 1) for k, v in sampler.max[p].items()}}
                            for p in PHASES}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["ratios"], report["targets"] = ratios(report["phases"])
    print_table(report)
    print(json.dumps(report), flush=True)
    return report


def ratios(phases: dict) -> tuple[dict, dict]:
    """attack / quiet, and the issue's targets: 0 failed legitimate prompts, fetch p50 within
    1.5x of the quiet run (RSS and fds: reported, judged by the reader against the caps)."""
    q, a = phases["quiet"], phases["attack"]

    def ratio(x, y):
        return None if x is None or not y else round(x / y, 2)
    r = {"fetch_p50": ratio(a["prompts"]["p50_ms"], q["prompts"]["p50_ms"]),
         "fetch_p99": ratio(a["prompts"]["p99_ms"], q["prompts"]["p99_ms"]),
         "rss": ratio(a["shard"]["rss_mb"], q["shard"]["rss_mb"]),
         "fds": ratio(a["shard"]["fds"], q["shard"]["fds"])}
    http_failed = (a["device_http"] or {}).get("failed", 0)
    targets = {"no_failed_prompts": a["prompts"]["failed"] == 0 and http_failed == 0,
               "p50_within_1_5x": r["fetch_p50"] is not None and r["fetch_p50"] <= 1.5}
    return r, targets


def print_table(report: dict) -> None:
    print(f"\nabuse: blocks {report['block_mb']} MB, attacks: "
          f"{', '.join(report['settings']['attacks'])}")
    print("| phase  | prompts ok | failed | fetch p50 ms | fetch p99 ms | RSS max MB | fds max "
          "| threads max | device HTTP ok | failed | p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, p in report["phases"].items():
        f, sh, h = p["prompts"], p["shard"], p["device_http"] or {}
        print(f"| {name:<6} | {f['ok']} | {f['failed']} | {f['p50_ms']} | {f['p99_ms']} | "
              f"{sh['rss_mb']} | {sh['fds']} | {sh['threads']} | {h.get('ok', '-')} | "
              f"{h.get('failed', '-')} | {h.get('p50_ms', '-')} |")
    r, tg = report["ratios"], report["targets"]
    print(f"\nattack / quiet: fetch p50 {r['fetch_p50']}x, p99 {r['fetch_p99']}x, RSS {r['rss']}x, "
          f"fds {r['fds']}x")
    for name, p in report["phases"].items():
        codes = {**p["prompts"]["codes"], **{f"http:{k}": v for k, v in
                                             (p["device_http"] or {}).get("codes", {}).items()}}
        if codes:
            print(f"failures in {name}: {codes}")
    print(f"targets: 0 failed legitimate prompts {'met' if tg['no_failed_prompts'] else 'MISSED'};"
          f" fetch p50 within 1.5x {'met' if tg['p50_within_1_5x'] else 'MISSED'}")


def parse_args(argv: list[str] | None) -> AbuseSettings:
    d = AbuseSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", choices=["paper", "tiny"], default=d.blocks,
                   help="block sizes: the paper's (27.5 / 6.9 / 1.7 MB) or 1/35 of them")
    p.add_argument("--phase-s", type=float, help=f"each phase's length (default {d.phase_s})")
    p.add_argument("--warmup-s", type=float)
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--think-s", type=float, default=d.think_s)
    p.add_argument("--manifest-ttl-s", type=float, default=d.manifest_ttl_s)
    p.add_argument("--device-churn", type=int, default=d.device_churn,
                   help="a device opens a new bank client (new connections) every N prompts; "
                        "0: one client for the whole run")
    p.add_argument("--device-timeout-s", type=float, default=d.device_timeout_s)
    p.add_argument("--no-device-http", dest="device_http", action="store_false")
    p.add_argument("--http-timeout-s", type=float, default=d.http_timeout_s)
    p.add_argument("--rate-limit-rps", type=float, default=d.rate_limit_rps)
    p.add_argument("--rate-limit-burst", type=int, default=d.rate_limit_burst)
    p.add_argument("--max-concurrent-rpcs", type=int, default=d.max_concurrent_rpcs)
    p.add_argument("--dataplane-max-connections", type=int, default=d.dataplane_max_connections)
    p.add_argument("--attacks", default=",".join(d.attacks),
                   help=f"comma-separated, of: {','.join(ATTACKS)}")
    p.add_argument("--watch-streams", type=int, help="default: --max-concurrent-rpcs")
    p.add_argument("--pin-fetches", type=int, default=d.pin_fetches)
    p.add_argument("--dp-junk-conns", type=int, help="default: --dataplane-max-connections")
    p.add_argument("--slow-readers", type=int, default=d.slow_readers)
    p.add_argument("--admin-body-mb", type=float)
    p.add_argument("--slowloris", type=int, default=d.slowloris)
    p.add_argument("--amplify-ids", type=int, default=d.amplify_ids)
    p.add_argument("--device-slow-clients", type=int, default=d.device_slow_clients)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dir", help="parent of the work directory (default: the system temp dir)")
    p.add_argument("--quick", action="store_true", help="a short run: 5 s phases, 1 s warm-up")
    a = p.parse_args(argv)
    attacks = tuple(x for x in a.attacks.split(",") if x)
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attacks {sorted(unknown)}; known: {','.join(ATTACKS)}")
    return AbuseSettings(
        blocks=a.blocks,
        phase_s=a.phase_s if a.phase_s is not None else (5.0 if a.quick else d.phase_s),
        warmup_s=a.warmup_s if a.warmup_s is not None else (1.0 if a.quick else d.warmup_s),
        devices=a.devices, think_s=a.think_s, manifest_ttl_s=a.manifest_ttl_s,
        device_churn=a.device_churn,
        device_timeout_s=a.device_timeout_s, device_http=a.device_http,
        http_timeout_s=a.http_timeout_s, rate_limit_rps=a.rate_limit_rps,
        rate_limit_burst=a.rate_limit_burst, max_concurrent_rpcs=a.max_concurrent_rpcs,
        dataplane_max_connections=a.dataplane_max_connections, attacks=attacks,
        watch_streams=a.watch_streams or a.max_concurrent_rpcs, pin_fetches=a.pin_fetches,
        dp_junk_conns=a.dp_junk_conns or a.dataplane_max_connections,
        slow_readers=a.slow_readers,
        admin_body_mb=a.admin_body_mb if a.admin_body_mb is not None else
        (2.0 if a.blocks == "tiny" else d.admin_body_mb),
        slowloris=a.slowloris, amplify_ids=a.amplify_ids,
        device_slow_clients=a.device_slow_clients, seed=a.seed, dir=a.dir, quick=a.quick)


if __name__ == "__main__":
    main()
