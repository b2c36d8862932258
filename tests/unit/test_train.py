"""Packing and the training loop's pieces (training/train.py)."""
import numpy as np
import torch

from membank.config import get_preset
from membank.memory import MemoryBank
from membank.model import Transformer
from training.train import IGNORE, TrainConfig, cosine_lr, lm_loss, pack, train_phase


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


def test_cotraining_lowers_loss_and_trains_the_bank():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model, bank = Transformer(cfg), MemoryBank(cfg)
    docs = [list(np.random.default_rng(i).integers(1, 60, size=30)) for i in range(8)]
    nodes = np.array([[i % 2, (i % 2) * 2 + (i // 2) % 2] for i in range(8)])
    packed = pack(docs, nodes, seq_len=16, eos=0)
    tc = TrainConfig(preset="tiny", batch_size=4, warmup_steps=2, memory_lr=1e-2, anchor_lr=1e-2)
    before = [p.detach().clone() for p in bank.levels]
    losses = train_phase("test", model, bank, packed, tc, 40, torch.Generator().manual_seed(0))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert all(not torch.equal(b, p) for b, p in zip(before, bank.levels))
    assert bank.levels[0][:, :, 2].abs().sum() > 0  # W3m left zero-init: memory now has an effect
