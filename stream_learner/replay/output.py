"""Where a replay's checkpoints go: the model topic, or a directory.

Both write a lineage's versions in order, weights before the signed
manifest, and can tell the newest version they hold (a resumed replay that
crashed between saving its state and publishing republishes that version).

A directory holds, per lineage, ``<lineage>/v00000001.safetensors`` and
``<lineage>/v00000001.manifest.json`` (the signed ``manifest.v1`` JSON,
``weights.chunk_offsets`` empty since nothing is chunked on disk), each
written to a temporary file and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..bus import make_producer
from ..checkpoint.errors import CheckpointNotFoundError
from ..checkpoint.publish import publish_checkpoint, weights_info
from ..checkpoint.reader import make_reader_consumer, read_latest
from ..checkpoint.signing import sign_manifest
from ..config import Settings
from ..events import MANIFEST, CheckpointManifest, encode


class Output(Protocol):
    """A destination for one lineage's checkpoints."""

    def latest_version(self) -> int:
        """The newest version of the lineage it holds (0 for none)."""
        ...

    def publish(self, manifest: CheckpointManifest, weights: bytes) -> CheckpointManifest:
        """Write the weights, then the signed manifest; return the signed manifest."""
        ...

    def close(self) -> None:
        """Release clients."""
        ...


class TopicOutput:
    """Checkpoints on the model topic, exactly as the trainer publishes them."""

    def __init__(self, settings: Settings, lineage: str, private_key: Ed25519PrivateKey) -> None:
        self.settings = settings
        self.lineage = lineage
        self.private_key = private_key
        self.producer = make_producer(settings, max_request_size=settings.trainer_chunk_bytes + 64 * 1024)

    def latest_version(self) -> int:
        consumer = make_reader_consumer(self.settings)
        try:
            return read_latest(consumer, self.settings.topic_models, self.private_key.public_key(),
                               self.lineage).manifest.version
        except CheckpointNotFoundError:
            return 0
        finally:
            consumer.close()

    def publish(self, manifest: CheckpointManifest, weights: bytes) -> CheckpointManifest:
        return publish_checkpoint(self.producer, self.settings.topic_models, manifest, weights, self.private_key,
                                  chunk_bytes=self.settings.trainer_chunk_bytes)

    def close(self) -> None:
        self.producer.close()


_VERSION_FILE = re.compile(r"^v(\d{8,})\.manifest\.json$")


class DirectoryOutput:
    """Checkpoints as files under ``<root>/<lineage>/`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], lineage: str, private_key: Ed25519PrivateKey,
                 chunk_bytes: int) -> None:
        self.path = Path(root) / lineage
        self.path.mkdir(parents=True, exist_ok=True)
        self.private_key = private_key
        self.chunk_bytes = chunk_bytes

    def latest_version(self) -> int:
        versions = [int(m[1]) for f in self.path.iterdir() if (m := _VERSION_FILE.match(f.name))]
        return max(versions, default=0)

    def manifest(self, version: int) -> CheckpointManifest:
        """The signed manifest of ``version`` (not verified here)."""
        return MANIFEST.decode((self.path / f"v{version:08d}.manifest.json").read_bytes())

    def weights_path(self, version: int) -> Path:
        """The safetensors file of ``version``."""
        return self.path / f"v{version:08d}.safetensors"

    def publish(self, manifest: CheckpointManifest, weights: bytes) -> CheckpointManifest:
        info = weights_info(weights, self.chunk_bytes)
        signed = sign_manifest(msgspec.structs.replace(manifest, weights=info, signature=None), self.private_key)
        self._write(self.weights_path(manifest.version), weights)
        self._write(self.path / f"v{manifest.version:08d}.manifest.json", encode(signed))
        return signed

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def close(self) -> None:
        pass
