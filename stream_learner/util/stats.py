"""Running sample statistics (count, mean, M2) in float64, merged a batch at a time.

One implementation serves the featurizer (a column per feature, with
missing values) and the regression target (one column): Chan et al.'s
pairwise update, exact and independent of the order inside a batch.

>>> m = Moments(2)
>>> m.update(np.array([[1.0, 10.0], [3.0, np.nan], [2.0, 30.0]]))
>>> m.count.tolist(), m.mean.tolist(), m.std().tolist()
([3.0, 2.0], [2.0, 20.0], [1.0, 14.142135623730951])
>>> Moments(1).std().tolist()        # fewer than two values: 1.0, so scaling is the identity
[1.0]
"""

from __future__ import annotations

import numpy as np

#: Below this, a standard deviation is taken as zero and scaling falls back to 1.0.
MIN_STD = 1e-12


def sample_std(count: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """The sample standard deviation, 1.0 where fewer than two values or where it is degenerate."""
    std = np.sqrt(np.where(count > 1, m2 / np.maximum(count - 1, 1), 1.0))
    return np.where(std > MIN_STD, std, 1.0)


class Moments:
    """Count, mean and M2 of ``n`` columns (float64 arrays), NaN values skipped."""

    def __init__(self, n: int) -> None:
        self.count = np.zeros(n, dtype=np.float64)
        self.mean = np.zeros(n, dtype=np.float64)
        self.m2 = np.zeros(n, dtype=np.float64)

    def std(self) -> np.ndarray:
        """Per column, :func:`sample_std`."""
        return sample_std(self.count, self.m2)

    def update(self, batch: np.ndarray, missing: np.ndarray | None = None) -> None:
        """Merge a ``[rows, n]`` batch; ``missing`` (default: NaN) marks values to skip."""
        present = ~(np.isnan(batch) if missing is None else missing)
        n_b = present.sum(axis=0).astype(np.float64)
        if not n_b.any():
            return
        safe = np.where(present, batch, 0.0)
        mean_b = np.divide(safe.sum(axis=0), n_b, out=np.zeros_like(n_b), where=n_b > 0)
        dev = np.where(present, batch - mean_b, 0.0)
        m2_b = (dev * dev).sum(axis=0)
        total = self.count + n_b
        delta = mean_b - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            self.mean = np.where(total > 0, self.mean + delta * n_b / np.maximum(total, 1), self.mean)
            self.m2 = self.m2 + m2_b + delta * delta * self.count * n_b / np.maximum(total, 1)
        self.count = total

    def as_array(self) -> np.ndarray:
        """``[count, mean, m2]`` stacked (a copy), the layout checkpoints store."""
        return np.stack([self.count, self.mean, self.m2])

    def load(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Restore from arrays (copied, as float64)."""
        self.count = np.asarray(count, dtype=np.float64).copy()
        self.mean = np.asarray(mean, dtype=np.float64).copy()
        self.m2 = np.asarray(m2, dtype=np.float64).copy()
