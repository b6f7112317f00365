"""Test session: one real Tansu broker and one real Valkey server, started here.

Each test that needs topics gets its own fresh, uniquely named set through the
``settings`` fixture, so tests never see each other's records.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stream_learner.bus import ensure_topics
from stream_learner.checkpoint.signing import generate_keypair, load_private_key, load_public_key
from stream_learner.config import Settings
from stream_learner.local import LocalServers


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServers]:
    """The session's real local servers."""
    with LocalServers(Settings(partitions_input=3), workdir=tmp_path_factory.mktemp("servers")) as srv:
        yield srv


#: The Kafka clients a test marked ``both_transports`` runs with (each once).
TRANSPORTS = ("kafka-python", "confluent")
#: The examples_format values a test marked ``both_formats`` runs with (each once).
FORMATS = ("json", "batch")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_transports: run the test with every kafka_client (see TRANSPORTS)")
    config.addinivalue_line(
        "markers",
        "both_formats: run the test with every examples_format (see FORMATS); with both_transports too, "
        "the batch format runs on kafka-python only (the format and the client are independent layers)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    transports = "kafka_client" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_transports")
    formats = "examples_format" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_formats")
    if transports and formats:
        # Every client with the json format, and the batch format once: three runs, not four.
        pairs = [(client, FORMATS[0]) for client in TRANSPORTS] + [(TRANSPORTS[0], f) for f in FORMATS[1:]]
        metafunc.parametrize(("kafka_client", "examples_format"), pairs, scope="function")
    elif transports:
        metafunc.parametrize("kafka_client", TRANSPORTS, scope="function")
    elif formats:
        metafunc.parametrize("examples_format", FORMATS, scope="function")


@pytest.fixture
def kafka_client() -> str:
    """The Kafka client of the ``settings`` fixture: STREAM_LEARNER_TEST_KAFKA_CLIENT, or kafka-python.

    Tests marked ``both_transports`` get each of :data:`TRANSPORTS` instead.
    """
    return os.environ.get("STREAM_LEARNER_TEST_KAFKA_CLIENT", "kafka-python")


@pytest.fixture
def examples_format() -> str:
    """The examples_format of the ``settings`` fixture: STREAM_LEARNER_TEST_EXAMPLES_FORMAT, or json.

    Tests marked ``both_formats`` get each of :data:`FORMATS` instead. The joiner writes in it, and the
    tests' own example producers (tests/learn/test_trainer.py ``produce_examples``) too.
    """
    return os.environ.get("STREAM_LEARNER_TEST_EXAMPLES_FORMAT", "json")


@pytest.fixture
def settings(servers: LocalServers, kafka_client: str, examples_format: str) -> Settings:
    """Settings pointing at the local servers, with a fresh set of topics for this test."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    fresh = msgspec.structs.replace(
        servers.settings,
        kafka_client=kafka_client,
        examples_format=examples_format,
        **{f"topic_{role}": f"{prefix}.{role}" for role in servers.settings.topics},
    )
    ensure_topics(fresh)
    return fresh


@pytest.fixture(scope="session")
def keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """The trainer's key pair."""
    private_pem, public_pem = generate_keypair()
    return load_private_key(private_pem), load_public_key(public_pem)


@pytest.fixture(scope="session")
def other_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A key pair nobody trusts."""
    private_pem, public_pem = generate_keypair()
    return load_private_key(private_pem), load_public_key(public_pem)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh key pair as PEM files: (private ``k.pem``, public ``k.pub.pem``)."""
    private_pem, public_pem = generate_keypair()
    (tmp_path / "k.pem").write_bytes(private_pem)
    (tmp_path / "k.pub.pem").write_bytes(public_pem)
    return tmp_path / "k.pem", tmp_path / "k.pub.pem"
