"""Deterministic, resumable sampling over one dataset or a weighted mixture of several.

The sample drawn at position ``g`` of the stream depends only on the seed and
``g`` (plus how many samples each dataset gave before it), so the whole state
is two integers per dataset and a resumed run draws exactly the batches an
uninterrupted run would have drawn.

Each dataset is walked in epochs; epoch ``e`` of dataset ``k`` is a permutation
seeded by ``(seed, k, e)``. With several datasets, the dataset of each sample is
drawn from the mixture weights in blocks of ``_BLOCK`` draws seeded by
``(seed, block)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["MixtureSampler", "World"]

_BLOCK = 4096


class World:
    """Where this process sits in a data-parallel job (one process: rank 0 of 1).

    The trainer shards every global batch with :meth:`shard` and writes files
    and logs only where :attr:`is_main`; a distributed launcher replaces this
    object with one that knows the real rank and reduces across processes.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's share of a global batch (strided, so ranks differ by at most one item)."""
        return list(items[self.rank::self.world_size])

    def all_reduce_sum(self, value: float) -> float:
        """Sum of ``value`` over all ranks (the identity for one process)."""
        return value

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""


def mix_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed; distinct tuples give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _seeded(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


class MixtureSampler:
    """Endless stream of ``(dataset index, row index)`` pairs; see the module docstring.

    Args:
        sizes: number of rows of each dataset (all > 0).
        weights: sampling weight per dataset (any positive scale); default
            proportional to ``sizes`` (plain concatenation).
        seed: stream seed.
        shuffle: permute each epoch (False: rows in order, for evaluation).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None, seed: int = 0,
                 shuffle: bool = True):
        if not sizes or any(int(s) <= 0 for s in sizes):
            raise ValueError(f"every dataset needs at least one row, got sizes {list(sizes)}")
        if weights is None:
            weights = [float(s) for s in sizes]
        # not (w >= 0) also refuses NaN, which fails every comparison; inf would make the
        # normalised weights NaN, and torch.multinomial only complains at the first draw.
        if (len(weights) != len(sizes) or any(not (w >= 0 and math.isfinite(w)) for w in weights)
                or not any(w > 0 for w in weights)):
            raise ValueError(f"weights must be {len(sizes)} finite non-negative numbers with a positive sum, "
                             f"got {list(weights)}")
        self.sizes = [int(s) for s in sizes]
        # Relative to the largest: finite weights can still sum to inf (1e308 + 1e308), and
        # torch.multinomial then drew the first dataset 0% of the time; subnormal ones lose precision.
        top = max(float(w) for w in weights)
        self.weights = torch.tensor([float(w) / top for w in weights], dtype=torch.float64)
        self.seed, self.shuffle = int(seed), shuffle
        self.drawn = 0
        self.per_dataset = [0] * len(sizes)
        self._perm_cache: dict[int, tuple[int, list[int]]] = {}
        self._block_cache: tuple[int, list[int]] | None = None

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "per_dataset": list(self.per_dataset)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["per_dataset"]) != len(self.sizes):
            raise ValueError(f"sampler state is for {len(state['per_dataset'])} datasets, "
                             f"this run has {len(self.sizes)}")
        self.drawn = int(state["drawn"])
        self.per_dataset = [int(c) for c in state["per_dataset"]]

    def _row(self, k: int, j: int) -> int:
        epoch, i = divmod(j, self.sizes[k])
        if not self.shuffle:
            return i
        cached = self._perm_cache.get(k)
        if cached is None or cached[0] != epoch:
            perm = torch.randperm(self.sizes[k], generator=_seeded(self.seed, k, epoch)).tolist()
            cached = self._perm_cache[k] = (epoch, perm)
        return cached[1][i]

    def _dataset_of(self, g: int) -> int:
        if len(self.sizes) == 1:
            return 0
        block, i = divmod(g, _BLOCK)
        if self._block_cache is None or self._block_cache[0] != block:
            draws = torch.multinomial(self.weights, _BLOCK, replacement=True, generator=_seeded(self.seed, -1, block))
            self._block_cache = (block, draws.tolist())
        return self._block_cache[1][i]

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` samples as ``(dataset index, row index)``."""
        out = []
        for _ in range(n):
            k = self._dataset_of(self.drawn)
            out.append((k, self._row(k, self.per_dataset[k])))
            self.per_dataset[k] += 1
            self.drawn += 1
        return out
