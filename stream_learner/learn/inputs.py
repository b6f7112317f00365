"""The feature spec: each feature's kind, declared in one string per feature.

``trainer_features`` lists the model's features in order; each entry is
``NAME`` (a number) or ``NAME:KIND:OPTION=VALUE:...``:

==========================================  =================================================================
``age`` (or ``age:numeric``)                a number, standardized online (README, "The trainer")
``plan:category:vocab=basic|premium|gold``  one-hot over the declared vocabulary; an unknown value is
                                            counted and encoded as no category (``unknown=refuse``: the
                                            example is refused, the field named)
``city:category:buckets=1024``              an open vocabulary, hashed (CRC-32 of the UTF-8) into buckets
``emb:vector:length=8``                     a list of exactly 8 finite numbers, used as given
``review:text:tokenizer=tok.json:max_length=32``
                                            tokenized by a local ``tokenizer.json`` (Hugging Face
                                            ``tokenizers``), cut to 32 tokens and padded; a longer text
                                            is truncated and counted (``overflow=refuse``: refused)
==========================================  =================================================================

The same strings work in TOML (a list), in the environment and in flags
(comma-separated), so vocabularies, names and paths may not hold ``,``,
``:``, ``|`` or ``=``. Only numbers are standardized (and clipped); category
columns are 0/1, vectors are used as given, texts are token ids.

A spec of numbers alone is what a model's spec always was: its architecture
records no ``inputs``, so the manifests of numeric models are unchanged.
Otherwise the architecture records every input (:meth:`Input.to_dict`), with
a text's tokenizer by content (its SHA-256 and vocabulary size; the file's
bytes travel with the weights, see :mod:`stream_learner.learn.featurizer`).

>>> plan = parse_input("plan:category:vocab=basic|premium")
>>> plan.kind, plan.vocab, plan.unknown, plan.width
('category', ('basic', 'premium'), 'count', 2)
>>> parse_input("emb:vector:length=3").width
3
>>> parse_input("emb:vector")
Traceback (most recent call last):
...
ValueError: feature 'emb:vector': a vector needs length=N
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["numeric", "category", "vector", "text"]
KINDS: tuple[str, ...] = ("numeric", "category", "vector", "text")
#: Bounds on what a spec may declare (a signed architecture is checked against them too).
MAX_VOCAB = 100_000
MAX_BUCKETS = 1 << 20
MAX_VECTOR = 65_536
MAX_TOKENS = 8192

_OPTIONS: dict[str, frozenset[str]] = {
    "numeric": frozenset(),
    "category": frozenset({"vocab", "buckets", "unknown"}),
    "vector": frozenset({"length"}),
    "text": frozenset({"tokenizer", "max_length", "overflow"}),
}


@dataclass(frozen=True)
class Input:
    """One declared feature: its name, kind and the kind's options (see the module docstring).

    ``tokenizer`` is the trainer's path to a text's ``tokenizer.json``;
    ``tokenizer_json`` its bytes once read (a serving node gets them from the
    checkpoint), ``tokenizer_sha256`` and ``vocab_size`` what the signed
    architecture records of it.
    """

    name: str
    kind: Kind = "numeric"
    vocab: tuple[str, ...] = ()
    unknown: Literal["count", "refuse"] = "count"
    buckets: int = 0
    length: int = 0
    max_length: int = 0
    overflow: Literal["truncate", "refuse"] = "truncate"
    tokenizer: str = ""
    tokenizer_json: bytes = field(default=b"", repr=False, compare=False)
    tokenizer_sha256: str = field(default="", repr=False)
    vocab_size: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        where = f"feature {self.name!r}"
        if not self.name or len(self.name) > 256:
            raise ValueError(f"{where}: a name has 1 to 256 characters")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r} (numeric, category, vector or text)")
        if self.kind == "category":
            if bool(self.vocab) == bool(self.buckets):
                raise ValueError(f"{where}: a category needs vocab=A|B|... or buckets=N (one of them)")
            if len(set(self.vocab)) != len(self.vocab) or not all(self.vocab):
                raise ValueError(f"{where}: the vocabulary names a value twice or an empty value")
            if len(self.vocab) > MAX_VOCAB or not 0 <= self.buckets <= MAX_BUCKETS:
                raise ValueError(f"{where}: at most {MAX_VOCAB} values or {MAX_BUCKETS} buckets")
        if self.unknown not in ("count", "refuse") or self.overflow not in ("truncate", "refuse"):
            raise ValueError(f"{where}: unknown= is count or refuse, overflow= is truncate or refuse")
        if self.kind == "vector" and not 1 <= self.length <= MAX_VECTOR:
            raise ValueError(f"{where}: a vector needs length=N, 1 <= N <= {MAX_VECTOR}")
        if self.kind == "text":
            if not 1 <= self.max_length <= MAX_TOKENS:
                raise ValueError(f"{where}: a text needs max_length=N, 1 <= N <= {MAX_TOKENS}")
            if not (self.tokenizer or self.tokenizer_sha256):
                raise ValueError(f"{where}: a text needs tokenizer=PATH (a local tokenizer.json)")

    @property
    def width(self) -> int:
        """Columns of the dense float input this feature takes (a text takes none: its tokens are apart)."""
        if self.kind == "numeric":
            return 1
        if self.kind == "category":
            return len(self.vocab) or self.buckets
        if self.kind == "vector":
            return self.length
        return 0

    def to_dict(self) -> dict[str, Any]:
        """What the signed architecture records: everything a serving node featurizes by, no paths."""
        d: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "category":
            d.update({"vocab": list(self.vocab), "unknown": self.unknown} if self.vocab else {"buckets": self.buckets})
        elif self.kind == "vector":
            d["length"] = self.length
        elif self.kind == "text":
            d.update(
                max_length=self.max_length,
                overflow=self.overflow,
                tokenizer_sha256=self.tokenizer_sha256,
                vocab_size=self.vocab_size,
            )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Input:
        """The input a signed architecture records (:meth:`to_dict`); ``ValueError`` if it is not one."""
        allowed = {"name", "kind", "vocab", "unknown", "buckets", "length", "max_length", "overflow"}
        allowed |= {"tokenizer_sha256", "vocab_size"}
        if not isinstance(d, Mapping) or not set(d) <= allowed:
            raise ValueError(f"not an input: {d!r}")
        values = dict(d)
        if "vocab" in values:
            if not isinstance(values["vocab"], list) or not all(isinstance(v, str) for v in values["vocab"]):
                raise ValueError(f"input {values.get('name')!r}: vocab must be a list of strings")
            values["vocab"] = tuple(values["vocab"])
        for key in ("buckets", "length", "max_length", "vocab_size"):
            if key in values and (type(values[key]) is not int or values[key] < 0):
                raise ValueError(f"input {values.get('name')!r}: {key} must be a non-negative integer")
        for key in ("name", "kind", "unknown", "overflow", "tokenizer_sha256"):
            if key in values and not isinstance(values[key], str):
                raise ValueError(f"input {values.get('name')!r}: {key} must be a string")
        made = cls(**values)
        if made.kind == "text" and not (len(made.tokenizer_sha256) == 64 and 1 <= made.vocab_size <= 10_000_000):
            raise ValueError(f"input {made.name!r}: a text records its tokenizer's sha256 and vocab_size")
        return made


def parse_input(text: str) -> Input:
    """One entry of ``trainer_features`` (see the module docstring); ``ValueError`` naming it if invalid."""
    name, *rest = text.strip().split(":")
    if not rest:
        return Input(name=name)
    kind, options = rest[0], rest[1:]
    if kind not in KINDS:
        raise ValueError(f"feature {text!r}: unknown kind {kind!r} (numeric, category, vector or text)")
    values: dict[str, Any] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key not in _OPTIONS[kind] or key in values:
            raise ValueError(
                f"feature {text!r}: {option!r} is not an option of a {kind} "
                f"(options: {', '.join(sorted(_OPTIONS[kind])) or 'none'}; each once, as key=value)"
            )
        values[key] = value
    try:
        for key in ("buckets", "length", "max_length"):
            if key in values:
                values[key] = int(values[key])
    except ValueError:
        raise ValueError(f"feature {text!r}: {key} must be an integer") from None
    if "vocab" in values:
        values["vocab"] = tuple(values["vocab"].split("|"))
    if kind == "vector" and "length" not in values:
        raise ValueError(f"feature {text!r}: a vector needs length=N")
    try:
        return Input(name=name, kind=kind, **values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"feature {text!r}: {exc}") from None


def parse_inputs(texts: Sequence[str]) -> tuple[Input, ...]:
    """The whole spec, in order; ``ValueError`` for an invalid entry or a name given twice."""
    inputs = tuple(parse_input(t) for t in texts)
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise ValueError("the feature spec names a feature twice")
    return inputs


def load_tokenizers(inputs: Sequence[Input]) -> tuple[Input, ...]:
    """The inputs with each text's ``tokenizer.json`` read and checked (its bytes, digest and vocabulary
    size); ``ValueError`` naming the feature and the file if it cannot be read or is not a tokenizer."""
    out = []
    for inp in inputs:
        if inp.kind == "text" and inp.tokenizer and not inp.tokenizer_json:
            try:
                with open(inp.tokenizer, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise ValueError(f"feature {inp.name!r}: cannot read tokenizer {inp.tokenizer}: {exc}") from None
            inp = with_tokenizer(inp, data)
        out.append(inp)
    return tuple(out)


def with_tokenizer(inp: Input, data: bytes) -> Input:
    """``inp`` holding the tokenizer ``data`` (a ``tokenizer.json``), its digest and vocabulary size."""
    tokenizer = parse_tokenizer(data, inp.name)
    return dataclasses.replace(
        inp,
        tokenizer_json=data,
        tokenizer_sha256=hashlib.sha256(data).hexdigest(),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )


def parse_tokenizer(data: bytes, name: str) -> Any:
    """A ``tokenizers.Tokenizer`` from the bytes of a ``tokenizer.json`` (parsed in Rust: no code runs)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - an install without the extra
        raise ValueError(
            f"feature {name!r} is a text: install the tokenizers library (pip install stream-learner[text])"
        ) from None
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - whatever the library says, the file is not a tokenizer
        raise ValueError(f"feature {name!r}: not a tokenizer.json: {exc}") from None


def is_numeric_only(inputs: Sequence[Input]) -> bool:
    """True if every input is a number (the spec of every model before inputs had kinds)."""
    return all(i.kind == "numeric" for i in inputs)
