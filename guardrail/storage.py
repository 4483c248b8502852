"""Free space on the database's file system: a pure decision, and a cached reading of the space.

When the disk is nearly full, intake replies to MAIL with 452 4.3.1 (RFC
3463: mail system full), so the sending server keeps the message and
retries, rather than sending its data only to have the commit fail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

# A message takes room three times over: in the WAL, in the database file
# once the WAL is checkpointed, and in the team's maildir file.
COPIES = 3
# Seconds a reading of the free space is reused. The system call is cheap,
# but every MAIL command would make one.
READ_EVERY = 1.0


def storage_problem(free: int, min_free: int, declared: int = 0) -> str | None:
    """Return why a message of `declared` bytes must wait, with `free` bytes left and `min_free` kept free; None if it fits.

    `declared` is the SIZE parameter of MAIL FROM (RFC 1870), or 0 when the client gave none.
    """
    needed = min_free + COPIES * declared
    if free >= needed:
        return None
    limit = f"{_mib(min_free)} MiB (database.min_free_space)"
    if declared:
        limit += f" plus {COPIES} times the declared size of {_mib(declared)} MiB"
    return f"{_mib(free)} MiB free on the database's file system, less than {limit}"


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f}"


def free_bytes(path: Path) -> int:
    """Return the bytes that an unprivileged process may still write on the file system holding `path`."""
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


class FreeSpace:
    """The free space of the file system holding a folder, read at most once per READ_EVERY seconds."""

    def __init__(self, folder: Path, read: Callable[[Path], int] = free_bytes, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._folder = folder
        self._read = read
        self._monotonic = monotonic
        self._value: int | None = None
        self._read_at: float | None = None

    def bytes(self) -> int | None:
        """Return the free bytes, or None when they cannot be read (the folder is gone, or the call failed)."""
        now = self._monotonic()
        if self._read_at is None or now - self._read_at >= READ_EVERY:
            try:
                self._value = self._read(self._folder)
            except OSError:
                self._value = None
            self._read_at = now
        return self._value
