"""The device's HTTP API (services/model_client/http_server.py) and `membank chat`, as real
subprocesses: uvicorn on a free port serving the tiny model, a real bank server for memory.

Run: .venv/bin/pytest -q tests/integration/test_device_http.py   (-m "not slow": no MiniLM)
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from testkit.models import run_device_server as start_device_server
from testkit.net import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@contextmanager
def run_device_server(export: Path, *extra: str, log_path: Path, timeout: float = 60.0):
    """testkit's device server with at most 40 new tokens; yield its "host:port"."""
    with start_device_server(export, "--max-tokens", "40", *extra, log_path=log_path,
                             timeout=timeout) as (address, _):
        yield address


def http(address: str, path: str, body: bytes | dict | None = None) -> tuple[int, bytes, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://{address}{path}", data=data,
                                 method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def generate(address: str, **body) -> dict:
    status, raw, _ = http(address, "/v1/generate", body)
    assert status == 200, raw
    return json.loads(raw)


def sse(raw: bytes) -> list[tuple[str, dict]]:
    """Server-sent events as (event name, JSON data); the default name is "message"."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


@pytest.fixture(scope="module")
def device(tiny_model_export, tmp_path_factory):
    """An anchor-only device server (no bank configured): no MiniLM needed, starts in seconds."""
    log = tmp_path_factory.mktemp("device") / "device.log"
    with run_device_server(tiny_model_export, log_path=log) as address:
        yield address


def test_generate_returns_text_timings_and_memory_info(device):
    r = generate(device, prompt="The atomic number of", max_tokens=12)
    assert r["new_tokens"] == 12 and r["finish_reason"] == "length" and r["text"]
    assert r["memory"] is False and r["anchor_only_reason"] == "no bank configured"
    assert ({"embed", "route", "fetch", "attach", "prefill", "decode", "ttft"}
            <= set(r["timings_ms"]))
    again = generate(device, prompt="The atomic number of", max_tokens=12)
    assert again["text"] == r["text"]  # greedy: the same answer every time


def test_stream_pieces_join_to_the_json_text_for_greedy(device):
    body = dict(prompt="Gold has", max_tokens=20)
    plain = generate(device, **body)
    status, raw, headers = http(device, "/v1/generate", body | {"stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse(raw)
    *pieces, (last, done) = events
    assert last == "done" and all(name == "message" for name, _ in pieces) and len(pieces) > 1
    assert "".join(p["text"] for _, p in pieces) == plain["text"] == done["text"]
    assert done["new_tokens"] == plain["new_tokens"] and done["memory"] is False


def test_stop_strings_and_seeded_sampling(device):
    full = generate(device, prompt="The atomic number of", max_tokens=12)["text"]
    cut = generate(device, prompt="The atomic number of", max_tokens=12, stop=[full[3:6]])
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(full[3:6])]
    a = generate(device, prompt="Gold", max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    b = generate(device, prompt="Gold", max_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert a["text"] == b["text"]


def test_health_says_model_loaded_and_no_bank(device):
    status, raw, _ = http(device, "/v1/health")
    assert status == 200
    assert json.loads(raw) == {"status": "ok", "model_loaded": True, "busy": False, "queued": 0,
                               "bank": {"configured": False, "targets": [], "reachable": None,
                                        "error": None}}


@pytest.mark.parametrize("body, message", [
    (b'{"prompt": "Gold", ', "not valid JSON"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "Gold", "max_tokens": 41}, "more than this server allows (40)"),
    ({"prompt": "Gold", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Gold", "temperature": -1}, "temperature"),
    ({"prompt": "Gold", "top_p": 1.5}, "top_p"),
    ({"prompt": "Gold", "stop": [""]}, "stop strings"),
    ({"prompt": "Gold", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "Gold", "seed": 2 ** 64}, "seed: Input should be less than"),   # was a 500
    ({"prompt": "Gold", "seed": -1}, "seed"),
    ({"prompt": "Gold", "colour": "red"}, "colour"),
    ({"prompt": "Gold", "ttft_budget_ms": -1}, "ttft_budget_ms"),
    (b'{"prompt": "Gold", "ttft_budget_ms": 1e400}', "ttft_budget_ms"),     # inf: was a 500
    ({}, "prompt: Field required"),
    ({"prompt": "Gold " * 200}, "the model's limit is 63"),
])
def test_bad_input_gets_422_with_a_one_line_message(device, body, message):
    status, raw, _ = http(device, "/v1/generate", body)
    assert status == 422, raw
    detail = json.loads(raw)["detail"]
    assert isinstance(detail, str) and "\n" not in detail and message in detail


def test_the_server_stays_usable_after_errors_and_a_dropped_stream(device):
    host, port = device.split(":")
    with socket.create_connection((host, int(port))) as s:  # ask for a stream, leave at once
        body = json.dumps({"prompt": "Gold", "max_tokens": 40, "stream": True}).encode()
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(64).startswith(b"HTTP/1.1 200")
    assert generate(device, prompt="Gold", max_tokens=3)["new_tokens"] == 3  # the lock was freed


def test_concurrent_requests_queue_and_match_sequential_answers(device):
    prompts = ["Gold has", "Hydrogen is", "The atomic number of", "Zürich"]
    want = {p: generate(device, prompt=p, max_tokens=16)["text"] for p in prompts}
    got: dict[str, str] = {}

    def ask(p: str) -> None:
        got[p] = generate(device, prompt=p, max_tokens=16, stream=False)["text"]

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_openapi_docs_are_served(device):
    status, raw, _ = http(device, "/docs")
    assert status == 200 and b"swagger" in raw.lower()
    status, raw, _ = http(device, "/openapi.json")
    spec = json.loads(raw)
    assert {"/v1/generate", "/v1/health"} <= set(spec["paths"])
    assert "temperature" in spec["components"]["schemas"]["GenerateRequest"]["properties"]


# -- with a bank: routing needs the MiniLM embedder (seconds to load) ---------------------------
@pytest.mark.slow
def test_memory_from_a_real_bank_and_anchor_only_when_unreachable(tiny_model_export, bank_server,
                                                                 tmp_path, trusted_key_file):
    # the session's bank is signed with the test key; the device pins it
    with run_device_server(tiny_model_export, "--bank", bank_server, "--trusted-keys",
                           str(trusted_key_file), log_path=tmp_path / "a.log") as a:
        health = json.loads(http(a, "/v1/health")[1])
        assert health["bank"] == {"configured": True, "targets": [bank_server], "reachable": True,
                                  "error": None}
        r = generate(a, prompt="The atomic number of Ruthenium is", max_tokens=8)
        assert r["memory"] is True and len(r["path"]) == 2 and len(r["fetched_blocks"]) == 2
        assert r["fetched_bytes"] > 0 and r["timings_ms"]["fetch"] > 0
        again = generate(a, prompt="The atomic number of Ruthenium is", max_tokens=8)
        assert again["memory"] is True and again["fetched_blocks"] == []  # already attached
        assert again["text"] == r["text"]
        off = generate(a, prompt="The atomic number of Ruthenium is", max_tokens=8,
                       use_memory=False)
        assert off["memory"] is False and off["anchor_only_reason"] == "memory disabled"
    dead = f"127.0.0.1:{free_port()}"
    with run_device_server(tiny_model_export, "--bank", dead, "--timeout", "1",
                           log_path=tmp_path / "b.log") as b:
        bank = json.loads(http(b, "/v1/health")[1])["bank"]
        assert bank["reachable"] is False and "UNAVAILABLE" in bank["error"]
        r = generate(b, prompt="The atomic number of Ruthenium is", max_tokens=4)
        assert r["memory"] is False and "bank unavailable" in r["anchor_only_reason"]


@pytest.mark.slow
def test_prefetch_and_a_ttft_budget_over_http(tiny_model_export, bank_server, tmp_path,
                                              trusted_key_file):
    prompt = "The atomic number of Ruthenium is"
    with run_device_server(tiny_model_export, "--bank", bank_server, "--trusted-keys",
                           str(trusted_key_file), "--cache-mb", "8",
                           log_path=tmp_path / "a.log") as a:
        status, raw, _ = http(a, "/v1/prefetch", {"prompt": prompt})
        p = json.loads(raw)
        assert status == 202 and len(p["path"]) == 2 and len(p["started"]) == 2
        assert p["started_bytes"] > 0 and p["version"] == "v1" and p["attached"] == []
        for _ in range(100):                 # done when a second prefetch finds both cached
            again = json.loads(http(a, "/v1/prefetch", {"prompt": prompt})[1])
            if again["started"] == [] and len(again["ready"]) == 2:
                break
            time.sleep(0.05)
        r = generate(a, prompt=prompt, max_tokens=4)
        assert r["memory"] is True and r["fetched_blocks"] == [] and r["fetched_bytes"] == 0
        assert sorted(r["cached_blocks"] + r["prefetched_blocks"]) == sorted(p["started"])
        assert r["levels_attached"] == [1, 2] and r["levels_pending"] == []
        # a byte budget smaller than any block starts nothing
        small = json.loads(http(a, "/v1/prefetch", {"prompt": "Helium", "max_bytes": 1})[1])
        assert small["started"] == [] and small["started_bytes"] == 0
        for body, words in (({"prompt": " "}, "prompt is empty"),
                            ({"prompt": "x", "max_bytes": -1}, "max_bytes"),
                            ({"prompt": "x", "bogus": 1}, "bogus")):
            status, raw, _ = http(a, "/v1/prefetch", body)
            assert status == 422 and words in json.loads(raw)["detail"]
    # a TTFT budget of 0: what is verified at once is attached (nothing, on a cold device), the
    # rest arrives in the background and a later prompt has the whole path without fetching
    with run_device_server(tiny_model_export, "--bank", bank_server, "--trusted-keys",
                           str(trusted_key_file), log_path=tmp_path / "b.log") as b:
        r = generate(b, prompt=prompt, max_tokens=4, ttft_budget_ms=0)
        assert sorted(r["levels_attached"] + r["levels_pending"]) == [1, 2]
        assert r["memory"] is bool(r["levels_attached"])
        for _ in range(100):
            r = generate(b, prompt=prompt, max_tokens=4, ttft_budget_ms=0)
            if not r["levels_pending"]:
                break
            time.sleep(0.05)
        assert r["memory"] is True and r["levels_attached"] == [1, 2]
        assert generate(b, prompt=prompt, max_tokens=4)["fetched_blocks"] == []


def test_prefetch_without_a_bank_is_503(device):
    status, raw, _ = http(device, "/v1/prefetch", {"prompt": "Helium"})
    assert status == 503 and "no bank configured" in json.loads(raw)["detail"]


# -- membank chat -----------------------------------------------------------------------------
def chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "membank_cli", "chat", *args], input=stdin,
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_chat_answers_each_line_with_a_streamed_reply_and_a_timings_line(tiny_model_export, device):
    r = chat("--model", str(tiny_model_export), "--max-new-tokens", "10",
             stdin="Gold has\n\n" + "Gold " * 200 + "\nThe atomic number of\n")
    assert r.returncode == 0, r.stderr
    timing_lines = [line for line in r.stdout.splitlines() if line.startswith("[ttft ")]
    assert len(timing_lines) == 2  # the empty line is skipped, the too-long one refused
    assert all("anchor only (no bank configured)" in t and "10 tokens" in t for t in timing_lines)
    assert "membank chat: error: prompt has" in r.stderr and "Traceback" not in r.stderr
    # the replies are the same greedy text the HTTP API gives
    for prompt in ("Gold has", "The atomic number of"):
        assert generate(device, prompt=prompt, max_tokens=10)["text"] in r.stdout


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "2"], "top_p must be"), (["--timeout", "-1"], "bank_timeout_s"),
    (["--bank", "a:1,b:2"], "shard ids"), (["--model", "/nonexistent"], "No such file"),
])
def test_chat_refuses_bad_flags_in_one_line(tiny_model_export, capsys, flags, message):
    from membank_cli.cli import main
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(tiny_model_export), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


# -- hostile clients (issue 16, point 6): the attacker from 127.0.0.2, the honest client from
# 127.0.0.1 (the limits are per client IP) ------------------------------------------------------
ATTACKER, HONEST = "127.0.0.2", "127.0.0.1"
LONG = dict(prompt="Gold has", max_tokens=1000)   # a long generation on the long-context model


def post(address: str, body: dict, source: str) -> tuple[int, bytes, dict]:
    import http.client
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120, source_address=(source, 0))
    try:
        conn.request("POST", "/v1/generate", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def read_until_closed(s: socket.socket, timeout: float = 15.0) -> tuple[bytes, bool]:
    """(what the server sent, whether it closed the connection within `timeout` s)."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except socket.timeout:
        return out, False
    except ConnectionResetError:
        pass
    return out, True


@pytest.fixture(scope="module")
def long_device(tmp_path_factory):
    """A device server on a tiny model with a 4096-token context (generations of seconds),
    test-sized limits: at most 6 requests in per client, 1 s to send a request, 2 s per
    generation."""
    from tests.conftest import make_model_export
    tmp = tmp_path_factory.mktemp("long_device")
    export = make_model_export(tmp / "export", max_seq_len=4096)
    with run_device_server(export, "--max-tokens", "3000", "--max-per-client", "6",
                           "--request-timeout-s", "1", "--generation-timeout-s", "2",
                           "--max-body-bytes", "4096", log_path=tmp / "device.log") as address:
        yield address


def wait_queued(address: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while json.loads(http(address, "/v1/health")[1]).get("queued", 0) < n:
        assert time.monotonic() < deadline, "the requests never queued"
        time.sleep(0.01)


def test_clients_take_turns_and_one_cannot_queue_without_bound(long_device):
    done: list[str] = []

    def attack() -> None:
        status, raw, _ = post(long_device, LONG, ATTACKER)
        done.append("attacker" if status == 200 else f"attacker {status}")

    attackers = [threading.Thread(target=attack) for _ in range(6)]
    for t in attackers:
        t.start()
    try:
        wait_queued(long_device, 5)   # one running, five waiting
        # its seventh is refused at once, with a time to come back
        status, raw, headers = post(long_device, LONG, ATTACKER)
        assert status == 429 and headers["retry-after"] == "1"
        assert "at most 6" in json.loads(raw)["detail"]
        # the honest client is next in turn, not behind the attacker's five waiting requests
        status, raw, _ = post(long_device, dict(prompt="Gold has", max_tokens=5), HONEST)
        assert status == 200 and json.loads(raw)["new_tokens"] == 5
        assert len(done) <= 2, done
    finally:
        for t in attackers:
            t.join(120)
    assert done == ["attacker"] * 6


def test_a_generation_stops_at_the_time_limit(long_device):
    status, raw, _ = post(long_device, dict(prompt="Gold has", max_tokens=3000), HONEST)
    r = json.loads(raw)
    assert status == 200 and r["finish_reason"] == "time" and 0 < r["new_tokens"] < 3000
    assert len(r["text"]) > 0


def test_a_slow_body_is_cut_off_and_never_holds_the_model(long_device):
    body = json.dumps(dict(prompt="Gold has", max_tokens=5)).encode()
    host, port = long_device.rsplit(":", 1)
    with socket.create_connection((host, int(port)), source_address=(ATTACKER, 0)) as slow:
        slow.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:3])
        # the honest client is answered while the body trickles in
        status, raw, _ = post(long_device, dict(prompt="Gold has", max_tokens=5), HONEST)
        assert status == 200
        for byte in body[3:8]:   # a byte now and then: the server cuts it off all the same
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.3)
        _, closed = read_until_closed(slow)
        assert closed
    # a body over the cap: 413 at once, the body never read
    with socket.create_connection((host, int(port)), source_address=(ATTACKER, 0)) as big:
        big.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                    b"\r\nContent-Length: 10000000\r\n\r\n{")
        answer, closed = read_until_closed(big)
    assert answer.startswith(b"HTTP/1.1 413") and closed

