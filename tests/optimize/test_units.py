"""Variants without servers: the int8 layer, the builders, determinism, the gate's decisions, signing."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from stream_learner.checkpoint.codec import decode_tensors
from stream_learner.checkpoint.errors import SignatureError
from stream_learner.checkpoint.signing import (
    canonical_bytes,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)
from stream_learner.events import MANIFEST, CheckpointManifest, VariantInfo, WeightsInfo, encode
from stream_learner.learn.learner import LearnerConfig, OnlineLearner
from stream_learner.learn.models import ModelSpec, build_model
from stream_learner.optimize.gate import GateConfig, decide
from stream_learner.optimize.int8 import Int8Linear
from stream_learner.optimize.student import StudentConfig
from stream_learner.optimize.variants import Parent, Servable, VariantSkipped, make_variant, recipe_of

from ..learn.streams import AGRAWAL_FEATURES, agrawal_examples


def trained(hidden=(64, 64), n=3000):
    spec = ModelSpec(kind="mlp", task="binary", features=AGRAWAL_FEATURES, classes=["0", "1"], hidden=hidden)
    learner = OnlineLearner(LearnerConfig(model_name="m", spec=spec, recent_window=1000, student=StudentConfig()))
    examples = agrawal_examples(n, unlabeled=0.2)
    for i in range(0, n, 32):
        learner.process(examples[i : i + 32])
    stats = {**learner.featurizer.state_dict(), "target": learner.target.state_tensor()}
    model = {f"model.{k}": v.clone() for k, v in learner.main.model.state_dict().items()}
    student = Servable(learner.student.spec, {**learner.student.servable(), **stats})
    return learner, Parent("m", 1, Servable(spec, {**model, **stats}), student)


def test_int8_layer_is_close_to_float_and_round_trips_through_safetensors_without_pickle() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(300, 200)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(64, 300)
    rel = (q(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert rel < 0.02
    assert q.weight.dtype == torch.int8 and q.scale.shape == (200,)
    assert not list(q.parameters())  # nothing trainable, nothing pickled: buffers only


@pytest.mark.slow
def test_each_variant_serves_through_the_predictor_and_is_deterministic() -> None:
    learner, parent = trained()
    window = learner.recent.window()
    for name in ("int8", "pruned", "sparse", "student"):
        a = make_variant(parent, recipe_of(name), window)
        b = make_variant(parent, recipe_of(name), window)
        assert a.servable.weights_bytes("m#x") == b.servable.weights_bytes("m#x"), name  # the same bytes
        tensors, _ = decode_tensors(a.servable.weights_bytes("m#x"))
        rebuilt = Servable(a.servable.spec, tensors).predictor()
        rows = window.rows(AGRAWAL_FEATURES)[:50]
        probs = rebuilt.predict(rows)
        assert all(abs(sum(p.values()) - 1) < 1e-9 for p in probs), name
    pruned = make_variant(parent, recipe_of("pruned"), window)
    assert pruned.servable.spec.hidden == (32, 32) and pruned.servable.parameters < parent.servable.parameters / 2
    int8 = make_variant(parent, recipe_of("int8"), window)
    assert int8.servable.spec.int8_layers == ("2",)  # 64x64; the 9-input and 2-output layers stay float
    assert int8.servable.tensors["model.2.weight"].dtype == torch.int8
    sparse = make_variant(parent, recipe_of("sparse", {"fraction": 0.7}), window)
    assert abs(sparse.details["zero_fraction"] - 0.7) < 0.01
    assert build_model(int8.servable.spec).state_dict()["2.weight"].dtype == torch.int8


def test_a_recipe_that_does_not_apply_is_skipped_with_its_reason() -> None:
    _, parent = trained(hidden=(8,), n=320)
    with pytest.raises(VariantSkipped, match="nothing worth quantizing"):
        make_variant(parent, recipe_of("int8"), trained(hidden=(8,), n=320)[0].recent.window())
    logreg = Parent("m", 1, Servable(ModelSpec(kind="logreg", task="binary", features=["a"], classes=["0", "1"]), {}))
    with pytest.raises(VariantSkipped, match="needs a float MLP"):
        make_variant(logreg, recipe_of("pruned"), trained(n=32)[0].recent.window())


@pytest.mark.parametrize(
    ("measured", "label"),
    [
        ({"heldout_examples": 50.0}, "too_few_examples"),
        (
            {"heldout_examples": 500.0, "accuracy": 0.9, "parent_accuracy": 0.91, "accuracy_drop_points": 1.0},
            "accuracy",
        ),
        (
            {
                "heldout_examples": 500.0,
                "accuracy": 0.91,
                "parent_accuracy": 0.91,
                "accuracy_drop_points": 0.0,
                "latency_b1_p50_ms": 0.05,
                "parent_latency_b1_p50_ms": 0.05,
            },
            "slower",
        ),
        (
            {
                "heldout_examples": 500.0,
                "accuracy": 0.91,
                "parent_accuracy": 0.91,
                "accuracy_drop_points": 0.0,
                "latency_b1_p50_ms": 0.02,
                "parent_latency_b1_p50_ms": 0.05,
            },
            "",
        ),
    ],
)
def test_the_gate_decides_on_accuracy_then_speed(measured: dict[str, float], label: str) -> None:
    verdict = decide("int8", measured, GateConfig(min_heldout_examples=100))
    assert verdict.publish is (label == "") and verdict.label == label


def test_a_manifest_without_a_variant_signs_the_bytes_it_always_did_and_a_variants_recipe_is_signed() -> None:
    private, public = (load_private_key(k) if i == 0 else load_public_key(k) for i, k in enumerate(generate_keypair()))
    plain = CheckpointManifest(
        model="m",
        version=1,
        parent=None,
        created_at=0,
        input_offsets=[],
        counts={},
        metrics={},
        drift_state={},
        feature_spec=["a"],
        architecture={},
        weights=WeightsInfo(format="safetensors", size=1, chunks=1, sha256="0" * 64),
    )
    assert b"variant" not in canonical_bytes(plain)  # what an older reader computes too
    older = msgspec.json.decode(encode(sign_manifest(plain, private)))
    older.pop("variant")  # as an older writer wrote it
    verify_manifest(MANIFEST.decode(msgspec.json.encode(older)), public)
    variant = msgspec.structs.replace(
        plain,
        model="m#int8",
        variant=VariantInfo(
            name="int8",
            parent_model="m",
            parent_version=1,
            parent_sha256="0" * 64,
            recipe={"min_features": 16},
            measured={"accuracy": 0.9},
        ),
    )
    signed = sign_manifest(variant, private)
    verify_manifest(MANIFEST.decode(encode(signed)), public)
    other_recipe = msgspec.structs.replace(signed.variant, recipe={"min_features": 1})
    forged = msgspec.structs.replace(signed, variant=other_recipe)
    with pytest.raises(SignatureError):
        verify_manifest(forged, public)


def test_the_student_is_saved_with_the_learner_and_continues_bit_for_bit() -> None:
    learner, _ = trained(n=640)
    tensors, meta = learner.state_dict()
    assert any(k.startswith("student.model.") for k in tensors) and "recent.raw" in tensors
    restored = OnlineLearner(learner.config)
    restored.load_state_dict(tensors, meta)
    more = agrawal_examples(320, seed=5)
    for i in range(0, 320, 32):
        learner.process(more[i : i + 32])
        restored.process(more[i : i + 32])
    for (k, a), b in zip(learner.student.model.state_dict().items(), restored.student.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert np.array_equal(learner.recent.window().raw, restored.recent.window().raw, equal_nan=True)
