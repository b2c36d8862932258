"""The bank server's API surface as a real subprocess: Route, Publish, admin HTTP, auth, TLS,
limits, deadlines and graceful shutdown.

Run: .venv/bin/python -m pytest -q tests/integration/test_api.py
"""
from __future__ import annotations

import json
import shutil
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import lmdb
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from membank.artifacts import ROUTER, iter_blocks, load_manifest
from membank.manifest import Manifest
from membank.router import Router
from membank.secrets import self_signed_cert
from membank.v1 import bank_pb2
from services.bank_server.ingest import ingest
from services.bank_server.router_store import router_key
from services.model_client.bank_client import BankClient, BankError
from tests.conftest import as_exported, run_bank_server

pytestmark = pytest.mark.integration

READ_TOKEN, ADMIN_TOKEN = "read-token-123", "admin-token-456"


# -- helpers -----------------------------------------------------------------------------------
def http(address: str, path: str, *, method: str = "GET", body: dict | None = None,
         token: str | None = None, context: ssl.SSLContext | None = None,
         scheme: str = "http") -> tuple[int, bytes, dict]:
    """(status, body, headers) of one HTTP request to the admin server."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{scheme}://{address}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def rpc(address: str, method: str, request, response_cls, *, token: str | None = None,
        timeout: float = 10):
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=response_cls.FromString)
        md = (("authorization", f"Bearer {token}"),) if token else None
        return call(request, timeout=timeout, metadata=md)


def rpc_code(*args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        rpc(*args, **kw)
    return e.value.code()


def route(address, bank, embedding, version="", token=None):
    return rpc(address, "/membank.v1.BankService/Route",
               bank_pb2.RouteRequest(bank=bank, version=version, embedding=embedding),
               bank_pb2.RouteResponse, token=token)


def publish(address, bank, version, token=None):
    return rpc(address, "/membank.v1.BankAdmin/Publish",
               bank_pb2.PublishRequest(bank=bank, version=version), bank_pb2.PublishResponse,
               token=token)


def write_tokens(tmp: Path) -> list[str]:
    (tmp / "read.token").write_text(READ_TOKEN + "\n")
    (tmp / "admin.token").write_text(ADMIN_TOKEN)
    return ["--auth-token-file", str(tmp / "read.token"),
            "--admin-token-file", str(tmp / "admin.token")]


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def router(tiny_export) -> Router:
    m = load_manifest(tiny_export)
    g = torch.Generator().manual_seed(7)
    k, dim = m.branching, 8
    tree = Router(k, m.depth, dim,
                  [torch.randn(k ** l, k, dim, generator=g) for l in range(m.depth)])
    docs = torch.randn(200, dim, generator=g).numpy()   # a nearest-document index: Route uses it
    return tree.with_index(docs, tree.route(docs))


@pytest.fixture(scope="module")
def api_lmdb(tmp_path_factory, tiny_export, big_export, wide_export, router) -> Path:
    """tiny bank "test": v1 (published, with a router: ingest stores the export's) and v2
    (ingested from an export without a router, not published); bank "big": b1 without one;
    bank "wide" (32 level-1 blocks) for long streams."""
    root = tmp_path_factory.mktemp("api")
    export = root / "export"
    shutil.copytree(tiny_export, export)
    router.save(export / ROUTER)
    path = root / "bank.lmdb"
    ingest(export, path, progress=False, map_size=1 << 30)
    ingest(tiny_export, path, version="v2", publish=False, progress=False, map_size=1 << 30)
    ingest(big_export, path, progress=False, map_size=1 << 30)
    ingest(wide_export, path, progress=False, map_size=1 << 30)
    return path


@pytest.fixture(scope="module")
def open_server(api_lmdb, tmp_path_factory):
    """A server without auth: (grpc address, admin address)."""
    log = tmp_path_factory.mktemp("logs") / "open.log"
    with run_bank_server(api_lmdb, log_path=log) as (address, proc):
        yield address, proc.admin_address


@pytest.fixture
def secured_server(api_lmdb, tmp_path):
    """A server with a read token and an admin token (per test: Publish changes state)."""
    lmdb = tmp_path / "bank.lmdb"
    shutil.copytree(api_lmdb, lmdb)
    with run_bank_server(lmdb, *write_tokens(tmp_path), log_path=tmp_path / "log") as (a, p):
        yield a, p.admin_address


# -- Route -------------------------------------------------------------------------------------
def test_route_matches_the_device_router(open_server, router, tiny_export):
    address, _ = open_server
    m = load_manifest(tiny_export)
    rng = np.random.default_rng(0)
    with BankClient(address) as client:
        for emb in rng.standard_normal((20, router.dim)).astype(np.float32):
            want = router.route(torch.from_numpy(emb))[0].tolist()
            path, blocks, version = client.route("test", emb)
            assert path == want and version == "v1"
            assert blocks == m.path_blocks(want)
            # and the blocks it names are fetchable as they are
            assert set(client.fetch("test", version, blocks, m)) == set(blocks)
    assert list(route(address, "test", [0.0] * router.dim, version="v1").path) == \
        router.route(torch.zeros(router.dim))[0].tolist()
    # the stored router routes by its document index, not by descent, like the device
    queries = rng.standard_normal((50, router.dim)).astype(np.float32)
    assert (router.route(queries) != router.route(queries, routing="centroid")).any()


def test_route_errors(open_server, router):
    address, _ = open_server
    dim = router.dim
    for bank, emb, version, code in [
        ("test", [0.5] * (dim + 1), "", grpc.StatusCode.INVALID_ARGUMENT),   # wrong width
        ("test", [], "", grpc.StatusCode.INVALID_ARGUMENT),                  # empty
        ("test", [float("nan")] * dim, "", grpc.StatusCode.INVALID_ARGUMENT),
        ("test", [float("inf")] * dim, "", grpc.StatusCode.INVALID_ARGUMENT),
        ("test", [0.0] * dim, "v2", grpc.StatusCode.NOT_FOUND),    # v2 has no router stored
        ("big", [0.0] * dim, "", grpc.StatusCode.NOT_FOUND),       # no router at all
        ("nope", [0.0] * dim, "", grpc.StatusCode.NOT_FOUND),
        ("test", [0.0] * dim, "v9", grpc.StatusCode.NOT_FOUND),
        ("", [0.0] * dim, "", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            route(address, bank, emb, version)
        assert e.value.code() == code, (bank, len(emb), version, e.value.details())


def test_route_on_a_damaged_stored_router_is_data_loss(api_lmdb, router, tmp_path):
    """The two server-fault rows of README's bad-input table: a stored router that does not
    parse, and one whose tree is not the manifest's, answer DATA_LOSS (never a wrong path)."""
    other = Router(router.branching + 1, router.depth, router.dim,
                   [np.zeros(((router.branching + 1) ** l, router.branching + 1, router.dim))
                    for l in range(router.depth)])
    for stored, says in [(b"not a router", "stored router is unreadable"),
                         (other.to_bytes(), "the manifest is k=")]:
        path = tmp_path / f"bank-{len(stored)}.lmdb"
        shutil.copytree(api_lmdb, path)
        env = lmdb.open(str(path), map_size=1 << 30)
        with env.begin(write=True) as txn:
            assert txn.get(router_key("test", "v1")) is not None
            txn.put(router_key("test", "v1"), stored)
        env.close()
        with run_bank_server(path, log_path=tmp_path / f"log-{len(stored)}") as (address, _):
            with pytest.raises(grpc.RpcError) as e:
                route(address, "test", [0.0] * router.dim)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS, e.value.details()
        assert says in e.value.details()


# -- admin HTTP --------------------------------------------------------------------------------
def test_admin_http_endpoints(open_server, tiny_export, big_export):
    address, admin = open_server
    assert admin is not None
    assert http(admin, "/healthz")[:2] == (200, b'{"status":"ok"}')
    # ready: manifests load and level 1 was pre-read (warm) at start
    deadline = time.monotonic() + 10
    while (ready := http(admin, "/readyz"))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, body, _ = ready
    detail = json.loads(body)
    assert status == 200 and detail["ready"] and detail["banks"] == {"test": "v1", "big": "b1",
                                                                  "wide": "w1"}
    assert detail["warm"]["blocks"] == 2 + 2 + 32 and not detail["warm"]["corrupt"]   # level 1

    # some traffic, including errors, then every metric family shows it
    with BankClient(address) as c:
        m = c.get_manifest("big")
        c.fetch("big", "b1", [(1, 0), (3, 5)], m)
        with pytest.raises(BankError):
            c.get_manifest("nope")
    status, body, headers = http(admin, "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for needle in ('membank_fetch_block_seconds_bucket{le="0.0005",level="1"}',
                   'membank_fetch_block_seconds_count{level="3"}',
                   'membank_block_bytes_sent_total{level="1"}',
                   'membank_rpc_total{code="NOT_FOUND",method="GetManifest"}',
                   'membank_rpc_total{code="OK",method="FetchBlocks"}',
                   'membank_tier_hits{tier="lmdb"}', "membank_rpc_in_flight",
                   "process_resident_memory_bytes"):
        assert needle in text, needle
    sent = next(line for line in text.splitlines()
                if line.startswith('membank_block_bytes_sent_total{level="1"}'))
    assert float(sent.split()[-1]) >= m.block_nbytes(1)   # (other tests fetch too)

    stats = json.loads(http(admin, "/v1/stats")[1])
    assert stats["rpcs"]["GetManifest"]["NOT_FOUND"] >= 1
    assert stats["fetch_by_level"]["1"]["bytes"] >= m.block_nbytes(1)
    assert stats["tiers"]["lmdb"]["hits"] >= 2
    assert stats["limits"]["max_blocks_per_request"] == 64 and stats["ready"]

    status, body, _ = http(admin, "/v1/manifest/test")
    assert status == 200 and as_exported(Manifest.from_json(body)) == load_manifest(tiny_export)
    status, body, _ = http(admin, "/v1/manifest/test/v2")
    assert status == 200 and json.loads(body)["version"] == "v2"
    assert http(admin, "/v1/manifest/nope")[0] == 404
    assert http(admin, "/v1/manifest/test/v9")[0] == 404
    # admin writes are disabled without an admin token
    assert http(admin, "/v1/publish", method="POST", body={"bank": "test", "version": "v2"},
                token="anything")[0] == 403
    # OpenAPI
    assert http(admin, "/docs")[0] == 200
    paths = json.loads(http(admin, "/openapi.json")[1])["paths"]
    assert {"/healthz", "/readyz", "/metrics", "/v1/stats", "/v1/manifest/{bank}",
            "/v1/manifest/{bank}/{version}", "/v1/publish"} <= set(paths)


# -- auth and Publish --------------------------------------------------------------------------
def test_token_auth_on_reads(secured_server):
    address, admin = secured_server
    code = grpc.StatusCode
    # no token, malformed, wrong token, right token, admin token
    with BankClient(address) as c, pytest.raises(BankError) as e:
        c.get_manifest("test")
    assert e.value.code == "UNAUTHENTICATED"
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary("/membank.v1.BankService/GetManifest",
                              request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=bank_pb2.GetManifestResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(bank_pb2.GetManifestRequest(bank="test"), timeout=5,
                 metadata=(("authorization", READ_TOKEN),))          # no "Bearer "
        assert err.value.code() == code.UNAUTHENTICATED
    # this server is plaintext on loopback: a client sends it a token only when told to
    # (allow_insecure_token; by default a token means TLS: test_token_never_in_the_clear below)
    with BankClient(address, token="wrong", allow_insecure_token=True) as c, \
            pytest.raises(BankError) as e:
        c.fetch("test", "v1", [(1, 0)], load_manifest_from(admin, "test", READ_TOKEN))
    assert e.value.code == "PERMISSION_DENIED"
    for token in (READ_TOKEN, ADMIN_TOKEN):
        with BankClient(address, token=token, allow_insecure_token=True) as c:
            m = c.get_manifest("test")
            assert len(c.fetch("test", "v1", [(1, 0), (2, 3)], m)) == 2
    # probes need no token
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="membank.v1.BankService"), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert http(admin, "/healthz")[0] == 200 and http(admin, "/metrics")[0] == 200
    # HTTP reads follow the gRPC read auth
    status, _, headers = http(admin, "/v1/manifest/test")
    assert status == 401 and headers.get("www-authenticate") == "Bearer"
    assert http(admin, "/v1/manifest/test", token="wrong")[0] == 403
    assert http(admin, "/v1/manifest/test", token=READ_TOKEN)[0] == 200
    assert http(admin, "/v1/stats", token=READ_TOKEN)[0] == 200
    assert http(admin, "/v1/stats")[0] == 401


def load_manifest_from(admin, bank, token):
    from membank.manifest import Manifest
    return Manifest.from_json(http(admin, f"/v1/manifest/{bank}", token=token)[1])


def test_publish_over_grpc_and_http(secured_server):
    address, admin = secured_server
    code = grpc.StatusCode
    req = bank_pb2.PublishRequest(bank="test", version="v2")
    method = "/membank.v1.BankAdmin/Publish"
    assert rpc_code(address, method, req, bank_pb2.PublishResponse) == code.UNAUTHENTICATED
    assert rpc_code(address, method, req, bank_pb2.PublishResponse, token=READ_TOKEN) \
        == code.PERMISSION_DENIED
    assert rpc_code(address, method, bank_pb2.PublishRequest(bank="test", version="v9"),
                    bank_pb2.PublishResponse, token=ADMIN_TOKEN) == code.NOT_FOUND
    assert rpc_code(address, method, bank_pb2.PublishRequest(bank="te/st", version="v2"),
                    bank_pb2.PublishResponse, token=ADMIN_TOKEN) == code.INVALID_ARGUMENT
    # names are matched whole and start with a letter or digit: a trailing newline is refused,
    # and a name like "-h" never reaches the publish child as an option (it once "succeeded")
    for bank, version in (("-h", "v2"), ("test", "--help"), ("test\n", "v2"), ("test", "v2\n")):
        assert rpc_code(address, method, bank_pb2.PublishRequest(bank=bank, version=version),
                        bank_pb2.PublishResponse, token=ADMIN_TOKEN) == code.INVALID_ARGUMENT

    with BankClient(address, token=READ_TOKEN, allow_insecure_token=True) as c:   # plaintext
        assert c.get_manifest("test").version == "v1"
        resp = publish(address, "test", "v2", token=ADMIN_TOKEN)
        assert (resp.bank, resp.version, resp.previous) == ("test", "v2", "v1")
        assert c.get_manifest("test").version == "v2"     # visible to the next request
        m = c.get_manifest("test")
        assert len(c.fetch("test", "", [(1, 1)], m)) == 1

        # and back over HTTP
        body = {"bank": "test", "version": "v1"}
        assert http(admin, "/v1/publish", method="POST", body=body)[0] == 401
        assert http(admin, "/v1/publish", method="POST", body=body, token=READ_TOKEN)[0] == 403
        status, out, _ = http(admin, "/v1/publish", method="POST", body=body, token=ADMIN_TOKEN)
        assert status == 200 and json.loads(out) == {"bank": "test", "version": "v1",
                                                     "previous": "v2"}
        assert c.get_manifest("test").version == "v1"
        assert http(admin, "/v1/publish", method="POST", body={"bank": "test", "version": "v9"},
                    token=ADMIN_TOKEN)[0] == 404
        assert http(admin, "/v1/publish", method="POST", body={"bank": "test"},
                    token=ADMIN_TOKEN)[0] == 422
        assert http(admin, "/v1/publish", method="POST", body={"bank": "", "version": "v1"},
                    token=ADMIN_TOKEN)[0] == 400


# -- TLS ---------------------------------------------------------------------------------------
def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1: (cert.pem, key.pem)."""
    cert, key = self_signed_cert(["localhost", "127.0.0.1"], days=1)
    (tmp / "cert.pem").write_bytes(cert)
    (tmp / "key.pem").write_bytes(key)
    return tmp / "cert.pem", tmp / "key.pem"


def test_tls(api_lmdb, tmp_path, tiny_export):
    cert, key = self_signed(tmp_path)
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), *write_tokens(tmp_path)]
    with run_bank_server(api_lmdb, *flags, log_path=tmp_path / "log") as (address, proc):
        port = address.rsplit(":", 1)[1]
        with BankClient(f"localhost:{port}", tls_ca=cert, token=READ_TOKEN) as c:
            m = c.get_manifest("test")
            assert as_exported(m) == load_manifest(tiny_export)
            got = c.fetch("test", "v1", list(m.blocks()), m)
            want = {(l, n): d for l, n, d in iter_blocks(tiny_export, m)}
            assert {k: bytes(v) for k, v in got.items()} == {k: bytes(v) for k, v in want.items()}
        # a plaintext client gets nowhere
        with BankClient(address, timeout_s=3) as c, pytest.raises(BankError) as e:
            c.get_manifest("test")
        assert e.value.code == "UNAVAILABLE"
        # a client that does not trust the certificate neither
        with BankClient(f"localhost:{port}", tls_ca=True, timeout_s=3) as c, \
                pytest.raises(BankError) as e:
            c.get_manifest("test")
        assert e.value.code == "UNAVAILABLE"
        # admin HTTP is TLS too
        admin_port = proc.admin_address.rsplit(":", 1)[1]
        ctx = ssl.create_default_context(cafile=str(cert))
        status, _, _ = http(f"localhost:{admin_port}", "/v1/manifest/test", token=READ_TOKEN,
                            context=ctx, scheme="https")
        assert status == 200


# -- limits ------------------------------------------------------------------------------------
def test_request_size_limit(api_lmdb, tmp_path):
    with run_bank_server(api_lmdb, "--max-request-bytes", "1024",
                         log_path=tmp_path / "log") as (address, _):
        big = bank_pb2.GetManifestRequest(bank="test", version="v" * 2000)
        assert rpc_code(address, "/membank.v1.BankService/GetManifest", big,
                        bank_pb2.GetManifestResponse) == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = bank_pb2.GetManifestRequest(bank="test")
        assert rpc(address, "/membank.v1.BankService/GetManifest", small,
                   bank_pb2.GetManifestResponse).manifest_json


def slow_fetch(address, request: bank_pb2.FetchBlocksRequest, *, timeout: float,
               delay_s: float, started: threading.Event | None = None) -> tuple[list, object]:
    """Read a FetchBlocks stream slowly (sleeping between chunks); (chunks, error or None)."""
    ch = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 4 << 20)])
    call = ch.unary_stream("/membank.v1.BankService/FetchBlocks",
                           request_serializer=lambda m: m.SerializeToString(),
                           response_deserializer=bank_pb2.BlockChunk.FromString)
    chunks, err = [], None
    try:
        for chunk in call(request, timeout=timeout):
            chunks.append(chunk)
            if started is not None:
                started.set()
            time.sleep(delay_s)
    except grpc.RpcError as e:
        err = e
    finally:
        ch.close()
    return chunks, err


def big_request(n: int) -> bank_pb2.FetchBlocksRequest:
    """n (at most 32) distinct level-1 blocks of the "wide" bank (1.76 MiB each): a request
    may not list a block twice."""
    return bank_pb2.FetchBlocksRequest(bank="wide", version="w1",
                                       blocks=[bank_pb2.BlockId(level=1, node=i)
                                               for i in range(n)])


def test_concurrent_stream_limit(api_lmdb, tmp_path):
    with run_bank_server(api_lmdb, "--max-concurrent-rpcs", "1",
                         log_path=tmp_path / "log") as (address, _):
        started = threading.Event()
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=slow_fetch(address, big_request(32), timeout=30, delay_s=0.02, started=started)))
        t.start()
        assert started.wait(10)
        assert rpc_code(address, "/membank.v1.BankService/GetManifest",
                        bank_pb2.GetManifestRequest(bank="test"),
                        bank_pb2.GetManifestResponse) == grpc.StatusCode.RESOURCE_EXHAUSTED
        t.join(60)
        chunks, err = result["r"]
        assert err is None and sum(len(c.data) for c in chunks) == 32 * 1_843_200
        # the slot is free again
        assert rpc(address, "/membank.v1.BankService/GetManifest",
                   bank_pb2.GetManifestRequest(bank="test"), bank_pb2.GetManifestResponse)


def test_rate_limit(api_lmdb, tmp_path):
    with run_bank_server(api_lmdb, "--rate-limit-rps", "2", "--rate-limit-burst", "3",
                         log_path=tmp_path / "log") as (address, proc):
        req = bank_pb2.GetManifestRequest(bank="test")
        method = "/membank.v1.BankService/GetManifest"
        for _ in range(3):
            rpc(address, method, req, bank_pb2.GetManifestResponse)
        with pytest.raises(grpc.RpcError) as e:
            rpc(address, method, req, bank_pb2.GetManifestResponse)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit" in e.value.details() and "retry in" in e.value.details()
        # health is never limited; the bucket refills at 2/s
        with BankClient(address) as c:
            assert c.health()
        time.sleep(0.6)
        rpc(address, method, req, bank_pb2.GetManifestResponse)
        stats = json.loads(http(proc.admin_address, "/v1/stats")[1])
        assert stats["rpcs"]["GetManifest"]["RESOURCE_EXHAUSTED"] >= 1


# -- deadlines and shutdown --------------------------------------------------------------------
def test_deadline_stops_the_stream(open_server):
    address, admin = open_server
    before = json.loads(http(admin, "/v1/stats")[1])["rpcs"].get("FetchBlocks", {})
    chunks, err = slow_fetch(address, big_request(32), timeout=0.5, delay_s=0.05)
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(chunks) < 32 * 2
    # the server saw the deadline too, and stopped sending
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = json.loads(http(admin, "/v1/stats")[1])["rpcs"].get("FetchBlocks", {})
        if after.get("DEADLINE_EXCEEDED", 0) > before.get("DEADLINE_EXCEEDED", 0):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"server did not record DEADLINE_EXCEEDED: {after}")
    # an already expired deadline
    with BankClient(address, timeout_s=-1) as c, pytest.raises(BankError) as e:   # expired
        c.get_manifest("test")
    assert e.value.code == "DEADLINE_EXCEEDED"
    with BankClient(address) as c:
        assert c.health()


def test_sigterm_drains_in_flight_fetch(api_lmdb, tmp_path, wide_export):
    want = {(l, n): bytes(d) for l, n, d in iter_blocks(wide_export, load_manifest(wide_export))}
    # a grace far above the ~1 s the slow reader needs, so a busy CI machine cannot cut it short
    with run_bank_server(api_lmdb, "--shutdown-grace-s", "20",
                         log_path=tmp_path / "log") as (address, proc):
        n_blocks = 24                       # 42 MiB: far more than any flow-control window
        started = threading.Event()
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=slow_fetch(address, big_request(n_blocks), timeout=30, delay_s=0.02,
                         started=started)))
        t.start()
        assert started.wait(10)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        # new work is refused while the old finishes
        time.sleep(0.2)
        assert proc.poll() is None
        with BankClient(address, timeout_s=2) as c, pytest.raises(BankError) as e:
            c.get_manifest("test")
        assert e.value.code == "UNAVAILABLE"
        t.join(30)
        chunks, err = result["r"]
        assert err is None, err
        # every block arrived whole and intact
        blocks: dict[int, bytearray] = {}
        for c in chunks:
            blocks.setdefault(c.index, bytearray()).extend(c.data)
        assert len(blocks) == n_blocks
        assert all(bytes(b) == want[(1, i)] for i, b in blocks.items())
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 15   # it exits once drained, before the grace ends


def test_reflection_lists_every_service(open_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    address, _ = open_server
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"membank.v1.BankService", "membank.v1.BankAdmin", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
