"""Shadow traffic on the real local servers: the trainer publishes its challenger as ``m#challenger`` and scores
both; a node with ``serving_shadow`` answers with the champion and logs the challenger's prediction."""

from __future__ import annotations

import json
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stream_learner.checkpoint.catalog import catalog
from stream_learner.checkpoint.errors import CheckpointNotFoundError
from stream_learner.checkpoint.reader import read_latest, read_version
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.drift import DriftFinding, Signal
from stream_learner.learn.predictor import Predictor
from stream_learner.learn.trainer import Trainer
from stream_learner.metrics import Metrics
from stream_learner.optimize.challenger import SessionChallenger
from stream_learner.serving import CheckpointSubscriber, ServingNode
from stream_learner.serving.model import load_served_model
from stream_learner.serving.shadow import Shadow

from ..learn.conftest import agrawal_trainer
from ..learn.streams import agrawal_examples
from ..learn.test_trainer import produce_examples, run_until
from .conftest import FEATURES, MODEL, ROW, SPEC, identifiable, manifest, publish, wait_for
from .stand_ins import FixedSource
from .test_node import call, serve_process

CHALLENGER = f"{MODEL}#challenger"


@dataclass
class Node:
    """A serving node over HTTP, its subscriber and its shadow (if any), and the shadow records it logged."""

    node: ServingNode
    sub: CheckpointSubscriber
    shadow: Shadow | None
    records: list[dict[str, Any]]
    metrics: Metrics

    def model(self) -> dict[str, Any]:
        return call(self.node.url, "GET", "/model")[1]

    def predict(self, request_id: str, features: dict[str, Any]) -> dict[str, Any]:
        status, reply = call(self.node.url, "POST", "/predict", {"request_id": request_id, "features": features})
        assert status == 200, reply
        return reply

    def close(self) -> None:
        self.node.stop()
        if self.shadow is not None:
            self.shadow.stop()
        self.sub.stop()


def start_node(settings: Settings, public_key: Any, *, shadow: bool) -> Node:
    metrics = Metrics(roles=["serving"])
    records: list[dict[str, Any]] = []
    sub = CheckpointSubscriber(settings, public_key, metrics=metrics)
    sh = Shadow(settings, public_key, metrics=metrics, on_record=records.append) if shadow else None
    node = ServingNode(sub, metrics=metrics, shadow=sh)
    sub.start(wait_s=None)
    if sh is not None:
        sh.start()
    node.start()
    return Node(node, sub, sh, records, metrics)


@pytest.fixture
def node_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, trainer_model=MODEL, trainer_features=FEATURES, trainer_task="regression")


@pytest.fixture
def nodes(node_settings: Settings, keypair: Any) -> Iterator[tuple[Node, Node]]:
    """A node with the shadow and one without, on the same topic."""
    with_shadow = start_node(node_settings, keypair[1], shadow=True)
    plain = start_node(node_settings, keypair[1], shadow=False)
    yield with_shadow, plain
    with_shadow.close()
    plain.close()


# -- the node, on hand-made checkpoints (identifiable: ROW predicts 4 * version) ------------------------------


@pytest.mark.slow
def test_a_shadow_node_answers_with_the_champion_logs_the_challenger_and_stops_when_it_falls_behind(
    nodes: tuple[Node, Node], node_settings: Settings, producer: Any, keypair: Any
) -> None:
    shadowed, plain = nodes
    topic = node_settings.topic_models
    publish(producer, topic, keypair[0], 3)  # the champion v3: 12.0
    publish(producer, topic, keypair[0], 3, model=CHALLENGER, tensors=identifiable(5))  # its challenger: 20.0
    wait_for(lambda: plain.sub.current is not None, what="the plain node to serve v3")
    wait_for(lambda: shadowed.model()["shadow"]["shadowing"], what="the shadow", detail=shadowed.model)

    a, b = shadowed.predict("r-1", ROW), plain.predict("r-1", ROW)
    assert a == b == {"request_id": "r-1", "model": MODEL, "model_version": "3", "prediction": 12.0}
    wait_for(lambda: shadowed.records, what="the shadow record")
    assert shadowed.records == [
        {
            "request_id": "r-1",
            "model": MODEL,
            "champion_version": 3,
            "champion_prediction": 12.0,
            "challenger_version": 3,
            "challenger_prediction": 20.0,
            "agree": None,  # regression: nothing to agree on
        }
    ]
    assert plain.records == [] and "shadow" not in plain.model()
    info = shadowed.model()["shadow"]
    assert info["lineage"] == CHALLENGER and info["challenger_version"] == 3 and info["champion_version"] == 3
    assert info["predictions"] == {"compared": 1} and info["reason"] is None
    value = shadowed.metrics.registry.get_sample_value
    assert value("stream_learner_serving_shadow_version") == 3
    assert value("stream_learner_serving_shadow_predictions_total", {"outcome": "compared"}) == 1

    # The champion moves on without a challenger (promoted or dropped at a drift): shadowing stops.
    publish(producer, topic, keypair[0], 4)
    wait_for(lambda: shadowed.sub.current.version == 4, what="v4 served")
    assert shadowed.predict("r-2", ROW)["model_version"] == "4"
    info = shadowed.model()["shadow"]
    assert not info["shadowing"] and "behind the champion v4" in info["reason"], info
    assert value("stream_learner_serving_shadow_version") == 0
    time.sleep(0.3)
    assert [r["request_id"] for r in shadowed.records] == ["r-1"]  # nothing shadowed at v4

    # The next challenger is shadowed as soon as it arrives.
    publish(producer, topic, keypair[0], 4, model=CHALLENGER, tensors=identifiable(7))
    wait_for(lambda: shadowed.model()["shadow"]["shadowing"], what="the next challenger")
    assert shadowed.predict("r-3", ROW)["prediction"] == 16.0
    wait_for(lambda: len(shadowed.records) == 2, what="the second shadow record")
    assert shadowed.records[1]["challenger_version"] == 4 and shadowed.records[1]["challenger_prediction"] == 28.0


@pytest.mark.slow
def test_a_node_whose_shadow_lineage_is_absent_or_forged_serves_normally(
    nodes: tuple[Node, Node], node_settings: Settings, producer: Any, keypair: Any, other_keypair: Any
) -> None:
    shadowed, plain = nodes
    topic = node_settings.topic_models
    publish(producer, topic, keypair[0], 2)
    wait_for(lambda: shadowed.sub.current is not None and plain.sub.current is not None, what="v2 served")
    assert shadowed.predict("r-1", ROW) == plain.predict("r-1", ROW)
    info = shadowed.model()["shadow"]
    assert not info["shadowing"] and info["challenger_version"] is None and CHALLENGER in info["reason"], info

    # A challenger signed by a key nobody trusts: refused by the shadow's subscriber, never shadowed.
    publish(producer, topic, other_keypair[0], 2, model=CHALLENGER, tensors=identifiable(9))
    wait_for(lambda: shadowed.model()["shadow"]["failures"] >= 1, what="the forged challenger refused")
    info = shadowed.model()["shadow"]
    assert info["failures_by_reason"].get("signature", 0) >= 1 and not info["shadowing"], info
    assert shadowed.predict("r-2", ROW) == plain.predict("r-2", ROW)
    assert shadowed.records == []
    assert shadowed.model()["status"]["failures"] == 0  # the champion's subscriber saw nothing wrong


class _Slow:
    """A stand-in challenger whose prediction takes ``delay_s`` (or raises)."""

    def __init__(self, version: int, delay_s: float = 0.0, fail: bool = False) -> None:
        self.version, self.delay_s, self.fail = version, delay_s, fail
        self.model = CHALLENGER
        self.manifest = types.SimpleNamespace(metrics={})
        self.release = threading.Event()

    def predict(self, rows: list[Any]) -> list[float]:
        if self.fail:
            raise RuntimeError("challenger broke")
        self.release.wait(self.delay_s)
        return [0.0 for _ in rows]


class _Champion:
    """A stand-in champion answering 12.0 to everything (no torch model to build: the test stays fast)."""

    model, version, spec, manifest = MODEL, 1, SPEC, manifest(1, b"weights")

    def predict(self, rows: list[Any]) -> list[float]:
        return [12.0 for _ in rows]


def test_a_slow_or_failing_challenger_never_delays_or_fails_the_champions_answer(
    node_settings: Settings, keypair: Any
) -> None:
    metrics = Metrics(roles=["serving"])
    slow = _Slow(version=1, delay_s=30.0)
    # No linger: each request is predicted alone, so the queue's bound is what is tested.
    shadow = Shadow(node_settings, keypair[1], metrics=metrics, queue_batches=2, linger_s=0.0)
    shadow.subscriber.stop()  # never started: its consumers are opened on first use
    shadow.subscriber = FixedSource(slow)  # type: ignore[assignment]
    node = ServingNode(FixedSource(_Champion()), metrics=metrics, shadow=shadow)
    shadow.start()
    node.start()
    value = metrics.registry.get_sample_value
    try:
        expected = 12.0

        def ask(request_id: str) -> tuple[int, Any]:
            return call(node.url, "POST", "/predict", {"request_id": request_id, "features": ROW})

        began = time.perf_counter()
        replies = [ask("r-0")]
        wait_for(lambda: node.model_info()["shadow"]["queued"] == 0, what="the worker to hold r-0")
        replies += [ask(f"r-{i}") for i in range(1, 5)]
        took = time.perf_counter() - began
        # The worker holds r-0 for up to 30 s, r-1 and r-2 wait, r-3 and r-4 are dropped: no answer waited.
        assert all(status == 200 and reply["prediction"] == expected for status, reply in replies), replies
        assert took < 2.0, took
        assert value("stream_learner_serving_shadow_predictions_total", {"outcome": "dropped"}) == 2
        slow.release.set()
        wait_for(lambda: value("stream_learner_serving_shadow_predictions_total", {"outcome": "compared"}) == 3)

        shadow.subscriber = FixedSource(_Slow(version=1, fail=True))  # type: ignore[assignment]
        status, reply = ask("r-f")
        assert status == 200 and reply["prediction"] == expected
        wait_for(lambda: value("stream_learner_serving_shadow_predictions_total", {"outcome": "failed"}) == 1)
        assert node.model_info()["shadow"]["predictions"] == {"dropped": 2, "compared": 3, "failed": 1}
    finally:
        slow.release.set()
        node.stop()
        shadow.stop()


@pytest.mark.slow
def test_the_serve_command_with_serving_shadow_logs_a_json_line_per_shadow_prediction(
    node_settings: Settings, producer: Any, keypair: Any, tmp_path: Path
) -> None:
    publish(producer, node_settings.topic_models, keypair[0], 5)
    publish(producer, node_settings.topic_models, keypair[0], 5, model=CHALLENGER, tensors=identifiable(6))
    with serve_process(node_settings, keypair, tmp_path, serving_shadow="challenger") as node:
        wait_for(
            lambda: (r := node.get("/model")) is not None and bool(r[1].get("shadow", {}).get("shadowing")),
            timeout_s=60,
            what="the serve process to shadow m#challenger v5",
        )
        assert call(node.url, "POST", "/predict", {"request_id": "r-9", "features": ROW})[1]["prediction"] == 20.0
        wait_for(lambda: call(node.url, "GET", "/model")[1]["shadow"]["predictions"], what="the shadow prediction")
    out = node.out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{") and "shadow_prediction" in line]
    assert len(lines) == 1, out[-3000:]
    line = lines[0]
    assert line["event"] == "shadow_prediction" and line["level"] == "info"
    assert {k: line[k] for k in ("request_id", "model", "champion_version", "challenger_version")} == {
        "request_id": "r-9",
        "model": MODEL,
        "champion_version": 5,
        "challenger_version": 5,
    }
    assert (line["champion_prediction"], line["challenger_prediction"]) == (20.0, 24.0)


# -- the trainer's challenger, end to end ------------------------------------------------------------------------


@pytest.fixture
def tsettings(settings: Settings, keys: tuple[Path, Path], tmp_path: Path) -> Settings:
    return agrawal_trainer(
        settings,
        keys,
        tmp_path,
        trainer_model=MODEL,
        serving_public_keys=[str(keys[1])],
        # The policy starts the challenger at a warning and settles it at a drift; the findings are the
        # test's (as in tests/learn/test_drift_policy.py), so they come exactly where it wants them.
        trainer_drift_challenger_on_warning=True,
        trainer_drift_enabled=False,
        trainer_drift_on_drift=["promote_challenger_if_better"],
    )


def test_the_shadow_predicts_the_requests_it_gathered_in_one_call_and_isolates_one_that_fails(
    node_settings: Settings, keypair: Any
) -> None:
    class Counting(_Slow):
        def __init__(self, version: int) -> None:
            super().__init__(version)
            self.calls: list[int] = []

        def predict(self, rows: list[Any]) -> list[float]:
            self.calls.append(len(rows))
            if any(row.get("bad") for row in rows):
                raise ValueError("a value the challenger refuses")
            return [float(row["a"]) for row in rows]

    records: list[dict[str, Any]] = []
    shadow = Shadow(node_settings, keypair[1], on_record=records.append, linger_s=0.1)
    shadow.subscriber.stop()
    challenger = Counting(version=1)
    shadow.subscriber = FixedSource(challenger)  # type: ignore[assignment]
    shadow.start()
    try:
        champion = _Champion()
        for i in range(3):
            shadow.observe(champion, [f"r-{i}"], [{"a": float(i), "bad": i == 1}], [12.0])  # type: ignore[arg-type]
        wait_for(lambda: len(records) == 2, what="the two good records")
        # One call for the three, then each alone to find the one refused.
        assert challenger.calls == [3, 1, 1, 1], challenger.calls
        assert [(r["request_id"], r["challenger_prediction"]) for r in records] == [("r-0", 0.0), ("r-2", 2.0)]
        assert shadow.status(champion)["predictions"] == {"compared": 2, "failed": 1}  # type: ignore[arg-type]
    finally:
        shadow.stop()


def challenge_gauges(metrics: Metrics) -> dict[str, float | None]:
    value = metrics.registry.get_sample_value
    return {
        **{
            f"{kind}{{{model}}}": value(f"stream_learner_trainer_challenge_accuracy{kind}", {"model": model})
            for kind in ("", "_cumulative")
            for model in (MODEL, CHALLENGER)
        },
        "examples": value("stream_learner_trainer_challenge_examples"),
    }


@pytest.mark.slow
def test_a_trainers_challenger_is_published_scored_and_shadowed_until_it_is_dropped(
    tsettings: Settings, keys: tuple[Path, Path]
) -> None:
    produce_examples(tsettings, agrawal_examples(3000))
    metrics = Metrics(roles=["trainer", "optimize"])
    metrics.rolling_every_s = 0  # the gauges at every chunk
    trainer = Trainer(tsettings, metrics=metrics)
    public = load_public_key(keys[1])
    shadowed = plain = None
    try:
        run_until(trainer, 1000)  # v1 (at 1024 examples): no challenger
        assert trainer.version == 1 and challenge_gauges(metrics)["examples"] == 0
        trainer.session.answer(DriftFinding("adwin_error", "error", Signal.WARNING, 1.0, 1280), 1)
        assert trainer.learner.challenger is not None
        run_until(trainer, 3000)  # v2 (at 2048), then v3 at the end of the stream, each with its challenger
        trainer.checkpoint()
        assert trainer.version == 3
        assert [m.version for m in trainer.challenger.published] == [2, 3]
        with pytest.raises(CheckpointNotFoundError):
            read_version(tsettings, tsettings.topic_models, public, 1, CHALLENGER, timeout_s=5)
        assert catalog(tsettings, [public]).variants(MODEL) == {"challenger": [2, 3]}  # what `models show` lists

        learner = trainer.learner
        latest = read_latest(tsettings, tsettings.topic_models, public, CHALLENGER)  # verified: signature, digest
        champion = read_version(tsettings, tsettings.topic_models, public, 3, MODEL)
        m = latest.manifest
        assert m.version == 3 and m.variant is not None
        assert (m.variant.name, m.variant.parent_model, m.variant.parent_version) == ("challenger", MODEL, 3)
        assert m.variant.parent_sha256 == champion.manifest.weights.sha256
        assert m.weights.sha256 != champion.manifest.weights.sha256  # other weights than the champion's
        scored = learner.prequential.challenger_scores.means["accuracy"].n
        assert scored > 1000 and m.metrics["examples"] == scored and m.metrics == m.variant.measured
        assert m.metrics["challenger_accuracy"] == learner.prequential.challenger_scores.means["accuracy"].cumulative

        # Both scored on the same labels, as gauges with the model label.
        gauges = challenge_gauges(metrics)
        assert gauges == {
            f"{{{MODEL}}}": learner.prequential.champion_scores.means["accuracy"].rolling,
            f"{{{CHALLENGER}}}": learner.prequential.challenger_scores.means["accuracy"].rolling,
            f"_cumulative{{{MODEL}}}": learner.prequential.champion_scores.means["accuracy"].cumulative,
            f"_cumulative{{{CHALLENGER}}}": learner.prequential.challenger_scores.means["accuracy"].cumulative,
            "examples": float(scored),
        }, gauges
        assert gauges[f"{{{MODEL}}}"] != gauges[f"{{{CHALLENGER}}}"]

        # Nodes: the shadow one answers as the plain one and logs the challenger's own prediction.
        shadowed = start_node(tsettings, public, shadow=True)
        plain = start_node(tsettings, public, shadow=False)
        wait_for(lambda: plain.sub.current is not None and plain.sub.current.version == 3, what="v3 served")
        wait_for(lambda: shadowed.model()["shadow"]["shadowing"], what="the shadow", detail=shadowed.model)
        rows = [ex.features for ex in agrawal_examples(20, seed=7)]
        for i, row in enumerate(rows):
            assert shadowed.predict(f"r-{i}", row) == plain.predict(f"r-{i}", row)
        wait_for(lambda: len(shadowed.records) == len(rows), what="every shadow record")
        own = load_served_model(latest)  # the challenger as its lineage holds it
        # ... and as the trainer holds it: the challenger model with the learner's statistics.
        trainers = Predictor(learner.spec, learner.featurizer, learner.target, learner.challenger.model)
        champions = plain.sub.current
        for record, row in zip(shadowed.records, rows, strict=True):
            assert record["champion_version"] == record["challenger_version"] == 3
            assert record["champion_prediction"] == champions.predict_one(row)
            # The shadow predicts the requests it gathered as one batch: equal up to float32 rounding.
            shadow_p, own_p = record["challenger_prediction"], own.predict_one(row)
            assert own_p == trainers.predict([row])[0] and shadow_p.keys() == own_p.keys()
            assert all(abs(shadow_p[k] - own_p[k]) < 1e-6 for k in own_p), (shadow_p, own_p)
            mine, theirs = record["champion_prediction"], record["challenger_prediction"]
            assert record["agree"] == (max(mine, key=mine.get) == max(theirs, key=theirs.get))
        assert any(r["challenger_prediction"] != r["champion_prediction"] for r in shadowed.records)
        assert shadowed.model()["shadow"]["challenger_metrics"] == m.metrics

        # A drift promotes it or drops it: either way none runs; the next chunks and v4 have none.
        trainer.session.answer(DriftFinding("adwin_error", "error", Signal.DRIFT, 1.0, 3000), 2)
        assert trainer.learner.challenger is None
        produce_examples(tsettings, agrawal_examples(64, seed=9))
        run_until(trainer, 3064)
        trainer.checkpoint()
        assert trainer.version == 4 and [m.version for m in trainer.challenger.published] == [2, 3]
        gone = challenge_gauges(metrics)
        assert gone == {**{k: None for k in gone if k != "examples"}, "examples": 0.0}, gone
        wait_for(lambda: plain.sub.current.version == 4, what="v4 served")
        wait_for(lambda: shadowed.sub.current.version == 4, what="v4 served with the shadow")
        before = len(shadowed.records)
        assert shadowed.predict("r-after", rows[0]) == plain.predict("r-after", rows[0])
        info = shadowed.model()["shadow"]
        assert not info["shadowing"] and "behind the champion v4" in info["reason"], info
        time.sleep(0.3)
        assert len(shadowed.records) == before
    finally:
        for n in (shadowed, plain):
            if n is not None:
                n.close()
        trainer.close()


@pytest.mark.slow
def test_a_challenger_not_published_before_a_crash_is_published_by_the_restored_trainer(
    tsettings: Settings, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    produce_examples(tsettings, agrawal_examples(2000))
    trainer = Trainer(tsettings)
    try:
        run_until(trainer, 1000)
        trainer.learner.start_challenger()
        # The process dies between publishing the champion's v2 and its challenger's.
        with monkeypatch.context() as patch:
            patch.setattr(SessionChallenger, "publish", lambda self, parent: None)
            run_until(trainer, 2000)
            trainer.checkpoint()
        assert trainer.version == 2
    finally:
        trainer.close()
    public = load_public_key(keys[1])
    with pytest.raises(CheckpointNotFoundError):
        read_latest(tsettings, tsettings.topic_models, public, CHALLENGER, timeout_s=5)
    restored = Trainer(tsettings)
    try:
        assert restored.learner.challenger is not None and [m.version for m in restored.challenger.published] == [2]
        latest = read_latest(tsettings, tsettings.topic_models, public, CHALLENGER)
        assert latest.manifest.version == 2 and latest.manifest.variant is not None
    finally:
        restored.close()
    again = Trainer(tsettings)  # a second restart publishes nothing twice
    try:
        assert again.challenger.published == []
    finally:
        again.close()
