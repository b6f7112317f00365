"""load_served_model: the served prediction is the learner's own, and loading is strict."""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
import pytest
import torch

from stream_learner.checkpoint import LoadedCheckpoint, decode_tensors, encode_tensors
from stream_learner.learn.learner import LearnerConfig, OnlineLearner
from stream_learner.learn.manifest import servable_weights
from stream_learner.learn.models import ModelSpec
from stream_learner.serving import ModelLoadError, load_served_model
from stream_learner.serving.model import BuildPolicy

from ..learn.streams import AGRAWAL_FEATURES, agrawal_examples
from .conftest import SPEC, identifiable, manifest


class Spy:
    """A drift monitor stand-in: records every value the learner observes, finds nothing."""

    def __init__(self) -> None:
        self.detectors: dict[str, Any] = {}
        self.seen: list[tuple[str, int, float]] = []

    def observe(self, signal: str, value: float, index: int) -> list[Any]:
        self.seen.append((signal, index, value))
        return []

    def observe_many(
        self, signal: str, values: list[float], *, indices: list[int]
    ) -> tuple[list[Any], dict[str, list[float]]]:
        # The batched form of observe (DriftMonitor.observe_many): no findings, no detector estimates.
        self.seen.extend((signal, i, v) for i, v in zip(indices, values))
        return [], {}

    def state(self) -> dict[str, Any]:
        return {}

    def values(self, signal: str) -> list[float]:
        return [v for s, _, v in self.seen if s == signal]


def relabel(examples: list[Any], label: Any) -> list[Any]:
    return [msgspec.structs.replace(ex, label=label(i, ex)) for i, ex in enumerate(examples)]


def with_gaps(examples: list[Any]) -> list[Any]:
    """Some features missing, null, absurdly large or unknown: the featurizer's policies all apply."""
    out = []
    for i, ex in enumerate(examples):
        f = dict(ex.features)
        if i % 5 == 0:
            f.pop("salary")
        if i % 7 == 0:
            f["age"] = None
        if i % 11 == 0:
            f["loan"] = 1e12  # out of range: treated as missing
        if i % 13 == 0:
            f["not_a_feature"] = 3.0
        out.append(msgspec.structs.replace(ex, features=f))
    return out


def trained(spec: ModelSpec, examples: list[Any]) -> tuple[OnlineLearner, LearnerConfig]:
    config = LearnerConfig(model_name="m", spec=spec)
    learner = OnlineLearner(config)
    for i in range(0, len(examples), 64):
        learner.process(examples[i : i + 64])
    return learner, config


def served_and_probe(learner: OnlineLearner, config: LearnerConfig) -> tuple[Any, OnlineLearner, Spy]:
    """The learner's checkpoint as a serving node loads it, and a copy of the learner that reports."""
    tensors, meta = learner.state_dict()
    # What the trainer publishes, through safetensors bytes as they cross the topic.
    data = encode_tensors(servable_weights(tensors), {"model": "m"})
    weights, metadata = decode_tensors(data)
    m = msgspec.structs.replace(
        manifest(7, data, architecture=config.spec.to_dict()), feature_spec=list(config.spec.features)
    )
    served = load_served_model(LoadedCheckpoint(m, weights, metadata, "sl.models", 0, 42))
    spy = Spy()
    probe = OnlineLearner(config, drift=spy)
    probe.load_state_dict({k: v.clone() for k, v in tensors.items()}, msgspec.json.decode(msgspec.json.encode(meta)))
    return served, probe, spy


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_classification_probabilities_are_the_learners(task: str) -> None:
    classes = ["0", "1"] if task == "binary" else ["0", "1", "2"]

    def label(i: int, ex: Any) -> str:
        y = int(ex.label)
        return str(y if task == "binary" else y + (ex.features["age"] > 50))

    spec = ModelSpec(kind="mlp", task=task, features=AGRAWAL_FEATURES, classes=classes, hidden=[16])
    learner, config = trained(spec, relabel(agrawal_examples(2000), label))
    served, probe, spy = served_and_probe(learner, config)
    assert (served.model, served.version, served.classes) == ("m", 7, tuple(classes))

    rows = with_gaps(relabel(agrawal_examples(300, seed=7), label))
    predictions = served.predict([ex.features for ex in rows])
    counts_before = served.featurizer.count.copy()
    labeled = probe.counts["labeled"]
    result = probe.process(rows)  # evaluates each row (before learning from it) with the same state
    assert probe.counts["labeled"] - labeled == 300 and len(result.confidences) == 300
    for p in predictions:
        assert isinstance(p, dict) and list(p) == classes and math.isclose(sum(p.values()), 1.0)
    # Exactly the learner's numbers: its confidence (the top probability) and
    # its log loss on the true class, row by row.
    assert [max(p.values()) for p in predictions] == result.confidences
    losses = [-math.log(max(p[ex.label], 1e-15)) for p, ex in zip(predictions, rows)]
    assert losses == spy.values("loss")
    assert len({round(c, 6) for c in result.confidences}) > 50  # not a constant model
    # Predicting did not touch the statistics it uses.
    served.predict([ex.features for ex in rows])
    assert (served.featurizer.count == counts_before).all()
    # One row alone: the same up to float32 rounding (torch's CPU kernels differ by batch shape).
    one = served.predict_one(rows[3].features)
    assert isinstance(one, dict) and all(math.isclose(one[c], predictions[3][c], rel_tol=1e-5) for c in classes)


def test_regression_values_are_the_learners() -> None:
    def label(i: int, ex: Any) -> float:
        return ex.features["salary"] / 1000.0 + 0.1 * ex.features["age"] + (i % 7)

    spec = ModelSpec(kind="mlp", task="regression", features=AGRAWAL_FEATURES, hidden=[16])
    learner, config = trained(spec, relabel(agrawal_examples(2000), label))
    served, probe, spy = served_and_probe(learner, config)
    assert served.target_std != 1.0 and served.target_mean != 0.0  # destandardization is exercised

    rows = with_gaps(agrawal_examples(300, seed=7))
    predictions = served.predict([ex.features for ex in rows])
    assert all(isinstance(p, float) for p in predictions) and len(set(predictions)) > 50
    # Label every row with the served value: the learner's own prediction
    # error (it observes its squared error) is then exactly zero, row by row.
    probe.process(relabel(rows, lambda i, ex: predictions[i]))
    assert spy.values("loss") == [0.0] * 300
    # ... and not zero for values one ulp away (the check can fail).
    spy.seen.clear()
    probe2 = served_and_probe(learner, config)[1]
    probe2.drift = spy
    probe2.process(relabel(rows, lambda i, ex: math.nextafter(predictions[i], math.inf)))
    assert all(v > 0.0 for v in spy.values("loss"))


# -- strict loading ------------------------------------------------------------------------------


def checkpoint(tensors: dict[str, torch.Tensor], **fields: Any) -> LoadedCheckpoint:
    data = encode_tensors(tensors)
    m = msgspec.structs.replace(manifest(2, data), **fields)
    return LoadedCheckpoint(m, tensors, {}, "sl.models", 0, 9)


def test_identifiable_weights_load() -> None:
    served = load_served_model(checkpoint(identifiable(2)))
    assert served.predict_one({"a": 1.0, "b": 2.0}) == 8.0
    assert served.predict([]) == []
    assert not served.network.training and not any(p.requires_grad for p in served.network.parameters())


@pytest.mark.parametrize(
    ("change", "fields", "message"),
    [
        (lambda t: t.pop("model.bias"), {}, "weights lack"),
        (lambda t: t.update({"model.extra": torch.zeros(1)}), {}, "architecture lacks"),
        (lambda t: t.update({"model.weight": t["model.weight"].double()}), {}, "dtype torch.float64"),
        (lambda t: t.update({"model.weight": torch.zeros(1, 3)}), {}, "shape [1, 3]"),
        (lambda t: t.pop("featurizer.m2"), {}, "expected statistics"),
        (lambda t: t.update({"challenger.model.weight": torch.zeros(1)}), {}, "expected statistics"),
        (lambda t: t.update({"featurizer.mean": torch.zeros(3, dtype=torch.float64)}), {}, "must be 2 finite"),
        (
            lambda t: t.update({"featurizer.mean": torch.tensor([0.0, math.inf], dtype=torch.float64)}),
            {},
            "must be 2 finite",
        ),
        (lambda t: t.update({"target": torch.tensor([2.0, math.nan, 1.0], dtype=torch.float64)}), {}, "target"),
        (lambda t: None, {"feature_spec": ["b", "a"]}, "differ from the manifest's feature_spec"),
        (lambda t: None, {"architecture": {**SPEC.to_dict(), "dropout": 0.5}}, "does not know: ['dropout']"),
        (lambda t: None, {"architecture": {**SPEC.to_dict(), "kind": "nope"}}, "not a model spec"),
        (lambda t: None, {"architecture": {**SPEC.to_dict(), "kind": "os:getcwd"}}, "cannot build"),
    ],
)
def test_loading_is_strict(change: Any, fields: dict[str, Any], message: str) -> None:
    tensors = identifiable(2)
    change(tensors)
    # os:getcwd allowed, so that its case reaches the build (not allowed, it is refused before: below).
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        load_served_model(checkpoint(tensors, **fields), BuildPolicy.of(["os:getcwd"]))


# -- an insider with the key: what a node refuses to build (issue 18.6, 17.7) ---------------------


@pytest.mark.parametrize("kind", ["torch.hub:load", "logging:basicConfig", "os:getcwd"])
def test_a_factory_not_on_the_allowlist_is_never_imported_or_called(kind: str, monkeypatch) -> None:
    import importlib

    imported: list[str] = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    with pytest.raises(ModelLoadError, match="is not allowed on this node") as info:
        load_served_model(checkpoint(identifiable(2), architecture={**SPEC.to_dict(), "kind": kind}))
    assert info.value.reason == "not_allowed" and imported == []


def test_an_allowed_factory_is_built() -> None:
    kind = "tests.serving.test_served_model:linear_factory"
    ck = checkpoint(identifiable(2), architecture={**SPEC.to_dict(), "kind": kind})
    with pytest.raises(ModelLoadError, match="not allowed"):
        load_served_model(ck)
    assert load_served_model(ck, BuildPolicy.of([kind])).predict_one({"a": 1.0, "b": 2.0}) == 8.0


def linear_factory(n_features: int, n_outputs: int) -> torch.nn.Module:
    """A user factory (allowed by name in the test above)."""
    return torch.nn.Linear(n_features, n_outputs)


def test_huge_hidden_widths_are_refused_before_anything_is_allocated() -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mlp = {**SPEC.to_dict(), "kind": "mlp", "hidden": [1_000_000, 1_000_000]}  # 10^12 parameters
    with pytest.raises(ModelLoadError, match="parameters, the limit is") as info:
        load_served_model(checkpoint(identifiable(2), architecture=mlp))
    assert info.value.reason == "limit"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing was built
    with pytest.raises(ModelLoadError, match="hidden has 65 entries") as info:
        load_served_model(checkpoint(identifiable(2), architecture={**mlp, "hidden": [1] * 65}))
    assert info.value.reason == "limit"


@pytest.mark.parametrize("name", ["featurizer.m2", "featurizer.count"])
def test_a_negative_variance_or_count_is_refused(name: str) -> None:
    tensors = identifiable(2)
    tensors[name] = torch.tensor([3.0, -1.0], dtype=torch.float64)
    with pytest.raises(ModelLoadError, match=f"{name} has negative values") as info:
        load_served_model(checkpoint(tensors))
    assert info.value.reason == "state"
    tensors = identifiable(2)
    tensors["target"] = torch.tensor([5.0, 0.0, -2.0], dtype=torch.float64)
    with pytest.raises(ModelLoadError, match="target m2 has negative values"):
        load_served_model(checkpoint(tensors))
