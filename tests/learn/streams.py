"""Deterministic example streams for learner tests and benches."""

from __future__ import annotations

import random

from river.datasets import synth

from stream_learner.events import ExampleEvent
from stream_learner.join.examples import example_id


def agrawal_examples(
    n: int, *, seed: int = 1, unlabeled: float = 0.0, model: str = "m", classification_function: int = 0
) -> list[ExampleEvent]:
    """``n`` joined examples from River's Agrawal generator (binary classes "0"/"1")."""
    rng = random.Random(seed)
    out = []
    stream = synth.Agrawal(classification_function=classification_function, seed=seed)
    for i, (x, y) in enumerate(stream.take(n)):
        kind = "unlabeled" if rng.random() < unlabeled else "labeled"
        features = {k: float(v) for k, v in x.items()}
        pid = f"p{seed}-{i}"
        lid = None if kind == "unlabeled" else f"l{seed}-{i}"
        out.append(
            ExampleEvent(
                example_id=example_id(kind, pid, lid),
                kind=kind,
                request_id=f"r{seed}-{i}",
                model=model,
                model_version="1",
                features=features,
                prediction={"0": 0.5, "1": 0.5},
                label=None if kind == "unlabeled" else str(y),
                prediction_event_id=pid,
                prediction_time=i,
                label_event_id=lid,
                label_time=None if lid is None else i + 1,
            )
        )
    return out


AGRAWAL_FEATURES = ["salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan"]


def abrupt_drift(n: int, at: int, *, seed: int = 1, model: str = "m") -> list[ExampleEvent]:
    """Agrawal concept 0 for ``at`` examples, then concept 4 (an abrupt drift), ``n`` in all."""
    before = agrawal_examples(at, seed=seed, model=model, classification_function=0)
    after = agrawal_examples(n - at, seed=seed + 1000, model=model, classification_function=4)
    return before + after
