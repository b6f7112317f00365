"""The recent examples window: a learner part holding the last examples learned, as raw rows.

Variants are fine-tuned on the window's examples before a version, and
gated on the examples after it (which that version had not trained on):
:meth:`RecentExamples.since` gives those by their running index. Rows are
kept *raw* (float64, NaN where missing or out of range), so a variant of
version ``v`` standardizes them with ``v``'s own featurizer statistics,
as a serving node would. Labels are class indices or regression values,
NaN for an unlabeled example. The state is two tensors and a counter
(never pickle), restored bit for bit.

>>> w = RecentExamples(["a", "b"], capacity=3)
>>> w.add([{"a": 1.0}, {"a": 2.0, "b": 5.0}], [0.0, float("nan")])
>>> w.add([{"a": 3.0}, {"b": 4.0}], [1.0, 1.0])
>>> win = w.window()
>>> win.raw.tolist(), win.labels.tolist(), w.total
([[2.0, 5.0], [3.0, nan], [nan, 4.0]], [nan, 1.0, 1.0], 4)
>>> w.since(3).labels.tolist(), w.since(3).n_labeled
([1.0], 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Window:
    """Examples as a raw float64 matrix ``[n, features]`` (NaN: missing) and their labels (NaN: none)."""

    raw: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_labeled(self) -> int:
        """Examples with a label."""
        return int((~np.isnan(self.labels)).sum())

    def labeled(self) -> Window:
        """Only the labeled examples."""
        keep = ~np.isnan(self.labels)
        return Window(self.raw[keep], self.labels[keep])

    def head(self, n: int) -> Window:
        """The first ``n`` examples."""
        return Window(self.raw[:n], self.labels[:n])

    def rows(self, names: Sequence[str]) -> list[dict[str, float | None]]:
        """As feature dicts (what a request carries): NaN becomes ``None``."""
        return [{k: (None if math.isnan(v) else v) for k, v in zip(names, row)} for row in self.raw.tolist()]


class RecentExamples:
    """The last ``capacity`` examples learned (see the module docstring)."""

    def __init__(self, names: Sequence[str], capacity: int, abs_max: float = 1e9) -> None:
        self.names = list(names)
        self.capacity = capacity
        self.abs_max = abs_max
        self.raw = np.full((capacity, len(self.names)), np.nan)
        self.labels = np.full(capacity, np.nan)
        self.total = 0  # examples ever added; entry i lives in slot i % capacity

    def add(self, rows: Sequence[Mapping[str, Any]], labels: Sequence[float]) -> None:
        """Append a chunk's examples (rows as the learner got them) and their labels."""
        if not rows:
            return
        names = self.names
        raw = np.array([[row.get(n) for n in names] for row in rows], dtype=np.float64)
        raw[np.abs(raw) > self.abs_max] = np.nan  # the featurizer's rule: out of range is missing
        ys = np.asarray(labels, dtype=np.float64)
        if len(rows) > self.capacity:
            raw, ys = raw[-self.capacity :], ys[-self.capacity :]
            self.total += len(rows) - self.capacity
        slots = (self.total + np.arange(len(ys))) % self.capacity
        self.raw[slots] = raw
        self.labels[slots] = ys
        self.total += len(ys)

    def since(self, start: int) -> Window:
        """The examples with running index ``>= start`` still in the window, oldest first."""
        first = max(start, self.total - self.capacity, 0)
        slots = np.arange(first, self.total) % self.capacity
        return Window(self.raw[slots].copy(), self.labels[slots].copy())

    def window(self) -> Window:
        """Every example in the window, oldest first."""
        return self.since(0)

    def save(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        """Into ``tensors`` (``recent.raw``, ``recent.labels``, oldest first) and ``meta["recent_total"]``."""
        w = self.window()
        tensors["recent.raw"] = torch.from_numpy(w.raw.copy())
        tensors["recent.labels"] = torch.from_numpy(w.labels.copy())
        meta["recent_total"] = self.total

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`save` wrote."""
        raw, labels = tensors["recent.raw"].numpy(), tensors["recent.labels"].numpy()
        total = int(meta["recent_total"])
        self.raw[:] = np.nan
        self.labels[:] = np.nan
        n = min(len(labels), self.capacity)
        slots = (total - n + np.arange(n)) % self.capacity
        self.raw[slots] = raw[len(labels) - n :]
        self.labels[slots] = labels[len(labels) - n :]
        self.total = total
