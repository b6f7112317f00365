"""Categorical, vector and text inputs end to end on the real local servers:
SDK -> broker -> joiner (Valkey) -> trainer -> signed checkpoint -> serving node over HTTP.

What does not fit goes to the dead-letter topic with the field named: a NaN in a vector at the joiner
(the wire decoder), a vector of the wrong length and a category outside a closed vocabulary declared
``unknown=refuse`` at the trainer (its featurizer); an over-long text is truncated, as declared, and
counted. The serving node featurizes with what the checkpoint signed (the tokenizer travels in it) and
answers exactly what the trainer's learner predicts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stream_learner.bus import H_ERROR_FIELD, H_ERROR_KIND, H_STAGE, make_producer
from stream_learner.checkpoint.signing import generate_keypair, load_public_key
from stream_learner.config import Settings
from stream_learner.errors import EventError
from stream_learner.learn.trainer import Trainer
from stream_learner.metrics import Metrics
from stream_learner.sdk import PredictionLogger
from stream_learner.serving import CheckpointSubscriber, ServingNode

from .join.helpers import RunningJoiner
from .procs import read_topic
from .serving.test_node import call
from .text_tokenizer import make_tokenizer

MODEL = "reviews"
GOOD = ["great product works perfectly", "excellent quality fast delivery", "love it would buy again"]
BAD = ["terrible service never again", "awful it stopped working after a day", "the product arrived broken and late"]


def features(i: int) -> tuple[dict[str, Any], str]:
    """Request ``i``'s features and its label: the text and the vector carry the signal."""
    positive = i % 2 == 0
    texts = GOOD if positive else BAD
    return (
        {
            "age": float(20 + i % 30),
            "plan": ["basic", "premium", "gold"][i % 3],
            "emb": [1.0 if positive else -1.0, 0.1 * (i % 5), 0.0],
            "review": texts[i % 3],
        },
        "pos" if positive else "neg",
    )


@pytest.fixture
def pipeline_settings(settings: Settings, tmp_path: Path) -> Settings:
    private_pem, public_pem = generate_keypair()
    (tmp_path / "k.pem").write_bytes(private_pem)
    (tmp_path / "k.pub.pem").write_bytes(public_pem)
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    return msgspec.structs.replace(
        settings,
        trainer_model=MODEL,
        trainer_features=[
            "age",
            "plan:category:vocab=basic|premium|gold:unknown=refuse",
            "emb:vector:length=3",
            f"review:text:tokenizer={tokenizer}:max_length=8",
        ],
        trainer_classes=["neg", "pos"],
        trainer_hidden=[8],
        trainer_lr=0.05,
        trainer_signing_key=str(tmp_path / "k.pem"),
        trainer_state_dir=str(tmp_path / "state"),
        trainer_checkpoint_every_examples=100,
        trainer_checkpoint_every_s=3600,
        trainer_max_wait_ms=200,
        trainer_group_id=f"{settings.topic_examples}-trainer",
        trainer_drift_enabled=False,
        joiner_window_ms=60_000,
        joiner_group_id=f"{settings.topic_predictions}-joiner",
        joiner_redis_prefix=f"{{{settings.topic_predictions}}}:",
        joiner_idle_advance=False,
        serving_public_keys=[str(tmp_path / "k.pub.pem")],
        serving_state_dir=str(tmp_path / "serving-state"),
    )


def dead_letters(settings: Settings) -> dict[str, dict[str, str]]:
    """request id -> the headers of its dead letter (every partition of the dead-letter topic)."""
    out = {}
    for p in range(settings.partitions_input):
        try:
            records = read_topic(settings, settings.topic_dlq, partition=p)
        except Exception:  # fewer partitions than that
            break
        for r in records:
            out[r.key.decode()] = {k: v.decode() for k, v in r.headers}
    return out


@pytest.mark.slow
def test_categories_vectors_and_texts_flow_from_the_sdk_to_a_serving_node(pipeline_settings: Settings) -> None:
    s = pipeline_settings
    n = 240
    t0 = int(time.time() * 1000)
    sdk = PredictionLogger(settings=s, model=MODEL, model_version="0")
    for i in range(n):
        feats, label = features(i)
        sdk.log_prediction(f"r{i}", feats, {"neg": 0.5, "pos": 0.5}, event_time=t0 + i)
        sdk.log_label(f"r{i}", label, event_time=t0 + i + 1)
    # What does not fit the model: refused by the trainer, the field named.
    odd = {
        "wrong-length": {**features(1)[0], "emb": [1.0, 2.0]},
        "unknown-plan": {**features(2)[0], "plan": "platinum"},
        "long-text": {**features(4)[0], "review": " ".join(["great product works perfectly"] * 3)},
    }
    for j, (rid, feats) in enumerate(odd.items()):
        sdk.log_prediction(rid, feats, {"neg": 0.5, "pos": 0.5}, event_time=t0 + n + j)
        sdk.log_label(rid, "pos", event_time=t0 + n + j + 1)
    # The SDK refuses a NaN on the caller's thread, naming it; another producer may still write one.
    with pytest.raises(EventError, match=r"\$\.features\.emb"):
        sdk.log_prediction("nan", {**features(3)[0], "emb": [1.0, float("nan"), 0.0]}, 0.5)
    assert sdk.flush(30) and sdk.stats.failed == 0
    sdk.close()
    raw = make_producer(s)
    event = {
        "event_id": "e-nan",
        "request_id": "nan",
        "model": MODEL,
        "model_version": "0",
        "event_time": t0,
        "features": {**features(3)[0], "emb": [1.0, float("nan"), 0.0]},
        "prediction": {"neg": 0.5, "pos": 0.5},
    }
    raw.send(s.topic_predictions, key=b"nan", value=json.dumps(event).encode()).get(30)
    raw.close()

    trainer = Trainer(s)
    try:
        with RunningJoiner(s):
            deadline = time.monotonic() + 90
            learner = trainer.learner
            while learner.counts["labeled"] + learner.counts["rejected"] < n + len(odd):
                assert time.monotonic() < deadline, f"timed out: {learner.counts}"
                trainer.step()
            trainer.checkpoint()
        counts = trainer.learner.counts
        assert counts["labeled"] == n + 1 and counts["rejected"] == 2
        assert trainer.learner.featurizer.counts["truncated"] == 1
        assert trainer.learner.summary()["accuracy_rolling"] > 0.6  # it learned from the text and the vector

        letters = dead_letters(s)
        assert letters["wrong-length"][H_ERROR_FIELD] == "$.features.emb"
        assert (
            letters["wrong-length"][H_ERROR_KIND] == "invalid_value" and letters["wrong-length"][H_STAGE] == "trainer"
        )
        assert letters["unknown-plan"][H_ERROR_FIELD] == "$.features.plan"
        assert letters["unknown-plan"][H_ERROR_KIND] == "invalid_value"
        assert letters["nan"][H_ERROR_FIELD] == "$.features.emb[1]" and letters["nan"][H_ERROR_KIND] == "non_finite"
        assert letters["nan"][H_STAGE] == "joiner"
        assert "long-text" not in letters

        published = trainer.published[-1]
        assert published.counts["truncated_texts"] == 1 and published.counts["rejected"] == 2
        arch = published.architecture
        assert [i["kind"] for i in arch["inputs"]] == ["numeric", "category", "vector", "text"]

        # A serving node that never saw the tokenizer file: it comes in the signed checkpoint.
        metrics = Metrics()
        sub = CheckpointSubscriber(s, load_public_key(Path(s.serving_public_keys[0]).read_bytes()), metrics=metrics)
        node = ServingNode(sub, metrics=metrics)
        sub.start(wait_s=30)
        node.start()
        try:
            assert sub.current.version == published.version
            rows = [features(i)[0] for i in range(1000, 1006)]
            status, answer = call(node.url, "POST", "/predict", {"instances": [{"features": r} for r in rows]})
            assert status == 200, answer
            served = [p["prediction"] for p in answer["predictions"]]
            assert served == trainer.learner.predictor.predict(rows)
            assert all(p["model_version"] == str(published.version) for p in answer["predictions"])
            positive, negative = served[0]["pos"], served[1]["pos"]
            assert positive > negative  # a good review with a positive vector against a bad one
            status, refused = call(node.url, "POST", "/predict", {"features": {**rows[0], "emb": [1.0]}})
            assert status == 400 and refused["field"] == "$.features.emb" and refused["kind"] == "invalid_value"
            status, refused = call(node.url, "POST", "/predict", {"features": {**rows[0], "plan": "platinum"}})
            assert status == 400 and refused["field"] == "$.features.plan"
            batch = {"instances": [{"features": rows[0]}, {"features": {**rows[0], "review": 3}}]}
            status, refused = call(node.url, "POST", "/predict", batch)
            assert status == 400 and refused["field"] == "$.instances[1].features.review"
        finally:
            node.stop()
            sub.stop()
    finally:
        trainer.close()
