"""The operator's checks against the running compose stack: `make compose-test` (after `make
compose-up`), or

    .venv/bin/python deploy/compose_test.py [--hold-s 10]

1. every service healthy, one-shot jobs exited 0; /readyz and /metrics of every shard answer
   over TLS; a prompt with memory answers from the device container and from the host;
2. the compose file's resource limits are the containers' cgroup limits;
3. under a steady load from two devices (the device container over HTTP, and a device in this
   process reaching the shards' published ports over gRPC + data plane): kill a shard, cut a
   shard off the network, pause a shard, restart Redis, publish a new version (two phases),
   add a shard with the rebalance runbook, recreate a shard's container on its volume. For
   each: prompts, failed prompts (an error or an answer without memory), paths that mixed
   versions, time to recovery (the shard ready again after the fault ends);
4. the `load` profile: headless locust in its container, over TLS with the read token.

Writes deploy/compose-results.{json,md,png}, puts the table into deploy/README.md between its
markers, prints one JSON line, and exits 1 when a check fails. State left behind: the stack
runs on with shard-2 and the new version (make compose-down removes everything).
"""
from __future__ import annotations

import argparse
import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / "runs" / "compose"
HOST = STATE / "host"                     # deploy/compose.sh copies these out of the volumes
EXPORT, KEYS, TLS = HOST / "run" / "export", HOST / "keys", HOST / "tls"
FILES = ["-f", "docker-compose.yml", "-f", "deploy/compose-shard-2.yml"]
ADMIN = {"shard-0": 8081, "shard-1": 8082, "shard-2": 8083}
HOST_TARGETS = {"shard-0": "localhost:50051+50061", "shard-1": "localhost:50052+50062",
                "shard-2": "localhost:50053+50063"}
SHARD_CMD = ["/data/run/export", "--lmdb", "/data/bank", "--replication", "2", "--no-progress",
             "--signing-key", "/data/keys"]
# load variety: prompts about different elements route to different leaves, so prompts keep
# fetching (the devices keep no block cache beyond the attached path)
ELEMENTS = ["Hydrogen", "Helium", "Lithium", "Carbon", "Oxygen", "Sodium", "Iron", "Copper",
            "Silver", "Tin", "Tungsten", "Gold", "Mercury", "Lead", "Uranium", "Neon", "Argon",
            "Calcium", "Zinc", "Nickel", "Cobalt", "Platinum", "Iodine", "Radon"]
README = REPO / "deploy" / "README.md"
BEGIN, END = "<!-- compose-test:begin -->", "<!-- compose-test:end -->"


# -- Docker and Compose ---------------------------------------------------------------------------
def sh(*cmd: str, check: bool = True, timeout: float = 600, merge: bool = False) -> str:
    """stdout (`merge`: with stderr) of `cmd`; RuntimeError when it fails and `check`."""
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
    return (r.stdout + r.stderr if merge else r.stdout).strip()


def compose(*args: str, check: bool = True, timeout: float = 600, merge: bool = False) -> str:
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    base = ["docker", "compose"] if v2 else ["docker-compose"]
    env = STATE / "compose.env"
    if env.exists():
        base += ["--env-file", str(env)]
    return sh(*base, *FILES, *args, check=check, timeout=timeout, merge=merge)


def cid(service: str) -> str:
    """The service's container id ("" when it has none)."""
    ids = compose("ps", "-a", "-q", service, check=False).splitlines()   # -a: exited jobs (v2)
    return ids[0] if ids else ""


def inspect(container: str, fmt: str) -> str:
    return sh("docker", "inspect", "-f", fmt, container)


def health(service: str) -> str:
    c = cid(service)
    if not c:
        return "absent"
    return inspect(c, "{{if .State.Health}}{{.State.Health.Status}}{{else}}"
                      "{{.State.Status}} {{.State.ExitCode}}{{end}}")


# -- HTTPS to the shards' admin ports ----------------------------------------------------------
def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(TLS / "tls.crt"))


def admin(shard: str, path: str, *, body: dict | None = None, timeout: float = 2.0):
    """(status, body bytes) of https://localhost:ADMIN/path; (0, error) when unreachable."""
    req = urllib.request.Request(f"https://localhost:{ADMIN[shard]}{path}",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    # reads with the read token, publish with the admin token
    token = TLS / ("admin-token" if body is not None else "read-token")
    req.add_header("Authorization", f"Bearer {token.read_text().strip()}")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=tls_context()) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ssl.SSLError) as e:
        return 0, str(e).encode()


def ready(shard: str) -> bool:
    status, body = admin(shard, "/readyz")
    return status == 200 and json.loads(body).get("ready") is True


def wait_ready(shard: str, timeout_s: float = 120) -> float:
    """Seconds until the shard's /readyz says ready (inf after timeout_s)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ready(shard):
            return time.monotonic() - t0
        time.sleep(0.2)
    return float("inf")


# -- the load: two devices ----------------------------------------------------------------------
@dataclass
class Prompt:
    t: float                      # seconds since the load started
    device: str
    ok: bool                      # answered, with memory
    latency_ms: float
    version: str = ""
    level_versions: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def mixed(self) -> bool:
        return len(set(self.level_versions)) > 1


class Load:
    """Prompts back to back from the device container (HTTP :8000) and from a device in this
    process (MemoryModel over the shards' published gRPC + data plane ports)."""

    def __init__(self):
        from membank.signing import Trust
        from services.model_client.memory_model import MemoryModel
        from services.model_client.targets import open_bank

        token = (TLS / "read-token").read_text().strip()
        bank = open_bank(HOST_TARGETS, timeout_s=5.0, token=token, tls_ca=TLS / "tls.crt")
        self.model = MemoryModel.from_pretrained(EXPORT, bank=bank, trust=Trust.load([KEYS]),
                                                 manifest_ttl_s=2.0)
        self.model.warmup()
        self.records: list[Prompt] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.t0 = time.monotonic()
        self._threads = [threading.Thread(target=self._run, args=(d,), daemon=True)
                         for d in ("container", "host")]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _one(self, device: str, prompt: str) -> Prompt:
        t = self.now()
        start = time.perf_counter()
        if device == "host":
            try:
                r = self.model.generate(prompt, max_new_tokens=4)
            except Exception as e:   # noqa: BLE001 - a failed prompt is a result here
                return Prompt(t, device, False, (time.perf_counter() - start) * 1e3,
                              error=f"{type(e).__name__}: {e}"[:200])
            return Prompt(t, device, r.memory, (time.perf_counter() - start) * 1e3, r.version,
                          r.level_versions, r.anchor_only_reason or "")
        req = urllib.request.Request("http://localhost:8000/v1/generate", data=json.dumps(
            {"prompt": prompt, "max_tokens": 4}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                r = json.loads(resp.read())
        except (OSError, ValueError) as e:
            return Prompt(t, device, False, (time.perf_counter() - start) * 1e3,
                          error=str(e)[:200])
        return Prompt(t, device, bool(r["memory"]), (time.perf_counter() - start) * 1e3,
                      r.get("version", ""), r.get("level_versions", []),
                      r.get("anchor_only_reason") or "")

    def _run(self, device: str) -> None:
        i = 0 if device == "host" else len(ELEMENTS) // 2
        while not self._stop.is_set():
            p = self._one(device, f"The atomic number of {ELEMENTS[i % len(ELEMENTS)]} is")
            with self._lock:
                self.records.append(p)
            i += 1
            time.sleep(0.02)

    def window(self, t0: float, t1: float) -> list[Prompt]:
        with self._lock:
            return [p for p in self.records if t0 <= p.t < t1]


# -- scenarios ------------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    action: str
    t0: float = 0.0
    t1: float = 0.0
    prompts: int = 0
    failed: int = 0
    mixed: int = 0
    recovery_s: float | None = None
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    note: str = ""
    errors: list[str] = field(default_factory=list)


def run_scenario(load: Load, name: str, action: str, fault, heal=None, *, hold_s: float,
                 shard: str | None = None, settle_s: float = 3.0) -> Row:
    """Load runs throughout: settle, fault(), hold, heal() (if any), wait until `shard` is
    ready (the recovery time), settle; the row counts the prompts from fault to the end."""
    row = Row(name, action)
    time.sleep(settle_s)
    row.t0 = load.now()
    note = fault()
    time.sleep(hold_s)
    if heal is not None:
        heal()
    if shard is not None:
        row.recovery_s = round(wait_ready(shard), 2)
    time.sleep(settle_s)
    row.t1 = load.now()
    got = load.window(row.t0, row.t1)
    row.prompts, row.failed = len(got), sum(not p.ok for p in got)
    row.mixed = sum(p.mixed for p in got)
    lat = [p.latency_ms for p in got]
    if lat:
        row.p50_ms, row.p99_ms = (round(float(v), 1) for v in np.percentile(lat, [50, 99]))
    row.note = note or ""
    row.errors = sorted({f"{p.device}: {p.error}" for p in got if not p.ok})[:5]
    print(f"  {name:<22} prompts {row.prompts:4d}  failed {row.failed:3d}  mixed {row.mixed}  "
          f"recovery {row.recovery_s} s  p50 {row.p50_ms} ms  p99 {row.p99_ms} ms  {row.note}",
          flush=True)
    for e in row.errors:
        print(f"      {e}", flush=True)
    return row


def current_version(shard: str) -> str:
    status, body = admin(shard, "/v1/manifest/demo")
    return json.loads(body)["version"] if status == 200 else ""


def publish_on(*shards: str, version: str) -> None:
    """Phase two of a publish: each running shard's admin HTTP (admin token) makes `version`
    of bank demo current."""
    for shard in shards:
        status, body = admin(shard, "/v1/publish", body={"bank": "demo", "version": version},
                             timeout=30)
        if status != 200:
            raise RuntimeError(f"publish on {shard}: {status} {body[:200]!r}")


def publish_new_version(version: str) -> str:
    """Two phases (deploy/README.md, "Publish a new bank version"): ingest unpublished on every
    shard, then publish on every shard (admin HTTP)."""
    for n in (0, 1):
        compose("run", "--rm", "--no-deps", f"ingest-{n}", *SHARD_CMD, "--shard-id",
                f"shard-{n}", "--shards", "shard-0,shard-1", "--version", version,
                "--no-publish")
    publish_on("shard-0", "shard-1", version=version)
    return f"ingest --no-publish x2, then publish {version} x2"


def add_shard_2(old: str, new: str) -> str:
    """deploy/README.md, "Add a shard and rebalance", one host: create shard-2 and its volume,
    copy the moved blocks (rebalance, unpublished), publish on every shard, start shard-2."""
    compose("up", "--no-start", "--no-deps", "shard-2")
    out = compose("run", "--rm", "--no-deps", "-v", "membank_shard-0-data:/s0",
                  "-v", "membank_shard-1-data:/s1", "-v", "membank_shard-2-data:/s2",
                  "-v", "membank_keys:/data/keys:ro", "--entrypoint", "python", "ingest-0",
                  "-m", "services.bank_server.rebalance", "--bank", "demo", "--version", old,
                  "--new-version", new, "--shards", "shard-0,shard-1,shard-2",
                  "--replication", "2", "--no-publish", "--signing-key", "/data/keys",
                  "--lmdb", "shard-0=/s0", "--lmdb", "shard-1=/s1", "--lmdb", "shard-2=/s2")
    publish_on("shard-0", "shard-1", version=new)
    compose("run", "--rm", "--no-deps", "-v", "membank_shard-2-data:/s2", "--entrypoint",
            "python", "ingest-0", "-m", "services.bank_server.publish", "--lmdb", "/s2",
            "demo", new)
    compose("up", "-d", "--no-deps", "shard-2")
    moved = json.loads(out.splitlines()[-1]) if out else {}
    return f"rebalance {old} -> {new}: {moved.get('bytes_copied', 0) / 1e6:.1f} MB copied"


def recreate(service: str) -> str:
    ingest = cid("ingest-0")
    before = inspect(ingest, "{{.State.FinishedAt}}") if ingest else ""
    compose("rm", "-s", "-f", service)
    compose("up", "-d", "--no-deps", service)
    # --no-deps: ingest-0's container is the same one; had it run again, it finished later
    after = inspect(ingest, "{{.State.FinishedAt}}") if ingest else ""
    if before != after:
        raise RuntimeError("ingest-0 ran again")
    return "container removed and created again on its volume; ingest-0 not rerun"


# -- checks ----------------------------------------------------------------------------------------
def check_health() -> list[dict]:
    rows = []
    for s in ("redis", "shard-0", "shard-1", "device"):
        rows.append({"check": f"{s} healthy", "ok": health(s) == "healthy", "got": health(s)})
    for s in ("keygen", "train", "ingest-0", "ingest-1"):
        rows.append({"check": f"{s} exited 0", "ok": health(s) == "exited 0", "got": health(s)})
    for shard in ("shard-0", "shard-1"):
        status, body = admin(shard, "/readyz")
        rows.append({"check": f"{shard} /readyz (TLS)", "ok": status == 200,
                     "got": body.decode()[:60]})
        status, body = admin(shard, "/metrics")
        rows.append({"check": f"{shard} /metrics (TLS)", "ok": status == 200
                     and b"membank_rpc_total" in body, "got": f"{status}, {len(body)} bytes"})
    return rows


def cgroup_limits(container: str) -> tuple[int | None, float | None]:
    """(memory bytes, CPUs) the kernel enforces on the container, from its cgroup files."""
    pid = inspect(container, "{{.State.Pid}}")
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    if v2 and Path("/sys/fs/cgroup/cgroup.controllers").exists():
        base = Path("/sys/fs/cgroup") / v2[0].lstrip("/")
        mem = (base / "memory.max").read_text().strip()
        quota, period = (base / "cpu.max").read_text().split()
        return (None if mem == "max" else int(mem),
                None if quota == "max" else int(quota) / int(period))
    paths = {ln.split(":", 2)[1]: ln.split(":", 2)[2] for ln in lines}
    mem_dir = Path("/sys/fs/cgroup/memory") / paths["memory"].lstrip("/")
    cpu_key = next(k for k in paths if "cpu" in k.split(","))
    cpu_dir = Path("/sys/fs/cgroup/cpu") / paths[cpu_key].lstrip("/")
    mem = int((mem_dir / "memory.limit_in_bytes").read_text())
    quota = int((cpu_dir / "cpu.cfs_quota_us").read_text())
    period = int((cpu_dir / "cpu.cfs_period_us").read_text())
    return (None if mem >= 1 << 60 else mem, None if quota < 0 else quota / period)


def parse_mem(v: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(float(v[:-1]) * units[v[-1].lower()]) if v[-1].lower() in units else int(v)


def check_limits() -> list[dict]:
    import yaml

    rows = []
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("redis", "shard-0", "shard-1", "device"):
        limits = spec[name].get("deploy", {}).get("resources", {}).get("limits", {})
        mem, cpus = cgroup_limits(cid(name))
        want_mem = parse_mem(limits["memory"]) if "memory" in limits else None
        want_cpus = float(limits["cpus"]) if "cpus" in limits else None
        rows.append({"check": f"{name} limits", "ok": (mem, cpus) == (want_mem, want_cpus),
                     "got": f"memory {mem}, cpus {cpus} (compose: {limits})"})
    return rows


def run_locust(seconds: float) -> dict:
    """The compose file's `load` profile as an engineer runs it: headless locust in its own
    container, over TLS with the read token, against all three shards."""
    hosts = ",".join(f"{s}={s}:50051" for s in ADMIN)
    out = compose("--profile", "load", "run", "--rm", "--no-deps", "locust-master",
                  "--headless", "-u", "4", "-r", "4", "-t", f"{max(5, int(seconds))}s",
                  "--host", hosts, "--only-summary", check=False, timeout=180, merge=True)
    # the request table's "Aggregated" line: name, requests, "failures(percent)", ... (the
    # percentile table's has no percent sign)
    agg = [ln.split() for ln in out.splitlines() if ln.strip().startswith("Aggregated")]
    agg = [a for a in agg if len(a) > 2 and "%)" in a[2]]
    reqs, fails = (int(agg[-1][1]), int(agg[-1][2].split("(")[0])) if agg else (0, -1)
    return {"check": "locust (profile load) over TLS + token", "ok": reqs > 0 and fails == 0,
            "got": f"{reqs} requests, {fails} failures" if agg else out.strip()[-200:]}


# -- report ------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    out = ["| scenario | what was done | prompts | failed | mixed versions | recovery (s) | "
           "p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = "-" if r.recovery_s is None else f"{r.recovery_s:.1f}"
        out.append(f"| {r.scenario} | {r.action}{'; ' + r.note if r.note else ''} | "
                   f"{r.prompts} | {r.failed} | {r.mixed} | {rec} | {r.p50_ms:.0f} / "
                   f"{r.p99_ms:.0f} |")
    return "\n".join(out)


def plot(load: Load, rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    for i, r in enumerate(rows):
        ax.axvspan(r.t0, r.t1, color=f"C{i % 10}", alpha=0.12)
        ax.text((r.t0 + r.t1) / 2, 1.0, r.scenario, rotation=90, va="bottom", ha="center",
                fontsize=7, transform=ax.get_xaxis_transform())
    for device, marker in (("container", "o"), ("host", "s")):
        ok = [p for p in load.records if p.device == device and p.ok]
        bad = [p for p in load.records if p.device == device and not p.ok]
        ax.scatter([p.t for p in ok], [p.latency_ms for p in ok], s=6, marker=marker,
                   label=f"{device} device, answered with memory")
        if bad:
            ax.scatter([p.t for p in bad], [p.latency_ms for p in bad], s=30, marker="x",
                       color="red", label=f"{device} device, failed")
    ax.set_yscale("log")
    ax.set_xlabel("seconds under load")
    ax.set_ylabel("prompt latency (ms)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hold-s", type=float, default=10.0, help="how long each fault lasts")
    ap.add_argument("--out", default=str(REPO / "deploy" / "compose-results"))
    args = ap.parse_args(argv)
    if not EXPORT.exists():
        print("compose-test: no stack (runs/compose/host is missing): make compose-up first",
              file=sys.stderr)
        return 2
    t_start = time.monotonic()
    checks = check_health() + check_limits()
    for c in checks:
        print(f"  {'ok ' if c['ok'] else 'BAD'} {c['check']:<28} {c['got']}", flush=True)

    print("load: the device container (HTTP) and a host device (gRPC + data plane)", flush=True)
    load = Load()
    load.start()
    hold = args.hold_s
    c = {s: cid(s) for s in ("shard-0", "shard-1", "redis")}
    net = next(iter(json.loads(inspect(c["shard-1"], "{{json .NetworkSettings.Networks}}"))))
    v0 = current_version("shard-0")
    if not v0:
        raise RuntimeError("shard-0 names no current version of bank demo")
    v1, v2 = f"{v0}-next", f"{v0}-next-s3"
    rows = [
        run_scenario(load, "steady", "no fault", lambda: None, hold_s=hold),
        run_scenario(load, "kill shard-1", "docker kill, then docker start",
                     lambda: sh("docker", "kill", c["shard-1"]) and None,
                     lambda: sh("docker", "start", c["shard-1"]), hold_s=hold, shard="shard-1"),
        run_scenario(load, "partition shard-1", "docker network disconnect, then connect",
                     lambda: sh("docker", "network", "disconnect", net, c["shard-1"]) and None,
                     lambda: sh("docker", "network", "connect", "--alias", "shard-1", net,
                                c["shard-1"]), hold_s=hold, shard="shard-1"),
        run_scenario(load, "stall shard-0", "docker pause, then unpause",
                     lambda: sh("docker", "pause", c["shard-0"]) and None,
                     lambda: sh("docker", "unpause", c["shard-0"]), hold_s=hold,
                     shard="shard-0"),
        run_scenario(load, "restart redis", "docker restart redis",
                     lambda: sh("docker", "restart", c["redis"]) and None, hold_s=hold),
        run_scenario(load, "publish", f"new version {v1}, two phases",
                     lambda: publish_new_version(v1), hold_s=hold),
        run_scenario(load, "add shard-2", "rebalance runbook (deploy/README.md)",
                     lambda: add_shard_2(v1, v2), hold_s=hold, shard="shard-2"),
        run_scenario(load, "recreate shard-0", "compose rm -sf, then up -d --no-deps",
                     lambda: recreate("shard-0"), hold_s=0, shard="shard-0"),
    ]
    load.stop()
    load.model.close()
    served = {s: current_version(s) for s in ("shard-0", "shard-1", "shard-2")}
    metrics = admin("shard-2", "/metrics")[1].decode().splitlines()
    shard2_fetches = sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics
                         if ln.startswith("membank_rpc_total{") and 'code="OK"' in ln
                         and ('"FetchBlocks"' in ln or '"DataPlaneFetch"' in ln))
    checks.append(run_locust(hold))
    checks.append({"check": "every shard serves the rebalanced version",
                   "ok": set(served.values()) == {v2}, "got": str(served)})
    checks.append({"check": "shard-2 answered fetches", "ok": shard2_fetches > 0,
                   "got": f"{shard2_fetches:.0f} fetches answered OK (gRPC + data plane)"})
    failed_checks = [c for c in checks if not c["ok"]]
    failed_prompts = sum(r.failed for r in rows)
    mixed = sum(r.mixed for r in rows)

    out = Path(args.out)
    md = table(rows)
    meta = {"date": time.strftime("%Y-%m-%d"), "compose": compose("version", "--short",
                                                                  check=False),
            "docker": sh("docker", "version", "-f", "{{.Server.Version}}", check=False),
            "seconds": round(time.monotonic() - t_start, 1)}
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "checks": checks, "scenarios": [asdict(r) for r in rows]}, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    plot(load, rows, out.with_suffix(".png"))
    text = README.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        README.write_text(f"{head}{BEGIN}\n{md}\n\n(`make compose-test`, {meta['date']}, Docker "
                          f"{meta['docker']}, Compose {meta['compose']}, {meta['seconds']:.0f} s;"
                          f" plot: deploy/compose-results.png)\n{END}{rest.split(END, 1)[1]}")
    print(md)
    summary = {"checks_failed": len(failed_checks), "prompts": sum(r.prompts for r in rows),
               "failed_prompts": failed_prompts, "mixed_versions": mixed,
               "recovery_s": {r.scenario: r.recovery_s for r in rows if r.recovery_s},
               "seconds": meta["seconds"]}
    ok = not failed_checks and failed_prompts == 0 and mixed == 0
    for c in failed_checks:
        print(f"FAILED: {c['check']}: {c['got']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    shutil.which("docker") or sys.exit("compose-test: docker is not installed (make compose-up)")
    sys.exit(main())
