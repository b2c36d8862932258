"""Packing and the training loop (training/packing.py, training/train.py): phases, the
generic memory, exact resume from a checkpoint."""
import numpy as np
import pytest
import torch

from membank.config import get_preset
from membank.nn.model import Transformer
from training import checkpoint
from training.config import load_train_config
from training.optim import cosine_lr
from training.packing import Sampler
from training.train import Trainer, generic_coins, lm_loss, pack


def test_pack_keeps_one_path_per_sequence_and_separates_documents():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    nodes = np.array([[0, 1], [1, 2], [0, 1], [1, 2]])  # docs 0, 2 share leaf 1; docs 1, 3 leaf 2
    p = pack(docs, nodes, seq_len=4, eos=0)
    assert p.tokens.shape[1] == 5
    for seq, ids, path in zip(p.tokens, p.doc_ids, p.node_ids):
        assert path.tolist() in ([0, 1], [1, 2])
    leaf1 = p.tokens[p.node_ids[:, 1] == 1].flatten().tolist()
    assert leaf1[:9] == [1, 2, 3, 0, 6, 7, 8, 9, 0]  # EOS-separated, same-leaf documents only
    assert (p.doc_ids[p.tokens == 10] >= 0).all()
    # padding is marked with doc id -1 so it gets no loss
    assert (p.doc_ids == -1).sum() == p.tokens.numel() - sum(len(d) + 1 for d in docs)


def test_padding_gets_no_loss():
    cfg = get_preset("tiny")
    model = Transformer(cfg)
    tokens = torch.randint(0, 100, (1, 9))
    ids = torch.tensor([[0, 0, 0, 0, -1, -1, -1, -1, -1]])
    loss_padded = lm_loss(model, tokens, ids)
    tokens2 = tokens.clone()
    tokens2[0, 5:] = 7  # changing padded targets must not change the loss
    torch.testing.assert_close(lm_loss(model, tokens2, ids), loss_padded)


def test_cosine_schedule_warms_up_and_decays():
    lrs = [cosine_lr(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] < lrs[9] == 1.0 and lrs[-1] < 0.2 and min(lrs) >= 0.1


def toy_packed(n_docs=8, size=30, seq_len=16):
    docs = [list(np.random.default_rng(i).integers(1, 60, size=size)) for i in range(n_docs)]
    nodes = np.array([[i % 2, (i % 2) * 2 + (i // 2) % 2] for i in range(n_docs)])
    return pack(docs, nodes, seq_len=seq_len, eos=0)


def tiny_trainer(*overrides, packed=None, **kw):
    tc = load_train_config("tiny", list(overrides))
    return Trainer(tc.model_config(), tc, packed or toy_packed(), log=lambda *a: None, **kw)


def test_loss_normalised_by_a_global_token_count_sums_to_the_mean():
    model = Transformer(get_preset("tiny"))
    p = toy_packed()
    tokens, ids = p.tokens[:4], p.doc_ids[:4]
    n = int((ids[:, 1:] >= 0).sum())
    halves = (lm_loss(model, tokens[:2], ids[:2], normalizer=n)
              + lm_loss(model, tokens[2:], ids[2:], normalizer=n))
    torch.testing.assert_close(halves, lm_loss(model, tokens, ids))


def test_sampler_is_a_seeded_permutation_per_epoch_and_resumes_from_two_integers():
    s = Sampler(10, 4, seed=3)
    first = [s.next().tolist() for _ in range(5)]          # 2 batches per epoch, tail dropped
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1]))
    assert s.epoch == 2
    again = Sampler(10, 4, seed=3)
    again.load_state_dict({"epoch": 1, "pos": 0})
    assert [again.next().tolist() for _ in range(3)] == first[2:]


def test_cotraining_lowers_loss_and_trains_the_bank():
    trainer = tiny_trainer("anchor_steps=0", "cotrain_steps=40", "batch_size=4")
    before = [t.clone() for t in trainer.bank]
    trainer.train()
    losses = trainer.losses["cotrain"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(not torch.equal(b, t) for b, t in zip(before, trainer.bank))
    assert trainer.bank[0][:, :, 2].abs().sum() > 0  # W3m left zero-init: memory now has an effect


def test_phases_train_the_right_parts():
    trainer = tiny_trainer("anchor_steps=3", "cotrain_steps=0", "frozen_steps=4",
                           "generic_prob=0.5")
    bank0, generic0 = [t.clone() for t in trainer.bank], trainer.generic.detach().clone()
    trainer.train(max_steps=3)                            # anchor phase: bank and generic idle
    assert all(torch.equal(a, b) for a, b in zip(bank0, trainer.bank))
    assert torch.equal(trainer.generic, generic0)
    anchor = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()                                       # frozen: anchor fixed, memories train
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in anchor.items())
    assert not torch.equal(trainer.bank[0], bank0[0]) and not torch.equal(trainer.generic, generic0)
    assert list(trainer.losses) == ["anchor", "frozen"] and len(trainer.losses["frozen"]) == 4


def test_generic_coins_are_seeded_per_step_and_about_one_in_seventeen():
    assert torch.equal(generic_coins(0, 5, 64, 1 / 17), generic_coins(0, 5, 64, 1 / 17))
    assert not torch.equal(generic_coins(0, 5, 64, 0.5), generic_coins(0, 6, 64, 0.5))
    rate = torch.cat([generic_coins(0, s, 1000, 1 / 17) for s in range(20)]).float().mean()
    assert abs(rate - 1 / 17) < 0.01
    assert not generic_coins(0, 0, 100, 0.0).any()


def test_no_memory_coins_leave_the_generic_coins_unchanged():
    for step in range(5):
        plain, mixed = (generic_coins(0, step, 500, 1 / 17),
                        generic_coins(0, step, 500, 1 / 17, 0.25))
        assert torch.equal(plain == 1, mixed == 1)                    # the same generic samples
        assert not (plain == 2).any()
    share = torch.cat([generic_coins(0, s, 1000, 1 / 17, 0.25)
                       for s in range(20)]).eq(2).float().mean()
    assert abs(share - 0.25) < 0.02


def test_no_memory_samples_see_exactly_the_anchor(monkeypatch):
    """A sample drawn for no memory gets a zero memory: its loss is the anchor's alone, and no
    bank row it would have fetched is touched by its gradient."""
    trainer = tiny_trainer("anchor_steps=0", "cotrain_steps=2", "no_memory_prob=0.99",
                           "generic_prob=0", "batch_size=4")
    batch = trainer._next_batch(uses_memory=True)
    assert batch.n_none == 4 and batch.n_generic == 0
    mem, fetched = trainer._memory(batch)
    assert fetched is None and not mem.any()
    with torch.no_grad():
        with_zeros = lm_loss(trainer.model, batch.tokens, batch.doc_ids, mem)
        alone = lm_loss(trainer.model, batch.tokens, batch.doc_ids, None)
    assert torch.allclose(with_zeros, alone)
    bank = [level.clone() for level in trainer.bank]
    trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(bank, trainer.bank))


def test_the_generic_memory_trains_only_on_steps_that_use_it():
    trainer = tiny_trainer("anchor_steps=0", "cotrain_steps=6", "generic_prob=0.3", "batch_size=4")
    used = [bool(generic_coins(0, s, 4, 0.3).any()) for s in range(6)]
    assert any(used) and not all(used)
    history = []
    for _ in range(6):
        trainer.step()
        history.append(trainer.generic.detach().clone())
    for s, (was_used, g) in enumerate(zip(used, history)):
        if s and not was_used:
            assert torch.equal(g, history[s - 1])        # no grad: AdamW skips it, no decay
    assert history[-1][:, :, 2].abs().sum() > 0          # W3m of the generic memory learned


@pytest.mark.parametrize("split", [2, 5])  # at the phase boundary; in the middle of co-training
def test_resume_from_a_checkpoint_is_exact(tmp_path, split):
    args = ("anchor_steps=2", "cotrain_steps=6", "generic_prob=0.25", "batch_size=4")
    whole = tiny_trainer(*args)
    whole.train()

    first = tiny_trainer(*args)
    first.train(max_steps=split)
    path = first.save(tmp_path / "ckpt")
    del first
    resumed = tiny_trainer(*args)                       # a fresh trainer (other random init)
    resumed.load(path)
    resumed.train()

    assert resumed.losses == whole.losses                # identical loss sequence, all phases
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(whole.bank, resumed.bank))
    assert torch.equal(whole.generic, resumed.generic)


def test_checkpoint_from_another_config_or_other_data_is_refused(tmp_path):
    path = tiny_trainer("anchor_steps=1", "cotrain_steps=0").save(tmp_path / "c")
    other = tiny_trainer("anchor_steps=1", "cotrain_steps=0", "model.d_model=64")
    with pytest.raises(ValueError,
                       match="another config: model.d_model: checkpoint 32, this run 64"):
        other.load(path)
    with pytest.raises(ValueError, match="other data"):
        tiny_trainer("anchor_steps=1", "cotrain_steps=0", data_fingerprint="elsewhere").load(path)
    with pytest.raises(ValueError, match="another config: anchor_lr"):
        tiny_trainer("anchor_steps=1", "cotrain_steps=0", "anchor_lr=0.5").load(path)
    assert checkpoint.read_state(path)["global_step"] == 0
