"""Load test of bank shards: devices that route prompts with Zipf popularity and fetch blocks.

    locust -f loadtests/locustfile.py --headless -u 8 -r 4 -t 30s --host 127.0.0.1:50051 \
        --csv runs/loadtest/lt --html runs/loadtest/lt.html

Each locust user is one device (loadtests/device.py): on start it reads the bank's manifest
(GetManifest); every task is one prompt: pick a leaf with Zipf popularity, take the path's
blocks, fetch only those missing from its device cache with ONE FetchBlocks per shard holding
them (the manifest's placement; a failing shard is skipped for the next replica, see
load_loop.ShardedBank; verified against the manifest's checksums by BankClient), cache them.
Every few seconds it re-reads the manifest; a new version empties its cache.

Reported to locust (request_type / name):
  grpc   GetManifest, FetchBlocks L<levels>   one entry per RPC (interceptor, grpc_instrument.py)
  device prompt                               one per prompt: time to have all its blocks;
                                              failed if any RPC or verification failed
--host is "host:port", or one address per shard: "shard-0=h:p,shard-1=h:p", or plain
"h:p,h:p" in the order of the manifest's `shards` (device.parse_targets); each fetch goes where
the device's planner sends it (services/model_client/fetcher.py `plan_groups`). Settings
(environment):
  MEMBANK_LOADTEST_BANK       bank name (demo)
  MEMBANK_LOADTEST_ZIPF_S     Zipf exponent over leaves (1.1)
  MEMBANK_LOADTEST_CACHE      device cache capacity in blocks (4)
  MEMBANK_LOADTEST_WAIT_S     think time between prompts per user (0: closed loop)
  MEMBANK_LOADTEST_MANIFEST_S seconds between manifest re-reads (10)
  MEMBANK_LOADTEST_SEED       seed of leaf ranks and of each user's choices (0)
  MEMBANK_LOADTEST_TLS_CA     PEM file of the CA (or self-signed certificate) the shards' TLS
                              certificate is checked against; unset: plaintext gRPC
  MEMBANK_LOADTEST_TLS_SERVER_NAME  name checked in the certificate instead of the host's
  MEMBANK_LOADTEST_TOKEN_FILE file holding the read token (sent only over TLS)
"""
from __future__ import annotations

import itertools
import os
import random
import sys
import time
from pathlib import Path

# gRPC's C core must yield to gevent (locust monkey-patches the stdlib before importing this
# file); this must run before any channel is created
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, constant, events, task  # noqa: E402

from device import DeviceCache, ZipfLeaves, parse_targets  # noqa: E402  (locust puts this dir on sys.path)
from grpc_instrument import InstrumentedBankClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo (or image) root
from loadtests.load_loop import ShardedBank  # noqa: E402
from services.model_client.bank_client import BankError  # noqa: E402

BANK = os.environ.get("MEMBANK_LOADTEST_BANK", "demo")
ZIPF_S = float(os.environ.get("MEMBANK_LOADTEST_ZIPF_S", "1.1"))
CACHE_BLOCKS = int(os.environ.get("MEMBANK_LOADTEST_CACHE", "4"))
WAIT_S = float(os.environ.get("MEMBANK_LOADTEST_WAIT_S", "0"))
MANIFEST_S = float(os.environ.get("MEMBANK_LOADTEST_MANIFEST_S", "10"))
SEED = int(os.environ.get("MEMBANK_LOADTEST_SEED", "0"))
TLS_CA = os.environ.get("MEMBANK_LOADTEST_TLS_CA") or None
TLS_SERVER_NAME = os.environ.get("MEMBANK_LOADTEST_TLS_SERVER_NAME") or None
TOKEN_FILE = os.environ.get("MEMBANK_LOADTEST_TOKEN_FILE") or None
# BankClient refuses a token without TLS (services/model_client/bank_client.py tls_for_token)
CLIENT_KW = {"tls_ca": TLS_CA, "tls_server_name": TLS_SERVER_NAME,
             "token": Path(TOKEN_FILE).read_text().strip() if TOKEN_FILE else None}

_user_ids = itertools.count()
_device_totals = {"hits": 0, "misses": 0, "prompts": 0, "fetched_bytes": 0}


class BankDevice(User):
    wait_time = constant(WAIT_S)

    def on_start(self) -> None:
        self.user_id = next(_user_ids)
        spec = self.host or "127.0.0.1:50051"
        report = self.environment.events.request.fire
        first = spec.split(",")[0].split("=")[-1].strip()
        with InstrumentedBankClient(first, report, **CLIENT_KW) as probe:   # the shard ids
            shard_ids = probe.get_manifest(BANK).shards
        self.bank = ShardedBank(parse_targets(spec, shard_ids),
                                client=lambda addr, t: InstrumentedBankClient(addr, report, t,
                                                                              **CLIENT_KW))
        self.rng = random.Random(SEED * 1_000_003 + self.user_id)
        self.cache = DeviceCache(CACHE_BLOCKS)
        self.manifest = None
        self.manifest_at = 0.0
        self._refresh_manifest()

    def on_stop(self) -> None:
        for k, v in (("hits", self.cache.hits), ("misses", self.cache.misses)):
            _device_totals[k] += v
        self.bank.close()

    def _refresh_manifest(self) -> None:
        manifest = self.bank.manifest(BANK)
        if self.manifest is None or manifest.version != self.manifest.version:
            self.cache.clear()
            self.leaves = ZipfLeaves(manifest.branching, manifest.depth, ZIPF_S, SEED)
        self.manifest, self.manifest_at = manifest, time.monotonic()

    @task
    def prompt(self) -> None:
        start = time.perf_counter()
        exc, nbytes = None, 0
        try:
            if self.manifest is None or time.monotonic() - self.manifest_at > MANIFEST_S:
                self._refresh_manifest()
            m = self.manifest
            missing = self.cache.missing(m.path_blocks(self.leaves.sample_path(self.rng)))
            if missing:
                blocks = self.bank.fetch(m, missing)
                for block_id, buf in blocks.items():
                    self.cache.put(block_id, len(buf))
                    nbytes += len(buf)
        except BankError as e:   # RPC status or a block failing verification
            exc = e
        _device_totals["prompts"] += 1
        _device_totals["fetched_bytes"] += nbytes
        self.environment.events.request.fire(
            request_type="device", name="prompt",
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=nbytes, exception=exc, context={})


@events.quitting.add_listener
def _print_device_totals(environment, **_kw) -> None:
    t = _device_totals
    total = t["hits"] + t["misses"]
    ratio = t["hits"] / total if total else 0.0
    print(f"membank device totals: prompts {t['prompts']}, device cache hit ratio {ratio:.3f} "
          f"({t['hits']} hits / {t['misses']} misses), fetched {t['fetched_bytes']:,} B")
