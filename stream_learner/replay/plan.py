"""What a replay is: its plan (range, source, lineage, output) and the fingerprint of its result."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Literal

import msgspec

from ..config import Settings
from .errors import ReplayError

Source_ = Literal["events", "examples"]

#: Settings that shape a replay's result: a resumed replay refuses to continue if one changed.
_RESULT_SETTINGS_PREFIXES = (
    "trainer_",
    "joiner_window_ms",
    "joiner_allowed_lateness_ms",
    "joiner_late_retention_ms",
    "joiner_orphan_retention_ms",
    "joiner_max_expire_per_poll",
    "replay_join_step_events",
    "max_event_bytes",
)
_NOT_RESULT = {
    "trainer_state_store",
    "trainer_state_dir",
    "trainer_signing_key",
    "trainer_group_id",
    "trainer_checkpoint_every_s",
    "trainer_max_wait_ms",
}


_SAFE_NAME = re.compile(r"[A-Za-z0-9._@-]{1,200}")


@dataclass(frozen=True)
class ReplayPlan:
    """What to replay and where the new lineage goes.

    ``start``/``end`` are bound texts (:func:`~.ranges.parse_bound`).
    ``lineage`` defaults to ``<trainer_model>@replay-<replay_id>``; the live
    name (``trainer_model``) is refused unless ``overwrite_live``.
    ``output_dir`` writes checkpoints as files instead of the model topic.
    ``close_windows``: at the end of the range, close every join window
    still open (their predictions become ``unlabeled`` examples) instead of
    leaving them open as a live joiner would until more events arrive.
    """

    replay_id: str
    source: Source_ = "events"
    start: str = "beginning"
    end: str = "end"
    lineage: str | None = None
    output_dir: str | None = None
    overwrite_live: bool = False
    close_windows: bool = False

    def __post_init__(self) -> None:
        # Both name a directory and a Redis key prefix: no path parts, no glob characters.
        for what, name in (("replay id", self.replay_id), ("lineage", self.lineage)):
            if name is not None and (not _SAFE_NAME.fullmatch(name) or name.strip(".") == ""):
                raise ReplayError(f"{what} {name!r} must be letters, digits and . _ @ - only")

    def lineage_name(self, settings: Settings) -> str:
        """The model name the replay publishes under."""
        return self.lineage or f"{settings.trainer_model}@replay-{self.replay_id}"


def result_fingerprint(settings: Settings, plan: ReplayPlan) -> str:
    """A digest of everything that shapes a replay's result (settings, source, lineage, window closing)."""
    fields = {
        k: v
        for k, v in msgspec.structs.asdict(settings).items()
        if k.startswith(_RESULT_SETTINGS_PREFIXES) and k not in _NOT_RESULT
    }
    fields.update(
        source=plan.source,
        lineage=plan.lineage_name(settings),
        close_windows=plan.close_windows,
        topics=[settings.topic_predictions, settings.topic_labels, settings.topic_examples],
    )
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
