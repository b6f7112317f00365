"""The JSON Schema files of the wire contract, generated from the typed events.

``schemas/*.json`` are committed and are what non-Python producers read.
They are written from the ``msgspec`` structs in :mod:`stream_learner.events`
(and, for the v1 shapes that v2 widened, :mod:`stream_learner.events_v1`) so
the two cannot silently disagree; the test suite fails if a file is stale,
and old fixtures under ``tests/fixtures/`` keep validating and decoding
(backward compatibility). Regenerate after changing an event::

    python -m stream_learner.schemas write schemas/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from . import events_v1
from .events import (
    CheckpointManifest,
    DriftEvent,
    ExampleBatch,
    ExampleEvent,
    LabelEvent,
    PredictionEvent,
    RegistryRecord,
)

#: Schema name (file stem) -> the struct it describes. A breaking change gets
#: a new version in the name; the old file stays.
SCHEMAS: dict[str, type[msgspec.Struct]] = {
    "prediction.v1": events_v1.PredictionEvent,
    "prediction.v2": PredictionEvent,
    "label.v1": LabelEvent,
    "example.v1": events_v1.ExampleEvent,
    "example.v2": ExampleEvent,
    "example-batch.v1": ExampleBatch,
    "manifest.v1": CheckpointManifest,
    "drift.v1": DriftEvent,
    "registry.v1": RegistryRecord,
}

_BASE_ID = "https://github.com/stream-learner/stream-learner/schemas/"


def schema_document(name: str) -> dict[str, Any]:
    """The JSON Schema 2020-12 document for schema ``name``.

    >>> doc = schema_document("label.v1")
    >>> doc["$schema"], doc["$defs"]["LabelEvent"]["required"]
    ('https://json-schema.org/draft/2020-12/schema', ['event_id', 'request_id', 'event_time', 'label'])
    """
    generated = msgspec.json.schema(SCHEMAS[name])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{_BASE_ID}{name}.json",
        "title": f"stream-learner {name}",
        **generated,
    }


def render(name: str) -> str:
    """The exact text of ``schemas/<name>.json``."""
    return json.dumps(schema_document(name), indent=2, sort_keys=False) + "\n"


def write_all(directory: Path) -> list[Path]:
    """Write every schema file into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SCHEMAS:
        path = directory / f"{name}.json"
        path.write_text(render(name))
        paths.append(path)
    return paths


if __name__ == "__main__":  # pragma: no cover - developer tool
    if len(sys.argv) != 3 or sys.argv[1] != "write":
        sys.exit("usage: python -m stream_learner.schemas write DIR")
    for written in write_all(Path(sys.argv[2])):
        print(written)
