"""A distributed sampler whose position can be saved and restored mid-epoch, for exact resume."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Each rank's share of a (seed, epoch)-shuffled order, startable from any position of the epoch.

    With ``pad=True`` (training) the order is padded by repeating its head so every rank gets
    ``ceil(n / world)`` indices, as torch's DistributedSampler does. With ``pad=False`` (evaluation) every
    index appears exactly once over all ranks and the shares differ by at most one.

    The sampler cannot know how far the loader got (DataLoader workers prefetch ahead of the step that
    is being trained), so the training loop tells it: ``state_dict(consumed)`` records how many of this
    rank's indices of the current epoch were trained on, and after ``load_state_dict`` the next iteration
    starts right after them. Later epochs start from 0 again.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, *, shuffle: bool = True,
                 seed: int = 0, pad: bool = True):
        if num_samples < 1:
            raise ValueError("the dataset is empty: nothing to sample")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def epoch_indices(self) -> list[int]:
        """This rank's whole share of the current epoch, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        if self.pad:
            total = math.ceil(self.num_samples / self.num_replicas) * self.num_replicas
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.epoch_indices()[start:])

    def __len__(self) -> int:
        return len(self.epoch_indices()) - self._start

    def state_dict(self, consumed: int) -> dict:
        """Where to resume: the epoch and how many of this rank's indices of it were consumed."""
        return {"epoch": self.epoch, "consumed": consumed, "seed": self.seed,
                "num_samples": self.num_samples, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        same_split = (state["num_samples"], state["num_replicas"]) == (self.num_samples, self.num_replicas)
        if not same_split:
            raise ValueError(
                f"cannot resume the sampler: it was saved for {state['num_samples']} samples on "
                f"{state['num_replicas']} ranks, this run has {self.num_samples} on {self.num_replicas}"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self._start = state["consumed"]
