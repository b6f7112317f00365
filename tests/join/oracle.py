"""An offline oracle of the join semantics, to check a joiner's output against.

Given every prediction and label event of a stream (duplicates allowed), it
computes the examples a correct joiner emits once the watermark has passed
every deadline, assuming each input partition is in event-time order and no
state is garbage-collected early (retentions larger than the stream):

* a prediction (the first one per request id) whose label's event time is at
  most ``prediction.event_time + window`` gives one ``labeled`` example;
* otherwise one ``unlabeled`` example (no label in it), plus a ``late`` one
  if a label exists;
* a label whose prediction never comes is an orphan: nothing is emitted.

>>> def prediction(i, t):
...     return PredictionEvent(event_id=f"p-{i}", request_id=f"req-{i}", model="m", model_version="1",
...                            event_time=t, features={}, prediction=0.5)
>>> def label(i, t):
...     return LabelEvent(event_id=f"l-{i}", request_id=f"req-{i}", event_time=t, label="a")
>>> out = expected_examples([prediction(1, 0), label(1, 10), prediction(2, 0), label(2, 11),
...                          prediction(3, 0), label(4, 5)], window_ms=10)
>>> sorted((x.kind, x.request_id, x.label_event_id) for x in out.examples.values())
[('labeled', 'req-1', 'l-1'), ('late', 'req-2', 'l-2'), ('unlabeled', 'req-2', None), ('unlabeled', 'req-3', None)]
>>> out.orphans
['req-4']
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from stream_learner.events import ExampleEvent, LabelEvent, PredictionEvent
from stream_learner.join.examples import example_id


@dataclass(frozen=True)
class Expected:
    """One example the joiner must emit."""

    example_id: str
    kind: str
    request_id: str
    prediction_event_id: str
    label_event_id: str | None
    label: object
    prediction_time: int
    label_time: int | None

    def key(self) -> tuple[str, str, str]:
        return (self.example_id, self.kind, self.request_id)


@dataclass
class OracleResult:
    """The examples by id, and the request ids of orphan labels."""

    examples: dict[str, Expected] = field(default_factory=dict)
    orphans: list[str] = field(default_factory=list)

    def keys(self) -> set[tuple[str, str, str]]:
        return {x.key() for x in self.examples.values()}

    def counts(self) -> Counter[str]:
        return Counter(x.kind for x in self.examples.values())


def expected_examples(events: Iterable[PredictionEvent | LabelEvent], window_ms: int) -> OracleResult:
    """What a correct joiner emits for ``events`` (any order; duplicates ignored)."""
    predictions: dict[str, PredictionEvent] = {}
    labels: dict[str, LabelEvent] = {}
    for ev in events:
        target = predictions if isinstance(ev, PredictionEvent) else labels
        target.setdefault(ev.request_id, ev)  # type: ignore[arg-type]
    out = OracleResult()

    def add(kind: str, p: PredictionEvent, lab: LabelEvent | None) -> None:
        eid = example_id(kind, p.event_id, lab.event_id if lab else None)
        out.examples[eid] = Expected(
            eid,
            kind,
            p.request_id,
            p.event_id,
            lab.event_id if lab else None,
            lab.label if lab else None,
            p.event_time,
            lab.event_time if lab else None,
        )

    for req, p in predictions.items():
        lab = labels.get(req)
        if lab is not None and lab.event_time <= p.event_time + window_ms:
            add("labeled", p, lab)
        else:
            add("unlabeled", p, None)
            if lab is not None:
                add("late", p, lab)
    out.orphans = sorted(req for req in labels if req not in predictions)
    return out


def mismatches(examples: Iterable[ExampleEvent], oracle: OracleResult, limit: int = 10) -> list[str]:
    """Human-readable differences between examples read back and the oracle (empty: they agree).

    Duplicates (same example id) are allowed, but each copy must carry the expected fields.
    """
    everything = list(examples)
    got: dict[str, ExampleEvent] = {}
    for x in everything:
        got.setdefault(x.example_id, x)
    problems: list[str] = []
    missing = [
        (e.kind, e.request_id, e.prediction_event_id, e.label_event_id, e.example_id)
        for e in (oracle.examples[k] for k in oracle.examples.keys() - got.keys())
    ]
    extra = [
        (x.kind, x.request_id, x.prediction_event_id, x.label_event_id, x.example_id)
        for x in (got[k] for k in got.keys() - oracle.examples.keys())
    ]
    if missing:
        problems.append(
            f"{len(missing)} missing (kind, request, prediction id, label id, example id), "
            f"e.g. {sorted(missing, key=lambda e: e[1])[:limit]}"
        )
    if extra:
        problems.append(f"{len(extra)} extra, e.g. {sorted(extra, key=lambda e: e[1])[:limit]}")
    if missing and extra:
        # A hint for the reader of a failure: the commonest way to get both at once.
        carrying = {x[1] for x in extra if x[0] == "unlabeled" and x[3] is not None}
        instead = sum(1 for e in missing if e[0] == "unlabeled" and e[1] in carrying)
        if instead:
            problems.append(
                f"{instead} of the missing are unlabeled examples emitted instead with the "
                f"(late) label in them, under another example id"
            )
    wrong = []
    for x in everything:
        e = oracle.examples.get(x.example_id)
        if e is None:
            continue
        k = x.example_id
        actual = (
            x.kind,
            x.request_id,
            x.prediction_event_id,
            x.label_event_id,
            x.label,
            x.prediction_time,
            x.label_time,
        )
        wanted = (
            e.kind,
            e.request_id,
            e.prediction_event_id,
            e.label_event_id,
            e.label,
            e.prediction_time,
            e.label_time,
        )
        if actual != wanted:
            wrong.append(f"{k}: got {actual}, expected {wanted}")
    if wrong:
        problems.append(f"{len(wrong)} with wrong fields, e.g. {wrong[:limit]}")
    return problems
