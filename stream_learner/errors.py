"""The root of every exception stream-learner raises on purpose.

One exception per area, all under :class:`StreamLearnerError`, so a caller can
catch everything of ours with one clause and still tell the areas apart.
"""

from __future__ import annotations


class StreamLearnerError(Exception):
    """Base class of all stream-learner errors."""


class ConfigError(StreamLearnerError):
    """A setting is missing, unknown or invalid; the message names it."""


class MissingTopicError(StreamLearnerError):
    """A topic a role needs does not exist, and creating it was not asked for (``create_topics``)."""


class EventError(StreamLearnerError):
    """An event could not be decoded or encoded.

    ``field`` is a JSON path such as ``$.features.age`` (``$`` for the whole
    message) and ``kind`` a short machine-readable reason, used as the
    dead-letter ``sl-error-kind`` header.
    """

    def __init__(self, kind: str, field: str, reason: str) -> None:
        self.kind = kind
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class LocalServerError(StreamLearnerError):
    """A local development server (Tansu or Valkey) failed to start or answer."""
