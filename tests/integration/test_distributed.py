"""Data parallelism on CPU (training/distributed.py): torchrun, gloo, 2 ranks.

Two ranks with half the global batch each must make the same update as one process with the
whole batch: dense gradients are all-reduced, the bank's fetched-row gradients are all-gathered
and summed per row, and the loss is normalised by the global batch's token count.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from training.train import generic_coins

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WORKER = REPO / "tests" / "integration" / "dist_worker.py"


def launch(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    launch([*torchrun, str(WORKER), str(out / "two")])
    launch([sys.executable, str(WORKER), str(out / "one")])
    files = {name: (out / d / f"rank{r}") for name, d, r in
             (("one", "one", 0), ("rank0", "two", 0), ("rank1", "two", 1))}
    return ({k: load_file(str(p.with_suffix(".safetensors"))) for k, p in files.items()},
            {k: json.loads(p.with_suffix(".json").read_text()) for k, p in files.items()})


def test_two_ranks_with_half_the_batch_each_give_the_full_batch_update(runs):
    tensors, meta = runs
    assert [meta[k]["world"] for k in ("one", "rank0", "rank1")] == [1, 2, 2]
    assert generic_coins(0, 0, 8, 0.25).any()           # the first step uses the generic memory too
    grads = sorted(k for k in tensors["one"] if k.startswith("grad."))
    assert len(grads) == len([k for k in tensors["one"] if k.startswith("model.")]) + 1 + 2
    for key in grads:  # anchor params, generic memory, fetched rows of both levels: summed right
        torch.testing.assert_close(tensors["rank0"][key], tensors["one"][key], rtol=1e-4,
                                   atol=1e-7, msg=key)
    assert meta["rank0"]["first_loss"] == pytest.approx(meta["one"]["first_loss"], rel=1e-6)


def test_replicas_stay_identical_and_close_to_one_process_after_all_phases(runs):
    tensors, meta = runs
    for key in tensors["one"]:
        assert torch.equal(tensors["rank0"][key], tensors["rank1"][key]), key
    # Adam divides by |g|: rounding differences in near-zero gradients grow to ~1e-4 in 7 steps
    for key in (k for k in tensors["one"] if not k.startswith("grad.")):
        torch.testing.assert_close(tensors["rank0"][key], tensors["one"][key], rtol=0, atol=2e-3,
                                   msg=key)
    for phase, losses in meta["one"]["losses"].items():
        assert len(losses) > 0
        assert meta["rank0"]["losses"][phase] == pytest.approx(losses, rel=1e-4)
