"""The digest checkpoints are named by (no torch here: the CLI's light verbs import it)."""

from __future__ import annotations

import hashlib


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """The SHA-256 of ``data`` as 64 lowercase hex digits.

    >>> sha256_hex(b"test")
    '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'
    """
    return hashlib.sha256(data).hexdigest()
