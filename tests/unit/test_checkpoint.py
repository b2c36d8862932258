"""Checkpoint files (training/checkpoint.py): nested state without pickle, atomic writes,
pruning."""
import pytest
import torch

from training import checkpoint


def test_optimizer_state_round_trips_through_tensors_and_json(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([{"params": [p], "peak": 1e-3}], lr=1e-3, betas=(0.9, 0.95))
    p.grad = torch.randn(3, 4)
    opt.step()
    tensors = {}
    skeleton = checkpoint.flatten({"dense": opt.state_dict(), "none": None}, "opt", tensors)
    path = checkpoint.save(tmp_path / "c", tensors, {"optimizer": skeleton, "global_step": 1})
    loaded, state = checkpoint.load(path)
    restored = checkpoint.unflatten(state["optimizer"], loaded)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=1.0)
    opt2.load_state_dict(restored["dense"])
    assert restored["none"] is None and opt2.param_groups[0]["peak"] == 1e-3
    assert torch.equal(opt2.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    assert torch.equal(opt2.state[q]["step"], opt.state[p]["step"])


def test_save_is_atomic_and_overwrites(tmp_path):
    checkpoint.save(tmp_path / "c", {"a": torch.zeros(2)}, {"global_step": 1})
    checkpoint.save(tmp_path / "c", {"a": torch.ones(2)}, {"global_step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    tensors, state = checkpoint.load(tmp_path / "c")
    assert state["global_step"] == 2 and tensors["a"].tolist() == [1.0, 1.0]
    (tmp_path / "half.tmp").mkdir()                    # an interrupted write is not a checkpoint
    (tmp_path / "half.tmp" / checkpoint.STATE).write_text("{}")
    assert [p.name for _, p in checkpoint.checkpoints(tmp_path)] == ["c"]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.load(tmp_path / "half.tmp")


def test_latest_resolve_and_prune(tmp_path):
    root = tmp_path / "run" / "ckpt"
    for name, step in [("step-0000002", 2), ("anchor-end", 3), ("step-0000005", 5),
                       ("step-0000007", 7)]:
        checkpoint.save(root / name, {"x": torch.zeros(1)}, {"global_step": step})
    assert checkpoint.resolve(tmp_path / "run").name == "step-0000007"
    assert checkpoint.resolve(root / "anchor-end").name == "anchor-end"
    checkpoint.prune(root, keep=1)
    assert sorted(p.name for _, p in checkpoint.checkpoints(root)) == ["anchor-end", "step-0000007"]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.resolve(tmp_path / "elsewhere")


def test_config_differences_name_the_fields():
    diffs = checkpoint.config_differences({"model": {"d": 32, "n": 2}, "ranks": [8, 4]},
                                          {"model": {"d": 64, "n": 2}, "ranks": (8, 4)})
    assert diffs == ["model.d: checkpoint 32, this run 64"]
