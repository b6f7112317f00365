"""Replay against the real local broker and Valkey: determinism, equality with live, resumption."""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import pytest

from stream_learner.checkpoint.output import DirectoryOutput
from stream_learner.checkpoint.reader import read_latest
from stream_learner.checkpoint.signing import load_public_key, verify_manifest
from stream_learner.config import Settings
from stream_learner.errors import ConfigError
from stream_learner.events import ExampleEvent
from stream_learner.learn.trainer import Trainer
from stream_learner.replay import Replay, ReplayPlan
from stream_learner.replay.report import compare, live_manifests

from ..join.helpers import RunningJoiner, read_examples, wait_until
from ..join.oracle import expected_examples, mismatches
from ..join.test_crash import generate, produce_raw
from ..learn.streams import AGRAWAL_FEATURES, agrawal_examples
from ..learn.test_trainer import produce_examples

#: Run with both Kafka clients (tests/conftest.py); the tests that read the examples topic with both
#: examples formats too (both_formats).
pytestmark = pytest.mark.both_transports

N_REQUESTS = 1500


@pytest.fixture
def events(rsettings: Settings) -> list:
    """~3,000 predictions and labels (early, late, never labeled, orphans, 2% re-sent) on 3 partitions each."""
    stream = generate(N_REQUESTS, seed=11)
    produce_raw(rsettings, stream)
    return stream


def replay(settings: Settings, replay_id: str, **kw) -> tuple[Replay, dict]:
    options = {k: kw.pop(k) for k in ("stop", "poll_records", "fetch_max_bytes", "on_chunk", "on_examples") if k in kw}
    r = Replay(settings, ReplayPlan(replay_id=replay_id, **kw), progress=False, **options)
    return r, r.run()


@pytest.mark.slow
def test_two_replays_of_the_same_range_have_identical_digests_whatever_the_fetch_size(
    rsettings: Settings, events, tmp_path: Path
) -> None:
    seen: dict[str, list[ExampleEvent]] = {"a": [], "b": []}
    _, a = replay(
        rsettings,
        "a",
        lineage="m@audit",
        output_dir=str(tmp_path / "out-a"),
        close_windows=True,
        on_examples=seen["a"].extend,
    )
    # Tiny fetches: every poll boundary falls elsewhere.
    _, b = replay(
        rsettings,
        "b",
        lineage="m@audit",
        output_dir=str(tmp_path / "out-b"),
        close_windows=True,
        poll_records=7,
        fetch_max_bytes=4096,
        on_examples=seen["b"].extend,
    )
    assert a["done"] and b["done"]
    assert a["records_read"] == b["records_read"] == a["records_in_ranges"] == len(events)
    assert [x.example_id for x in seen["a"]] == [x.example_id for x in seen["b"]]  # same examples, same order
    assert a["published"] == b["published"] and len(a["published"]) >= 3
    assert a["final_sha256"] == b["final_sha256"]
    assert a["learner_counts"] == b["learner_counts"]
    # The examples are exactly the join's semantics (the offline oracle, every window closed).
    assert mismatches(seen["a"], expected_examples(events, window_ms=rsettings.joiner_window_ms)) == []
    # Signed checkpoints in the directory, versions 1..n with no gaps.
    out = DirectoryOutput(tmp_path / "out-a", "m@audit", None, rsettings.trainer_chunk_bytes)  # type: ignore[arg-type]
    public = load_public_key(Path(rsettings.trainer_signing_key).with_suffix(".pub.pem"))
    assert out.latest_version() == a["version"]
    for v in range(1, a["version"] + 1):
        verify_manifest(out.manifest(v), public)
    assert out.manifest(a["version"]).weights.sha256 == a["final_sha256"]


@pytest.mark.slow
@pytest.mark.both_formats
def test_examples_replay_equals_the_live_trainer_bit_for_bit(rsettings: Settings) -> None:
    s = msgspec.structs.replace(rsettings, trainer_features=AGRAWAL_FEATURES, trainer_classes=["0", "1"])
    records = produce_examples(s, agrawal_examples(3_000, unlabeled=0.2, seed=3))
    live = Trainer(s)  # the CLI's construction, drift detectors included
    try:
        while sum(live.offsets.values()) < records or live.buffer:
            live.step()
        live.checkpoint()
    finally:
        live.close()
    public = load_public_key(Path(s.trainer_signing_key).with_suffix(".pub.pem"))
    want = read_latest(s, s.topic_models, public, "m")

    _r, got = replay(s, "ex", source="examples")  # to the model topic, lineage m@replay-ex
    mine = read_latest(s, s.topic_models, public, "m@replay-ex")
    assert mine.manifest.weights.sha256 == got["final_sha256"]
    assert got["final_sha256_as_live"] == want.manifest.weights.sha256
    assert mine.manifest.counts == want.manifest.counts
    assert mine.manifest.input_offsets == want.manifest.input_offsets
    assert read_latest(s, s.topic_models, public, "m").manifest.version == want.manifest.version  # live untouched

    report = compare(got, live_manifests(s, "m", public), s.topic_examples)
    assert report["inputs_match"] and report["digest_equal"]
    assert report["records_applied"] == {"replay": records, "live": records}
    assert got["counts"]["examples"] == 3_000
    assert all(v["replay"] == v["live"] for v in report["metrics"].values())


@pytest.mark.slow
@pytest.mark.both_formats
def test_events_replay_joins_what_the_live_joiner_joined(rsettings: Settings, events) -> None:
    """Over a closed range with no crash, the replay's examples are the live joiner's, id for id and kind
    for kind (the live joiner's windows left open at the end stay open in the replay too)."""
    with RunningJoiner(rsettings) as joiner:
        wait_until(lambda: sum(joiner.counts.events.values()) >= len(events), 60, "the joiner to read everything")
        wait_until(lambda: joiner.store.pending_outbox() == 0, 30, "the joiner to produce its examples")
    live = read_examples(rsettings, timeout_s=10, expect=sum(joiner.counts.examples.values()))
    seen: list[ExampleEvent] = []
    _, summary = replay(
        rsettings, "ev", output_dir=str(Path(rsettings.replay_state_dir) / "out"), on_examples=seen.extend
    )
    assert summary["done"] and summary["records_read"] == len(events)
    live_ids = {(x.example_id, x.kind) for x in live}
    assert {(x.example_id, x.kind) for x in seen} == live_ids
    assert len(seen) == len({x.example_id for x in seen})  # the replay emits each example once


@pytest.mark.slow
def test_interrupted_replay_resumes_to_the_same_digests(rsettings: Settings, events, tmp_path: Path) -> None:
    _, whole = replay(rsettings, "whole", lineage="m@r", output_dir=str(tmp_path / "whole"), close_windows=True)

    stop = threading.Event()
    chunks = {"n": 0}

    def interrupt_after(n: int):
        def on_chunk(r: Replay) -> None:
            chunks["n"] += 1
            if chunks["n"] >= n:
                stop.set()

        return on_chunk

    plan = dict(lineage="m@r", output_dir=str(tmp_path / "cut"), close_windows=True)
    runs = []
    for n in (7, 19, 10**9):  # stopped twice, then to the end
        stop.clear()
        chunks["n"] = 0
        _, s = replay(rsettings, "cut", stop=stop, on_chunk=interrupt_after(n), poll_records=50, **plan)
        runs.append(s)
    assert [s["done"] for s in runs] == [False, False, True]
    assert 0 < runs[0]["records_read"] < runs[1]["records_read"] < runs[2]["records_read"] == len(events)
    final = runs[-1]
    assert final["published"] == whole["published"]  # same versions, same digests, none repeated or missing
    assert final["learner_counts"] == whole["learner_counts"]
    assert final["counts"] == whole["counts"]
    # A finished replay run again does nothing.
    _, again = replay(rsettings, "cut", **plan)
    assert again == final | {"seconds": again["seconds"]}


def test_the_live_lineage_is_refused_without_overwrite_live(rsettings: Settings) -> None:
    with pytest.raises(ConfigError, match="overwrite-live"):
        Replay(rsettings, ReplayPlan(replay_id="x", lineage="m"), progress=False)


def test_resuming_with_other_settings_is_refused(rsettings: Settings, events, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()  # interrupted at its first step
    _, first = replay(rsettings, "s", output_dir=str(tmp_path / "o"), stop=stop)
    assert not first["done"]
    other = msgspec.structs.replace(rsettings, trainer_lr=0.5)
    from stream_learner.replay.errors import ReplayError

    with pytest.raises(ReplayError, match="other settings"):
        replay(other, "s", output_dir=str(tmp_path / "o"))


@pytest.mark.slow
@pytest.mark.both_formats
def test_interrupted_examples_replay_resumes_to_the_same_digests(rsettings: Settings, tmp_path: Path) -> None:
    s = msgspec.structs.replace(
        rsettings, trainer_features=AGRAWAL_FEATURES, trainer_classes=["0", "1"], trainer_checkpoint_every_examples=300
    )
    produce_examples(s, agrawal_examples(2_000, unlabeled=0.2, seed=9))
    _, whole = replay(s, "whole", source="examples", lineage="m@e", output_dir=str(tmp_path / "whole"))
    stop = threading.Event()
    calls = {"n": 0}

    def on_chunk(r: Replay) -> None:
        calls["n"] += 1
        if calls["n"] % 13 == 0:
            stop.set()

    runs = []
    while not runs or not runs[-1]["done"]:
        stop.clear()
        _, summary = replay(
            s,
            "cut",
            source="examples",
            lineage="m@e",
            output_dir=str(tmp_path / "cut"),
            stop=stop,
            on_chunk=on_chunk,
            poll_records=100,
        )
        runs.append(summary)
        assert len(runs) < 20
    assert len(runs) >= 4  # 2,000 examples in chunks of 32, stopped every 13 chunks
    assert runs[-1]["published"] == whole["published"]
    assert runs[-1]["learner_counts"] == whole["learner_counts"]


@pytest.mark.slow
def test_overwrite_live_continues_the_live_lineage(rsettings: Settings) -> None:
    s = msgspec.structs.replace(rsettings, trainer_features=AGRAWAL_FEATURES, trainer_classes=["0", "1"])
    produce_examples(s, agrawal_examples(1_200, seed=4))
    live = Trainer(s)
    try:
        while sum(live.offsets.values()) < 1_200 or live.buffer:
            live.step()
        live.checkpoint()
    finally:
        live.close()
    public = load_public_key(Path(s.trainer_signing_key).with_suffix(".pub.pem"))
    before = read_latest(s, s.topic_models, public, "m").manifest
    _, got = replay(s, "fix", source="examples", lineage="m", overwrite_live=True)
    after = read_latest(s, s.topic_models, public, "m").manifest
    assert after.version == got["version"] > before.version
    versions = [p["version"] for p in got["published"]]
    assert versions == list(range(before.version + 1, after.version + 1))
    assert after.weights.sha256 == before.weights.sha256  # same range, same settings: the same weights


def test_a_partition_with_nothing_in_the_range_does_not_hold_the_watermark(rsettings: Settings) -> None:
    """Events on some partitions only, all in one join step: windows still close by the watermark of the
    partitions that have events (a live joiner would find the empty ones idle)."""
    from stream_learner.bus import make_producer
    from stream_learner.events import encode

    from ..join.helpers import label, prediction

    t0, n, window = 1_767_225_600_000, 200, rsettings.joiner_window_ms
    producer = make_producer(rsettings)
    for i in range(n):
        p = prediction(f"i{i}", t0 + 100 * i)
        producer.send(rsettings.topic_predictions, key=p.request_id.encode(), value=encode(p), partition=i % 2)
        if i % 2 == 0:  # only even requests are labeled; their labels all on labels partition 0
            lab = label(f"i{i}", t0 + 100 * i + 10)
            producer.send(rsettings.topic_labels, key=lab.request_id.encode(), value=encode(lab), partition=0)
    producer.flush()
    producer.close()
    seen: list[ExampleEvent] = []
    _, summary = replay(
        rsettings, "idle", output_dir=str(Path(rsettings.replay_state_dir) / "o"), on_examples=seen.extend
    )
    assert summary["records_read"] == n + n // 2
    # The watermark: the smallest of the non-empty partitions' largest event times.
    watermark = min(t0 + 100 * (n - 2), t0 + 100 * (n - 1), t0 + 100 * (n - 2) + 10)
    unlabeled = {f"req-i{i}" for i in range(1, n, 2) if t0 + 100 * i + window < watermark}
    assert {x.request_id for x in seen if x.kind == "labeled"} == {f"req-i{i}" for i in range(0, n, 2)}
    assert {x.request_id for x in seen if x.kind == "unlabeled"} == unlabeled and len(unlabeled) == 74
