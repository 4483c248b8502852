"""The pid file beside the database, locked for as long as the daemon runs.

The lock, not the file, shows whether a daemon is running. After a crash or
a `kill -9` the file remains, and its process id may belong to another
process by then. `guardrail reload` signals a process only while the lock is
held, and a second daemon on the same database refuses to start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class PidFileBusy(OSError):
    """Error raised when another guardrail has locked the pid file, because it runs on the same database."""


def claim(path: Path) -> int:
    """Lock `path` and empty it; return the open descriptor, which keeps the lock.

    The file stays empty until `publish` writes the process id, so a reader
    finds a pid only once the daemon accepts connections.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise PidFileBusy(f"another guardrail (pid {holder}) runs on this database and has locked {path}; stop it first") from None
    os.ftruncate(fd, 0)
    return fd


def publish(fd: int) -> None:
    """Write our process id into the claimed pid file."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def release(path: Path, fd: int) -> None:
    """Remove the pid file and drop the lock."""
    path.unlink(missing_ok=True)
    os.close(fd)


def running_pid(path: Path) -> int | None:
    """Return the process id of the daemon that has locked `path`, or None when no daemon has."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        return None  # The file is unlocked, so it is left over from a daemon that died.
    finally:
        os.close(fd)
