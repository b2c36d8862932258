"""Deploy artefacts expose the bank server's raw-TCP data plane consistently (offline).

- Kubernetes: the ConfigMap's MEMBANK_SERVER_DATAPLANE_PORT is the bank-server container's
  port named `dataplane`, and the headless Service lists it (targetPort by name);
- compose: every shard sets MEMBANK_SERVER_DATAPLANE_PORT, exposes it on the compose network and
  publishes it on a host port of its own; the `generate` client's `--bank` is a data plane
  target ("shard-0:GRPC+DP") that the device's target parser accepts;
- deploy/README.md tells a device the "POD-DNS:50051+50052" form.
Schema validation and the rest of the structure: tests/deploy/test_manifests.py.

Run: .venv/bin/python -m pytest -q tests/deploy/test_dataplane_deploy.py
"""
from __future__ import annotations

from services.bank_server.settings import BankServerSettings
from services.model_client.targets import check_target, is_dataplane
from tests.deploy.test_manifests import DEPLOY, SHARD, compose, objects


def test_kubernetes_shards_expose_the_dataplane_port():
    assert "dataplane_port" in BankServerSettings.model_fields
    (settings,) = objects("ConfigMap", "membank-server-settings")[:1]
    port = int(settings["data"]["MEMBANK_SERVER_DATAPLANE_PORT"])
    assert port != int(settings["data"]["MEMBANK_SERVER_PORT"])
    (sts,) = objects("StatefulSet", "membank-shard")
    (server,) = [c for c in sts["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "bank-server"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["dataplane"] == port
    assert len(set(ports.values())) == len(ports)          # no two names on one port
    (svc,) = objects("Service", "membank-shard")
    listed = {p["name"]: p for p in svc["spec"]["ports"]}
    assert listed["dataplane"]["port"] == port and listed["dataplane"]["targetPort"] == "dataplane"


def test_compose_shards_expose_and_publish_the_dataplane_port():
    c = compose()
    services = c["services"]
    shards = {name: s for name, s in services.items() if SHARD.match(name)}
    host_ports = []
    for name, s in shards.items():
        env = s["environment"]
        dp = env["MEMBANK_SERVER_DATAPLANE_PORT"]
        assert dp != env["MEMBANK_SERVER_PORT"], name
        assert dp in s["expose"], name
        # "127.0.0.1:HOST:CONTAINER" (published on loopback only, issue 16)
        published = [p.split(":") for p in s["ports"] if p.rsplit(":", 1)[-1] == dp]
        assert len(published) == 1, (name, s["ports"])
        host_ports.append(published[0][-2])
    every_host_port = [p.split(":")[-2] for s in shards.values() for p in s["ports"]]
    assert len(every_host_port) == len(set(every_host_port)), every_host_port
    entry = services["generate"]["entrypoint"]
    target = entry[entry.index("--bank") + 1]
    assert is_dataplane(check_target(target))
    host = target.split("+")[0].rsplit(":", 1)[0]
    env = services[host]["environment"]
    assert target == f"{host}:{env['MEMBANK_SERVER_PORT']}+{env['MEMBANK_SERVER_DATAPLANE_PORT']}"


def test_readme_says_how_a_device_targets_the_dataplane():
    text = (DEPLOY / "README.md").read_text()
    assert "membank-shard.membank-dev.svc:50051+50052" in text
    assert "localhost:50051+50061" in text
