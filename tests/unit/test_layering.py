"""The house's floors, read from the source: imports run one way, and there is no circle.

    config -> contract (membank/) -> bank server | device | training      torch: membank/nn/ only
                                     (services/bank_server, services/model_client, training/)
    membank_cli/ on top: the one package that may import everything; nothing imports it

Every import counts, at module level or inside a function (those run too, later), absolute or
relative. The source is parsed with `ast`, nothing is imported, so the check needs no torch and
runs in a fraction of a second. A broken rule fails with `file:line: the import` per offender.
(One test runs the `python -m membank.cli` shim, the rule's one exemption.)

Run: .venv/bin/python -m pytest -q tests/unit/test_layering.py
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

# the packages of the house (tests/ stands outside: it may import anything)
PACKAGES = ("membank", "membank_cli", "services", "training", "loadtests", "benchmarks",
            "testkit")
# generated gRPC stubs (`make stubs`), not the house's own code
GENERATED = ("membank/v1/",)

# what only the `device` / `train` extras install (pyproject.toml): the bank server's base
# install has none of it, so membank/ outside membank/nn/ and the bank server never name it
DEVICE_ONLY = ("torch", "safetensors", "transformers", "sentence_transformers", "tokenizers",
               "membank.nn")
# the tools beside the CLI (testkit: what tests, benchmarks and load tests share); the product's
# packages never import them
TOOLS = ("loadtests", "benchmarks", "testkit", "tests")


@dataclass(frozen=True)
class Rule:
    where: str                    # a path prefix under the repository root
    forbidden: tuple[str, ...]    # module prefixes: "services" also forbids "services.x.y"
    why: str
    # (path, module prefix) pairs that are allowed anyway, each with its reason beside it
    exempt: tuple[tuple[str, str], ...] = ()
    outside: tuple[str, ...] = ()  # path prefixes under `where` the rule skips


RULES = (
    Rule("membank/", ("training", "services", "membank_cli") + TOOLS,
         "membank/ is the ground floor (the contract): it imports nothing above it",
         # `python -m membank.cli` (an address scripts and torchrun use) forwards to
         # membank_cli; it is a shim with no code of its own
         exempt=(("membank/cli.py", "membank_cli"),)),
    Rule("membank/", DEVICE_ONLY,
         "membank/ outside membank/nn/ is torch-free: the bank server stands on it",
         outside=("membank/nn/",)),
    Rule("services/bank_server/",
         ("services.model_client", "training", "membank_cli") + TOOLS + DEVICE_ONLY,
         "the bank server stands on membank/ alone (no device code, no training, no torch)"),
    Rule("services/model_client/", ("services.bank_server", "training", "membank_cli") + TOOLS,
         "the device stands on membank/ (and membank/nn/); it meets the server on the wire only"),
    Rule("training/", ("services", "membank_cli") + TOOLS,
         "training stands on membank/ (and membank/nn/); it never needs the server or the device"),
    Rule("loadtests/", ("membank_cli",), "membank_cli/ is the top floor: nothing imports it"),
    Rule("benchmarks/", ("membank_cli",), "membank_cli/ is the top floor: nothing imports it"),
    Rule("testkit/", ("membank_cli",), "membank_cli/ is the top floor: nothing imports it"),
)


@dataclass(frozen=True)
class Import:
    path: str        # relative to the repository root, with forward slashes
    line: int
    text: str        # the statement as written (ast.unparse)
    names: tuple[str, ...]  # absolute modules it may load: `from a import b` -> a, a.b


def module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(root: Path, path: Path) -> list[Import]:
    rel = path.relative_to(root).as_posix()
    name = module_name(rel)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        if isinstance(node, ast.Import):
            names = tuple(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this file's package
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = (base,) + tuple(f"{base}.{a.name}" for a in node.names if a.name != "*")
        else:
            continue
        found.append(Import(rel, node.lineno, ast.unparse(node), names))
    return sorted(found, key=lambda imp: imp.line)  # ast.walk goes breadth first


def house(root: Path) -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if not path.relative_to(root).as_posix().startswith(GENERATED):
                files.append(path)
    return files


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path, rules=RULES) -> list[str]:
    """One line per import that breaks a rule: `path:line: statement -- why`."""
    out = []
    for path in house(root):
        for imp in imports_of(root, path):
            for rule in rules:
                if not imp.path.startswith(rule.where) or imp.path.startswith(rule.outside):
                    continue
                bad = sorted({p for p in rule.forbidden for n in imp.names if under(n, p)
                              and (imp.path, p) not in rule.exempt})
                if bad:
                    out.append(f"{imp.path}:{imp.line}: `{imp.text}` reaches {', '.join(bad)}"
                               f" -- {rule.why}")
    return out


def circles(root: Path) -> list[list[str]]:
    """Import circles among the house's modules (strongly connected components, Tarjan)."""
    modules = {module_name(p.relative_to(root).as_posix()): p for p in house(root)}
    graph = {m: sorted({n for imp in imports_of(root, p) for n in imp.names
                        if n in modules and n != m}) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_imports_run_down_the_floors():
    bad = violations(REPO)
    if bad:
        pytest.fail("imports against the floors:\n" + "\n".join(bad), pytrace=False)


def test_no_import_circles():
    found = circles(REPO)
    if found:
        pytest.fail("import circles:\n" + "\n".join(" <-> ".join(c) for c in found),
                    pytrace=False)


def test_every_exemption_is_still_used():
    # an exemption whose import is gone would quietly allow the next one
    for rule in RULES:
        for path, prefix in rule.exempt:
            names = [n for imp in imports_of(REPO, REPO / path) for n in imp.names]
            assert any(under(n, prefix) for n in names), f"stale exemption: {path} -> {prefix}"


def test_the_exempt_shim_still_forwards():
    # `python -m membank.cli` is the one import up from membank/; it must keep working
    r = subprocess.run([sys.executable, "-m", "membank.cli", "serve", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--lmdb" in r.stdout, r.stderr[-2000:]


def test_the_check_sees_every_kind_of_import(tmp_path):
    # function-local, relative and `from package import module` imports are all caught
    (tmp_path / "membank" / "nn").mkdir(parents=True)
    (tmp_path / "membank" / "__init__.py").write_text("")
    (tmp_path / "membank" / "nn" / "ok.py").write_text("import torch\n")
    (tmp_path / "membank" / "bad.py").write_text(
        "def f():\n    import torch.nn\n\n"
        "from . import nn\n"
        "from services import bank_server\n")
    (tmp_path / "membank" / "a.py").write_text("from membank import b\n")
    (tmp_path / "membank" / "b.py").write_text("def g():\n    from membank.a import x\n")
    assert [line.split(" -- ")[0] for line in violations(tmp_path)] == [
        "membank/bad.py:2: `import torch.nn` reaches torch",
        "membank/bad.py:4: `from . import nn` reaches membank.nn",
        "membank/bad.py:5: `from services import bank_server` reaches services",
    ]
    assert circles(tmp_path) == [["membank.a", "membank.b"]]
