"""The bank's sparse step (training/optim.py): gathering fetched rows and the lazy AdamW."""
import numpy as np
import pytest
import torch

from membank.config import get_preset
from membank.nn.memory import MemoryBank
from training.config import load_train_config
from training.optim import LazyAdamW, fetch_rows
from training.train import Trainer, pack

BETAS = (0.9, 0.95)


def adamw(p: torch.Tensor, lr=3e-3, wd=0.05, fused=False):
    param = torch.nn.Parameter(p.clone())
    return param, torch.optim.AdamW([param], lr=lr, betas=BETAS, weight_decay=wd, fused=fused)


# row sizes are multiples of the vector width, as bank rows (L*n*r*W, W = d_model) always are, so
# the fused kernel handles every element alike whether it is given whole tensors or rows
@pytest.mark.parametrize("fused", [False, True])
def test_rows_fetched_every_step_match_torch_adamw_bit_for_bit(fused):
    torch.manual_seed(0)
    p0 = torch.randn(5, 2, 3, 4, 16)
    ref, opt = adamw(p0, fused=fused)
    mine = p0.clone()
    lazy = LazyAdamW([mine], lr=3e-3, betas=BETAS, weight_decay=0.05, fused=fused)
    for step in range(25):
        g = torch.randn_like(p0)
        lr = 3e-3 * (1 - step / 50)   # a schedule: the lr changes every step
        opt.param_groups[0]["lr"] = lr
        ref.grad = g.clone()
        opt.step()
        lazy.step([(torch.arange(5), g.clone())], lr=lr)
    assert torch.equal(ref.data, mine)
    state = opt.state[ref]
    assert (torch.equal(state["exp_avg"], lazy.exp_avg[0])
            and torch.equal(state["exp_avg_sq"], lazy.exp_avg_sq[0]))


def test_fused_and_reference_paths_agree_on_any_shape():
    torch.manual_seed(4)
    p0 = torch.randn(4, 3, 7)
    a, b = p0.clone(), p0.clone()
    fused, ref = (LazyAdamW([a], lr=1e-2, weight_decay=0.1, fused=True),
                  LazyAdamW([b], lr=1e-2, weight_decay=0.1, fused=False))
    for step in range(10):
        ids = torch.tensor([0, 2, 3]) if step % 2 else torch.tensor([1, 2])
        g = torch.randn(len(ids), 3, 7)
        fused.step([(ids, g)])
        ref.step([(ids, g)])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_unfetched_rows_are_bit_for_bit_unchanged_and_do_not_drift(fused):
    torch.manual_seed(1)
    p0 = torch.randn(6, 2, 3, 4, 5)
    p = p0.clone()
    lazy = LazyAdamW([p], lr=1e-2, betas=BETAS, weight_decay=0.1, fused=fused)
    lazy.step([(torch.tensor([0, 2]), torch.randn(2, 2, 3, 4, 5))])   # rows 0 and 2 once
    after_first = p.clone()
    moments = (lazy.exp_avg[0].clone(), lazy.exp_avg_sq[0].clone())
    assert not torch.equal(after_first[[0, 2]], p0[[0, 2]])
    assert torch.equal(after_first[[1, 3, 4, 5]], p0[[1, 3, 4, 5]])   # never fetched: untouched
    for _ in range(30):                                 # only rows 1 and 3 from now on
        lazy.step([(torch.tensor([1, 3]), torch.randn(2, 2, 3, 4, 5))])
    idle = [0, 2, 4, 5]
    assert torch.equal(p[idle], after_first[idle])    # no decay, no momentum drift while idle
    assert torch.equal(lazy.exp_avg[0][idle], moments[0][idle])
    assert torch.equal(lazy.exp_avg_sq[0][idle], moments[1][idle])
    assert lazy.steps[0].tolist() == [1, 30, 1, 30, 0, 0]


@pytest.mark.parametrize("fused", [False, True])
def test_a_row_follows_adamw_over_exactly_the_steps_that_fetched_it(fused):
    """Lazy Adam = dense AdamW run on the subsequence of steps where the row was fetched
    (per-row step counts drive the bias correction)."""
    torch.manual_seed(2)
    p0 = torch.randn(3, 4, 16)
    p = p0.clone()
    lazy = LazyAdamW([p], lr=1e-2, betas=BETAS, weight_decay=0.05, fused=fused)
    ref, opt = adamw(p0[1], lr=1e-2, fused=fused)
    for step in range(12):
        ids = torch.tensor([0, 1]) if step in (0, 3, 4, 9) else torch.tensor([0])
        g = torch.randn(len(ids), 4, 16)
        lazy.step([(ids, g)])
        if len(ids) == 2:
            ref.grad = g[1].clone()
            opt.step()
    assert torch.equal(p[1], ref.data)


def test_lazy_state_round_trips():
    p = torch.randn(4, 3)
    a = LazyAdamW([p.clone()], lr=1e-2)
    a.step([(torch.tensor([1, 2]), torch.randn(2, 3))])
    b = LazyAdamW([p.clone()], lr=1e-2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.exp_avg_sq[0], a.exp_avg_sq[0]) and torch.equal(b.steps[0], a.steps[0])
    with pytest.raises(ValueError, match="shapes"):
        LazyAdamW([torch.zeros(5, 3)]).load_state_dict(a.state_dict())


def test_fetched_rows_give_the_bank_gather_and_its_gradient_without_a_dense_grad():
    torch.manual_seed(3)
    cfg = get_preset("tiny")
    bank = MemoryBank(cfg)
    with torch.no_grad():  # W3m non-zero so every matrix gets a gradient
        for lvl in bank.levels:
            lvl.normal_()
    node_ids = torch.tensor([[0, 1], [1, 2], [0, 1], [1, 3]])   # duplicates share rows
    fetched = fetch_rows([p.detach() for p in bank.levels], node_ids)
    assert [ids.tolist() for ids in fetched.ids] == [[0, 1], [1, 2, 3]]
    dense = bank.gather(node_ids)
    assert torch.equal(fetched.memory(), dense)
    weights = torch.randn_like(dense)
    (fetched.memory() * weights).sum().backward()
    (dense * weights).sum().backward()
    for (ids, grad), lvl in zip(fetched.grads(), bank.levels):
        assert grad.shape[0] == len(ids)                # only fetched rows, never (k^l, ...)
        torch.testing.assert_close(grad, lvl.grad[ids])
        others = torch.ones(lvl.shape[0], dtype=torch.bool)
        others[ids] = False
        assert lvl.grad[others].abs().sum() == 0


def test_a_training_step_leaves_blocks_no_sample_fetched_bit_for_bit_unchanged():
    tc = load_train_config("tiny", ["anchor_steps=0", "cotrain_steps=5", "generic_prob=0"])
    cfg = tc.model_config()
    docs = [list(np.random.default_rng(i).integers(1, 60, size=40)) for i in range(6)]
    nodes = np.array([[0, i % 2] for i in range(6)])              # every path in subtree 0
    trainer = Trainer(cfg, tc, pack(docs, nodes, seq_len=16, eos=0))
    before = [t.clone() for t in trainer.bank]
    trainer.train()
    lvl1, lvl2 = trainer.bank
    assert torch.equal(lvl1[1], before[0][1])                     # level-1 node 1: never fetched
    assert torch.equal(lvl2[2:], before[1][2:])                   # its children 2, 3
    assert not torch.equal(lvl1[0], before[0][0]) and not torch.equal(lvl2[:2], before[1][:2])
    assert trainer.bank_opt is None and trainer.done
