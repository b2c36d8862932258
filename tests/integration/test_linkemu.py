"""benchmarks/linkemu.py: the emulated link adds its RTT, holds its rate, and leaves nothing behind.

Needs root and `ip netns` (skipped otherwise, with the reason). All traffic stays on this machine:
loopback and the test's own namespaces (198.18.0.0/15, RFC 2544's benchmarking range).
Run: .venv/bin/python -m pytest -q tests/integration/test_linkemu.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.linkemu import (
    NS_PREFIX,
    Link,
    ProbeServer,
    cleanup_stale,
    probe,
    unavailable_reason,
)
from tests.conftest import REPO

REASON = unavailable_reason()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(REASON is not None,
                                 reason=f"emulated links unavailable: {REASON}")]


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def interfaces() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                          timeout=10).stdout


def run_probe(link: Link, target: str, pings: int, bulk: int) -> dict:
    out = link.run([sys.executable, "-c", "import json, sys; from benchmarks.linkemu import probe; "
                    f"print(json.dumps(probe({target!r}, {pings}, {bulk})))"],
                   capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_link_adds_its_rtt_and_holds_its_rate():
    with ProbeServer() as server:
        direct = probe(server.address, pings=5, bulk_bytes=1 << 20)   # loopback, no link
        with Link(rtt_ms=40, rate_mbit=20) as link:
            target = link.forward(server.address)
            got = run_probe(link, target, pings=5, bulk=2 << 20)
    # every ping crosses the relay twice, each time held for rtt/2: never less than the RTT
    assert got["rtt_ms_min"] >= 40.0
    assert got["rtt_ms_min"] > direct["rtt_ms_min"]
    # tbf on each veth end: payload never beats the configured rate (10% margin for timing)
    assert 0 < got["down_mbit"] <= 20 * 1.1
    assert 0 < got["up_mbit"] <= 20 * 1.1
    assert direct["down_mbit"] > 20 * 1.1   # loopback alone is not what limits it


def test_teardown_leaves_nothing_also_after_an_error():
    before = namespaces()
    link = Link(rtt_ms=10, rate_mbit=50)
    with pytest.raises(RuntimeError, match="boom"):
        with link:
            assert link.exists() and link.host_if in interfaces()
            sleeper = link.popen(["sleep", "60"])      # still running inside at teardown
            raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) is not None        # killed, not left in the namespace
    assert not link.exists() and link.ns not in namespaces()
    ifs = interfaces()
    assert link.host_if not in ifs and link.dev_if not in ifs
    assert namespaces() - before == set()
    link.close()                                        # idempotent


def test_cleanup_removes_namespaces_of_dead_processes():
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"{NS_PREFIX}{gone.pid}-0"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        assert stale in cleanup_stale()
        assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=10)


def test_bad_link_parameters_are_refused():
    with pytest.raises(ValueError, match="rate_mbit"):
        Link(rtt_ms=10, rate_mbit=0)
