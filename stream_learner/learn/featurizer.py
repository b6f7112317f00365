"""Feature dicts -> standardized tensors, from a declared, ordered feature spec.

Policy, per value:

* a declared feature that is absent or ``null`` is *missing*: it is imputed
  with the running mean (0 after standardization) and counted;
* a value whose magnitude exceeds ``abs_max`` is *out of range*: treated as
  missing and counted, so an absurd value can neither poison the running
  statistics nor reach the weights;
* a feature not in the spec is *unknown*: ignored and counted;
* standardized values are clipped to ``[-clip, clip]``.

Statistics (count, mean, M2 in float64, :class:`~stream_learner.util.stats.Moments`)
are updated from every featurized batch *after* it is transformed, so an
example is always featurized with statistics that did not see it
(prequential). Serving transforms with ``learn=False``: the statistics the
checkpoint was trained with, never updated.

>>> f = Featurizer(["a", "b"])
>>> x = f.transform([{"a": 1.0, "b": 10.0}, {"a": 3.0}, {"a": 2.0, "b": 30.0, "zz": 5.0}])
>>> f.counts["missing"], f.counts["unknown"]
(1, 1)
>>> f.transform([{"a": 2.0, "b": 20.0}]).tolist()
[[0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..util.stats import Moments

#: The tensor names of the statistics in a state dict and in a checkpoint.
STATS = ("featurizer.count", "featurizer.mean", "featurizer.m2")


class Featurizer:
    """Online standardizing featurizer over a fixed, ordered list of names."""

    def __init__(self, names: Sequence[str], *, clip: float = 10.0, abs_max: float = 1e9) -> None:
        if not names:
            raise ValueError("the feature spec is empty: declare the model's features")
        if len(set(names)) != len(names):
            raise ValueError("the feature spec names a feature twice")
        self.names = list(names)
        self.clip = clip
        self.abs_max = abs_max
        self._reset()

    def _reset(self) -> None:
        self._name_set = frozenset(self.names)
        self.moments = Moments(len(self.names))
        self.counts = {"missing": 0, "unknown": 0, "out_of_range": 0}

    @property
    def count(self) -> np.ndarray:
        """Values seen, per feature."""
        return self.moments.count

    @property
    def mean(self) -> np.ndarray:
        """Running mean, per feature."""
        return self.moments.mean

    @property
    def m2(self) -> np.ndarray:
        """Running sum of squared deviations, per feature."""
        return self.moments.m2

    def raw_matrix(self, rows: Sequence[Mapping[str, float | None]]) -> np.ndarray:
        """The declared features as a float64 matrix, NaN where missing or out of range; counts them."""
        names, name_set = self.names, self._name_set
        # numpy turns None into NaN for a float dtype: missing and null alike. One flat list
        # (map over the names, in C) and a subset test per row: half the time of a nested
        # comprehension and a set difference per row.
        flat: list[float | None] = []
        extend = flat.extend
        unknown = 0
        for row in rows:
            extend(map(row.get, names))
            if not row.keys() <= name_set:
                unknown += len(row.keys() - name_set)
        matrix = np.array(flat, dtype=np.float64).reshape(len(rows), len(names))
        self.counts["unknown"] += unknown
        self.counts["missing"] += int(np.isnan(matrix).sum())
        bad = np.abs(matrix) > self.abs_max
        if bad.any():
            self.counts["out_of_range"] += int(bad.sum())
            matrix[bad] = np.nan
        return matrix

    def transform(self, rows: Sequence[Mapping[str, float | None]], *, learn: bool = True) -> torch.Tensor:
        """Standardize a batch (float32 tensor ``[len(rows), len(names)]``), then learn from it."""
        raw = self.raw_matrix(rows)
        missing = np.isnan(raw)
        z = self.standardize(raw, missing)
        if learn:
            self.moments.update(raw, missing)
        return z

    def standardize(self, raw: np.ndarray, missing: np.ndarray | None = None) -> torch.Tensor:
        """A raw matrix (NaN where missing, as :meth:`raw_matrix` gives) standardized with the current
        statistics, nothing counted or learned: :meth:`transform`'s math (variants are scored with it
        on stored raw rows)."""
        if missing is None:
            missing = np.isnan(raw)
        z = (raw - self.moments.mean) / self.moments.std()
        z[missing] = 0.0
        np.clip(z, -self.clip, self.clip, out=z)
        return torch.from_numpy(z.astype(np.float32))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running statistics as tensors (float64, exact), named as in :data:`STATS`."""
        m = self.moments
        return {name: torch.from_numpy(a.copy()) for name, a in zip(STATS, (m.count, m.mean, m.m2))}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.moments.load(*(state[name].numpy() for name in STATS))
