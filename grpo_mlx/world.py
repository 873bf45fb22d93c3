"""Where this process stands among data-parallel ranks, and every collective the step needs.

Stages call these methods instead of branching on the world size: with one process (what
`mx.distributed.init()` gives when not started by `mlx.launch`) each one returns its input.
Groups never straddle ranks: each rank samples and scores whole groups of its share.
"""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class World:
    def __init__(self, group=None):
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and evaluates; the other ranks hold the same adapters."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's equal, contiguous slice of a global list (the global batch's order)."""
        if self.size == 1:
            return items
        n = len(items) // self.size
        return items[self.rank * n : (self.rank + 1) * n]

    def own_rows(self, n_local: int) -> slice:
        """The rows of a gathered (global) array that are this rank's own `n_local` rows."""
        return slice(self.rank * n_local, (self.rank + 1) * n_local)

    def gather(self, x: np.ndarray) -> np.ndarray:
        """Every rank's rows, concatenated in rank order."""
        if self.size == 1:
            return x
        return np.array(mx.distributed.all_gather(mx.array(x), group=self.group))

    def gather_ragged(self, x: np.ndarray) -> np.ndarray:
        """Every rank's 1-D `x`, of any length, concatenated in rank order."""
        if self.size == 1:
            return x
        sizes = self.gather(np.array([len(x)], dtype=np.int32))  # (size,)
        padded = np.zeros(int(sizes.max()), dtype=x.dtype)
        padded[: len(x)] = x
        rows = self.gather(padded[None])  # (size, max)
        return np.concatenate([rows[r, : sizes[r]] for r in range(self.size)])

    def max(self, value):
        """The largest over ranks of a per-rank scalar (an mx.array)."""
        if self.size == 1:
            return value
        return mx.distributed.all_gather(value.reshape(1), group=self.group).max()

    def min(self, value):
        return -self.max(-value)

    def mean(self, value):
        """The mean over ranks of a per-rank figure (an mx.array)."""
        if self.size == 1:
            return value
        return mx.distributed.all_sum(value, group=self.group) / self.size

    def all(self, flag):
        """True (an mx bool array) only where every rank's `flag` is true."""
        if self.size == 1:
            return flag
        return mx.distributed.all_sum(flag.astype(mx.float32), group=self.group) == self.size

    def any(self, flag: bool) -> bool:
        """A stop asked on any rank (Ctrl-C reaches them at different moments) stops all of them
        at the same step, so none waits forever in a collective."""
        if self.size == 1:
            return flag
        return mx.distributed.all_sum(mx.array(float(flag)), group=self.group).item() > 0

    def average_gradients(self, grads):
        """The global batch's gradient from each rank's share of it."""
        if self.size == 1:
            return grads
        return nn.average_gradients(grads, group=self.group)

    def same_everywhere(self, value) -> bool:
        """Whether every rank holds the same JSON-serialisable `value` (a 16-byte digest summed)."""
        if self.size == 1:
            return True
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
        mine = mx.array(list(digest[:16]), dtype=mx.float32)  # (16,) bytes, exact in float32
        total = mx.distributed.all_sum(mine, group=self.group)
        return bool(mx.array_equal(total, mine * self.size).item())
