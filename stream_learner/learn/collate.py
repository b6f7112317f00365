"""The collate hook: a user function that turns a batch of feature dicts into tensors of its own.

For inputs the declared kinds do not cover (``trainer_collate``,
``package.module:function``), the hook is called as ``function(rows)`` with
the batch's feature dicts (as the events hold them) and returns a dict of
tensors, each with one row per example; they reach the model (a user model:
a factory's module) next to the featurizer's own, in one dict. It runs in
the trainer and, with the same rows, in every serving node that allows it
(``serving_allowed_architectures`` names it, as it names factories: a
signing key is not trusted to name code).

A hook's failure is the rows' fault, found row by row: if the batch fails,
each row is tried alone and the ones that fail are refused (the trainer
dead-letters them, a node answers 400), naming ``$.features`` and the
hook's message; a batch whose rows all pass alone but not together is
refused whole. Nothing a hook raises or returns stops a role.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..errors import EventError

Hook = Callable[[Sequence[Mapping[str, Any]]], Mapping[str, torch.Tensor]]
#: Names the featurizer's own tensors use: a hook's may not.
RESERVED = ("dense", "text:", "mask:")


class CollateError(EventError):
    """A collate hook refused a batch or returned something that is not its tensors."""


def load_hook(name: str) -> Hook:
    """The function ``package.module:function`` names (``ValueError`` if there is none)."""
    module_name, _, func_name = name.partition(":")
    try:
        hook = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"collate hook {name!r} cannot be imported: {exc}") from None
    if not callable(hook):
        raise ValueError(f"collate hook {name!r} is not a function")
    return hook  # type: ignore[no-any-return]


def call_hook(hook: Hook, name: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The hook's tensors for ``rows``, checked: named apart from the featurizer's, one row per example,
    finite where floating. Raises :class:`CollateError` otherwise, whatever the hook did."""
    try:
        out = hook(rows)
    except Exception as exc:  # noqa: BLE001 - a user's function may raise anything: the rows are refused
        raise CollateError(
            "invalid_value", "$.features", f"collate hook {name} raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(out, Mapping):
        raise CollateError(
            "invalid_value", "$.features", f"collate hook {name} returned {type(out).__name__}, not a dict"
        )
    checked: dict[str, torch.Tensor] = {}
    for key, t in out.items():
        if not isinstance(key, str) or key.startswith(RESERVED):
            raise CollateError(
                "invalid_value", "$.features", f"collate hook {name}: tensor name {key!r} is reserved or not a string"
            )
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != len(rows):
            raise CollateError(
                "invalid_value", "$.features", f"collate hook {name}: {key!r} must be a tensor of {len(rows)} rows"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CollateError("non_finite", "$.features", f"collate hook {name}: {key!r} holds NaN or Infinity")
        checked[key] = t
    return checked


def culprits(hook: Hook, name: str, rows: Sequence[Mapping[str, Any]]) -> dict[int, CollateError]:
    """The rows the hook refuses alone (all of them, with the batch's error, if none does)."""
    errors: dict[int, CollateError] = {}
    for index, row in enumerate(rows):
        try:
            call_hook(hook, name, [row])
        except CollateError as exc:
            errors[index] = exc
    if errors:
        return errors
    try:
        call_hook(hook, name, rows)
    except CollateError as exc:
        return dict.fromkeys(range(len(rows)), exc)
    return {}
