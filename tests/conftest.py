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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_transports: run the test with every kafka_client (see TRANSPORTS)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kafka_client" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_transports"):
        metafunc.parametrize("kafka_client", TRANSPORTS, scope="function")


@pytest.fixture
def kafka_client() -> str:
    """The Kafka client of the ``settings`` fixture: STREAM_LEARNER_TEST_KAFKA_CLIENT, or kafka-python.

    Tests marked ``both_transports`` get each of :data:`TRANSPORTS` instead.
    """
    return os.environ.get("STREAM_LEARNER_TEST_KAFKA_CLIENT", "kafka-python")


@pytest.fixture
def settings(servers: LocalServers, kafka_client: str) -> Settings:
    """Settings pointing at the local servers, with a fresh set of topics for this test."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    fresh = msgspec.structs.replace(
        servers.settings,
        kafka_client=kafka_client,
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
