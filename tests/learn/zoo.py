"""User models and a collate hook, importable by name as the settings name them (tests only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: Every call of a factory here: the keyword arguments it was given (a test reads them back).
CALLS: list[dict[str, Any]] = []


def wide(*, n_features: int, n_outputs: int, width: int, depth: int = 1, **rest: Any) -> nn.Module:
    """An MLP whose size the architecture params choose."""
    CALLS.append({"n_features": n_features, "n_outputs": n_outputs, "width": width, "depth": depth, **rest})
    layers: list[nn.Module] = []
    size = n_features
    for _ in range(depth):
        layers += [nn.Linear(size, width), nn.ReLU()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, n_outputs))


class _WithLengths(nn.Module):
    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features + 1, n_outputs)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.linear(torch.cat([x["dense"], x["comment_length"]], dim=1))
        return out


def with_lengths(*, n_features: int, n_outputs: int, inputs: list[dict[str, Any]], collate: str) -> nn.Module:
    """A model reading the hook's ``comment_length`` next to the dense columns."""
    CALLS.append({"n_features": n_features, "inputs": inputs, "collate": collate})
    return _WithLengths(n_features, n_outputs)


def comment_length(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The length of each row's ``comment`` (a feature the spec does not declare); refuses a number."""
    lengths = []
    for row in rows:
        comment = row.get("comment", "")
        if not isinstance(comment, str):
            raise ValueError(f"comment must be a string, got {type(comment).__name__}")
        lengths.append([len(comment) / 100.0])
    return {"comment_length": torch.tensor(lengths, dtype=torch.float32)}
