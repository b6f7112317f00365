"""Atomic, durable file replacement.

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = pathlib.Path(tmp) / "state.bin"
...     atomic_write(path, b"one")
...     atomic_write(path, b"two")
...     path.read_bytes(), sorted(p.name for p in pathlib.Path(tmp).iterdir())
(b'two', ['state.bin'])
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

#: Temporary files are named ``<prefix>*<suffix>`` in the target's directory.
TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".part"


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader sees the old file or the new one, never a mix.

    The data goes to a temporary file in the same directory, is fsynced, is
    renamed over ``path`` (``os.replace``, atomic on POSIX), and the directory
    is fsynced: the rename itself is durable only once the directory entry is.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_leftovers(directory: str | os.PathLike[str]) -> None:
    """Delete temporary files a writer killed mid-write left in ``directory`` (garbage by then)."""
    for leftover in Path(directory).glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
