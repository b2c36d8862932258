"""The bank server stands without torch: torch lives behind one line, membank/nn/.

A fresh interpreter refuses every `torch` import (a sys.meta_path finder), then imports every
bank server module, the torch-free floor of `membank`, the gRPC clients the locust image runs,
and runs `membank serve --help` (the bank-server image's entry point). Any of them reaching for
torch fails the import; `torch` must also be absent from sys.modules at the end. This is what
lets the server install without the `device` / `train` extras (pyproject.toml) and the
bank-server image carry no torch (Dockerfile).
"""
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = r'''
import contextlib, importlib, io, pkgutil, sys


class RefuseTorch:
    """A finder that answers every torch import with ModuleNotFoundError."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"torch is refused here: {name}", name=name)
        return None


sys.meta_path.insert(0, RefuseTorch())

import services.bank_server

modules = ["services.bank_server." + m.name
           for m in pkgutil.iter_modules(services.bank_server.__path__)]
modules += ["membank." + m for m in ("config", "keys", "placement", "blocks", "manifest",
                                     "quant", "artifacts", "router", "wire", "cli")]
# what the loadtest image runs (locust itself aside): the device's gRPC / data plane clients
modules += ["services.model_client." + m for m in ("bank_client", "dataplane_client", "targets",
                                                   "fetcher")]
modules += ["loadtests.load_loop", "loadtests.grpc_instrument"]
# the `membank` command (the bank-server image's entry point) and its `python -m membank.cli` shim
modules += ["membank_cli.cli", "membank_cli.results"]
for name in modules:
    importlib.import_module(name)

import membank_cli.cli
from services.bank_server import server

for main, argv in ((server.main, ["--help"]), (membank_cli.cli.main, ["serve", "--help"])):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as e:
            assert e.code in (0, None), (argv, e.code)
    assert "--lmdb" in out.getvalue(), out.getvalue()

assert "torch" not in sys.modules, "torch was imported"
print(len(modules), "modules imported without torch")
'''


def test_bank_server_imports_and_starts_its_cli_without_torch():
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "modules imported without torch" in r.stdout


def test_the_finder_does_refuse_torch():
    # the check above means something only if the finder really blocks torch here
    script = SCRIPT.split("import services.bank_server")[0] + "import torch\n"
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "torch is refused here" in r.stderr
