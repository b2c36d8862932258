"""`membank train` and `membank merge` end to end on a small JSONL corpus (real MiniLM routing):
checkpoints, exact resume after an interruption, the loss curve, the generic memory in the
export, frozen-anchor subtree jobs and their merge."""
import json
import shutil
import subprocess
import sys

import pytest

from membank import artifacts
from membank.nn.tensors import load_generic
from tests.conftest import REPO
from training import checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ELEMENTS = ["Hydrogen", "Helium", "Lithium", "Carbon", "Nitrogen", "Oxygen", "Neon", "Sodium",
            "Iron", "Copper", "Silver", "Gold", "Tungsten", "Ruthenium", "Uranium", "Radon"]


def membank(*args, rc: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "membank_cli", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == rc, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "elements.jsonl"
    lines = []
    for z, name in enumerate(ELEMENTS, start=1):
        lines.append({"text": f"The atomic number of {name} is {z}. {name} is element number {z}."})
        lines.append({"text": f"{name} is a chemical element. It was studied by many chemists."})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


SMALL = ["--set", "batch_size=4", "--set", "seq_len=32"]


def test_train_resume_and_subtree_merge(tmp_path, corpus):
    run = tmp_path / "run"
    membank("train", "--config", "tiny", "--corpus", corpus, "--out", run, *SMALL,
            "--set", "anchor_steps=3", "--set", "cotrain_steps=4", "--set", "ckpt_every=2")
    export = run / "export"
    assert artifacts.load_manifest(export).bank == "tiny"
    assert load_generic(export).shape[0] == 1
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    names = sorted(p.name for _, p in checkpoint.checkpoints(run / "ckpt"))
    assert names == ["anchor-end", "cotrain-end", "step-0000002", "step-0000005"]
    done = json.loads((run / "run.json").read_text())

    # a checkpoint from another config is refused in one line, before the data is touched
    packed = (run / "data" / "packed.safetensors").read_bytes()
    r = membank("train", "--config", "tiny", "--corpus", corpus, "--out", run, *SMALL, "--resume",
                "--set", "anchor_steps=3", "--set", "cotrain_steps=4", "--set", "model.d_model=64",
                rc=2)
    assert "is from another config: model.d_model: checkpoint 32, this run 64" in r.stderr
    assert ("Traceback" not in r.stderr
            and (run / "data" / "packed.safetensors").read_bytes() == packed)

    # interrupt: forget the end of co-training, then resume from step 5
    shutil.rmtree(run / "ckpt" / "cotrain-end")
    (run / "run.json").unlink()
    r = membank("train", "--config", "tiny", "--corpus", corpus, "--out", run, *SMALL,
                "--set", "anchor_steps=3", "--set", "cotrain_steps=4", "--set", "ckpt_every=2",
                "--resume")
    assert "resumed from" in r.stdout and "step-0000005" in r.stdout
    assert json.loads((run / "run.json").read_text())["losses"] == done["losses"]

    for s in (0, 1):  # frozen-anchor jobs, one per level-1 subtree, from the co-trained run
        membank("train", "--config", "tiny", "--corpus", corpus, "--out", tmp_path / f"sub{s}",
                *SMALL, "--set", f"init_from={run}", "--set", "anchor_steps=0",
                "--set", "cotrain_steps=0", "--set", "frozen_steps=3", "--set", f"subtree={s}",
                "--set", "batch_size=2")
        assert not (tmp_path / f"sub{s}" / "export").exists()
    membank("merge", "--out", tmp_path / "merged", tmp_path / "sub0", tmp_path / "sub1")
    merged = artifacts.load_manifest(tmp_path / "merged" / "export")
    assert merged.checksums != artifacts.load_manifest(export).checksums
