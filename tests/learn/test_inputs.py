"""Inputs with kinds: the spec syntax, the featurizer's encodings and refusals, the architecture params,
and what a checkpoint records so that a served model featurizes as the learner did."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from stream_learner.checkpoint.reader import LoadedCheckpoint
from stream_learner.config import Settings, load_settings
from stream_learner.errors import ConfigError
from stream_learner.events import ExampleEvent
from stream_learner.learn.build import learner_config
from stream_learner.learn.featurizer import Featurizer, RowsRefused, bucket
from stream_learner.learn.inputs import load_tokenizers, parse_input, parse_inputs
from stream_learner.learn.learner import OnlineLearner
from stream_learner.learn.manifest import build_manifest, servable_weights, weights_bytes
from stream_learner.learn.models import ModelSpec
from stream_learner.serving.failures import ModelLoadError
from stream_learner.serving.model import BuildPolicy, load_served_model

from ..text_tokenizer import make_tokenizer
from . import zoo


@pytest.fixture
def tokenizer(tmp_path: Path) -> Path:
    return make_tokenizer(tmp_path / "tokenizer.json")


def spec_strings(tokenizer: Path, overflow: str = "truncate") -> list[str]:
    return [
        "age",
        "plan:category:vocab=basic|premium|gold",
        "city:category:buckets=8",
        "emb:vector:length=3",
        f"review:text:tokenizer={tokenizer}:max_length=4:overflow={overflow}",
    ]


# -- the spec syntax -----------------------------------------------------------------------------------


def test_each_kind_parses_with_its_options() -> None:
    age, plan, city, emb, strict = parse_inputs(
        [
            "age",
            "plan:category:vocab=a|b",
            "city:category:buckets=16",
            "emb:vector:length=8",
            "p:category:vocab=x:unknown=refuse",
        ]
    )
    assert (age.kind, age.width) == ("numeric", 1)
    assert (plan.vocab, plan.unknown, plan.width) == (("a", "b"), "count", 2)
    assert (city.buckets, city.width) == (16, 16)
    assert (emb.length, emb.width) == (8, 8)
    assert strict.unknown == "refuse"
    text = parse_input("review:text:tokenizer=/t.json:max_length=32:overflow=refuse")
    assert (text.tokenizer, text.max_length, text.overflow, text.width) == ("/t.json", 32, "refuse", 0)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("emb:vector", "needs length=N"),
        ("emb:vector:length=x", "length must be an integer"),
        ("emb:vector:size=3", "'size=3' is not an option of a vector"),
        ("plan:category", "needs vocab=A|B|... or buckets=N"),
        ("plan:category:vocab=a|b:buckets=3", "one of them"),
        ("plan:category:vocab=a|a", "twice"),
        ("review:text:max_length=8", "needs tokenizer=PATH"),
        ("review:text:tokenizer=t.json", "needs max_length=N"),
        ("x:image", "unknown kind 'image'"),
        ("plan:category:vocab=a:unknown=maybe", "unknown= is count or refuse"),
    ],
)
def test_an_invalid_entry_is_refused_naming_it(entry: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as refused:
        parse_input(entry)
    assert repr(entry.split(":")[0]) in str(refused.value) or entry in str(refused.value)


def test_the_spec_comes_from_toml_env_and_flags_alike(tmp_path: Path) -> None:
    entries = ["age", "plan:category:vocab=basic|gold", "emb:vector:length=2"]
    (tmp_path / "s.toml").write_text(f"[trainer]\nfeatures = {json.dumps(entries)}\n")
    from_toml = load_settings(env={}, config_file=tmp_path / "s.toml").trainer_features
    from_env = load_settings(env={"STREAM_LEARNER_TRAINER_FEATURES": ",".join(entries)}).trainer_features
    from_flag = load_settings(env={}, flags={"trainer_features": ",".join(entries)}).trainer_features
    assert from_toml == from_env == from_flag == entries


def test_an_invalid_spec_stops_the_trainer_at_start_naming_the_feature() -> None:
    with pytest.raises(ConfigError, match="feature 'emb:vector:length=0'"):
        learner_config(Settings(trainer_features=["a", "emb:vector:length=0"]))
    with pytest.raises(ConfigError, match="cannot read tokenizer"):
        learner_config(Settings(trainer_features=["r:text:tokenizer=/nonexistent.json:max_length=3"]))
    with pytest.raises(ConfigError, match="trainer_variants need a spec of numeric features"):
        learner_config(Settings(trainer_features=["a", "p:category:buckets=4"], trainer_variants=["int8"]))
    from stream_learner.optimize.role import Optimizer

    with pytest.raises(ConfigError, match="trainer_variants need a spec of numeric features"):
        Optimizer(
            Settings(trainer_features=["a", "p:category:buckets=4"], trainer_variants=["int8"], trainer_signing_key="k")
        )


# -- the featurizer --------------------------------------------------------------------------------------


def test_numbers_are_standardized_and_nothing_else_is(tokenizer: Path) -> None:
    f = Featurizer(load_tokenizers(parse_inputs(spec_strings(tokenizer))))
    rows: list[dict[str, Any]] = [
        {"age": 10.0, "plan": "gold", "city": "Paris", "emb": [100.0, -50.0, 0.5], "review": "great product"},
        {"age": 30.0, "plan": "basic", "city": "Lyon", "emb": [1.0, 2.0, 3.0], "review": None},
    ]
    f.transform(rows)  # learns age's mean (20) and deviation
    x = f.transform(rows, learn=False)
    assert isinstance(x, dict)
    dense = x["dense"]
    assert dense.shape == (2, 1 + 3 + 8 + 3)
    std = math.sqrt(200.0)
    assert dense[:, 0].tolist() == pytest.approx([-10 / std, 10 / std])
    assert dense[0, 1:4].tolist() == [0.0, 0.0, 1.0] and dense[1, 1:4].tolist() == [1.0, 0.0, 0.0]
    paris = zlib.crc32(b"Paris") % 8
    assert dense[0, 4:12].tolist() == [1.0 if b == paris else 0.0 for b in range(8)]
    assert bucket("Paris", 8) == paris
    # A vector is used as given: not standardized, not clipped (100 is far beyond the clip of 10).
    assert dense[0, 12:].tolist() == [100.0, -50.0, 0.5]
    ids = x["text:review"]
    assert ids.shape == (2, 4) and ids.dtype == torch.int64
    assert ids[0, :2].tolist() != [0, 0] and ids[0, 2:].tolist() == [0, 0] and ids[1].tolist() == [0, 0, 0, 0]
    assert x["mask:review"].tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert f.counts["missing"] == 2  # the review, twice


def test_unknown_categories_are_counted_or_refused_as_declared() -> None:
    counted = Featurizer(parse_inputs(["plan:category:vocab=basic|gold"]))
    assert counted.transform([{"plan": "platinum"}, {"plan": "gold"}]).tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert counted.counts["unknown_category"] == 1
    strict = Featurizer(parse_inputs(["plan:category:vocab=basic|gold:unknown=refuse"]))
    with pytest.raises(RowsRefused) as refused:
        strict.transform([{"plan": "gold"}, {"plan": "platinum"}])
    assert list(refused.value.errors) == [1]
    assert (refused.value.kind, refused.value.field) == ("invalid_value", "$.features.plan")
    assert "'platinum' is not in the declared vocabulary" in refused.value.reason


@pytest.mark.parametrize(
    ("value", "kind", "says"),
    [
        ([1.0, 2.0], "invalid_value", "a vector of 2 numbers, the model takes 3"),
        ([1.0, math.nan, 2.0], "non_finite", "NaN or Infinity"),
        ([1.0, math.inf, 2.0], "non_finite", "NaN or Infinity"),
        ("1,2,3", "wrong_type", "a vector is an array, got str"),
        ([1.0, "2", 3.0], "wrong_type", "numbers only"),
    ],
)
def test_a_vector_that_does_not_fit_is_refused_naming_it(value: Any, kind: str, says: str) -> None:
    f = Featurizer(parse_inputs(["a", "emb:vector:length=3"]))
    with pytest.raises(RowsRefused) as refused:
        f.transform([{"emb": [0.0, 0.0, 0.0], "zz": 1.0}, {"a": 2.0, "emb": value}])
    assert list(refused.value.errors) == [1] and refused.value.field == "$.features.emb"
    assert refused.value.kind == kind and says in refused.value.reason
    # Nothing learned or counted: the rows that fit come again alone, and are counted then.
    assert f.count.tolist() == [0.0] and set(f.counts.values()) == {0}
    f.transform([{"emb": [0.0, 0.0, 0.0], "zz": 1.0}])
    assert (f.counts["missing"], f.counts["unknown"]) == (1, 1)


def test_a_number_written_as_a_string_is_refused_not_read() -> None:
    f = Featurizer(["a", "b"])
    with pytest.raises(RowsRefused) as refused:
        f.transform([{"a": 1.0, "b": "41"}, {"a": True, "b": 2.0}, {"a": 1.0}])
    assert sorted(refused.value.errors) == [0, 1]
    assert refused.value.errors[0].field == "$.features.b" and refused.value.errors[1].field == "$.features.a"
    assert refused.value.kind == "wrong_type"


def test_an_over_long_text_is_truncated_and_counted_or_refused(tokenizer: Path) -> None:
    long_text = "the product arrived broken and late"  # 6 words, the model takes 4
    cut = Featurizer(load_tokenizers(parse_inputs([f"r:text:tokenizer={tokenizer}:max_length=4"])))
    x = cut.transform([{"r": long_text}])
    assert isinstance(x, dict) and int(x["mask:r"].sum()) == 4 and cut.counts["truncated"] == 1
    full = Featurizer(load_tokenizers(parse_inputs([f"r:text:tokenizer={tokenizer}:max_length=6"])))
    full_x = full.transform([{"r": long_text}])
    assert isinstance(full_x, dict) and x["text:r"][0].tolist() == full_x["text:r"][0, :4].tolist()
    strict = Featurizer(load_tokenizers(parse_inputs([f"r:text:tokenizer={tokenizer}:max_length=4:overflow=refuse"])))
    with pytest.raises(RowsRefused) as refused:
        strict.transform([{"r": "great product"}, {"r": long_text}])
    assert list(refused.value.errors) == [1] and refused.value.field == "$.features.r"
    assert "the text is 6 tokens, the model takes at most 4" in refused.value.reason


# -- the learner, its state and its checkpoints ------------------------------------------------------------


def example(i: int, features: dict[str, Any], label: str) -> ExampleEvent:
    return ExampleEvent(
        example_id=f"x{i}",
        kind="labeled",
        request_id=f"r{i}",
        model="m",
        model_version="0",
        features=features,
        prediction={"no": 0.5, "yes": 0.5},
        label=label,
        prediction_event_id=f"p{i}",
        prediction_time=1_700_000_000_000 + i,
    )


def stream(n: int, start: int = 0) -> list[ExampleEvent]:
    words = ["great product", "terrible service never again", "love it", "awful broken"]
    out = []
    for i in range(start, start + n):
        good = i % 2 == 0
        out.append(
            example(
                i,
                {
                    "age": float(20 + i % 7),
                    "plan": ["basic", "premium", "gold", "platinum"][i % 4],
                    "city": f"c{i % 5}",
                    "emb": [float(good), 0.25 * (i % 3), -1.0],
                    "review": words[(i % 2) * 2 + (i // 2) % 2] if i % 5 else None,
                },
                "yes" if good else "no",
            )
        )
    return out


def learner_settings(tokenizer: Path, **kw: Any) -> Settings:
    return Settings(
        trainer_model="m",
        trainer_classes=["no", "yes"],
        trainer_features=spec_strings(tokenizer),
        trainer_hidden=[8],
        trainer_drift_enabled=False,
        **kw,
    )


def test_refused_examples_are_named_and_the_rest_of_the_chunk_is_learned(tokenizer: Path) -> None:
    learner = OnlineLearner(learner_config(learner_settings(tokenizer)))
    chunk = stream(8)
    bad = {2: {"emb": [1.0]}, 5: {"plan": 3.0}}
    for i, change in bad.items():
        chunk[i] = msgspec.structs.replace(chunk[i], features={**chunk[i].features, **change})
    result = learner.process(chunk)
    assert [(r.index, r.kind, r.field) for r in result.rejected] == [
        (2, "invalid_value", "$.features.emb"),
        (5, "wrong_type", "$.features.plan"),
    ]
    assert learner.counts["labeled"] == 6 and learner.counts["rejected"] == 2 and learner.counts["batches"] == 1


def test_a_restored_learner_with_every_kind_ends_bit_identical(tokenizer: Path) -> None:
    config = learner_config(learner_settings(tokenizer))
    straight = OnlineLearner(config)
    for k in range(4):
        straight.process(stream(16, 16 * k))
    first = OnlineLearner(config)
    first.process(stream(16, 0))
    first.process(stream(16, 16))
    tensors, meta = first.state_dict()
    restored = OnlineLearner(config)
    restored.load_state_dict({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    for k in (2, 3):
        restored.process(stream(16, 16 * k))
    a, a_meta = straight.state_dict()
    b, b_meta = restored.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a_meta == b_meta and a_meta["featurizer_counts"]["unknown_category"] == 16


def test_a_state_learned_with_another_tokenizer_is_refused(tokenizer: Path, tmp_path: Path) -> None:
    learner = OnlineLearner(learner_config(learner_settings(tokenizer)))
    learner.process(stream(8))
    tensors, meta = learner.state_dict()
    make_tokenizer(tokenizer, ["a different corpus entirely"])
    with pytest.raises(ValueError, match="the saved state was learned with tokenizer"):
        OnlineLearner(learner_config(learner_settings(tokenizer))).load_state_dict(tensors, meta)


def checkpoint_of(learner: OnlineLearner) -> LoadedCheckpoint:
    tensors, _ = learner.state_dict()
    weights = weights_bytes(tensors, "m")
    manifest = build_manifest(
        learner, model="m", version=1, parent=None, input_offsets=[], weights=weights, chunk_bytes=1 << 20
    )
    return LoadedCheckpoint(manifest, servable_weights(tensors), {}, "t", 0, 0)


def test_the_manifest_records_the_inputs_and_a_served_model_featurizes_as_the_learner(tokenizer: Path) -> None:
    learner = OnlineLearner(learner_config(learner_settings(tokenizer)))
    for k in range(3):
        learner.process(stream(16, 16 * k))
    checkpoint = checkpoint_of(learner)
    arch = checkpoint.manifest.architecture
    assert checkpoint.manifest.feature_spec == ["age", "plan", "city", "emb", "review"]
    assert checkpoint.manifest.counts["unknown_categories"] == 12  # "platinum", one in four of 48
    digest = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert [i["kind"] for i in arch["inputs"]] == ["numeric", "category", "category", "vector", "text"]
    assert arch["inputs"][1] == {
        "name": "plan",
        "kind": "category",
        "vocab": ["basic", "premium", "gold"],
        "unknown": "count",
    }
    assert arch["inputs"][4]["tokenizer_sha256"] == digest and "tokenizer" not in arch["inputs"][4]  # no paths
    served = load_served_model(checkpoint)
    rows = [ex.features for ex in stream(10, 100)]
    assert served.predict(rows) == learner.predictor.predict(rows)
    with pytest.raises(RowsRefused) as refused:
        served.predict([{"emb": [1.0, 2.0]}])
    assert refused.value.field == "$.features.emb"


def test_a_checkpoint_whose_tokenizer_is_not_the_signed_one_is_refused(tokenizer: Path) -> None:
    learner = OnlineLearner(learner_config(learner_settings(tokenizer)))
    checkpoint = checkpoint_of(learner)
    other = make_tokenizer(tokenizer.parent / "other.json", ["some other words"]).read_bytes()
    tensors = {**checkpoint.tensors, "tokenizer.review": torch.frombuffer(bytearray(other), dtype=torch.uint8)}
    with pytest.raises(ModelLoadError, match="do not have the signed digest"):
        load_served_model(LoadedCheckpoint(checkpoint.manifest, tensors, {}, "t", 0, 0))
    without = {k: v for k, v in checkpoint.tensors.items() if k != "tokenizer.review"}
    with pytest.raises(ModelLoadError, match="expected statistics"):
        load_served_model(LoadedCheckpoint(checkpoint.manifest, without, {}, "t", 0, 0))


def test_a_numeric_spec_records_what_it_always_did() -> None:
    spec = learner_config(Settings(trainer_features=["a", "b"])).spec
    assert set(spec.to_dict()) == {"kind", "task", "features", "classes", "hidden", "seed", "params"}
    assert spec.inputs == () and spec.n_features == 2


# -- the user model's parameters, and a collate hook -------------------------------------------------------


def test_architecture_params_reach_the_factory_and_the_signed_architecture() -> None:
    settings = load_settings(
        env={"STREAM_LEARNER_TRAINER_ARCHITECTURE_PARAMS": '{"width": 12, "depth": 2}'},
        flags={"trainer_architecture": "tests.learn.zoo:wide", "trainer_features": "a,b,p:category:vocab=x|y"},
    )
    zoo.CALLS.clear()
    learner = OnlineLearner(learner_config(msgspec.structs.replace(settings, trainer_drift_enabled=False)))
    assert zoo.CALLS[0] == {"n_features": 4, "n_outputs": 2, "width": 12, "depth": 2}
    assert next(tuple(p.shape) for p in learner.main.model.parameters()) == (12, 4)
    learner.process([example(i, {"a": 1.0 * i, "b": 2.0, "p": "x"}, "1") for i in range(4)])
    checkpoint = checkpoint_of(learner)
    assert checkpoint.manifest.architecture["params"] == {"width": 12, "depth": 2}
    # A node builds the factory only if allowed, and then with the signed params.
    with pytest.raises(ModelLoadError, match="is not allowed"):
        load_served_model(checkpoint)
    zoo.CALLS.clear()
    served = load_served_model(checkpoint, BuildPolicy.of(["tests.learn.zoo:wide"]))
    assert zoo.CALLS[0]["width"] == 12 and zoo.CALLS[0]["depth"] == 2
    rows: list[dict[str, Any]] = [{"a": 3.0, "b": 2.0, "p": "y"}]
    assert served.predict(rows) == learner.predictor.predict(rows)


def test_architecture_params_from_toml_and_refused_when_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        '[trainer]\narchitecture = "tests.learn.zoo:wide"\n[trainer.architecture_params]\nwidth = 5\n'
    )
    assert load_settings(env={}, config_file=tmp_path / "s.toml").trainer_architecture_params == {"width": 5}
    with pytest.raises(ConfigError, match=r"invalid setting trainer_architecture_params \(from flag"):
        load_settings(env={}, flags={"trainer_architecture_params": "width=5"})
    with pytest.raises(ConfigError, match="mlp takes no architecture params but text_dim"):
        learner_config(Settings(trainer_features=["a"], trainer_architecture_params={"width": 5}))


def test_a_collate_hook_feeds_the_user_model_and_its_failures_refuse_the_rows() -> None:
    settings = Settings(
        trainer_model="m",
        trainer_features=["a"],
        trainer_architecture="tests.learn.zoo:with_lengths",
        trainer_collate="tests.learn.zoo:comment_length",
        trainer_drift_enabled=False,
    )
    zoo.CALLS.clear()
    learner = OnlineLearner(learner_config(settings))
    assert zoo.CALLS[0]["collate"] == "tests.learn.zoo:comment_length"
    chunk = [example(i, {"a": float(i), "comment": "x" * i}, str(i % 2)) for i in range(6)]
    chunk[3] = msgspec.structs.replace(chunk[3], features={"a": 1.0, "comment": 7.0})
    result = learner.process(chunk)
    assert [(r.index, r.field) for r in result.rejected] == [(3, "$.features")]
    assert "comment must be a string" in result.rejected[0].reason and learner.counts["labeled"] == 5
    checkpoint = checkpoint_of(learner)
    assert checkpoint.manifest.architecture["collate"] == "tests.learn.zoo:comment_length"
    with pytest.raises(ModelLoadError, match=r"collate hook 'tests\.learn\.zoo:comment_length' is not allowed"):
        load_served_model(checkpoint, BuildPolicy.of(["tests.learn.zoo:with_lengths"]))
    served = load_served_model(
        checkpoint, BuildPolicy.of(["tests.learn.zoo:with_lengths", "tests.learn.zoo:comment_length"])
    )
    rows: list[dict[str, Any]] = [{"a": 1.0, "comment": "hello"}]
    assert served.predict(rows) == learner.predictor.predict(rows)
    with pytest.raises(ValueError, match="a collate hook's tensors need a user model"):
        ModelSpec(
            kind="mlp", task="binary", features=["a"], classes=["0", "1"], collate="tests.learn.zoo:comment_length"
        )
