"""Local cluster launcher: the compose / Kubernetes topology as processes on one machine.

    python -m services.bank_server.cluster --export runs/demo/export --shards 2 [--replication 2]
        [--redis] [--dataplane] [--workdir runs/cluster]
        [-- --lru-mb 64]                                  # extra flags: every server

    with run_local_cluster(export, shards=2, replication=2, redis=True) as cluster:
        cluster.targets            # {"shard-0": "127.0.0.1:PORT", "shard-1": ...}
        cluster.kill("shard-1")    # SIGKILL; cluster.restart("shard-1") brings it back, same port
        cluster.stop_redis(); cluster.start_redis()   # same port: servers pick it up again
        cluster.publish(new_export, version="v2")     # on every shard, two phases (below)

    with run_local_cluster(export, shards=2, dataplane=True) as cluster:
        cluster.targets            # {"shard-0": "127.0.0.1:GRPC+DP", ...}: block bodies over
                                   # each shard's raw-TCP data plane
                                   # (services/model_client/targets.py)
        cluster.grpc_targets       # {"shard-0": "127.0.0.1:GRPC", ...}: the same shards, gRPC only

A development tool for tests, load tests and benchmarks; production runs docker-compose.yml or
deploy/ (Kubernetes). Everything is real and on loopback: an optional `redis-server` on a free
port (no persistence), one LMDB per shard written by shard-aware ingest (each shard stores only
the blocks rendezvous placement gives it, plus the levels above `placement_level`), and one
`services.bank_server.server` subprocess per shard (launch.py) started with `--shard-id`, so a
shard asked for a block it does not own answers FAILED_PRECONDITION, as in production.

`dataplane=True` (`--dataplane`) starts every shard with `--dataplane-port` as well, and
`targets` gives the "HOST:GRPC_PORT+DATAPLANE_PORT" form, which ShardedFetcher, the load loop
and the device's `--bank` turn into data plane clients; off by default (`targets` is then plain
"HOST:PORT").

A restarted shard keeps its gRPC, admin and data plane ports, so clients holding its address
reconnect to it; Redis restarts on its port too. `publish` ingests the new version on EVERY
shard without publishing it, then switches `current` shard by shard: by the time any shard
advertises the new version, every shard can serve it, so a device holding either manifest never
gets NOT_FOUND (deploy/README.md, "Publish a new bank version").

The CLI prints one line per shard (`shard-0 127.0.0.1:PORT admin 127.0.0.1:PORT`, plus
`dataplane 127.0.0.1:PORT` with --dataplane), then one JSON line {"targets": ..., "redis": ...},
and runs until Ctrl-C (SIGINT) or SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from membank.artifacts import load_manifest
from membank.manifest import Manifest
from services.bank_server import launch
from services.bank_server.ingest import ingest
from services.bank_server.publish import publish_in_env

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def shard_names(n: int) -> list[str]:
    """The shard ids of an n-shard cluster, as compose and the StatefulSet name them."""
    return [f"shard-{i}" for i in range(n)]


# -- Redis ------------------------------------------------------------------------------------
class LocalRedis:
    """A private `redis-server` on loopback (cache only: no RDB, no AOF), restartable on its
    port; `unix_socket`: listen on that socket path too (`unix_url`)."""

    def __init__(self, workdir: Path, port: int | None = None, maxmemory_mb: int = 256,
                 unix_socket: Path | None = None):
        self.workdir, self.maxmemory_mb, self.unix_socket = workdir, maxmemory_mb, unix_socket
        self.port = port or launch.free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        if self.unix_socket is None:
            raise ValueError("this redis-server has no unix socket (LocalRedis(unix_socket=))")
        return f"unix://{self.unix_socket}?db=0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout_s: float = 2.0):
        """A redis-py client of this server."""
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s)

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir),
             "--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "allkeys-lru"]
            + (["--unixsocket", str(self.unix_socket)] if self.unix_socket else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        client = self.client(timeout_s=1.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# -- one shard --------------------------------------------------------------------------------
class ShardProcess:
    """One bank server subprocess over its shard's LMDB; keeps its ports across restarts.
    `dataplane`: serve block bodies over the raw-TCP data plane too (`--dataplane-port`)."""

    def __init__(self, name: str, lmdb: Path, args: Sequence[str], log_dir: Path, *,
                 dataplane: bool = False):
        self.name, self.lmdb, self.args, self.log_dir = name, lmdb, list(args), log_dir
        self.dataplane = dataplane
        self.port = 0          # 0 until the first start; then fixed (a restart rebinds it)
        self.admin_port = 0
        self.dataplane_port = 0
        self.address: str | None = None
        self.admin_address: str | None = None
        self.dataplane_address: str | None = None
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._stack: ExitStack | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def target(self) -> str | None:
        """What a device is given: "HOST:PORT", or "HOST:PORT+DATAPLANE_PORT" with the data
        plane."""
        if self.address is None or not self.dataplane:
            return self.address
        return f"{self.address}+{self.dataplane_port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.starts}.log"

    def start(self, timeout: float = 60.0) -> None:
        if self.alive:
            return
        self.close()
        self.starts += 1
        stack = ExitStack()
        # flags given later win in argparse: these override launch's "--port 0 --admin-port 0"
        ports = ["--port", str(self.port), "--admin-port", str(self.admin_port)]
        if self.dataplane:
            ports += ["--dataplane-port", str(self.dataplane_port)]
        address, proc = stack.enter_context(launch.run_bank_server(
            self.lmdb, "--shard-id", self.name, *self.args, *ports,
            log_path=self.log_path, timeout=timeout, cwd=REPO))
        self._stack, self.proc, self.address = stack, proc, address
        self.admin_address = proc.admin_address
        self.port = int(address.rsplit(":", 1)[1])
        if self.admin_address:
            self.admin_port = int(self.admin_address.rsplit(":", 1)[1])
        if self.dataplane:
            self.dataplane_address = proc.dataplane_address
            if not self.dataplane_address:
                stack.close()
                raise RuntimeError(f"{self.name} started without its data plane; log: "
                                   f"{self.log_path}")
            self.dataplane_port = int(self.dataplane_address.rsplit(":", 1)[1])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (default SIGKILL: no drain) and wait for the process to exit."""
        if self.alive:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def close(self) -> None:
        """Stop gracefully (SIGTERM, drain) if running; release the pipes and the log."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def stats(self, timeout: float = 5.0) -> dict:
        """The server's admin `GET /v1/stats` (tier hits, fetches by level, RPC codes)."""
        if not self.admin_address:
            raise RuntimeError(f"{self.name} runs without the admin HTTP server")
        with urllib.request.urlopen(f"http://{self.admin_address}/v1/stats",
                                    timeout=timeout) as r:
            return json.loads(r.read())

    def pid(self) -> int | None:
        return self.proc.pid if self.alive else None


# -- the cluster ------------------------------------------------------------------------------
class LocalCluster:
    def __init__(self, workdir: Path, shards: dict[str, ShardProcess], redis: LocalRedis | None,
                 manifest: Manifest, *, replication: int, placement_level: int | None,
                 map_size: int):
        self.workdir, self.shards, self.redis, self.manifest = workdir, shards, redis, manifest
        self.replication, self.placement_level, self.map_size = (replication, placement_level,
                                                                 map_size)
        self._lock = threading.Lock()     # kill/restart/publish from a test thread and a timer

    @property
    def bank(self) -> str:
        return self.manifest.bank

    @property
    def dataplane(self) -> bool:
        """Whether the shards serve block bodies over the data plane (`dataplane=True`)."""
        return any(s.dataplane for s in self.shards.values())

    @property
    def targets(self) -> dict[str, str]:
        """Shard id -> the device's target (stable across restarts): "127.0.0.1:PORT", or
        "127.0.0.1:PORT+DATAPLANE_PORT" when the cluster runs with the data plane."""
        return {name: s.target for name, s in self.shards.items()}

    @property
    def grpc_targets(self) -> dict[str, str]:
        """Shard id -> "127.0.0.1:PORT": gRPC only, with or without the data plane."""
        return {name: s.address for name, s in self.shards.items()}

    def shard(self, name: str) -> ShardProcess:
        try:
            return self.shards[name]
        except KeyError:
            raise KeyError(f"no shard {name!r}; shards: {sorted(self.shards)}") from None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        with self._lock:
            self.shard(name).kill(sig)

    def restart(self, name: str) -> None:
        """Start a killed (or running: it is stopped first) shard again on its ports."""
        with self._lock:
            s = self.shard(name)
            s.close()
            s.start()

    def stop_redis(self, *, kill: bool = False) -> None:
        if self.redis is None:
            raise RuntimeError("this cluster runs without Redis (redis=True to have one)")
        self.redis.stop(kill=kill)

    def start_redis(self) -> None:
        if self.redis is None:
            raise RuntimeError("this cluster runs without Redis (redis=True to have one)")
        self.redis.start()

    def stats(self) -> dict[str, dict]:
        """Admin /v1/stats of every running shard."""
        return {name: s.stats() for name, s in self.shards.items() if s.alive}

    def publish(self, export_dir: str | Path, *, version: str | None = None) -> Manifest:
        """Roll out a new version while the shards serve: ingest it on every shard unpublished,
        then switch `current` on each (see the module docstring for why in that order)."""
        with self._lock:
            names = list(self.shards)
            manifest = None
            for name, s in self.shards.items():
                manifest = ingest(export_dir, s.lmdb, version=version, publish=False,
                                  shard_id=name, shards=names, replication=self.replication,
                                  placement_level=self.placement_level, progress=False,
                                  map_size=self.map_size)
            for s in self.shards.values():
                publish_in_env(s.lmdb, manifest.bank, manifest.version, self.map_size)
            self.manifest = manifest
            return manifest

    def close(self) -> None:
        for s in self.shards.values():
            s.close()
        if self.redis is not None:
            self.redis.stop()


def ingest_shards(export_dir: str | Path, root: Path, names: list[str], *, replication: int,
                  placement_level: int | None, map_size: int,
                  progress: bool = False) -> tuple[dict[str, Path], Manifest]:
    """One LMDB per shard under `root` (root/shard-i), each holding only its blocks."""
    paths, manifest = {}, None
    for name in names:
        paths[name] = root / name
        manifest = ingest(export_dir, paths[name], shard_id=name, shards=names,
                          replication=replication, placement_level=placement_level,
                          progress=progress, map_size=map_size)
    return paths, manifest


@contextmanager
def run_local_cluster(export_dir: str | Path, *, shards: int = 1, replication: int = 1,
                      redis: bool = False, workdir: str | Path | None = None,
                      placement_level: int | None = None, server_args: Sequence[str] = (),
                      map_size_gb: float = 1.0, redis_maxmemory_mb: int = 256,
                      progress: bool = False, dataplane: bool = False) -> Iterator[LocalCluster]:
    """Start Redis (optional), ingest the export into one LMDB per shard, start the shards;
    yield the LocalCluster; stop everything on exit (shards gracefully, then Redis).

    `workdir` keeps the LMDBs and logs (a temporary directory, removed at exit, when None);
    a rerun over the same workdir and topology reuses the LMDBs (ingest is idempotent).
    `server_args` are extra `services.bank_server.server` flags for every shard.
    `dataplane`: every shard also serves block bodies over its raw-TCP data plane (a free port,
    kept across restarts) and `cluster.targets` are "127.0.0.1:GRPC_PORT+DATAPLANE_PORT".
    """
    if shards < 1:
        raise ValueError(f"need at least one shard, got {shards}")
    if not 1 <= replication <= shards:
        raise ValueError(f"replication must be 1..{shards} (the number of shards), "
                         f"got {replication}")
    export_dir = Path(export_dir)
    base = load_manifest(export_dir)     # fails early, in one line, on a bad export
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="membank-cluster-")))
        workdir = Path(workdir)
        # one directory per topology: another shard count or replication is another placement,
        # hence another manifest, which ingest would refuse under the same version
        topo = workdir / f"{base.bank}-s{shards}-r{replication}-p{placement_level or 'd'}"
        names = shard_names(shards)
        map_size = int(map_size_gb * (1 << 30))
        paths, manifest = ingest_shards(export_dir, topo, names, replication=replication,
                                        placement_level=placement_level, map_size=map_size,
                                        progress=progress)
        rds = None
        args = ["--map-size-gb", str(map_size_gb), *server_args]
        if redis:
            rds = LocalRedis(workdir / "redis", maxmemory_mb=redis_maxmemory_mb)
            rds.start()
            args += ["--redis-url", rds.url]
        logs = workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cluster = LocalCluster(workdir, {n: ShardProcess(n, paths[n], args, logs,
                                                         dataplane=dataplane) for n in names},
                               rds, manifest, replication=replication,
                               placement_level=placement_level, map_size=map_size)
        stack.callback(cluster.close)
        for s in cluster.shards.values():
            s.start()
        log.info("local cluster: %s", cluster.targets)
        yield cluster


# -- CLI --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:            # everything after "--" goes to every bank server
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m services.bank_server.cluster",
                                description="Run a local cluster of bank shards (a dev tool) "
                                            "until Ctrl-C; extra server flags after --.")
    p.add_argument("--export", required=True, type=Path, help="export directory to serve")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--replication", type=int, default=1)
    p.add_argument("--placement-level", type=int)
    p.add_argument("--redis", action="store_true", help="start a redis-server tier too")
    p.add_argument("--dataplane", action="store_true",
                   help="every shard also serves block bodies over its raw-TCP data plane; "
                        "targets are printed as HOST:GRPC_PORT+DATAPLANE_PORT")
    p.add_argument("--workdir", type=Path, help="LMDBs and logs (default: a temp dir)")
    p.add_argument("--map-size-gb", type=float, default=4.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with run_local_cluster(args.export, shards=args.shards, replication=args.replication,
                               redis=args.redis, workdir=args.workdir,
                               placement_level=args.placement_level, server_args=server_args,
                               map_size_gb=args.map_size_gb, progress=True,
                               dataplane=args.dataplane) as cluster:
            for name, s in cluster.shards.items():
                dp = f" dataplane {s.dataplane_address}" if s.dataplane else ""
                print(f"{name} {s.address} admin {s.admin_address}{dp}", flush=True)
            print(json.dumps({"bank": cluster.bank, "version": cluster.manifest.version,
                              "targets": cluster.targets,
                              "redis": cluster.redis.url if cluster.redis else None}),
                  flush=True)
            while not stop.wait(1.0):
                for name, s in cluster.shards.items():
                    if not s.alive:
                        log.warning("%s exited (code %s); restarting", name, s.proc.poll())
                        cluster.restart(name)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
