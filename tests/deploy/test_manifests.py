"""Deploy artefacts: schema validation (offline) and the structure operators rely on.

- every Kubernetes manifest under deploy/ (each YAML document with apiVersion/kind, except
  kustomize's own Kustomization files) passes `kubernetes-validate --strict`; so do the rendered
  kustomizations when `kubectl` (built-in kustomize) or `kustomize` is on PATH;
- docker-compose.yml passes `check-jsonschema --builtin-schema vendor.compose-spec`;
- structure: one compose service per shard with its own volume and healthcheck, fed by its own
  ingest job; the StatefulSet has native gRPC probes, claims, a headless Service and a PDB;
  every MEMBANK_SERVER_* setting named anywhere is one the bank server knows.
Both validators come from the `deploy` extra (`make test` installs it) and run from the venv.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.bank_server.settings import BankServerSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
BIN = Path(sys.executable).parent
SHARD = re.compile(r"^shard-(\d+)$")


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in the venv: pip install -e '.[deploy]' "
                    f"(make test does)")
    return str(path)


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def k8s_validate(*files: Path) -> subprocess.CompletedProcess:
    return run(tool("kubernetes-validate"), "--strict", *map(str, files))


def assert_valid(r: subprocess.CompletedProcess) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # kubernetes-validate only WARNs (exit 0) on a kind/apiVersion it has no schema for, so a
    # typo in apiVersion would pass unnoticed: no warning is allowed either
    assert "WARN" not in out and "Couldn't find schema" not in out, out


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    """YAML files under deploy/ holding Kubernetes objects (not kustomize's own files)."""
    out = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        ds = docs(path)
        if any("apiVersion" in d and "kind" in d and d["kind"] != "Kustomization" for d in ds):
            assert all(d.get("kind") != "Kustomization" for d in ds), path
            out.append(path)
    return out


def objects(kind: str, name: str | None = None) -> list[dict]:
    return [d for p in manifest_files() for d in docs(p)
            if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# -- schema validation --------------------------------------------------------------------------
def test_every_kubernetes_manifest_validates_strict():
    files = manifest_files()
    kinds = {d["kind"] for p in files for d in docs(p)}
    assert {"StatefulSet", "Service", "PodDisruptionBudget", "Deployment", "ConfigMap", "Job",
            "PersistentVolumeClaim"} <= kinds
    assert_valid(k8s_validate(*files))


def kustomize_cmd() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@pytest.mark.parametrize("kustomization", ["base", "overlays/dev"])
def test_rendered_kustomization_validates_strict(kustomization, tmp_path):
    cmd = kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kubectl nor kustomize on PATH (the files are validated one by one)")
    r = run(*cmd, str(DEPLOY / kustomization))
    assert r.returncode == 0, r.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(r.stdout)
    assert_valid(k8s_validate(rendered))
    objs = [d for d in yaml.safe_load_all(r.stdout) if d]
    sts = next(d for d in objs if d["kind"] == "StatefulSet")
    if kustomization == "overlays/dev":
        assert sts["spec"]["replicas"] == 2
        assert {d["metadata"].get("namespace") for d in objs if d["kind"] != "Namespace"} \
            == {"membank-dev"}
        jobs = {d["metadata"]["name"] for d in objs if d["kind"] == "Job"}
        assert jobs == {"membank-ingest-shard-0", "membank-ingest-shard-1"}


def test_strict_validation_is_not_a_no_op(tmp_path):
    bad = tmp_path / "bad.yaml"
    svc = docs(DEPLOY / "base" / "service.yaml")[0]
    svc["spec"]["clusterIp"] = "None"   # misspelt field
    bad.write_text(yaml.safe_dump(svc))
    r = k8s_validate(bad)
    assert r.returncode != 0 and "clusterIp" in r.stdout + r.stderr


def test_compose_validates_against_compose_spec():
    r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_validation_is_not_a_no_op(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("depends_on:", "depends_onn:", 1))
    r = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert r.returncode != 0 and "depends_onn" in r.stdout + r.stderr


# -- docker-compose structure ---------------------------------------------------------------------
def volume_names(service: dict) -> list[str]:
    return [v.split(":")[0] if isinstance(v, str) else v["source"]
            for v in service.get("volumes", [])]


def test_compose_shards_have_own_volume_healthcheck_and_ingest_job():
    c = compose()
    services = c["services"]
    shards = {name: s for name, s in services.items() if SHARD.match(name)}
    assert len(shards) >= 2
    seen_volumes, shard_lists = set(), set()
    for name, s in shards.items():
        n = SHARD.match(name).group(1)
        # its own data volume; `tls` (certificate and tokens, read-only) is shared by design
        vols = [v for v in volume_names(s) if v in c["volumes"] and v != "tls"]
        assert vols == [f"shard-{n}-data"], (name, vols)
        assert "tls:/data/tls:ro" in s["volumes"]
        # not PID 1: a job opening the same LMDB from its own container is PID 1 (store.open_env)
        assert s["init"] is True
        assert not seen_volumes & set(vols), f"{name} shares a volume"
        seen_volumes |= set(vols)
        test = s["healthcheck"]["test"]
        assert "services.bank_server.healthcheck" in test
        assert s["depends_on"][f"ingest-{n}"]["condition"] == "service_completed_successfully"
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "serve" in s["command"]
        ingest = services[f"ingest-{n}"]
        assert f"shard-{n}-data" in volume_names(ingest)
        assert ingest["depends_on"]["train"]["condition"] == "service_completed_successfully"
        assert ingest["entrypoint"][-2:] == ["-m", "services.bank_server.ingest"]
        flag = lambda name: ingest["command"][ingest["command"].index(name) + 1]  # noqa: E731
        # the server's LMDB is where its ingest job wrote it, for the shard it serves
        lmdb = flag("--lmdb")
        assert s["environment"]["MEMBANK_SERVER_LMDB_PATH"] == lmdb
        assert f"shard-{n}-data:{lmdb}" in s["volumes"]
        assert flag("--shard-id") == s["environment"]["MEMBANK_SERVER_SHARD_ID"] == name
        shard_lists.add((flag("--shards"), flag("--replication")))
        # gRPC and admin HTTP (metrics, readiness) reachable
        container_ports = {p.rsplit(":", 1)[-1] for p in s["ports"]}
        assert {"50051", s["environment"]["MEMBANK_SERVER_ADMIN_PORT"]} <= container_ports
    # every ingest job names the same placement, and it lists exactly the compose shards
    (shard_list, _), = shard_lists
    assert sorted(shard_list.split(",")) == sorted(shards)


def test_compose_redis_is_an_lru_cache_and_locust_is_opt_in():
    services = compose()["services"]
    cmd = services["redis"]["command"]
    assert "--maxmemory" in cmd and cmd[cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert services["train"]["command"][:1] == ["train"]
    for name in ("locust-master", "locust-worker"):
        assert services[name]["profiles"] == ["load"]
    for name, s in services.items():
        if not name.startswith("locust"):
            assert "load" not in s.get("profiles", []), name


# -- Kubernetes structure -------------------------------------------------------------------------
def test_statefulset_shards_probe_grpc_and_claim_volumes():
    (sts,) = objects("StatefulSet", "membank-shard")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "bank-server"]
    port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
    assert port == 50051
    # TLS on the gRPC port (kubelet's gRPC probes are plaintext): the in-container health
    # probe, which takes port and TLS from the server's own settings
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert server[probe]["exec"]["command"][:3] == [
            "python", "-m", "services.bank_server.healthcheck"], probe
    assert "--service" not in server["readinessProbe"]["exec"]["command"]   # the bank service
    assert server["resources"]["requests"]["cpu"] and server["resources"]["requests"]["memory"]
    claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    assert {m["name"] for m in server["volumeMounts"]} & claims
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["enableServiceLinks"] is False

    (svc,) = objects("Service", spec["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (pdb,) = objects("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_every_server_setting_named_is_a_real_one():
    known = {f"MEMBANK_SERVER_{f.upper()}" for f in BankServerSettings.model_fields}
    named = set()
    for cm in objects("ConfigMap"):
        named |= {k for k in cm.get("data", {}) if k.startswith("MEMBANK_SERVER_")}
    for s in compose()["services"].values():
        env = s.get("environment", {})
        named |= {k for k in (env if isinstance(env, dict) else [])
                  if k.startswith("MEMBANK_SERVER_")}
    named |= set(re.findall(r"MEMBANK_SERVER_[A-Z_]+", (REPO / "Dockerfile").read_text()))
    assert named and named <= known, named - known


def test_dockerfile_is_slim_non_root_with_stubs_and_healthcheck():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert "grpc_tools.protoc -Iproto" in text and "proto/membank/v1/bank.proto" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] != "root" and not users[-1].startswith("0")
    for target in ("bank-server", "model-client", "loadtest"):
        assert re.search(rf"^FROM \S+ AS {target}$", text, re.M), target
    assert re.search(r"^HEALTHCHECK .*\n.*services\.bank_server\.healthcheck", text, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs/"} <= set(ignored)


def test_the_loadtest_image_holds_every_module_locust_imports():
    """The loadtest target copies loadtests/ beside the installed project: every first-party
    top-level package the locust files import must be installed (pyproject) or copied."""
    import ast

    text = (REPO / "Dockerfile").read_text()
    stage = text.split("AS loadtest", 1)[1].split("\nFROM ", 1)[0]
    copied = set(re.findall(r"^COPY (?!--from)(\S+) /app/", stage, re.M))
    installed = {"membank", "membank_cli", "services", "training"}     # pyproject's packages
    first_party = {p.name for p in REPO.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    imported = set()
    for f in (REPO / "loadtests").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
    imported &= first_party      # (locust puts loadtests/ on sys.path: `device` is a sibling)
    assert imported and imported <= installed | copied, imported - installed - copied


def test_shards_know_their_id_expose_admin_and_ingest_their_placement():
    (sts,) = objects("StatefulSet", "membank-shard")
    pod = sts["spec"]["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "bank-server"]
    env = {e["name"]: e for e in server["env"]}
    assert env["MEMBANK_SERVER_SHARD_ID"]["value"] == "shard-$(MEMBANK_SHARD_INDEX)"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    (settings,) = objects("ConfigMap", "membank-server-settings")[:1]
    assert ports["admin"] == int(settings["data"]["MEMBANK_SERVER_ADMIN_PORT"])
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["admin"])
    (svc,) = objects("Service", "membank-shard")
    assert {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}["admin"] == "admin"
    # every ingest (init container, Jobs) writes its own shard's blocks with the topology
    (init,) = pod["initContainers"]
    script = " ".join(init["args"])
    assert '--shard-id "shard-$MEMBANK_SHARD_INDEX"' in script and "$MEMBANK_SHARDS" in script
    assert {"name": "membank-topology"} in [e["configMapRef"] for e in init["envFrom"]]
    for job in objects("Job"):
        (c,) = job["spec"]["template"]["spec"]["containers"]
        shard = job["metadata"]["labels"]["membank.dev/shard"]
        (script,) = c["args"]
        assert f"--shard-id {shard} " in script and "services.bank_server.ingest" in script
        assert '--shards "$MEMBANK_SHARDS"' in script and "$MEMBANK_REPLICATION" in script
        assert {"name": "membank-topology"} in [e["configMapRef"] for e in c["envFrom"]]


def test_dev_overlay_topology_matches_its_replicas():
    kust = yaml.safe_load((DEPLOY / "overlays" / "dev" / "kustomization.yaml").read_text())
    (replicas,) = [r["count"] for r in kust["replicas"] if r["name"] == "membank-shard"]
    topo = docs(DEPLOY / "overlays" / "dev" / "topology-patch.yaml")[0]["data"]
    assert topo["MEMBANK_SHARDS"].split(",") == [f"shard-{i}" for i in range(replicas)]
    assert 1 <= int(topo["MEMBANK_REPLICATION"]) <= replicas
    (pdb,) = objects("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] < int(topo["MEMBANK_REPLICATION"])


# -- issue 16: TLS, tokens and the signing key -----------------------------------------------------
def test_shards_serve_tls_with_token_secrets_and_ingest_signs():
    secrets = {d["metadata"]["name"]: d for d in objects("Secret")}
    assert secrets["membank-tls"]["type"] == "kubernetes.io/tls"
    assert {"read-token", "admin-token"} <= set(secrets["membank-tokens"]["stringData"])
    assert "signing.key" in secrets["membank-signing-key"]["stringData"]
    (sts,) = objects("StatefulSet", "membank-shard")
    pod = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (server,) = [c for c in pod["containers"] if c["name"] == "bank-server"]
    env = {e["name"]: e for e in server["env"]}
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert volumes["tls"]["secret"]["secretName"] == "membank-tls"
    assert env["MEMBANK_SERVER_TLS_CERT"]["value"] == f"{mounts['tls']}/tls.crt"
    assert env["MEMBANK_SERVER_TLS_KEY"]["value"] == f"{mounts['tls']}/tls.key"
    for name, key in (("MEMBANK_SERVER_AUTH_TOKEN", "read-token"),
                      ("MEMBANK_SERVER_ADMIN_TOKEN", "admin-token")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "membank-tokens", "key": key}
    assert "signing-key" not in mounts           # the server never sees the private key
    # every ingest signs with the mounted key
    (init,) = pod["initContainers"]
    ingests = [(init, volumes)]
    for job in objects("Job"):
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        ingests.append((container, {v["name"]: v for v in spec["volumes"]}))
    for container, vols in ingests:
        script = " ".join(container["args"])
        keys = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["signing-key"]
        assert f"--signing-key {keys}/signing.key" in script
        assert vols["signing-key"]["secret"]["secretName"] == "membank-signing-key"
    # every Secret a pod names is shipped
    named = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
    named |= {e["valueFrom"]["secretKeyRef"]["name"] for e in env.values() if "valueFrom" in e
              and "secretKeyRef" in e["valueFrom"]}
    assert named <= set(secrets)


def test_compose_publishes_on_loopback_only_and_signs():
    services = compose()["services"]
    for name, s in services.items():
        for p in s.get("ports", []):
            assert p.startswith("127.0.0.1:"), (name, p)
    for n in (0, 1):
        cmd = services[f"ingest-{n}"]["command"]
        assert cmd[cmd.index("--signing-key") + 1] == "/data/keys"
        assert services[f"ingest-{n}"]["depends_on"]["keygen"]["condition"] \
            == "service_completed_successfully"
    assert "--trusted-keys" in services["generate"]["entrypoint"]
