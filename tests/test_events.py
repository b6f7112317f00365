"""The wire contract: typed events, the JSON Schema files, and fixtures agree."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner import events, events_v1
from stream_learner.errors import EventError
from stream_learner.schemas import SCHEMAS, render

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
#: Each schema's own decoder: v1 files against the strict v1 decoders, v2 against the roles' decoders.
CODECS = {
    "prediction.v1": events_v1.PREDICTION_V1,
    "prediction.v2": events.PREDICTION,
    "label.v1": events.LABEL,
    "example.v1": events_v1.EXAMPLE_V1,
    "example.v2": events.EXAMPLE,
    "example-batch.v1": events.Codec(events.ExampleBatch),
    "manifest.v1": events.MANIFEST,
    "drift.v1": events.DRIFT,
    "registry.v1": events.REGISTRY,
}
#: What the roles decode with, by schema: a v1 event is a v2 event.
ROLE_CODECS = {**CODECS, "prediction.v1": events.PREDICTION, "example.v1": events.EXAMPLE}
#: The newest version of each schema, which whatever a role writes must validate against.
NEWEST = {
    "prediction": "prediction.v2",
    "label": "label.v1",
    "example": "example.v2",
    "example-batch": "example-batch.v1",
    "manifest": "manifest.v1",
    "drift": "drift.v1",
    "registry": "registry.v1",
}


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / "schemas" / f"{name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


VALIDATORS = {name: validator(name) for name in SCHEMAS}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_files_are_generated_from_the_code(name: str) -> None:
    # Compared as JSON values: msgspec versions differ in writing 1.0 or 1.
    committed = json.loads((ROOT / "schemas" / f"{name}.json").read_text())
    assert committed == json.loads(render(name)), (
        f"schemas/{name}.json is stale: python -m stream_learner.schemas write schemas/"
    )


def _fixture_files() -> list[Path]:
    return sorted(FIXTURES.glob("v*/*.json"))


@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stored_fixtures_still_validate_and_decode(path: Path) -> None:
    name = f"{path.stem.split('_')[0]}.{path.parent.name}"
    data = path.read_bytes()
    VALIDATORS[name].validate(json.loads(data))
    event = CODECS[name].decode(data)
    # What we would write back is valid too, and decodes to the same event.
    assert CODECS[name].decode(events.encode(event)) == event
    VALIDATORS[name].validate(json.loads(events.encode(event)))


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("v1/*.json")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_v1_fixtures_decode_as_the_roles_decode_and_stay_v1(path: Path) -> None:
    """Backward compatibility: what a v1 producer wrote is read by today's roles as it was meant, and what they
    write back for it is still valid v1 (an old reader downstream keeps reading it) and valid in the newest version."""
    kind = path.stem.split("_")[0]
    data = path.read_bytes()
    event = ROLE_CODECS[f"{kind}.v1"].decode(data)
    assert json.loads(events.encode(event)) == json.loads(events.encode(CODECS[f"{kind}.v1"].decode(data)))
    VALIDATORS[f"{kind}.v1"].validate(json.loads(events.encode(event)))
    VALIDATORS[NEWEST[kind]].validate(json.loads(events.encode(event)))


def test_v2_values_are_refused_by_the_v1_schema_and_decoder() -> None:
    """A v1 reader refuses (does not misread) a v2 feature value: old joiners dead-letter it, loudly."""
    data = (FIXTURES / "v2" / "prediction.json").read_bytes()
    assert not VALIDATORS["prediction.v1"].is_valid(json.loads(data))
    with pytest.raises(EventError) as refused:
        events_v1.PREDICTION_V1.decode(data)
    assert refused.value.field.startswith("$.features.") and refused.value.kind == "wrong_type"


def test_every_schema_has_fixtures() -> None:
    covered = {f"{p.stem.split('_')[0]}.{p.parent.name}" for p in _fixture_files()}
    assert covered == set(SCHEMAS)


# -- property-based: what the encoder writes validates; what the files refuse, the decoder refuses --

names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)
features = st.dictionaries(names, st.one_of(st.none(), finite, st.integers(-(2**53), 2**53)), max_size=20)
# v2: strings (categories, texts, quotes and all) and vectors of numbers as well.
features_v2 = st.dictionaries(
    names,
    st.one_of(st.none(), finite, st.integers(-(2**53), 2**53), st.text(max_size=30), st.lists(finite, max_size=6)),
    max_size=20,
)
probs = st.dictionaries(names, st.floats(0, 1), min_size=1, max_size=5)
times = st.integers(0, 2**53)
sources = st.builds(events.Source, names, st.integers(0, 1000), st.integers(0, 2**62))

predictions = st.builds(
    events_v1.PredictionEvent,
    event_id=names,
    request_id=names,
    model=names,
    model_version=names,
    event_time=times,
    features=features,
    prediction=st.one_of(finite, probs),
)
predictions_v2 = st.builds(
    events.PredictionEvent,
    event_id=names,
    request_id=names,
    model=names,
    model_version=names,
    event_time=times,
    features=features_v2,
    prediction=st.one_of(finite, probs),
)
labels = st.builds(
    events.LabelEvent,
    event_id=names,
    request_id=names,
    event_time=times,
    label=st.one_of(names, finite),
    model=st.one_of(st.none(), names),
)


def _examples(struct: type, feats: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.builds(
        struct,
        example_id=names,
        kind=st.sampled_from(["labeled", "unlabeled", "late"]),
        request_id=names,
        model=names,
        model_version=names,
        features=feats,
        prediction=st.one_of(finite, probs),
        label=st.one_of(st.none(), names, finite),
        prediction_event_id=names,
        prediction_time=times,
        prediction_source=st.one_of(st.none(), sources),
        label_event_id=st.one_of(st.none(), names),
        label_time=st.one_of(st.none(), times),
        label_source=st.one_of(st.none(), sources),
    )


examples = _examples(events_v1.ExampleEvent, features)
examples_v2 = _examples(events.ExampleEvent, features_v2)
drifts = st.builds(
    events.DriftEvent,
    event_id=names,
    model=names,
    event_time=times,
    kind=st.sampled_from(["warning", "drift", "status"]),
    detector=names,
    signal=names,
    model_version=st.one_of(st.none(), st.integers(0, 10**6)),
    value=st.one_of(st.none(), finite),
    actions=st.lists(names, max_size=3),
    details=st.dictionaries(names, st.one_of(finite, names), max_size=3),
)
STRATEGIES = {
    "prediction.v1": predictions,
    "prediction.v2": predictions_v2,
    "label.v1": labels,
    "example.v1": examples,
    "example.v2": examples_v2,
    "drift.v1": drifts,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_encoder_output_validates_and_round_trips(name: str, data: st.DataObject) -> None:
    event = data.draw(STRATEGIES[name])
    raw = events.encode(event)
    VALIDATORS[name].validate(json.loads(raw))
    assert CODECS[name].decode(raw) == event


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), names, st.just("")),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)),
    max_leaves=8,
)


def _mutate(doc: Any, draw: Any) -> Any:
    """Replace, delete or add one value somewhere inside a valid document."""
    if not isinstance(doc, dict) or not doc:
        return draw(json_values)
    key = draw(st.sampled_from(sorted(doc)))
    action = draw(st.sampled_from(["replace", "delete", "descend", "add"]))
    out = dict(doc)
    if action == "replace":
        out[key] = draw(json_values)
    elif action == "delete":
        del out[key]
    elif action == "add":
        out[draw(names)] = draw(json_values)
    else:
        out[key] = _mutate(doc[key], draw)
    return out


def _json_bytes(doc: Any) -> bytes:
    # allow_nan: NaN/Infinity tokens are exactly the kind of bad input we must refuse.
    return json.dumps(doc, allow_nan=True).encode()


def _schema_accepts(name: str, doc: Any) -> bool:
    # Python's json reads NaN/Infinity tokens that no JSON Schema reader would see
    # as numbers; a document holding them is not valid JSON, so the files refuse it.
    def finite_everywhere(x: Any) -> bool:
        if isinstance(x, float):
            return math.isfinite(x)
        if isinstance(x, dict):
            return all(map(finite_everywhere, x.values()))
        if isinstance(x, list):
            return all(map(finite_everywhere, x))
        return True

    return finite_everywhere(doc) and VALIDATORS[name].is_valid(doc)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoder_refuses_what_the_schema_refuses(name: str, data: st.DataObject) -> None:
    valid = json.loads(events.encode(data.draw(STRATEGIES[name])))
    doc = _mutate(valid, data.draw)
    raw = _json_bytes(doc)
    if _schema_accepts(name, doc):
        return  # the decoder may accept (or, for 1.0 written as an integer, refuse)
    with pytest.raises(EventError) as refused:
        CODECS[name].decode(raw)
    assert refused.value.field.startswith("$") and refused.value.reason


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(doc=json_values)
def test_decoder_refuses_arbitrary_json_that_the_schema_refuses(doc: Any) -> None:
    for name in STRATEGIES:
        if not _schema_accepts(name, doc):
            with pytest.raises(EventError):
                CODECS[name].decode(_json_bytes(doc))


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(blob: bytes) -> None:
    try:
        events.PREDICTION.decode(blob)
    except EventError as exc:
        # Never "undecodable": that kind is for decoder failures nobody foresaw.
        assert exc.kind in {
            "malformed_json",
            "missing_field",
            "wrong_type",
            "invalid_value",
            "non_finite",
            "too_deep",
            "duplicate_key",
        }


def test_manifest_round_trip() -> None:
    data = (FIXTURES / "v1" / "manifest.json").read_bytes()
    manifest = events.MANIFEST.decode(data)
    assert manifest.version == 3 and manifest.weights.chunks == 1
    bad = json.loads(data)
    bad["weights"]["sha256"] = "not-hex"
    assert not VALIDATORS["manifest.v1"].is_valid(bad)
    with pytest.raises(EventError, match=r"\$\.weights\.sha256"):
        events.MANIFEST.decode(json.dumps(bad).encode())


def test_class_names_are_normalised() -> None:
    assert events.class_name(1) == events.class_name(1.0) == events.class_name("1") == "1"


def test_event_ids_are_unique() -> None:
    assert len({events.new_event_id() for _ in range(1000)}) == 1000


def test_msgspec_struct_and_schema_agree_on_required_fields() -> None:
    for name, struct in SCHEMAS.items():
        schema = json.loads((ROOT / "schemas" / f"{name}.json").read_text())
        body = schema["$defs"][struct.__name__]
        required = {f.encode_name for f in msgspec.structs.fields(struct) if f.required}
        assert set(body["required"]) == required, name


# -- property-based: a key given twice where the reader looks is refused, wherever and however written --


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as written: its (key, value) pairs in order, repeats allowed."""


def _as_pairs(value: Any) -> Any:
    if isinstance(value, dict):
        return _Pairs((k, _as_pairs(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_as_pairs(v) for v in value]
    return value


def _write(value: Any, draw: Any) -> str:
    """JSON text of ``value``, compact or spaced, strings sometimes escaped (\\uXXXX, or ASCII only)."""
    colon, comma = draw(st.sampled_from([(":", ","), (": ", ", "), (" : ", " ,\n ")]))
    if isinstance(value, _Pairs):
        return "{" + comma.join(f"{_string(k, draw)}{colon}{_write(v, draw)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + comma.join(_write(v, draw) for v in value) + "]"
    if isinstance(value, str):
        return _string(value, draw)
    return json.dumps(value)


def _string(text: str, draw: Any) -> str:
    how = draw(st.sampled_from(["plain", "ascii", "escape-first"]))
    if how == "escape-first" and text and ord(text[0]) < 0x10000:  # beyond, json.dumps writes the surrogates
        return '"' + f"\\u{ord(text[0]):04x}" + json.dumps(text[1:], ensure_ascii=False)[1:]
    return json.dumps(text, ensure_ascii=how == "ascii")


def _repeats(pairs: Any, fields: set[str]) -> bool:
    """The reference: is a key repeated at the top (a known field) or inside a known field's object?"""
    keys = [k for k, _ in pairs]
    if any(keys.count(k) > 1 for k in keys if k in fields):
        return True
    return any(k in fields and isinstance(v, _Pairs) and len({kk for kk, _ in v}) != len(v) for k, v in pairs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prediction.v1", "prediction.v2", "label.v1", "example.v1", "example.v2"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_repeated_key_is_refused_and_nothing_else_is(name: str, data: st.DataObject) -> None:
    draw = data.draw
    codec = CODECS[name]
    fields = set(codec.event_type.__struct_fields__)
    doc = _as_pairs(json.loads(events.encode(draw(STRATEGIES[name]))))
    # Optional fields that are null: written as null, or left out.
    doc = _Pairs(kv for kv in doc if not (kv[1] is None and kv[0] not in ("label",) and draw(st.booleans())))
    for _ in range(draw(st.integers(0, 3))):
        target = doc
        objects = [v for _, v in doc if isinstance(v, _Pairs)]
        if objects and draw(st.booleans()):
            target = draw(st.sampled_from(objects))  # features, prediction or a source
        what = draw(st.sampled_from(["repeat", "unknown", "unknown-named-like-a-field", "feature-named-like-a-field"]))
        if what == "repeat" and target:
            key, value = draw(st.sampled_from(list(target)))
            target.insert(draw(st.integers(0, len(target))), (key, draw(st.sampled_from([value, None, 1.5, "x"]))))
        elif what == "unknown":
            target.append((draw(names), _as_pairs(draw(json_values))))
        elif what == "unknown-named-like-a-field":
            # An unknown object holding a key named like a null optional field ("label_time": null).
            doc.append((draw(names), _Pairs([(draw(st.sampled_from(sorted(fields))), None)])))
        elif what == "feature-named-like-a-field":
            feats = next((v for k, v in doc if k == "features"), None)
            if isinstance(feats, _Pairs):
                feats.append((draw(st.sampled_from(sorted(fields))), None))
    raw = _write(doc, draw).encode()
    try:
        lenient = msgspec.json.decode(raw, type=codec.event_type)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return  # refused anyway (a repeat with a wrong value, an unknown field clashing...): not this test's case
    if _repeats(doc, fields):
        try:
            codec.decode(raw)
        except EventError as refused:
            assert refused.kind == "duplicate_key", raw
        else:
            pytest.fail(f"accepted with a repeated key: {raw!r}")
    else:
        assert codec.decode(raw) == lenient, raw


@pytest.mark.parametrize("depth", [62, 63, 64, 1000, 10_000])
@pytest.mark.parametrize("where", ["unknown field", "feature value", "prediction", "object in unknown field"])
def test_nesting_beyond_the_limit_is_refused_as_too_deep(depth: int, where: str) -> None:
    nest = "[" * depth + "]" * depth
    doc = {
        "event_id": "e",
        "request_id": "r",
        "model": "m",
        "model_version": "1",
        "event_time": 1,
        "features": {"a": 1.0},
        "prediction": 0.5,
    }
    text = json.dumps(doc)[:-1]
    if where == "unknown field":  # the event's object is level 1: depth + 1 levels
        text += f', "zz": {nest}}}'
    elif where == "object in unknown field":
        text += ', "zz": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    elif where == "feature value":  # the event, features, then the nest
        text = text.replace('{"a": 1.0}', '{"a": ' + nest + "}") + "}"
    else:
        text = text.replace('"prediction": 0.5', f'"prediction": {nest}') + "}"
    levels = depth + (2 if where == "feature value" else 1)
    if levels > events.MAX_DEPTH:
        with pytest.raises(EventError) as refused:
            events.PREDICTION.decode(text.encode())
        assert refused.value.kind == "too_deep" and refused.value.field == "$"
    elif where in ("unknown field", "object in unknown field"):
        assert events.PREDICTION.decode(text.encode()).request_id == "r"  # ignored, as unknown fields are
    else:
        with pytest.raises(EventError) as refused:
            events.PREDICTION.decode(text.encode())
        assert refused.value.kind == "wrong_type"


def test_sdk_values_nested_too_deep_are_refused_not_raised() -> None:
    deep: Any = 1.0
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(EventError) as refused:
        events.PREDICTION.convert(
            {
                "event_id": "e",
                "request_id": "r",
                "model": "m",
                "model_version": "1",
                "event_time": 1,
                "features": {"a": deep},
                "prediction": 0.5,
            }
        )
    assert refused.value.kind in {"wrong_type", "too_deep"}
