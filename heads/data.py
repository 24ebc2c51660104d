"""Aligned (input, output) rows for one head, read from the stores in bounded memory.

A head sees only the store: rows of the input site in one store paired with rows of the
output site in the other, through the alignment. Data that fits the memory budget is
read once and kept; larger data is streamed in shuffled blocks every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import torch


def heldout_mask(segments: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True for rows whose *segment* is held out: no held-out text is ever trained on."""
    uniq = np.unique(segments)
    rng = np.random.default_rng(seed)
    n_out = max(1, int(round(fraction * len(uniq)))) if len(uniq) > 1 else 0
    held = rng.choice(uniq, size=n_out, replace=False)
    return np.isin(segments, held)


def gather(arr: da.Array, rows: np.ndarray) -> np.ndarray:
    """Rows of a (tokens, dim) dask array in the order given, reading only their chunks."""
    order = np.argsort(rows, kind="stable")
    with dask.config.set(scheduler="synchronous"):
        block = arr[rows[order]].compute()
    out = np.empty_like(block)
    out[order] = block
    return out


def row_stats(arr: da.Array, rows: np.ndarray, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean and (population) variance per dimension over `rows`, in bounded memory.
    Blocks are merged by Chan's update, not from raw sums of squares: Gemma-3's activations reach
    ~1e5, where E[x²] - E[x]² loses the variance of a narrow dimension."""
    rows = np.sort(rows)  # sequential reads; the order of rows does not change the statistics
    n, mean, m2 = 0, np.zeros(arr.shape[1]), np.zeros(arr.shape[1])
    for start in range(0, len(rows), block_rows):
        b = gather(arr, rows[start: start + block_rows]).astype(np.float64)
        nb, mb = len(b), b.mean(0)
        delta, total = mb - mean, n + nb
        mean = mean + delta * nb / total
        m2 = m2 + ((b - mb) ** 2).sum(0) + delta ** 2 * n * nb / total
        n = total
    return mean, m2 / max(n, 1)


@dataclass
class PairLoader:
    """Minibatches of (x, y) standardised float32 tensors for a set of aligned rows."""

    x: da.Array
    y: da.Array
    x_rows: np.ndarray
    y_rows: np.ndarray
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    batch_size: int = 256
    block_rows: int = 16_384
    memory_budget_mb: float = 1024.0
    seed: int = 0

    def __post_init__(self):
        n, width = len(self.x_rows), self.x.shape[1] + self.y.shape[1]
        self.in_memory = n * width * 4 <= self.memory_budget_mb * 2**20
        self._cache = self._read(np.arange(n)) if self.in_memory else None

    def __len__(self) -> int:
        return len(self.x_rows)

    def _read(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs = (gather(self.x, self.x_rows[idx]) - self.x_mean) / self.x_std
        ys = (gather(self.y, self.y_rows[idx]) - self.y_mean) / self.y_std
        return torch.from_numpy(xs.astype(np.float32)), torch.from_numpy(ys.astype(np.float32))

    def blocks(self, shuffle: bool = False, epoch: int = 0):
        """(x, y) blocks of up to block_rows rows; shuffled blocks in shuffled order."""
        n = len(self)
        rng = np.random.default_rng(self.seed + epoch)
        perm = rng.permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, self.block_rows):
            idx = perm[start: start + self.block_rows]
            if self.in_memory:
                t = torch.from_numpy(idx)
                yield self._cache[0][t], self._cache[1][t]
            else:
                # Sorting inside a block keeps disk reads sequential; the permutation
                # already chose which rows share the block.
                yield self._read(np.sort(idx))

    def batches(self, epoch: int):
        """Shuffled minibatches for one epoch."""
        for xb, yb in self.blocks(shuffle=True, epoch=epoch):
            order = torch.randperm(len(xb), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            for s in range(0, len(xb), self.batch_size):
                sel = order[s: s + self.batch_size]
                yield xb[sel], yb[sel]
