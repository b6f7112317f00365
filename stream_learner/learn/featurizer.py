"""Feature dicts -> model inputs, from a declared, ordered feature spec.

The spec's inputs (:mod:`stream_learner.learn.inputs`) become one dense
float32 matrix (each input's columns in spec order) and, for each text, a
matrix of token ids. Per value:

* a declared feature that is absent or ``null`` is *missing*: a number is
  imputed with the running mean (0 after standardization), a category is
  no category (zeros), a vector zeros, a text no tokens; counted;
* a number whose magnitude exceeds ``abs_max`` is *out of range*: treated as
  missing and counted, so an absurd value can neither poison the running
  statistics nor reach the weights;
* a feature not in the spec is *unknown*: ignored and counted;
* standardized numbers are clipped to ``[-clip, clip]``; nothing else is
  standardized or clipped: a category is 0/1 columns (a declared vocabulary
  one-hot, an open one hashed into buckets), a vector is used as given, a
  text is token ids;
* a value that does not fit its input is *refused*, naming the feature: a
  number that is not one (``wrong_type``), a vector of another length
  (``invalid_value``) or with a non-finite number (``non_finite``), a
  category that is not a string, an unknown category of a closed vocabulary
  declared ``unknown=refuse`` (else counted, ``unknown_category``), a text
  longer than ``max_length`` tokens declared ``overflow=refuse`` (else cut
  and counted, ``truncated``). :meth:`Featurizer.transform` raises
  :class:`RowsRefused` listing every refused row before it changes
  anything; the learner dead-letters them and featurizes the rest, a
  serving node answers 400.

Statistics (count, mean, M2 in float64, :class:`~stream_learner.util.stats.Moments`,
one column per *number*) are updated from every featurized batch *after* it
is transformed, so an example is always featurized with statistics that did
not see it (prequential). Serving transforms with ``learn=False``: the
statistics the checkpoint was trained with, never updated.

A spec of numbers alone gives a float32 tensor ``[rows, features]``, as it
always did. A spec with a text (or a collate hook, see
:mod:`stream_learner.learn.collate`) gives a dict: ``"dense"`` (the float
matrix), ``"text:<name>"`` (int64 ``[rows, max_length]``: token id + 1, 0 is
padding) and ``"mask:<name>"`` (float32, 1 where a token is).

>>> f = Featurizer(["a", "b"])
>>> x = f.transform([{"a": 1.0, "b": 10.0}, {"a": 3.0}, {"a": 2.0, "b": 30.0, "zz": 5.0}])
>>> f.counts["missing"], f.counts["unknown"]
(1, 1)
>>> f.transform([{"a": 2.0, "b": 20.0}]).tolist()
[[0.0, 0.0]]
>>> from stream_learner.learn.inputs import parse_inputs
>>> g = Featurizer(parse_inputs(["plan:category:vocab=basic|gold", "emb:vector:length=2"]))
>>> g.transform([{"plan": "gold", "emb": [0.5, -1.0]}, {"plan": "silver"}]).tolist()
[[0.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]]
>>> g.counts["unknown_category"], g.counts["missing"]
(1, 1)
>>> g.transform([{"emb": [1.0]}])
Traceback (most recent call last):
...
stream_learner.learn.featurizer.RowsRefused: $.features.emb: a vector of 1 numbers, the model takes 2
"""

from __future__ import annotations

import hashlib
import math
import operator
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import EventError
from ..util.stats import Moments
from .collate import CollateError, call_hook, culprits, load_hook
from .inputs import Input, parse_tokenizer, with_tokenizer

#: The tensor names of the statistics in a state dict and in a checkpoint.
STATS = ("featurizer.count", "featurizer.mean", "featurizer.m2")
#: A text's tokenizer file, as uint8 bytes, in a state dict and in a checkpoint: ``tokenizer.<name>``.
TOKENIZER_PREFIX = "tokenizer."
#: What :meth:`Featurizer.transform` gives the model: one tensor, or named tensors.
ModelInput = torch.Tensor | dict[str, torch.Tensor]
Rows = Sequence[Mapping[str, Any]]


def move_input(x: ModelInput, device: torch.device) -> ModelInput:
    """``x`` (one tensor or named tensors) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return {k: v.to(device) for k, v in x.items()}


_NUMBER = frozenset({float, int, type(None)})
_COUNTS = ("missing", "unknown", "out_of_range", "unknown_category", "truncated")


class FeatureError(EventError):
    """A feature value that does not fit its declared input (the field is ``$.features.<name>``)."""


class RowsRefused(EventError):
    """Rows whose features do not fit the spec: ``errors`` maps each refused row's index to why.

    As an :class:`~stream_learner.errors.EventError` it names the first one.
    """

    def __init__(self, errors: Mapping[int, EventError]) -> None:
        first = errors[min(errors)]
        super().__init__(first.kind, first.field, first.reason)
        self.errors = dict(errors)


def _inputs(spec: Sequence[str | Input]) -> list[Input]:
    return [Input(name=i) if isinstance(i, str) else i for i in spec]


def bucket(value: str, buckets: int) -> int:
    """The bucket of a hashed category: CRC-32 of its UTF-8, the same in every process (``hash()`` is not).

    >>> bucket("Paris", 16)
    6
    """
    return zlib.crc32(value.encode("utf-8", "surrogatepass")) % buckets


class Featurizer:
    """Online featurizer over a fixed, ordered spec: feature names (numbers) or :class:`Input` s."""

    def __init__(
        self, spec: Sequence[str | Input], *, clip: float = 10.0, abs_max: float = 1e9, collate: str = ""
    ) -> None:
        inputs = _inputs(spec)
        if not inputs:
            raise ValueError("the feature spec is empty: declare the model's features")
        if len({i.name for i in inputs}) != len(inputs):
            raise ValueError("the feature spec names a feature twice")
        self.inputs = inputs
        self.names = [i.name for i in inputs]
        self.clip = clip
        self.abs_max = abs_max
        self.collate = collate
        self._hook = load_hook(collate) if collate else None
        self.numeric_only = all(i.kind == "numeric" for i in inputs) and not collate
        self.numeric = [i.name for i in inputs if i.kind == "numeric"]
        self.texts = [i for i in inputs if i.kind == "text"]
        self.width = sum(i.width for i in inputs)
        # Where each number's column is in the dense matrix (the rest are 0/1 or vectors, never scaled).
        offsets, at = [], 0
        for i in inputs:
            if i.kind == "numeric":
                offsets.append(at)
            at += i.width
        self._numeric_columns = np.array(offsets, dtype=np.intp)
        # Every numeric feature of a row in one call (a tuple: two names at least), when the spec is numbers alone.
        self._getter = (
            operator.itemgetter(*self.numeric) if len(self.numeric) >= 2 and self.numeric == self.names else None
        )
        self._vocab = {i.name: {v: k for k, v in enumerate(i.vocab)} for i in inputs if i.vocab}
        self._tokenizers: dict[str, Any] = {
            t.name: parse_tokenizer(t.tokenizer_json, t.name) for t in self.texts if t.tokenizer_json
        }
        self._reset()

    def _reset(self) -> None:
        self._name_set = frozenset(self.names)
        self.moments = Moments(len(self.numeric))
        self.counts = dict.fromkeys(_COUNTS, 0)

    @property
    def count(self) -> np.ndarray:
        """Values seen, per numeric feature."""
        return self.moments.count

    @property
    def mean(self) -> np.ndarray:
        """Running mean, per numeric feature."""
        return self.moments.mean

    @property
    def m2(self) -> np.ndarray:
        """Running sum of squared deviations, per numeric feature."""
        return self.moments.m2

    def raw_matrix(self, rows: Rows) -> np.ndarray:
        """The numeric features as a float64 matrix, NaN where missing or out of range; counts them.

        Raises :class:`RowsRefused` (nothing counted) if a row holds something else than a number or
        ``null`` for a numeric feature.
        """
        matrix, counts = self._raw(rows)
        for key, n in counts.items():
            self.counts[key] += n
        return matrix

    def _raw(self, rows: Rows) -> tuple[np.ndarray, dict[str, int]]:
        """:meth:`raw_matrix` without counting: the matrix and what it would count."""
        names, name_set = self.numeric, self._name_set
        # numpy turns None into NaN for a float dtype: missing and null alike. One flat list.
        # A row holding exactly the spec's features (the usual one) is one itemgetter call, in
        # C, and has no unknown feature (as many keys as names, every name among them): a
        # quarter of the time of a map of row.get and a subset test per row, which the others take.
        flat: list[Any] = []
        extend = flat.extend
        unknown = 0
        getter, width = self._getter, len(self.names)
        for row in rows:
            if getter is not None and len(row) == width:
                try:
                    extend(getter(row))
                    continue
                except KeyError:  # a name is missing and another key is there instead
                    pass
            extend(map(row.get, names))
            if not row.keys() <= name_set:
                unknown += len(row.keys() - name_set)
        # numpy would read "1.5" as 1.5 and True as 1.0: only numbers and None are numbers (one C pass).
        if not set(map(type, flat)) <= _NUMBER:
            raise RowsRefused(self._numeric_errors(rows))
        matrix = np.array(flat, dtype=np.float64).reshape(len(rows), len(names))
        counts = {"unknown": unknown, "missing": int(np.isnan(matrix).sum())}
        bad = np.abs(matrix) > self.abs_max
        if bad.any():
            counts["out_of_range"] = int(bad.sum())
            matrix[bad] = np.nan
        return matrix, counts

    def _numeric_errors(self, rows: Rows) -> dict[int, FeatureError]:
        errors: dict[int, FeatureError] = {}
        for index, row in enumerate(rows):
            for name in self.numeric:
                value = row.get(name)
                if type(value) not in _NUMBER:
                    errors[index] = FeatureError(
                        "wrong_type", f"$.features.{name}", f"expected a number or null, got {_json_type(value)}"
                    )
                    break
        return errors

    def transform(self, rows: Rows, *, learn: bool = True) -> ModelInput:
        """The model input of a batch (see the module docstring), then learn from it.

        Raises :class:`RowsRefused` before changing anything if a row does not fit the spec.
        """
        if self.numeric_only:
            raw = self.raw_matrix(rows)
            missing = np.isnan(raw)
            z = self.standardize(raw, missing)
            if learn:
                self.moments.update(raw, missing)
            return z
        return self._transform_inputs(rows, learn)

    def _transform_inputs(self, rows: Rows, learn: bool) -> ModelInput:
        errors: dict[int, EventError] = {}
        counts = dict.fromkeys(_COUNTS, 0)
        dense = np.zeros((len(rows), self.width), dtype=np.float32)
        texts: dict[str, tuple[list[list[int]], list[int]]] = {}
        at = 0
        for inp in self.inputs:
            if inp.kind == "category":
                self._categories(inp, rows, dense, at, errors, counts)
            elif inp.kind == "vector":
                self._vectors(inp, rows, dense, at, errors, counts)
            elif inp.kind == "text":
                texts[inp.name] = self._tokens(inp, rows, errors, counts)
            at += inp.width
        try:
            raw, raw_counts = self._raw(rows)
        except RowsRefused as refused:
            errors.update({i: e for i, e in refused.errors.items() if i not in errors})
        hooked: dict[str, torch.Tensor] = {}
        if self._hook is not None and rows:
            try:
                hooked = call_hook(self._hook, self.collate, rows)
            except CollateError as exc:
                # A hook that fails the batch and then passes it (it is not a function of the rows) fails it all.
                found = culprits(self._hook, self.collate, rows) or dict.fromkeys(range(len(rows)), exc)
                errors.update({i: e for i, e in found.items() if i not in errors})
        if errors:
            raise RowsRefused(errors)  # before anything is counted: the rows that fit come again alone
        for key, n in (*counts.items(), *raw_counts.items()):
            self.counts[key] += n
        if self.numeric:
            missing = np.isnan(raw)
            dense[:, self._numeric_columns] = self.standardize(raw, missing).numpy()
            if learn:
                self.moments.update(raw, missing)
        x = torch.from_numpy(dense)
        if not self.texts and self._hook is None:
            return x
        out = {"dense": x, **hooked}
        for inp in self.texts:
            ids, _ = texts[inp.name]
            tokens = torch.zeros((len(rows), inp.max_length), dtype=torch.int64)
            for r, row_ids in enumerate(ids):
                if row_ids:
                    tokens[r, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.int64) + 1
            out[f"text:{inp.name}"] = tokens
            out[f"mask:{inp.name}"] = (tokens > 0).to(torch.float32)
        return out

    def _categories(
        self,
        inp: Input,
        rows: Rows,
        dense: np.ndarray,
        at: int,
        errors: dict[int, EventError],
        counts: dict[str, int],
    ) -> None:
        name, vocab = inp.name, self._vocab.get(inp.name)
        for r, row in enumerate(rows):
            value = row.get(name)
            if value is None:
                counts["missing"] += 1
            elif type(value) is not str:
                errors.setdefault(
                    r,
                    FeatureError(
                        "wrong_type", f"$.features.{name}", f"a category is a string, got {_json_type(value)}"
                    ),
                )
            elif vocab is None:
                dense[r, at + bucket(value, inp.buckets)] = 1.0
            elif (k := vocab.get(value)) is not None:
                dense[r, at + k] = 1.0
            elif inp.unknown == "refuse":
                errors.setdefault(
                    r,
                    FeatureError(
                        "invalid_value", f"$.features.{name}", f"{value[:64]!r} is not in the declared vocabulary"
                    ),
                )
            else:
                counts["unknown_category"] += 1

    def _vectors(
        self,
        inp: Input,
        rows: Rows,
        dense: np.ndarray,
        at: int,
        errors: dict[int, EventError],
        counts: dict[str, int],
    ) -> None:
        name, length = inp.name, inp.length
        field = f"$.features.{name}"
        for r, row in enumerate(rows):
            value = row.get(name)
            if value is None:
                counts["missing"] += 1
                continue
            if type(value) is not list:
                errors.setdefault(
                    r, FeatureError("wrong_type", field, f"a vector is an array, got {_json_type(value)}")
                )
            elif len(value) != length:
                errors.setdefault(
                    r,
                    FeatureError("invalid_value", field, f"a vector of {len(value)} numbers, the model takes {length}"),
                )
            elif not set(map(type, value)) <= {float, int}:
                errors.setdefault(r, FeatureError("wrong_type", field, "a vector holds numbers only"))
            elif not all(map(math.isfinite, value)):
                # The wire decoder refuses these already; a Python caller (a serving node's embedder) may not.
                errors.setdefault(r, FeatureError("non_finite", field, "a vector holds NaN or Infinity"))
            else:
                dense[r, at : at + length] = value

    def _tokens(
        self, inp: Input, rows: Rows, errors: dict[int, EventError], counts: dict[str, int]
    ) -> tuple[list[list[int]], list[int]]:
        name, field = inp.name, f"$.features.{inp.name}"
        tokenizer = self._tokenizers.get(name)
        if tokenizer is None:
            raise ValueError(f"feature {name!r}: the featurizer holds no tokenizer")
        texts: list[str] = []
        where: list[int] = []
        for r, row in enumerate(rows):
            value = row.get(name)
            if value is None:
                counts["missing"] += 1
            elif type(value) is not str:
                errors.setdefault(r, FeatureError("wrong_type", field, f"a text is a string, got {_json_type(value)}"))
            else:
                texts.append(value)
                where.append(r)
        ids: list[list[int]] = [[] for _ in rows]
        if texts:
            # One call for the batch (Rust); no truncation there, so an over-long text is seen as one.
            for r, encoding in zip(where, tokenizer.encode_batch(texts), strict=True):
                row_ids = encoding.ids
                if len(row_ids) > inp.max_length:
                    if inp.overflow == "refuse":
                        errors.setdefault(
                            r,
                            FeatureError(
                                "invalid_value",
                                field,
                                f"the text is {len(row_ids)} tokens, the model takes at most {inp.max_length}",
                            ),
                        )
                        continue
                    counts["truncated"] += 1
                    row_ids = row_ids[: inp.max_length]
                ids[r] = row_ids
        return ids, where

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
        """The running statistics as tensors (float64, exact), named as in :data:`STATS`, and each text's
        tokenizer file as bytes (``tokenizer.<name>``, uint8), so a checkpoint carries what it reads with."""
        m = self.moments
        state = {name: torch.from_numpy(a.copy()) for name, a in zip(STATS, (m.count, m.mean, m.m2))}
        for t in self.texts:
            state[TOKENIZER_PREFIX + t.name] = torch.frombuffer(bytearray(t.tokenizer_json), dtype=torch.uint8)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned; ``ValueError`` if a text's tokenizer is not the one
        this featurizer reads with (the file changed since the state was saved)."""
        for t in self.texts:
            saved = state.get(TOKENIZER_PREFIX + t.name)
            digest = hashlib.sha256(saved.numpy().tobytes()).hexdigest() if saved is not None else None
            if digest != t.tokenizer_sha256:
                raise ValueError(
                    f"feature {t.name!r}: the saved state was learned with tokenizer {digest}, "
                    f"this featurizer reads with {t.tokenizer_sha256} (was {t.tokenizer or 'the file'} changed?)"
                )
        self.moments.load(*(state[name].numpy() for name in STATS))


def attach_tokenizers(inputs: Sequence[Input], tensors: Mapping[str, torch.Tensor]) -> list[Input]:
    """The inputs of a signed architecture with each text's tokenizer taken from the checkpoint's
    ``tokenizer.<name>`` bytes, which must have the digest the architecture records (``ValueError``)."""
    out = []
    for inp in inputs:
        if inp.kind == "text":
            t = tensors.get(TOKENIZER_PREFIX + inp.name)
            if t is None or t.dtype != torch.uint8 or t.dim() != 1:
                raise ValueError(f"feature {inp.name!r}: the checkpoint holds no tokenizer (uint8 bytes)")
            data = t.numpy().tobytes()
            if hashlib.sha256(data).hexdigest() != inp.tokenizer_sha256:
                raise ValueError(f"feature {inp.name!r}: the tokenizer's bytes do not have the signed digest")
            loaded = with_tokenizer(inp, data)
            if loaded.vocab_size != inp.vocab_size:
                raise ValueError(f"feature {inp.name!r}: the tokenizer's vocabulary is not the signed size")
            inp = loaded
        out.append(inp)
    return out


def _json_type(value: Any) -> str:
    """What a Python value is in JSON's words (for refusals)."""
    names = {str: "str", bool: "bool", list: "array", dict: "object", float: "number", int: "number"}
    return names.get(type(value), type(value).__name__)
