"""The learner's first stage: which examples of a chunk it learns from.

An example is dropped if it was seen before (by example id, over a bounded
:class:`~stream_learner.learn.parts.DedupWindow`: the joiner is at least
once) or is of another model, and refused (a dead letter) if its label is
one the model cannot use. The window is this part's state, saved and
restored by it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..events import ExampleEvent, class_name
from .parts import DedupWindow, Tensors

__all__ = ["Intake", "Refusal"]

#: An example refused at intake: (its index in the chunk, the reason).
Refusal = tuple[int, str]


class Intake:
    """Dedup, the model filter and the label check of a chunk (module docstring).

    ``counts`` is the learner's own tally, shared: this part bumps
    ``duplicates``, ``other_model`` and ``rejected`` in it.
    """

    def __init__(
        self,
        model_name: str,
        classes: list[str],
        class_index: Mapping[str, int],
        *,
        regression: bool,
        label_abs_max: float,
        dedup_window: int,
        counts: dict[str, int],
    ) -> None:
        self.model_name = model_name
        self.classes = classes
        self.class_index = class_index
        self.regression = regression
        self.label_abs_max = label_abs_max
        self.seen = DedupWindow(dedup_window)
        self.counts = counts

    def admit(self, chunk: Sequence[ExampleEvent]) -> tuple[list[ExampleEvent], list[int], list[Refusal]]:
        """The rows to learn from, each one's index in the chunk, and the refused examples."""
        rows: list[ExampleEvent] = []
        where: list[int] = []  # each row's index in the chunk
        refused: list[Refusal] = []
        blake2b, model_name = hashlib.blake2b, self.model_name
        # A label that is one of the class names as given is fine: no need to ask label_problem.
        known = self.class_index if not self.regression else {}
        counts = self.counts
        # Every example is remembered, in chunk order (those of other models and refused ones too).
        fresh = self.seen.add_many([blake2b(ex.example_id.encode(), digest_size=16).digest() for ex in chunk])
        for i, ex in enumerate(chunk):
            if not fresh[i]:
                counts["duplicates"] += 1
                continue
            if ex.model != model_name:
                counts["other_model"] += 1
                continue
            if (
                ex.kind != "unlabeled"
                and not (type(ex.label) is str and ex.label in known)
                and (reason := self.label_problem(ex.label))
            ):
                counts["rejected"] += 1
                refused.append((i, reason))
                continue
            rows.append(ex)
            where.append(i)
        return rows, where, refused

    def label_problem(self, label: Any) -> str | None:
        """Why the model cannot learn from ``label`` (``None``: it can)."""
        if label is None:
            return "a labeled example has no label"
        if self.regression:
            if isinstance(label, str):
                return f"regression label must be a number, got {label!r}"
            if not abs(label) <= self.label_abs_max:
                return f"label {label!r} is out of range"
            return None
        if class_name(label) not in self.class_index:
            return f"label {class_name(label)!r} is not one of the model's classes {self.classes}"
        return None

    def save(self, tensors: Tensors) -> None:
        """Into ``tensors["dedup"]``: the window of example digests."""
        self.seen.save(tensors)

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`save` wrote."""
        self.seen.load(tensors)
