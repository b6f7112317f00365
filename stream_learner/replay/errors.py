"""The replay's exceptions."""

from __future__ import annotations

from ..errors import StreamLearnerError


class ReplayError(StreamLearnerError):
    """A replay cannot go on: its inputs, its saved state or its output disagree with what it expects."""
