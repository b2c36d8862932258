"""The walking skeleton end to end, through the `membank` CLI and real processes:
train (tiny) -> export -> ingest into LMDB -> bank server subprocess -> generate with memory.
"""
import json
import subprocess
import sys

import pytest

from membank.artifacts import iter_blocks, load_manifest
from testkit.net import free_port
from tests.conftest import REPO, run_bank_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def membank(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "membank_cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = membank("train", "--config", "tiny", "--out", str(out), "--set", "anchor_steps=4",
                "--set", "cotrain_steps=4", "--set", "seq_len=32", "--set", "batch_size=4")
    assert r.returncode == 0, r.stderr[-2000:]
    export = out / "export"
    lmdb = out / "lmdb"
    # the operator's key pair; ingest signs, the device pins the public key (issue 16)
    r = membank("keygen", "--out", str(out / "keys"))
    assert r.returncode == 0 and "key id" in r.stdout, r.stderr[-2000:]
    (private,) = (out / "keys").glob("*.key")
    r = membank("ingest", str(export), "--lmdb", str(lmdb), "--signing-key", str(private))
    assert r.returncode == 0, r.stderr[-2000:]
    return export, lmdb, out / "keys"


def generate(export, *extra) -> dict:
    r = membank("generate", "The atomic number of Ruthenium is", "--model", str(export),
                "--max-new-tokens", "4", "--json", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_export_is_complete_and_checksummed(trained):
    export, _, _ = trained
    manifest = load_manifest(export)
    for name in ("config.json", "anchor.safetensors", "tokenizer.json", "router.safetensors"):
        assert (export / name).exists(), name
    blocks = list(iter_blocks(export, manifest))
    assert len(blocks) == sum(manifest.n_nodes(lv) for lv in range(1, manifest.depth + 1))


def test_generate_fetches_the_routed_path_from_a_real_server(trained, tmp_path):
    export, lmdb, keys = trained
    manifest = load_manifest(export)
    with run_bank_server(lmdb, log_path=tmp_path / "server.log") as (address, _):
        result = generate(export, "--bank", address, "--trusted-keys", str(keys))
        unpinned = generate(export, "--bank", address)        # no key pinned: never used
    assert unpinned["memory"] is False and "not signed" not in unpinned["anchor_only_reason"]
    assert "untrusted manifest" in unpinned["anchor_only_reason"]
    assert result["memory"] is True and result["anchor_only_reason"] is None
    path_blocks = manifest.path_blocks(result["path"])
    assert [tuple(b) for b in result["fetched_blocks"]] == path_blocks
    assert result["fetched_bytes"] == sum(manifest.block_nbytes(lv) for lv, _ in path_blocks)
    assert set(result["timings_ms"]) == {"embed", "route", "fetch", "attach", "prefill", "decode",
                                         "ttft"}


def test_no_reachable_bank_decodes_anchor_only_and_says_so(trained):
    export, _, _ = trained
    result = generate(export, "--bank", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert result["memory"] is False and "bank unavailable" in result["anchor_only_reason"]
    assert result["new_tokens"] >= 0
    assert generate(export, "--no-memory")["anchor_only_reason"] == "memory disabled"


def test_bad_input_gets_one_line_errors(trained):
    export, _, _ = trained
    r = membank("generate", "", "--model", str(export))
    assert r.returncode == 2 and "empty prompt" in r.stderr and "Traceback" not in r.stderr
    r = membank("train", "--config", "nope", "--out", "/tmp/never")
    assert r.returncode == 2 and "unknown config" in r.stderr and "Traceback" not in r.stderr


def test_generate_authenticates_with_a_token_file_over_tls(trained, tmp_path):
    from tests.integration.test_api import self_signed
    export, lmdb, keys = trained
    cert, key = self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret-read-token\n")
    with run_bank_server(lmdb, "--auth-token-file", str(token), "--tls-cert", str(cert),
                         "--tls-key", str(key), log_path=tmp_path / "server.log") \
            as (address, _):
        bank = f"localhost:{address.rsplit(':', 1)[1]}"
        pinned = ("--trusted-keys", str(keys))
        assert generate(export, "--bank", bank, "--token-file", str(token), "--tls-ca",
                        str(cert), *pinned)["memory"] is True
        refused = generate(export, "--bank", bank, "--tls-ca", str(cert), *pinned)
        # a token and no CA: TLS with the system roots (which do not hold this certificate),
        # never the token in cleartext (issue 16)
        no_ca = generate(export, "--bank", bank, "--token-file", str(token), *pinned)
    assert refused["memory"] is False and "UNAUTHENTICATED" in refused["anchor_only_reason"]
    assert no_ca["memory"] is False and "UNAVAILABLE" in no_ca["anchor_only_reason"]
