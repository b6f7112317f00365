"""The model registry (issue 11) on the real local broker: aliases, rollback, pin, forged and replayed records.

Every subscriber here follows the real model topic; registry records are
written by the same functions ``stream-learner models`` runs (and by the CLI
entry point itself where the command is the point).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization

from stream_learner import cli
from stream_learner.checkpoint import CheckpointError, CheckpointNotFoundError, catalog
from stream_learner.checkpoint.reader import make_reader_consumer
from stream_learner.checkpoint.registry import (
    RegistryConflictError,
    RegistryRecord,
    registry_headers,
    sign_registry,
    write_registry,
)
from stream_learner.config import Settings
from stream_learner.events import encode, now_ms
from stream_learner.metrics import Metrics
from stream_learner.serving import CheckpointSubscriber, ServingNode

from .conftest import MODEL, ROW, publish, step_until, wait_for
from .test_node import call
from .test_subscriber import failures


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # cli.main() configures structlog for the process: later tests must not log into this test's
    # captured (and then closed) output.
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture
def key_files(tmp_path: Path, keypair: Any) -> tuple[Path, Path]:
    """The session key pair as PEM files, for the CLI."""
    private = keypair[0].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = keypair[1].public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.pem").write_bytes(private)
    (tmp_path / "keys" / "signing.pub.pem").write_bytes(public)
    return tmp_path / "keys" / "signing.pem", tmp_path / "keys" / "signing.pub.pem"


def models_cli(settings: Settings, key_files: tuple[Path, Path], *argv: str) -> int:
    """``stream-learner models ...`` through the entry point, on this test's topics."""
    return cli.main(
        [
            "models",
            *argv,
            "--bootstrap-servers",
            settings.bootstrap_servers,
            "--topic-models",
            settings.topic_models,
            "--trainer-signing-key",
            str(key_files[0]),
            "--serving-public-keys",
            str(key_files[1]),
            "--log-format",
            "json",
        ]
    )


@pytest.fixture
def fleet(settings: Settings, keypair: Any) -> Iterator[list[CheckpointSubscriber]]:
    """Three started subscribers following ``champion``, as three serving nodes would."""
    subs = [CheckpointSubscriber(settings, [keypair[1]], model=MODEL, alias="champion") for _ in range(3)]
    for sub in subs:
        sub.start(wait_s=None)
    yield subs
    for sub in subs:
        sub.stop()


def served(subs: list[CheckpointSubscriber]) -> list[int | None]:
    return [sub.version for sub in subs]


def raw_registry(producer: Any, topic: str, record: RegistryRecord, partition: int = 0) -> int:
    """Produce a registry record as a writer would (to forge or replay one)."""
    return (
        producer.send(
            topic,
            key=record.model.encode(),
            value=encode(record),
            headers=registry_headers(record),
            partition=partition,
        )
        .get(timeout=30)
        .offset
    )


@pytest.mark.slow
def test_an_alias_moves_and_three_subscribers_follow_it(
    settings: Settings, producer: Any, keypair: Any, fleet: list[CheckpointSubscriber]
) -> None:
    topic = settings.topic_models
    for v in (1, 2, 3):
        publish(producer, topic, keypair[0], v)
    newest = CheckpointSubscriber(settings, [keypair[1]], model=MODEL)  # no alias: the newest, as before
    newest.start(wait_s=30)
    try:
        # Nothing set yet: a node following an alias serves nothing and says why.
        wait_for(lambda: all(s.problem and "alias 'champion'" in s.problem for s in fleet), what="the alias unset")
        assert served(fleet) == [None, None, None] and newest.version == 3
        catalog.set_alias(settings, keypair[0], MODEL, "champion", 2)
        wait_for(lambda: served(fleet) == [2, 2, 2], what="champion v2 everywhere", detail=lambda: served(fleet))
        assert fleet[0].current.predict_one(ROW) == 8.0  # v2's own weights
        # A newer version is followed (loaded) but not served under the alias.
        publish(producer, topic, keypair[0], 4)
        wait_for(lambda: newest.version == 4, what="v4 on the node without alias")
        wait_for(lambda: all(s.status()["followed_version"] == 4 for s in fleet), what="v4 followed by the fleet")
        assert served(fleet) == [2, 2, 2]
        catalog.set_alias(settings, keypair[0], MODEL, "champion", 4)
        wait_for(lambda: served(fleet) == [4, 4, 4], what="champion v4 everywhere", detail=lambda: served(fleet))
        status = fleet[1].status()
        assert status["alias"] == "champion" and status["serving_by"] == "alias champion v4"
        assert status["registry"]["seq"] == 2 and status["registry"]["aliases"] == {"champion": 4}
        assert status["problem"] is None and newest.version == 4
    finally:
        newest.stop()


@pytest.mark.slow
def test_rollback_is_fleet_wide_in_one_command(
    settings: Settings,
    producer: Any,
    keypair: Any,
    key_files: tuple[Path, Path],
    fleet: list[CheckpointSubscriber],
) -> None:
    # No capsys here: cli.main() configures logging onto the output it finds, which must outlive the test.
    topic = settings.topic_models
    for v in (1, 2, 3):
        publish(producer, topic, keypair[0], v)
    metrics = Metrics()
    watched = CheckpointSubscriber(settings, [keypair[1]], model=MODEL, alias="champion", metrics=metrics)
    node = ServingNode(watched, metrics=metrics).start()
    watched.start(wait_s=None)
    everyone = [*fleet, watched]
    try:
        assert models_cli(settings, key_files, "alias", MODEL, "champion", "1") == 0
        assert models_cli(settings, key_files, "alias", MODEL, "champion", "3") == 0
        wait_for(lambda: served(everyone) == [3, 3, 3, 3], what="champion v3")
        # The one command: the champion goes back to the version it named before, on every node.
        assert models_cli(settings, key_files, "rollback", MODEL) == 0
        wait_for(lambda: served(everyone) == [1, 1, 1, 1], what="champion back to v1 everywhere")
        health = call(node.url, "GET", "/health")[1]
        assert health["version"] == 1 and health["alias"] == "champion"
        info = call(node.url, "GET", "/model")[1]
        assert info["alias"] == "champion" and info["version"] == 1 and info["serving_by"] == "alias champion v1"
        text = call(node.url, "GET", "/metrics")[1]
        assert 'stream_learner_serving_alias_version{alias="champion"} 1.0' in text
        assert "stream_learner_serving_registry_seq 3.0" in text
        # Nothing earlier was recorded: a second rollback has nowhere to go (never forth to v3).
        with pytest.raises(CheckpointError, match="no earlier version"):
            catalog.rollback(settings, keypair[0], MODEL)
        assert models_cli(settings, key_files, "rollback", MODEL) == 1
        # Rolling back to a named version.
        assert models_cli(settings, key_files, "rollback", MODEL, "--to", "2") == 0
        wait_for(lambda: served(everyone) == [2, 2, 2, 2], what="champion v2 everywhere")
        # A version that is not on the topic is refused before anything is written.
        with pytest.raises(CheckpointNotFoundError, match="no manifest"):
            catalog.set_alias(settings, keypair[0], MODEL, "champion", 9)
        assert models_cli(settings, key_files, "alias", MODEL, "champion", "9") == 1
        # What `models show` and `models list` print.
        found = catalog.catalog(settings, [keypair[1]])
        shown = catalog.show_model(found, MODEL)
        assert shown["aliases"] == {"champion": 2} and [v["version"] for v in shown["versions"]] == [1, 2, 3]
        assert [v["aliases"] for v in shown["versions"]] == [[], ["champion"], []]
        assert [c["change"] for c in shown["registry_changes"]] == [
            "alias champion unset -> v1",
            "alias champion v1 -> v3",
            "rollback champion v3 -> v1",
            "rollback champion v1 -> v2",
        ]
        assert catalog.list_models(found)["models"] == [
            {
                "model": MODEL,
                "versions": 3,
                "oldest": 1,
                "newest": 3,
                "aliases": {"champion": 2},
                "pin": None,
                "registry_seq": 4,
                "variants": {},
            }
        ]
        assert models_cli(settings, key_files, "show", MODEL) == 0 and models_cli(settings, key_files, "list") == 0
    finally:
        node.stop()
        watched.stop()


@pytest.mark.slow
def test_pin_and_unpin_are_fleet_wide(
    settings: Settings, producer: Any, keypair: Any, key_files: tuple[Path, Path], fleet: list[CheckpointSubscriber]
) -> None:
    topic = settings.topic_models
    for v in (1, 2, 3):
        publish(producer, topic, keypair[0], v)
    newest = CheckpointSubscriber(settings, [keypair[1]], model=MODEL)
    newest.start(wait_s=30)
    try:
        catalog.set_alias(settings, keypair[0], MODEL, "champion", 3)
        wait_for(lambda: served(fleet) == [3, 3, 3], what="champion v3")
        assert models_cli(settings, key_files, "pin", MODEL, "2") == 0
        everyone = [*fleet, newest]
        wait_for(lambda: served(everyone) == [2, 2, 2, 2], what="the pin everywhere", detail=lambda: served(everyone))
        assert newest.status()["serving_by"] == "registry pin v2"
        # Pinned: a new version, and a new champion, change nothing served.
        publish(producer, topic, keypair[0], 4)
        catalog.set_alias(settings, keypair[0], MODEL, "champion", 4)
        wait_for(lambda: all(s.status()["registry"]["aliases"] == {"champion": 4} for s in everyone), what="seq 3")
        wait_for(lambda: newest.status()["followed_version"] == 4, what="v4 followed")
        assert served(everyone) == [2, 2, 2, 2]
        assert models_cli(settings, key_files, "unpin", MODEL) == 0
        wait_for(lambda: served(everyone) == [4, 4, 4, 4], what="unpinned", detail=lambda: served(everyone))
        assert models_cli(settings, key_files, "unpin", MODEL) == 1  # nothing pinned: nothing written
    finally:
        newest.stop()


@pytest.mark.slow
def test_a_forged_or_unsigned_registry_record_is_refused_counted_and_changes_nothing(
    settings: Settings, producer: Any, keypair: Any, other_keypair: Any
) -> None:
    topic = settings.topic_models
    for v in (1, 2, 3):
        publish(producer, topic, keypair[0], v)
    catalog.set_alias(settings, keypair[0], MODEL, "champion", 3)
    metrics = Metrics()
    sub = CheckpointSubscriber(settings, [keypair[1]], model=MODEL, alias="champion", metrics=metrics)
    try:
        step_until(sub, lambda: sub.version == 3, what="champion v3")
        forged = RegistryRecord(model=MODEL, seq=99, log_end=0, created_at=now_ms(), aliases={"champion": 1}, pin=1)
        raw_registry(producer, topic, sign_registry(forged, other_keypair[0]))  # an untrusted key
        raw_registry(producer, topic, forged)  # unsigned
        good = sign_registry(msgspec.structs.replace(forged, seq=2, log_end=0), keypair[0])
        tampered = msgspec.structs.replace(good, aliases={"champion": 2})  # signed bytes changed after signing
        raw_registry(producer, topic, tampered)
        producer.send(topic, key=MODEL.encode(), value=b"{", headers=registry_headers(forged), partition=0).get(30)
        step_until(sub, lambda: failures(metrics, "signature") == 3, what="three refused signatures")
        step_until(sub, lambda: failures(metrics, "invalid") == 1, what="one invalid record")
        assert sub.version == 3 and sub.status()["registry"]["seq"] == 1
        # A node starting now passes over them all and serves what the genuine record says.
        fresh = msgspec.structs.replace(settings, serving_state_dir="fresh")
        metrics2 = Metrics()
        restarted = CheckpointSubscriber(fresh, [keypair[1]], model=MODEL, alias="champion", metrics=metrics2)
        try:
            step_until(restarted, lambda: restarted.version == 3, what="champion v3 at start")
            assert failures(metrics2, "signature") == 3 and failures(metrics2, "invalid") == 1
            assert restarted.status()["registry"]["seq"] == 1
        finally:
            restarted.stop()
    finally:
        sub.stop()


@pytest.mark.slow
def test_a_replayed_old_registry_record_does_not_move_the_alias_back(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    topic = settings.topic_models
    for v in (1, 2, 3):
        publish(producer, topic, keypair[0], v)
    first = catalog.set_alias(settings, keypair[0], MODEL, "champion", 1)
    catalog.set_alias(settings, keypair[0], MODEL, "champion", 3)
    sub = CheckpointSubscriber(settings, [keypair[1]], model=MODEL, alias="champion")
    try:
        step_until(sub, lambda: sub.version == 3, what="champion v3")
        # The old record, validly signed, replayed onto the end of the topic, twice, with versions after.
        raw_registry(producer, topic, first.record)
        publish(producer, topic, keypair[0], 4)
        raw_registry(producer, topic, first.record)
        step_until(sub, lambda: sub.status()["registry"]["stale_records"] == 2, what="two replays ignored")
        assert sub.version == 3 and sub.status()["registry"]["seq"] == 2
    finally:
        sub.stop()
    # A node that never ran, started after the replays: the replay's writer read an end far back, so
    # confirming it reads past the newer record, which wins.
    fresh = msgspec.structs.replace(settings, serving_state_dir="fresh")
    new = CheckpointSubscriber(fresh, [keypair[1]], model=MODEL, alias="champion")
    try:
        step_until(new, lambda: new.version == 3, what="champion v3 on a fresh node")
        assert new.status()["registry"]["seq"] == 2
    finally:
        new.stop()
    # A restarted node whose search budget cannot reach the genuine record: its remembered record
    # (seq 2) refuses the replay as a downgrade.
    small = msgspec.structs.replace(settings, serving_scan_max_records=2)
    metrics = Metrics()
    again = CheckpointSubscriber(small, [keypair[1]], model=MODEL, alias="champion", metrics=metrics)
    try:
        step_until(again, lambda: again.version == 3, what="champion v3 after a restart")
        assert again.status()["registry"]["seq"] == 2 and failures(metrics, "downgrade") == 1
    finally:
        again.stop()


def test_two_writers_at_once_the_first_wins_and_the_second_is_told(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    topic = settings.topic_models
    for v in (1, 2):
        publish(producer, topic, keypair[0], v)
    consumer = make_reader_consumer(settings)
    try:

        def racing(state: RegistryRecord | None) -> tuple[dict[str, int], int | None, dict[str, list[int]], str]:
            # Another operator writes after this one read the state, before it writes.
            catalog.set_alias(settings, keypair[0], MODEL, "champion", 1)
            return {"champion": 2}, None, {}, "alias champion -> v2"

        with pytest.raises(RegistryConflictError, match="came first"):
            write_registry(consumer, producer, topic, keypair[0], MODEL, racing)
    finally:
        consumer.close()
    sub = CheckpointSubscriber(settings, [keypair[1]], model=MODEL, alias="champion")
    try:
        step_until(sub, lambda: sub.version == 1, what="the first writer's champion")
        assert sub.status()["registry"]["seq"] == 1
    finally:
        sub.stop()


@pytest.mark.slow
def test_a_wrong_model_name_says_which_models_the_topic_holds(settings: Settings, producer: Any, keypair: Any) -> None:
    topic = settings.topic_models
    publish(producer, topic, keypair[0], 1, model="churn")
    publish(producer, topic, keypair[0], 1, model="fraud")
    sub = CheckpointSubscriber(settings, [keypair[1]], model="chrun")
    node = ServingNode(sub).start()
    sub.start(wait_s=None)
    try:
        wait_for(lambda: sub.problem is not None, what="the problem named")
        code, body = call(node.url, "GET", "/health")
        assert code == 503
        assert body["detail"].startswith("no checkpoint of model 'chrun' on topic")
        assert "'churn', 'fraud'" in body["detail"]
        assert call(node.url, "GET", "/model")[1]["problem"] == body["detail"]
        # It keeps following: the model may appear later.
        publish(producer, topic, keypair[0], 1, model="chrun")
        wait_for(lambda: sub.version == 1, what="the model, once published")
        code, body = call(node.url, "GET", "/health")
        assert code == 200 and "detail" not in body
    finally:
        node.stop()
        sub.stop()


@pytest.mark.slow
def test_a_restarted_node_reads_back_only_what_was_appended_since_a_fresh_one_to_the_record(
    settings: Settings, producer: Any, keypair: Any
) -> None:
    topic = settings.topic_models
    for v in range(1, 31):
        signed = publish(producer, topic, keypair[0], v)
    per_version = signed.weights.chunks + 1
    catalog.set_alias(settings, keypair[0], MODEL, "champion", 5)
    for v in range(31, 41):
        publish(producer, topic, keypair[0], v)
    first = CheckpointSubscriber(settings, [keypair[1]], model=MODEL, alias="champion")
    try:
        step_until(first, lambda: first.version == 5, what="champion v5")
        # Without state: back to the registry record (and its writer's end), past ten versions.
        assert first.status()["registry"]["search"]["records"] >= 10 * per_version
    finally:
        first.stop()
    for v in (41, 42):
        publish(producer, topic, keypair[0], v)
    again = CheckpointSubscriber(settings, [keypair[1]], model=MODEL, alias="champion")
    try:
        step_until(again, lambda: again.version == 5, what="champion v5 after a restart")
        # With state: only the two versions published since the first node started.
        search = again.status()["registry"]["search"]
        assert search["done"] and not search["exhausted"]
        assert search["records"] <= 2 * per_version + 2, search
    finally:
        again.stop()


@pytest.mark.slow
def test_the_serve_command_follows_an_alias(
    settings: Settings, producer: Any, keypair: Any, key_files: tuple[Path, Path]
) -> None:
    import signal
    import subprocess
    import sys

    from stream_learner.config import settings_env
    from stream_learner.local import free_port

    topic = settings.topic_models
    for v in (1, 2, 3):
        publish(producer, topic, keypair[0], v)
    catalog.set_alias(settings, keypair[0], MODEL, "champion", 2)
    port = free_port()
    env = settings_env(
        msgspec.structs.replace(
            settings, serving_model=MODEL, serving_public_keys=[str(key_files[1])], serving_port=port
        )
    )
    # This checkout's code, whatever the environment has installed (the test runs in its own directory).
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_learner.cli", "serve", "--serving-alias", "champion"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def health() -> dict[str, Any]:
        try:
            body: dict[str, Any] = call(url, "GET", "/health")[1]
            return body
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            return {}

    try:
        wait_for(lambda: health().get("version") == 2, timeout_s=60, what="the serve process at champion v2")
        assert health()["alias"] == "champion"
        assert call(url, "POST", "/predict", {"features": ROW})[1]["prediction"] == 8.0
        catalog.rollback(settings, keypair[0], MODEL, to=1)
        wait_for(lambda: health().get("version") == 1, timeout_s=30, what="the serve process rolled back to v1")
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode in (0, 130), out[-2000:]
