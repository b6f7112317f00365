"""What a serving node remembers across restarts: the highest good version it served.

A node must never serve less than the highest good version it knows, or an
old, validly signed manifest replayed onto the topic would be served by
every node that restarts. :class:`FloorStore` keeps that version in one
small JSON file per topic and model under ``serving_state_dir``, written
atomically (:func:`~stream_learner.util.files.atomic_write`) each time a
higher version is swapped in; a start reads it back as the *floor*: a
start version below it is refused (counted as ``downgrade``).

Delete the file to let a node serve a lower version again (a model topic
recreated from scratch); :meth:`CheckpointSubscriber.pin
<stream_learner.serving.CheckpointSubscriber.pin>` serves an older version
without touching it.

>>> import tempfile
>>> store = FloorStore(tempfile.mkdtemp(), "sl.models", "churn@replay-1")
>>> store.load(), store.save(7), store.save(3), store.load()
(0, True, False, 7)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import structlog

from ..util.files import atomic_write

log = structlog.get_logger(__name__)

__all__ = ["FloorStore", "RegistryStore"]


class FloorStore:
    """The highest good version of ``model`` on ``topic`` served by this node, in ``directory``
    (``None``: kept in memory only)."""

    def __init__(self, directory: str | Path | None, topic: str, model: str) -> None:
        self.path: Path | None = None
        if directory is not None:
            # Model names are free text: a readable part plus a digest keeps names unique and safe.
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{topic}.{model}")[:100]
            digest = hashlib.sha256(f"{topic}\0{model}".encode()).hexdigest()[:12]
            self.path = Path(directory) / f"{safe}.{digest}.json"
        self.topic, self.model = topic, model
        self._version = 0

    def load(self) -> int:
        """The floor: the version saved (0 if none). An unreadable file is logged and read as 0."""
        if self.path is None or not self.path.exists():
            return self._version
        try:
            data = json.loads(self.path.read_bytes())
            version = int(data["highest_version"])
            if version < 0:
                raise ValueError(f"negative version {version}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("serving_state_unreadable", path=str(self.path), error=str(exc))
            return self._version
        self._version = max(self._version, version)
        return self._version

    def save(self, version: int) -> bool:
        """Remember ``version`` if it is higher than the one saved; True if it was."""
        if version <= self._version:
            return False
        self._version = version
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(
                    self.path,
                    json.dumps(
                        {"topic": self.topic, "model": self.model, "highest_version": version, "at": time.time()}
                    ).encode(),
                )
            except OSError as exc:  # a full disk must not stop serving; the floor stays in memory
                log.warning("serving_state_not_saved", path=str(self.path), version=version, error=str(exc))
        return True


class RegistryStore:
    """The registry record of ``model`` on ``topic`` a node applied last, and how far back it had searched.

    One JSON file beside the floor's (``None`` directory: memory only):
    the signed record as it was on the topic (verified again when loaded),
    its offset in partition 0, and ``searched_to``: every record of
    partition 0 before it was read by this node (at start or while
    following), so a restart's registry search stops there.
    """

    def __init__(self, directory: str | Path | None, topic: str, model: str) -> None:
        floor = FloorStore(directory, topic, model)
        self.path = floor.path.with_suffix(".registry.json") if floor.path is not None else None
        self.topic, self.model = topic, model
        self._saved: tuple[bytes | None, int, int] | None = None  # (record JSON, offset, searched_to)

    def load(self) -> tuple[bytes | None, int, int] | None:
        """The record's JSON (``None``: no record was found), its offset and ``searched_to``; ``None`` if
        nothing is kept (or the file is unreadable)."""
        if self.path is None or not self.path.exists():
            return self._saved
        try:
            data = json.loads(self.path.read_bytes())
            record = data["record"]
            saved = (record.encode() if record is not None else None, int(data["offset"]), int(data["searched_to"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("serving_state_unreadable", path=str(self.path), error=str(exc))
            return self._saved
        self._saved = saved
        return saved

    def save(self, record: bytes | None, offset: int, searched_to: int) -> None:
        """Remember the record applied (its JSON as on the topic), where it is, and how far back was read."""
        self._saved = (record, offset, searched_to)
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(
                self.path,
                json.dumps(
                    {
                        "topic": self.topic,
                        "model": self.model,
                        "record": record.decode() if record is not None else None,
                        "offset": offset,
                        "searched_to": searched_to,
                        "at": time.time(),
                    }
                ).encode(),
            )
        except OSError as exc:  # a full disk must not stop serving; kept in memory
            log.warning("serving_state_not_saved", path=str(self.path), error=str(exc))
