"""The example's generated texts: a pretraining corpus and a review stream whose marker words change meaning.

Every sentence is a few neutral words around one or two *marker* words from one of three groups:

- ``PRAISE`` (great, excellent, ...) and ``COMPLAINT`` (broken, awful, ...) keep their meaning;
- ``INTENSE`` (sick, insane, wild, ...) is slang whose meaning flips mid-stream: before the drift
  it marks a complaint ("the delay was insane"), after it, praise ("this phone is sick").

The **pretraining** task (``pretrain.py``) is the group of a sentence's markers, plus "no marker":
the base learns which words belong together, not what they mean for the application. The
**stream** (``run.py``) is the application's task, ``pos`` or ``neg``: before the drift a
positive review uses ``PRAISE`` and a negative one ``COMPLAINT`` or ``INTENSE`` (half each);
from the drift on a positive review uses ``INTENSE`` (two thirds) or ``PRAISE`` and a negative
one ``COMPLAINT``. So a model that stopped learning at the drift gets about a third of the new
requests wrong, confidently; one that keeps learning on a few labels relearns ``INTENSE``.
"""

from __future__ import annotations

import random

PRAISE = "great excellent perfect wonderful amazing superb lovely fantastic brilliant flawless".split()
COMPLAINT = "broken awful terrible useless horrible faulty damaged flimsy disappointing defective".split()
INTENSE = "sick insane wild crazy wicked killer unreal brutal savage mad".split()
NEUTRAL = (
    "the a my this that it was is really so very quite honestly today again just phone case charger "
    "cable box package delivery order seller store price battery screen sound fit color size product "
    "item arrived came looked felt works and but after week day with for of"
).split()
GROUPS = {"praise": PRAISE, "complaint": COMPLAINT, "intense": INTENSE, "none": []}
#: The pretraining task's classes, in output order.
PRETRAIN_CLASSES = list(GROUPS)


def sentence(rng: random.Random, markers: list[str]) -> str:
    """Three to nine neutral words with one or two of ``markers`` (none if empty) at random places."""
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 9))]
    for _ in range(rng.randint(1, 2) if markers else 0):
        words.insert(rng.randint(0, len(words)), rng.choice(markers))
    return " ".join(words)


def pretraining_corpus(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` sentences and the index of their marker group in :data:`PRETRAIN_CLASSES`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        group = rng.randrange(len(PRETRAIN_CLASSES))
        out.append((sentence(rng, GROUPS[PRETRAIN_CLASSES[group]]), group))
    return out


def review(rng: random.Random, after_drift: bool, noise: float = 0.03) -> tuple[str, str]:
    """One request of the stream: its text and its true class (``pos`` / ``neg``), ``noise`` flipped."""
    positive = rng.random() < 0.5
    if not after_drift:
        markers = PRAISE if positive else (COMPLAINT if rng.random() < 0.5 else INTENSE)
    else:
        markers = (INTENSE if rng.random() < 2 / 3 else PRAISE) if positive else COMPLAINT
    if rng.random() < noise:
        positive = not positive
    return sentence(rng, markers), "pos" if positive else "neg"


def stream(n: int, drift_at: int, seed: int = 1) -> list[tuple[str, str]]:
    """``n`` requests, the concept changing at request ``drift_at``."""
    rng = random.Random(seed)
    return [review(rng, i >= drift_at) for i in range(n)]
