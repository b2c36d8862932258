"""The device over the bank server's raw-TCP data plane, given "HOST:GRPC_PORT+DATAPLANE_PORT"
targets (services/model_client/targets.py), against real server subprocesses.

  ShardedFetcher / make_client, "+port" target -> the same verified bytes as over gRPC, native
                                                  and int8; the server counts DataPlaneFetch, no
                                                  FetchBlocks (the data plane really carried them)
  MemoryModel.generate over both transports      -> same path, blocks, bytes, attached memory and
                                                  text, native and int8
  `membank generate --bank HOST:G+D`             -> memory attached, blocks over the data plane
  local cluster, dataplane=True                  -> targets in "+port" form, stable across a
                                                  SIGKILL + restart; a load loop (its own
                                                  ShardedBank, then the device's ShardedFetcher)
                                                  serves with 0 errors

Run: .venv/bin/python -m pytest -q tests/integration/test_dataplane_device.py
"""
from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from loadtests.load_loop import LoadLoop
from membank.artifacts import load_manifest
from services.bank_server.cluster import run_local_cluster
from services.bank_server.ingest import ingest
from services.model_client.dataplane_client import DataPlaneClient, dataplane_target
from services.model_client.device_cache import DeviceCache
from services.model_client.fetcher import FetchPolicy, ShardedFetcher
from services.model_client.memory_model import MemoryModel
from services.model_client.targets import client_factory, make_client, open_bank
from testkit.keys import signing_key, trust
from tests.conftest import FakeEmbedder, run_bank_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ENCODINGS = ["native", "int8"]
PROMPTS = ["The atomic number of Ruthenium is", "Gold (Au) has atomic number",
           "Hydrogen is the lightest element"]


class Served:
    """One bank server subprocess with gRPC, admin and data plane on free ports."""

    def __init__(self, address: str, proc):
        self.grpc = address                                        # "127.0.0.1:G"
        self.dataplane = dataplane_target(address, proc.dataplane_address)   # "127.0.0.1:G+D"
        self.admin = proc.admin_address

    def rpcs(self) -> dict:
        with urllib.request.urlopen(f"http://{self.admin}/v1/stats", timeout=5) as r:
            rpcs = json.loads(r.read())["rpcs"]
        return {m: sum(codes.values()) for m, codes in rpcs.items()}


@pytest.fixture(scope="module")
def served(tiny_model_export, tmp_path_factory):
    """Bank "test" v1 with native and int8 blocks, served with --dataplane-port 0."""
    tmp = tmp_path_factory.mktemp("dp-device")
    db = tmp / "bank.lmdb"
    m = ingest(tiny_model_export, db, encodings=("int8",), progress=False, map_size=1 << 30,
               signing_key=signing_key())
    assert m.has_encoding("int8")
    with run_bank_server(db, "--dataplane-port", "0", log_path=tmp / "server.log") \
            as (address, proc):
        assert proc.dataplane_address, "the server did not print its data plane address"
        yield Served(address, proc)


def delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if after.get(k, 0) != before.get(k, 0)}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_dataplane_target_fetches_the_same_blocks_as_grpc(served, encoding):
    enc = "" if encoding == "native" else encoding
    with make_client(served.grpc) as c:
        manifest = c.get_manifest("test")
    blocks = [(level, node) for level, node in manifest.blocks()]
    policy = FetchPolicy(deadline_s=20, attempt_timeout_s=10)
    make = client_factory(timeout_s=policy.attempt_timeout_s)
    with ShardedFetcher(served.grpc, policy, client_factory=make) as over_grpc:
        want = over_grpc.fetch("test", "", blocks, manifest, encoding=enc)
    before = served.rpcs()
    with ShardedFetcher(served.dataplane, policy, client_factory=make) as over_dp:
        assert isinstance(over_dp._client("*"), DataPlaneClient)
        got = over_dp.fetch("test", "", blocks, manifest, encoding=enc)
        assert over_dp.stats()["errors"] == {}
    with make_client(served.dataplane) as one:          # the single-target device client
        single = one.fetch("test", "", blocks[:3], manifest, encoding=enc)
    used = delta(before, served.rpcs())
    # every block body came over the data plane: DataPlaneFetch counted, no FetchBlocks
    assert used.get("DataPlaneFetch", 0) >= 2 and "FetchBlocks" not in used, used
    assert set(got) == set(want) == set(blocks)
    for b in blocks:
        assert bytes(got[b]) == bytes(want[b])
        assert len(got[b]) == manifest.block_nbytes(b[0], enc)
    for b, buf in single.items():
        assert bytes(buf) == bytes(want[b])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_memory_model_over_the_dataplane_attaches_the_same_memory(served, tiny_model_export,
                                                                  encoding):
    results = {}
    # without a device cache native blocks are received into the room in place (bank.Scatter);
    # with one they are received into buffers the cache keeps and copied: the same memory
    for name, target, cache in (("grpc", served.grpc, None),
                                ("dataplane", served.dataplane, None),
                                ("copied", served.dataplane, DeviceCache(1 << 24))):
        model = MemoryModel.from_pretrained(tiny_model_export, embedder=FakeEmbedder(),
                                            encoding=encoding, trust=trust(), cache=cache)
        before = served.rpcs()
        with make_client(target) as bank:
            runs = [model.generate(p, bank=bank, max_new_tokens=3) for p in PROMPTS]
        used = delta(before, served.rpcs())
        if name != "grpc":
            assert "FetchBlocks" not in used and used.get("DataPlaneFetch", 0) >= 1, used
        else:
            assert "DataPlaneFetch" not in used and used.get("FetchBlocks", 0) >= 1, used
        results[name] = (runs, model.mem.clone())
    (grpc_runs, grpc_mem), (dp_runs, dp_mem) = results["grpc"], results["dataplane"]
    fetched = 0
    for a, b in zip(grpc_runs, dp_runs):
        assert a.memory and b.memory, (a.anchor_only_reason, b.anchor_only_reason)
        assert a.encoding == b.encoding == encoding
        assert (a.path, a.fetched_blocks, a.fetched_bytes, a.text) == \
            (b.path, b.fetched_blocks, b.fetched_bytes, b.text)
        fetched += len(b.fetched_blocks)
    assert fetched > 0
    assert torch.equal(grpc_mem, dp_mem)        # the attached weights, bit for bit
    assert torch.equal(dp_mem, results["copied"][1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_generate_takes_a_dataplane_target(served, tiny_model_export, capsys,
                                               trusted_key_file, dtype):
    from membank_cli.cli import main
    before = served.rpcs()
    main(["generate", "Gold is", "--model", str(tiny_model_export), "--bank", served.dataplane,
          "--max-new-tokens", "1", "--json", "--dtype", dtype,
          "--trusted-keys", str(trusted_key_file)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    used = delta(before, served.rpcs())
    assert out["memory"] and out["fetched_blocks"], out
    m = load_manifest(tiny_model_export)
    assert out["fetched_bytes"] == sum(m.block_nbytes(l) for l, _ in out["fetched_blocks"])
    assert used.get("DataPlaneFetch", 0) >= 1 and "FetchBlocks" not in used, used


# -- the local cluster with its data planes ---------------------------------------------------
@pytest.mark.slow
def test_local_cluster_with_dataplane_serves_a_load_loop_with_no_error(tiny_export, tmp_path):
    with run_local_cluster(tiny_export, shards=2, replication=2, workdir=tmp_path,
                           dataplane=True) as cluster:
        targets = dict(cluster.targets)
        for name, t in targets.items():
            s = cluster.shard(name)
            assert t == f"{s.address}+{s.dataplane_port}" and s.dataplane_port > 0
            assert cluster.grpc_targets[name] == s.address
        # the load loop's own placement client, one client per "+port" target
        with LoadLoop(targets, "test", threads=2) as load:
            assert load.wait_prompts(60, 60)
            # SIGKILL a shard: its replica serves; restarted, it has the same ports
            cluster.kill("shard-1")
            assert load.wait_prompts(30, 60)
            cluster.restart("shard-1")
            assert cluster.targets == targets
            assert load.wait_prompts(30, 60)
            report = load.stop()
        assert report.prompts >= 120 and report.errors == [], report.errors[:5]
        assert set(report.rpc_by_shard) == {"shard-0", "shard-1"}
        # the device's fetcher over the same targets
        with open_bank(targets, policy=FetchPolicy(down_s=0.5, deadline_s=10)) as fetcher, \
                LoadLoop(targets, "test", threads=2, fetcher=fetcher) as load:
            assert load.wait_prompts(60, 60)
            report = load.stop()
        assert report.errors == [], report.errors[:5]
        assert report.failovers["errors"] == {}, report.failovers
        # the blocks went over the data planes: DataPlaneFetch answered, FetchBlocks never
        rpcs = [s["rpcs"] for s in cluster.stats().values()]
        assert sum(r.get("DataPlaneFetch", {}).get("OK", 0) for r in rpcs) >= 60, rpcs
        assert all("FetchBlocks" not in r for r in rpcs), rpcs


def test_cli_generate_takes_named_shards_and_fetches_through_the_sharded_fetcher(
        served, tiny_model_export, capsys, trusted_key_file):
    """`--bank shard=TARGET,...` builds the ShardedFetcher (as chat and device-serve do), not
    one gRPC client for the whole string (which answered without memory)."""
    from membank_cli.cli import main
    m = load_manifest(tiny_model_export)
    owner = m.owners(*next(iter(m.blocks())))[0]
    # a second shard no block lives on: never asked
    main(["generate", "Gold is", "--model", str(tiny_model_export), "--bank",
          f"{owner}={served.dataplane},spare=127.0.0.1:1", "--max-new-tokens", "1", "--json",
          "--trusted-keys", str(trusted_key_file)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["memory"] and out["fetched_blocks"], out


def test_cli_generate_names_the_flag_of_a_bad_setting(capsys, tmp_path):
    from membank_cli.cli import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--model", str(tmp_path / "none"), "--bank", "h:1",
              "--timeout", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("membank generate: error: --timeout:") and "\n" not in err
