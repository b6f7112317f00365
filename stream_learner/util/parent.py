"""A child process that follows its parent: it stops when the parent is gone."""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def watch_parent(stop: Any, grace_s: float = 30.0) -> None:
    """Stop this process when its parent dies (a SIGKILLed parent leaves its children behind otherwise):
    ``stop`` (anything with ``set()``) is set at once, and the process exits ``grace_s`` later if it
    has not ended by then.

    Used by the ranks of a data-parallel trainer (their parent: the launcher) and by the joiner
    process of ``run`` (its parent: the trainer's process).
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        stop.set()
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
