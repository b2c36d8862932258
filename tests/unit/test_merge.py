"""Frozen-anchor subtree jobs and their merge (training/merge.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from membank import artifacts
from membank.nn.tensors import load_generic
from membank.router import Router
from training import checkpoint
from training.config import load_train_config
from training.merge import merge
from training.prepare import fingerprint
from training.tokenizer import train_tokenizer
from training.train import Trainer, pack, subtree_rows

QUIET = dict(log=lambda *a: None)


def fake_run(run: Path) -> tuple:
    """A run directory with the data files a real run prepares (no MiniLM: a random router)."""
    docs = [list(np.random.default_rng(i).integers(1, 60, size=40)) for i in range(12)]
    nodes = np.array([[i % 2, (i % 2) * 2 + (i // 2) % 2] for i in range(12)])  # both subtrees
    packed = pack(docs, nodes, seq_len=16, eos=0)
    router = Router(branching=2, depth=2, dim=4,
                    centroids=[torch.randn(1, 2, 4), torch.randn(2, 2, 4)])
    (run / "data").mkdir(parents=True)
    train_tokenizer([f"element {i} text" for i in range(30)], 512, run / artifacts.TOKENIZER)
    router.save(run / artifacts.ROUTER)
    packed.save(run / "data" / "packed.safetensors")
    fp = fingerprint(packed, router)
    (run / "data" / "meta.json").write_text(json.dumps({"key": {}, "fingerprint": fp}))
    return packed, fp


def job(run: Path, packed, fp, overrides, init=None) -> Trainer:
    tc = load_train_config("tiny", overrides)
    trainer = Trainer(tc.model_config(), tc, packed, data_fingerprint=fp, init=init, **QUIET)
    trainer.train(run / "ckpt")
    return trainer


@pytest.fixture
def base(tmp_path):
    run = tmp_path / "base"
    packed, fp = fake_run(run)
    trainer = job(run, packed, fp, ["anchor_steps=2", "cotrain_steps=2", "batch_size=4"])
    return run, packed, fp, trainer


def subtree_job(tmp_path, base, s: int, steps: int = 3) -> tuple[Path, Trainer]:
    run_dir, packed, fp, _ = base
    sub = tmp_path / f"sub{s}"
    overrides = ["anchor_steps=0", "cotrain_steps=0", f"frozen_steps={steps}", f"subtree={s}",
                 f"init_from={run_dir}", "batch_size=2"]
    init = checkpoint.resolve(run_dir)
    return sub, job(sub, packed, fp, overrides, init=init)


def test_a_subtree_job_holds_and_trains_only_its_rows_on_its_sequences(tmp_path, base):
    _, packed, _, trainer = base
    sub, t = subtree_job(tmp_path, base, 1)
    assert (t.packed.node_ids[:, 0] == 1).all() and len(t.packed) < len(packed)
    assert [lvl.shape[0] for lvl in t.bank] == [1, 2] and t.offsets == [1, 2]
    assert not torch.equal(t.bank[1], trainer.bank[1][2:4])        # trained from the base rows
    saved, _ = checkpoint.load(checkpoint.resolve(sub))
    assert saved["bank.level2"].shape[0] == 2                      # the job saves only its rows
    assert subtree_rows(16, 3, 5) == slice(5 * 256, 6 * 256)


def test_merge_two_subtree_jobs(tmp_path, base):
    run_dir, _, _, trainer = base
    (sub0, t0), (sub1, t1) = subtree_job(tmp_path, base, 0), subtree_job(tmp_path, base, 1, steps=4)
    export_dir = merge([sub0, sub1], tmp_path / "merged", **QUIET)

    tensors, state = checkpoint.load(tmp_path / "merged" / "ckpt" / "merged")
    assert torch.equal(tensors["bank.level1"], torch.cat([t0.bank[0], t1.bank[0]]))
    assert torch.equal(tensors["bank.level2"], torch.cat([t0.bank[1], t1.bank[1]]))
    assert torch.equal(tensors["generic"], trainer.generic.detach())   # the base's generic memory
    assert (set(state["losses"]) == {"subtree0", "subtree1"}
            and len(state["losses"]["subtree1"]) == 4)
    manifest = artifacts.load_manifest(export_dir)
    blocks = {(lv, n): b for lv, n, b in artifacts.iter_blocks(export_dir, manifest)}
    assert len(blocks) == 2 + 4
    assert load_generic(export_dir).shape == trainer.generic.shape


def test_merge_of_one_job_keeps_the_other_subtree_from_the_base(tmp_path, base):
    _, _, _, trainer = base
    sub1, t1 = subtree_job(tmp_path, base, 1)
    merge([sub1], tmp_path / "merged", **QUIET)
    tensors, _ = checkpoint.load(tmp_path / "merged" / "ckpt" / "merged")
    assert torch.equal(tensors["bank.level2"][:2], trainer.bank[1][:2])
    assert torch.equal(tensors["bank.level2"][2:], t1.bank[1])


def test_merge_refuses_duplicates_and_non_jobs(tmp_path, base):
    run_dir = base[0]
    sub0, _ = subtree_job(tmp_path, base, 0)
    with pytest.raises(ValueError, match="subtree 0 comes twice"):
        merge([sub0, sub0], tmp_path / "m1", **QUIET)
    with pytest.raises(ValueError, match="not a subtree job"):
        merge([run_dir], tmp_path / "m2", base=run_dir, **QUIET)


def test_a_subtree_job_never_builds_or_reads_the_whole_bank(tmp_path, base, monkeypatch):
    """The job allocates only its rows (no MemoryBank) and reads only those rows of the base
    checkpoint (row-range reads; never a whole bank tensor, never checkpoint.load)."""
    import training.train as train_module

    def refuse(*a, **k):
        raise AssertionError("a subtree job must not build or load the whole bank")
    monkeypatch.setattr(train_module, "MemoryBank", refuse)
    monkeypatch.setattr(checkpoint, "load", refuse)
    gets, rows = [], []
    real_get, real_rows = checkpoint.TensorReader.get, checkpoint.TensorReader.rows
    monkeypatch.setattr(checkpoint.TensorReader, "get",
                        lambda self, k: gets.append(k) or real_get(self, k))
    monkeypatch.setattr(checkpoint.TensorReader, "rows",
                        lambda self, k, a, b: rows.append((k, a, b)) or real_rows(self, k, a, b))

    run_dir, packed, fp, trainer = base
    tc = load_train_config("tiny", ["anchor_steps=0", "cotrain_steps=0", "frozen_steps=1",
                                    "subtree=1", f"init_from={run_dir}", "batch_size=2"])
    t = Trainer(tc.model_config(), tc, packed, data_fingerprint=fp,
                init=checkpoint.resolve(run_dir), **QUIET)
    assert [lvl.shape[0] for lvl in t.bank] == [1, 2] and t.offsets == [1, 2]
    assert (torch.equal(t.bank[0], trainer.bank[0][1:2])
            and torch.equal(t.bank[1], trainer.bank[1][2:4]))
    assert not any(k.startswith("bank.") for k in gets)
    assert rows == [("bank.level1", 1, 2), ("bank.level2", 2, 4)]


def test_merge_reads_checkpoints_lazily_with_the_same_result(tmp_path, base, monkeypatch):
    (sub0, t0), (sub1, t1) = subtree_job(tmp_path, base, 0), subtree_job(tmp_path, base, 1)
    full_loads = []
    real_load = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda p: full_loads.append(p) or real_load(p))
    merge([sub0, sub1], tmp_path / "merged", **QUIET)
    assert full_loads == []
    monkeypatch.undo()
    tensors, _ = checkpoint.load(tmp_path / "merged" / "ckpt" / "merged")
    assert torch.equal(tensors["bank.level2"], torch.cat([t0.bank[1], t1.bank[1]]))
    export_dir = tmp_path / "merged" / "export"
    blocks = {(lv, n): b
              for lv, n, b in artifacts.iter_blocks(export_dir,
                                                    artifacts.load_manifest(export_dir))}
    assert len(blocks) == 6
