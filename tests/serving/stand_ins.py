"""A model source without a broker, for in-process nodes in tests and bench/bench_shadow.py."""

from __future__ import annotations

from typing import Any


class FixedSource:
    """A stand-in subscriber serving one fixed model (``current``): what it serves, nothing else."""

    def __init__(self, current: Any) -> None:
        self.current = current
        self.problem = None

    def status(self) -> dict[str, Any]:
        """A subscriber's status with nothing swapped and nothing failed."""
        return {"swaps": 0, "failures": 0, "failures_by_reason": {}, "last_error": None}

    def start(self, wait_s: float | None = None) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""
