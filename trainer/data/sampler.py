"""Which samples each rank trains on, at every step, independent of the world size.

Each epoch is a seeded permutation of the dataset. Global step k takes the next
`global_batch` indices of it; these are cut into micro-batches ordered (accumulation step,
rank), so one rank with 8 per micro-batch and two ranks with 4 each see the same global batch.
The position is a function of the step alone, which makes resume exact and free.
"""
from __future__ import annotations

from typing import List

import torch


class GlobalBatchSampler:
    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int, world_size: int, rank: int,
                 seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch * grad_accum * world_size
        if num_samples < self.global_batch:
            raise ValueError(f"the training set has {num_samples} samples, fewer than one global batch "
                             f"({self.global_batch}); lower train.micro_batch_size or train.grad_accum")
        self.steps_per_epoch = num_samples // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> List[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
                self._perm = torch.randperm(self.num_samples, generator=gen).tolist()
            else:
                self._perm = list(range(self.num_samples))
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> List[int]:
        """All samples of global step `step` (0-based), in micro-batch order."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self._permutation(epoch)[start:start + self.global_batch]

    def micro_batches(self, step: int) -> List[List[int]]:
        """This rank's micro-batches for global step `step`, one per accumulation step."""
        indices = self.global_indices(step)
        chunks = []
        for accum in range(self.grad_accum):
            slot = accum * self.world_size + self.rank
            chunks.append(indices[slot * self.micro_batch:(slot + 1) * self.micro_batch])
        return chunks

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def state_dict(self, step: int) -> dict:
        return {"epoch": self.epoch_of(step), "step_in_epoch": step % self.steps_per_epoch,
                "num_samples": self.num_samples, "global_batch": self.global_batch, "seed": self.seed}
