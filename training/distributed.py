"""Data parallelism with torch.distributed (gloo works on CPU), launched by torchrun:

    torchrun --standalone --nproc_per_node 2 -m membank_cli train --config demo --out runs/dp

Every rank holds the whole model, bank and generic memory (replicas), draws the same global batch
(the sampler and the generic-memory coin flips are seeded, so no communication is needed for
them) and trains on its contiguous slice of it. The loss of a slice is its summed token loss
divided by the token count of the *global* batch, so summing gradients over ranks gives exactly
the full batch's gradient, whatever the padding in each slice. After backward:

- dense gradients (anchor, generic memory): one flattened all-reduce (SUM). This is what DDP
  does; doing it by hand keeps tied embeddings, frozen anchors and the sometimes-unused generic
  memory simple.
- bank gradients are sparse: each rank has gradients only for the rows its samples fetched
  (training/optim.py `fetch_rows`). `reduce_rows` all-gathers every rank's (row ids, row
  gradients), padded to the longest, and sums them per row id. Every rank gets the same union of
  rows and the same sums, in the same order, so the replicas of the bank stay identical. The
  traffic is world x max_rows x block per level, against the whole level for a dense all-reduce
  (paper scale: 4,096 level-3 blocks vs a few hundred fetched).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        """Join the process group torchrun describes (WORLD_SIZE > 1); else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of n samples (sizes differ by <= 1)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum tensors over ranks in place, as one flattened buffer."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def reduce_rows(self, rows: list[tuple[torch.Tensor, torch.Tensor] | None]
                    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Sum sparse row gradients over ranks: per level, (ids (U,), grads (U, ...)) -> the union
        of all ranks' ids (sorted) and the per-id sums. `None` levels (rank 0) stay None."""
        if self.world == 1:
            return rows
        counts = torch.tensor([0 if r is None else r[0].numel() for r in rows], dtype=torch.int64)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world)]
        dist.all_gather(all_counts, counts)
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for level, item in enumerate(rows):
            if item is None:
                out.append(None)
                continue
            ids, grads = item
            sizes = [int(c[level]) for c in all_counts]
            longest = max(sizes)
            if longest == 0:  # no rank fetched this level (every sample used the generic memory)
                out.append(item)
                continue
            pad_ids = torch.zeros(longest, dtype=torch.int64)
            pad_ids[:ids.numel()] = ids
            pad_grads = grads.new_zeros(longest, *grads.shape[1:])
            pad_grads[:ids.numel()] = grads
            got_ids = [torch.empty_like(pad_ids) for _ in range(self.world)]
            got_grads = [torch.empty_like(pad_grads) for _ in range(self.world)]
            dist.all_gather(got_ids, pad_ids)
            dist.all_gather(got_grads, pad_grads)
            all_ids = torch.cat([g[:s] for g, s in zip(got_ids, sizes)])
            all_grads = torch.cat([g[:s] for g, s in zip(got_grads, sizes)])
            union, inv = torch.unique(all_ids, return_inverse=True)
            out.append((union, grads.new_zeros(union.numel(),
                                               *grads.shape[1:]).index_add_(0, inv, all_grads)))
        return out

    def sum_scalar(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.sum_scalar(float(flag)) > 0
