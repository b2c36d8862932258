"""One client cannot deny the gRPC API to others (issue 16, point 1), against a real server.

The attacker reaches the server through a relay bound to 127.0.0.2 (testkit/net.py), so the
server sees it as another client than the device (127.0.0.1): limits are per client IP.
  - Health/Watch streams take watch slots, few per client: they never crowd out Health.Check
    (the liveness probe) or the device's RPCs, and they end after their lifetime;
  - one client holds at most `max_rpcs_per_peer` of the server's RPC slots;
  - a FetchBlocks client that stops reading is ended after `stream_stall_timeout_s`.

Run: .venv/bin/python -m pytest -q tests/integration/test_admission.py
"""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from membank.v1 import bank_pb2
from testkit.net import Relay
from tests.conftest import run_bank_server, wait_for

pytestmark = pytest.mark.integration

FETCH = "/membank.v1.BankService/FetchBlocks"
BIG_BLOCK = 1_843_200        # a level-1 block of the "wide" bank: 2 chunks of at most 1 MiB


@pytest.fixture(scope="module")
def lmdb_dir(tmp_path_factory, wide_export):
    """Bank "wide": 32 distinct level-1 blocks (a request may not list a block twice)."""
    from services.bank_server.ingest import ingest
    path = tmp_path_factory.mktemp("admission") / "bank.lmdb"
    ingest(wide_export, path, progress=False, map_size=1 << 30)
    return path


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 4 << 20)])


def check(address: str) -> int:
    """Health.Check of the whole server: its status (raises grpc.RpcError when refused)."""
    with channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10).status


def fetch_stream(ch: grpc.Channel, n_blocks: int, timeout: float | None = None):
    """A FetchBlocks stream of n (at most 32) distinct level-1 blocks of "wide" (the caller
    reads it, or not)."""
    request = bank_pb2.FetchBlocksRequest(bank="wide", version="w1", blocks=[
        bank_pb2.BlockId(level=1, node=i) for i in range(n_blocks)])
    call = ch.unary_stream(FETCH, request_serializer=lambda m: m.SerializeToString(),
                           response_deserializer=bank_pb2.BlockChunk.FromString)
    return call(request, timeout=timeout)


def fetch_all(address: str, n_blocks: int) -> int:
    """Bytes of a whole FetchBlocks of n blocks, read at once."""
    with channel(address) as ch:
        return sum(len(c.data) for c in fetch_stream(ch, n_blocks, timeout=30))


def code_of(iterator) -> grpc.StatusCode:
    try:
        next(iterator)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_watch_streams_never_crowd_out_health_checks(lmdb_dir, tmp_path):
    """The issue's case: with 4 RPC slots, 4 Watch streams from one client made Health.Check
    answer RESOURCE_EXHAUSTED (the liveness probe would restart the pod in a loop)."""
    with run_bank_server(lmdb_dir, "--max-concurrent-rpcs", "4",
                         log_path=tmp_path / "log") as (address, _), \
            Relay(address, source_host="127.0.0.2") as relay, channel(relay.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                   for _ in range(6)]
        first = []
        for w in watches:
            try:
                first.append(next(w).status)
            except grpc.RpcError as e:
                first.append(e.code())
        # some of the attacker's Watch streams are served, the ones beyond its share refused
        assert health_pb2.HealthCheckResponse.SERVING in first
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in first
        # the probe, the attacker's own Check, and the device's RPCs all still answer
        assert check(address) == health_pb2.HealthCheckResponse.SERVING
        assert check(relay.address) == health_pb2.HealthCheckResponse.SERVING
        assert fetch_all(address, 2) == 2 * BIG_BLOCK
        for w in watches:
            w.cancel()


def test_watch_stream_ends_after_its_lifetime(lmdb_dir, tmp_path):
    with run_bank_server(lmdb_dir, "--health-watch-max-s", "1",
                         log_path=tmp_path / "log") as (address, _), channel(address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30)
        # SERVING, then the server ends the stream with OK (a deadline here would raise)
        assert [r.status for r in watch] == [health_pb2.HealthCheckResponse.SERVING]
        assert watch.code() == grpc.StatusCode.OK


def test_one_client_cannot_take_every_rpc_slot(lmdb_dir, tmp_path):
    with run_bank_server(lmdb_dir, "--max-concurrent-rpcs", "4", "--max-rpcs-per-peer", "2",
                         log_path=tmp_path / "log") as (address, _), \
            Relay(address, source_host="127.0.0.2") as relay, channel(relay.address) as ch:
        # the attacker opens streams and never reads past their first chunk
        held = [fetch_stream(ch, 32) for _ in range(2)]
        assert all(next(s).index == 0 for s in held)
        refused = fetch_stream(ch, 1)
        assert code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per client" in refused.details()
        # the device still gets its slots; health answers
        assert fetch_all(address, 4) == 4 * BIG_BLOCK
        assert check(address) == health_pb2.HealthCheckResponse.SERVING
        for s in held:
            s.cancel()
        # the attacker's slots are free again once its streams end
        assert wait_for(lambda: code_of(fetch_stream(ch, 1)) == grpc.StatusCode.OK, 10)


def test_a_client_that_stops_reading_is_ended_after_the_stall_timeout(lmdb_dir, tmp_path):
    """A FetchBlocks client with no deadline that never reads: the server ends its stream
    (DEADLINE_EXCEEDED) after `stream_stall_timeout_s` instead of pinning the handler."""
    log = tmp_path / "log"
    with run_bank_server(lmdb_dir, "--stream-stall-timeout-s", "1",
                         log_path=log) as (address, _), \
            Relay(address, source_host="127.0.0.2") as relay, channel(relay.address) as ch:
        stream = fetch_stream(ch, 32)             # 56 MiB, no deadline
        assert next(stream).index == 0            # ... and then it stops reading
        assert wait_for(lambda: "stalled" in log.read_text(), 30), log.read_text()[-2000:]
        assert "127.0.0.2" in log.read_text()
        # the device is served meanwhile
        assert fetch_all(address, 2) == 2 * BIG_BLOCK
        # when the client reads again, it finds its stream ended short with the reason
        n = 1
        with pytest.raises(grpc.RpcError) as e:
            for _ in stream:
                n += 1
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "took no data" in e.value.details()
        assert n < 32 * 2
