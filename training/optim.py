"""The bank's sparse training step: gather fetched rows, then a lazy AdamW on those rows only.

PAPER.md section 6 leaves open how optimizer state and weight decay treat blocks that a step does
not fetch. Decaying the whole bank every step would erase rare blocks, and a dense optimizer
step over a multi-GB bank would cost more than the model. So, per step and per level:

1. `fetch_rows` takes the unique fetched node ids U (at most the batch size) and copies those
   rows out of the level tensor into a fresh leaf tensor (U, L, n, r, W) with requires_grad.
   Per-sample memories index that leaf. Backward therefore produces a (U, ...) gradient and never
   a dense (k^l, ...) one: indexing the bank parameter itself would allocate a zero gradient the
   size of the whole level at every step.
2. `LazyAdamW.step` takes (ids, row gradients) per level and applies AdamW to those rows only:
   decoupled weight decay, first and second moments, and bias correction from a per-row step
   count (the number of steps that fetched that row). Rows it is not given are never read or
   written, so an unfetched block, its moments and its step count stay bit for bit unchanged:
   no decay and no momentum drift while it is idle. For a row fetched at every step the update
   is exactly torch.optim.AdamW's (torch's fused kernel run on the fetched rows in place).

Between 1 and 2 the trainer may all-reduce the row gradients across ranks
(training/distributed.py `reduce_rows`) and clip them together with the dense gradients.

Moments are dense tensors the size of the bank (Adam needs 2 x bank anyway); only the fetched
rows' pages are ever touched after initialisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine down to floor_ratio * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# gathering fetched rows


@dataclass
class FetchedRows:
    """The rows a batch fetched, per level (None for levels with r_l = 0)."""

    ids: list[torch.Tensor | None]      # (U,) unique row indices into the level tensor held
    rows: list[torch.Tensor | None]     # (U, L, n, r, W) leaf copies, requires_grad
    inverse: list[torch.Tensor | None]  # (B,) row of each sample: rows[l][inverse[l]]

    def memory(self) -> torch.Tensor:
        """Per-sample memory (B, L, n, R, W): the path's blocks concatenated along R in level
        order, exactly as `MemoryBank.gather` builds it."""
        # index_select: its backward is index_add_, faster on CPU than indexing's index_put_
        return torch.cat([r.index_select(0, i) for r, i in zip(self.rows, self.inverse)
                          if r is not None], dim=3)

    def grads(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """(ids, row gradients) per level, after backward; zeros for rows that got no gradient."""
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for ids, rows in zip(self.ids, self.rows):
            if rows is None:
                out.append(None)
            else:
                out.append((ids, rows.grad if rows.grad is not None else torch.zeros_like(rows)))
        return out


def fetch_rows(levels: list[torch.Tensor], node_ids: torch.Tensor,
               offsets: list[int] | None = None, requires_grad: bool = True) -> FetchedRows:
    """Gather the rows fetched by node ids (B, p) from level tensors (N_l, L, n, r_l, W).

    offsets[l] is the node id of row 0 of levels[l] (non-zero when a job holds one subtree's
    slice of the bank). A level whose rank is 0 (shape[3] == 0) is skipped.
    """
    ids, rows, inverse = [], [], []
    for l, level in enumerate(levels):
        if level.shape[0] == 0 or level.shape[3] == 0:
            ids.append(None), rows.append(None), inverse.append(None)
            continue
        local = node_ids[:, l] - (offsets[l] if offsets else 0)
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= level.shape[0]):
            raise ValueError(f"level {l + 1}: node ids outside the {level.shape[0]} rows held")
        uniq, inv = torch.unique(local, return_inverse=True)
        leaf = level.detach().index_select(0, uniq)
        ids.append(uniq), rows.append(leaf.requires_grad_(requires_grad)), inverse.append(inv)
    return FetchedRows(ids, rows, inverse)


# ---------------------------------------------------------------------------------------------
# lazy AdamW


class LazyAdamW:
    """AdamW on row-indexed tensors (N, ...) that updates only the rows it is given.

    `params` are updated in place (plain tensors, or the `.data` of parameters). Hyper-parameters
    and maths follow torch.optim.AdamW: decoupled weight decay `p *= 1 - lr * wd`, then the Adam
    update with bias corrections from the row's own step count.

    fused=True (the default where torch has it) runs torch's fused AdamW kernel directly on the
    fetched rows' views: one pass over each row, no gather or scatter copies; it matches
    torch.optim.AdamW(fused=True) bit for bit. fused=False is the same update written out with
    index_select / index_copy_, matching the default torch.optim.AdamW bit for bit.
    """

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-4, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.fused = hasattr(torch, "_fused_adamw_") if fused is None else fused
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # steps that fetched each row (float32, as torch.optim.AdamW keeps its step)
        self.steps = [torch.zeros(p.shape[0], dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def step(self, rows: list[tuple[torch.Tensor, torch.Tensor] | None],
             lr: float | None = None) -> None:
        """rows[i] = (ids (U,), grad (U, ...)) for params[i], ids unique; None: nothing fetched."""
        lr = self.lr if lr is None else lr
        for i, item in enumerate(rows):
            if item is None or item[0].numel() == 0:
                continue
            ids, grad = item
            self.steps[i].index_add_(0, ids, torch.ones(ids.numel()))
            (self._step_fused if self.fused else self._step_reference)(i, ids, grad.contiguous(),
                                                                       lr)

    def _step_fused(self, i: int, ids: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        rows = ids.tolist()
        p, m, v, t = self.params[i], self.exp_avg[i], self.exp_avg_sq[i], self.steps[i]
        torch._fused_adamw_([p[r] for r in rows], list(grad.unbind(0)), [m[r] for r in rows],
                            [v[r] for r in rows], [], [t[r] for r in rows], lr=lr,
                            beta1=self.betas[0], beta2=self.betas[1],
                            weight_decay=self.weight_decay, eps=self.eps,
                            amsgrad=False, maximize=False)

    def _step_reference(self, i: int, ids: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        beta1, beta2 = self.betas
        p, m_all, v_all = self.params[i], self.exp_avg[i], self.exp_avg_sq[i]
        param, m, v = p.index_select(0, ids), m_all.index_select(0, ids), v_all.index_select(0, ids)
        # the operations of torch.optim.AdamW's single-tensor path, with per-row scalars
        param.mul_(1 - lr * self.weight_decay)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size, bc2_sqrt = self._bias_corrections(self.steps[i].index_select(0, ids), lr,
                                                     param.dim())
        denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
        param.add_(m * -step_size / denom)   # = addcdiv_(m, denom, value=-step_size)
        p.index_copy_(0, ids, param)
        m_all.index_copy_(0, ids, m)
        v_all.index_copy_(0, ids, v)

    def _bias_corrections(self, t: torch.Tensor, lr: float, ndim: int):
        """Per-row lr / (1 - beta1^t) and sqrt(1 - beta2^t), computed in Python floats exactly
        as torch.optim.AdamW computes its scalars, then cast to float32 like its scalar args."""
        beta1, beta2 = self.betas
        uniq, inv = torch.unique(t, return_inverse=True)
        sizes, corr = [], []
        for s in uniq.tolist():
            sizes.append(lr / (1 - beta1 ** s))
            corr.append((1 - beta2 ** s) ** 0.5)
        shape = (-1,) + (1,) * (ndim - 1)
        step_size = torch.tensor(sizes, dtype=torch.float64).to(torch.float32)[inv].view(shape)
        bc2_sqrt = torch.tensor(corr, dtype=torch.float64).to(torch.float32)[inv].view(shape)
        return step_size, bc2_sqrt

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"hyper": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                          "weight_decay": self.weight_decay},
                "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for name in ("exp_avg", "exp_avg_sq", "steps"):
            mine, theirs = getattr(self, name), state[name]
            if len(theirs) != len(mine) or any(a.shape != b.shape for a, b in zip(mine, theirs)):
                raise ValueError(f"lazy AdamW state {name!r} does not match the bank's shapes")
            for a, b in zip(mine, theirs):
                a.copy_(b)
