"""examples/text_classifier end to end, at a reduced size, on real local servers it starts.

The example pretrains its base (tokenizer and transformer) on its generated corpus, runs the real
``stream-learner joiner``, ``trainer`` (LoRA on the frozen base, pseudo-labels on) and ``serve``
processes, and sends a drifting review stream to the node over HTTP. The served model must have
relearned the flipped words: the last window after the drift is served better than the first,
and back near what it was before the drift.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text_classifier"


def load(name: str) -> ModuleType:
    """One of the example's scripts as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"text_classifier_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_text_classifier_example_relearns_the_drift_and_serves_it(tmp_path: Path) -> None:
    run = load("run")
    try:
        summary = run.run(
            requests=2000,
            drift_at=0.6,  # 30 s to learn the first concept, 20 s for the second
            rate=40.0,
            window=250,
            build=tmp_path / "build",
            quiet=True,
            pretrain_sentences=2500,
            pretrain_epochs=3,
        )
    finally:
        for name in ("corpus", "pretrain", "text_model"):  # the example's modules are on sys.path now
            sys.modules.pop(name, None)
        sys.path[:] = [p for p in sys.path if p != str(EXAMPLE)]
    acc = summary["served_accuracy"]
    assert acc["before_drift"] > 0.85, acc  # the first concept was learned (on the frozen base)
    # The flip costs the served model (the slang that meant a complaint now means praise), and online
    # learning on the deltas wins it back: the last window is served better than the first after the drift.
    assert acc["last"] > acc["first_after_drift"] + 0.1, acc
    assert acc["last"] > 0.85, acc
    counts = summary["trainer_counts"]
    assert counts["pseudo"] > 0, counts  # unlabeled requests were learned from confident predictions
    assert summary["checkpoints"]["swapped_in"] > 5
    assert summary["freshness_s"]["labels"] > 100 and summary["freshness_s"]["p50"] is not None
