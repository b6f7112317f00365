"""Variants on the real local servers: published by the trainer, verified, refused when forged, served
with fallback and rollback, a failing gate counted; the optimize role derives the trainer's very bytes."""

from __future__ import annotations

import dataclasses
import time

import msgspec
import pytest
import torch

from stream_learner.bus import ensure_topics, make_producer
from stream_learner.checkpoint.errors import CheckpointNotFoundError
from stream_learner.checkpoint.publish import publish_checkpoint, weights_info
from stream_learner.checkpoint.reader import read_latest, read_version
from stream_learner.checkpoint.signing import load_public_key
from stream_learner.config import Settings
from stream_learner.learn.trainer import Trainer
from stream_learner.metrics import Metrics
from stream_learner.optimize.hook import Outcome
from stream_learner.optimize.role import Optimizer
from stream_learner.optimize.variants import recipe_of
from stream_learner.serving import CheckpointSubscriber

from ..learn.streams import agrawal_examples
from ..learn.test_trainer import produce_examples, run_until

N = 6000


def train(settings: Settings, *, sparse_that_fails: bool = False) -> tuple[Trainer, list[Outcome]]:
    """A trainer over the N examples; speed is not gated here (bench/bench_variants.py measures it)."""
    trainer = Trainer(settings, metrics=Metrics())
    outcomes: list[Outcome] = []
    if trainer.variants is not None:
        trainer.variants.gate = dataclasses.replace(trainer.variants.gate, min_speedup=0.0)
        trainer.variants.on_outcome = outcomes.append
        if sparse_that_fails:  # 99% of the weights zero and no fine-tune: far below its parent
            trainer.variants.recipes.append(recipe_of("sparse", {"fraction": 0.99, "epochs": 0}))
    run_until(trainer, N)
    trainer.checkpoint()  # v3 at the end of the stream (its variants: nothing learned after it yet)
    return trainer, outcomes


@pytest.mark.slow
def test_trainer_variants_are_published_verified_served_refused_when_forged_and_fall_back(
    vsettings: Settings, keys, other_keypair
) -> None:
    produce_examples(vsettings, agrawal_examples(N, unlabeled=0.2))
    trainer, outcomes = train(vsettings, sparse_that_fails=True)
    try:
        public = load_public_key(keys[1])
        assert trainer.version == 3  # checkpoints at 2000, 4000, 6000 examples
        published = {(o.name, o.version) for o in outcomes if o.verdict.publish}
        # v3 is the last version: nothing was learned after it, so it is not gated yet.
        assert published == {(n, v) for n in ("int8", "pruned", "student") for v in (1, 2)}, outcomes
        sparse = [o for o in outcomes if o.name == "sparse"]
        assert [o.verdict.label for o in sparse] == ["accuracy", "accuracy"], sparse
        assert (
            trainer.metrics.registry.get_sample_value(
                "stream_learner_variants_skipped_total", {"variant": "sparse", "reason": "accuracy"}
            )
            == 2
        )
        with pytest.raises(CheckpointNotFoundError):
            read_latest(vsettings, vsettings.topic_models, public, "m#sparse", timeout_s=10)

        int8 = read_latest(vsettings, vsettings.topic_models, public, "m#int8")  # signature, chunks, digest
        assert int8.manifest.version == 2 and int8.manifest.variant is not None
        info = int8.manifest.variant
        assert (info.name, info.parent_model, info.parent_version) == ("int8", "m", 2)
        parent = read_version(vsettings, vsettings.topic_models, public, 2, "m")
        assert info.parent_sha256 == parent.manifest.weights.sha256
        assert info.measured["heldout_examples"] == 500 and abs(info.measured["accuracy_drop_points"]) <= 0.5
        assert int8.tensors["model.2.weight"].dtype == torch.int8 and int8.manifest.architecture["int8_layers"] == ["2"]
        student = read_latest(vsettings, vsettings.topic_models, public, "m#student")
        assert student.manifest.architecture["hidden"] == [32, 32]

        metrics = Metrics(roles=["serving"])
        with CheckpointSubscriber(vsettings, [public], variant="int8", metrics=metrics) as sub:
            deadline = time.monotonic() + 30
            while (sub.current is None or sub.current.manifest.variant is None) and time.monotonic() < deadline:
                time.sleep(0.1)
            served = sub.current
            assert served is not None and served.manifest.variant is not None, sub.status()
            assert (served.model, served.version, served.manifest.variant.name) == ("m", 2, "int8")
            # A forged v3 of the int8 lineage (another key) while it follows: refused, the last good variant kept.
            weights = trainer.variants.outcomes[0].variant.servable.weights_bytes("m#int8")  # any valid weights
            forged = msgspec.structs.replace(int8.manifest, version=3, weights=weights_info(weights))
            producer = make_producer(vsettings, max_request_size=2 << 20)
            publish_checkpoint(producer, vsettings.topic_models, forged, weights, other_keypair[0])
            producer.close()
            deadline = time.monotonic() + 30
            while not sub.status()["variant"]["failures_by_reason"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sub.current is served
            status = sub.status()["variant"]
            assert status["serving"] == "variant" and status["parent_version"] == 3
            assert status["failures_by_reason"].get("signature", 0) >= 1, status  # the forged v3
            assert metrics.registry.get_sample_value("stream_learner_serving_variant_fallback") == 0
            assert metrics.registry.get_sample_value("stream_learner_serving_variant_version") == 2
            p = served.predict_one({"salary": 50_000.0, "age": 40.0})
            assert abs(sum(p.values()) - 1) < 1e-9
            sub.pin(1)  # a rollback serves the pinned parent
            assert sub.current.version == 1 and sub.current.manifest.variant is None
            sub.unpin()
            assert sub.current.manifest.variant is not None

        with CheckpointSubscriber(vsettings, [public], variant="sparse", metrics=metrics) as sub:
            time.sleep(1.0)
            served = sub.current
            assert served.version == 3 and served.manifest.variant is None  # the parent: no sparse passed
            status = sub.status()["variant"]
            assert status["serving"] == "parent" and status["fallback_reason"] == "no variant loaded yet"
            assert metrics.registry.get_sample_value("stream_learner_serving_variant_fallback") == 1
    finally:
        trainer.close()


@pytest.mark.slow
def test_the_optimize_role_publishes_the_trainers_variant_bytes(vsettings: Settings, keys) -> None:
    produce_examples(vsettings, agrawal_examples(N, unlabeled=0.2, seed=3))
    with_hook = msgspec.structs.replace(vsettings, trainer_variants=["int8", "pruned"])
    trainer, outcomes = train(with_hook)
    trainer.close()
    # The same stream, a trainer without variants on its own model topic, then the role on that topic.
    plain = msgspec.structs.replace(
        vsettings,
        trainer_variants=[],
        topic_models=vsettings.topic_models + ".plain",
        trainer_state_dir=vsettings.trainer_state_dir + ".plain",
    )
    ensure_topics(plain)
    trainer, _ = train(plain)
    trainer.close()
    role_settings = msgspec.structs.replace(plain, trainer_variants=["int8", "pruned"])
    role = Optimizer(role_settings)
    role.gate = dataclasses.replace(role.gate, min_speedup=0.0)
    try:
        deadline = time.monotonic() + 60
        while len(role.outcomes) < 4 and time.monotonic() < deadline:
            role.step()
    finally:
        role.close()
    public = load_public_key(keys[1])
    expected = {(n, v) for n in ("int8", "pruned") for v in (1, 2)}
    assert {(o.name, o.version) for o in role.outcomes if o.verdict.publish} == expected
    assert {(o.name, o.version) for o in outcomes if o.verdict.publish} == expected
    for name in ("int8", "pruned"):
        for version in (1, 2):
            a = read_version(vsettings, vsettings.topic_models, public, version, f"m#{name}")
            b = read_version(plain, plain.topic_models, public, version, f"m#{name}")
            assert a.manifest.weights.sha256 == b.manifest.weights.sha256, (name, version)
            assert a.manifest.variant.measured["accuracy"] == b.manifest.variant.measured["accuracy"]
