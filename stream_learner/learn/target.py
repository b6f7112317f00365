"""Online standardization of a regression target.

The network learns ``(y - mean) / std`` and its output is turned back with
:meth:`TargetScaler.destandardize`; the statistics are those of every
target learned before the current chunk (prequential, as the features).

>>> t = TargetScaler()
>>> t.mean_std()                        # nothing seen: the identity
(0.0, 1.0)
>>> t.update([10.0, 20.0, 30.0])
>>> t.mean_std()
(20.0, 10.0)
>>> t.state_tensor().tolist()           # count, mean, M2: what checkpoints carry as ``target``
[3.0, 20.0, 200.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..util.stats import Moments


class TargetScaler:
    """Count, mean and M2 of the regression targets learned so far."""

    def __init__(self) -> None:
        self.moments = Moments(1)

    def mean_std(self) -> tuple[float, float]:
        """The mean and the sample std (1.0 below two targets or when degenerate)."""
        return float(self.moments.mean[0]), float(self.moments.std()[0])

    def update(self, ys: Sequence[float]) -> None:
        """Merge a chunk's targets (no-op for none)."""
        if len(ys):
            self.moments.update(np.asarray(ys, dtype=np.float64).reshape(-1, 1))

    def state_tensor(self) -> torch.Tensor:
        """``[count, mean, m2]`` as float64, the ``target`` tensor of the state and checkpoints."""
        return torch.from_numpy(self.moments.as_array()[:, 0].copy())

    def load_tensor(self, target: torch.Tensor) -> None:
        """Restore from :meth:`state_tensor`'s layout."""
        count, mean, m2 = target.double().numpy().reshape(3, 1)
        self.moments.load(count, mean, m2)
