"""Maildir writing: files written to tmp/, fsynced, then linked into new/.

A maildir file ends its lines with LF, as Postfix's local delivery agent and
Dovecot write them, so mail readers and tools that expect local text files
read it unchanged. SMTP carries CRLF, and intake rejects bare CR and bare LF,
so every CRLF of the data becomes one LF and nothing else changes.

This module has no state and imports nothing heavy, because a child process
runs it as well as the daemon's worker thread (see offload.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import BinaryIO

from .errors import TemporaryDeliveryError

# Names tried for one file, NAME then NAME.1 and on, before the delivery is retried later.
MAX_NAME_VARIANTS = 100


def write_maildirs(files: list[tuple[Path, str, bytes]]) -> list[bool | Exception]:
    """Write each (folder, name, data) into maildir `folder` as new/NAME with LF line endings; return one result per file.

    A result is True when the file was written, False when new/NAME was
    already there with the same content, or the exception that stopped it:
    TemporaryDeliveryError naming the folder for a file system error. Each
    file is written to tmp/, fsynced, then linked into new/, so a reader
    never sees a partial message and a repeated delivery of the same outbox
    row does not create a second copy. A different message under the same
    name (from another guardrail database that delivers to the same folder,
    for instance) is kept, and this one is linked as new/NAME.1, NAME.2 and
    so on. Each new/ folder is fsynced once, after all of its files, and a
    file counts as written only after that.

    Every file is written before the first fsync. On ext4, in its default
    data=ordered mode, the first fsync then commits them all in one journal
    commit, and the others return without waiting for the disk again.
    """
    results: list[bool | Exception] = [False] * len(files)
    written: list[tuple[int, BinaryIO, Path, Path, tuple[bytes, ...]]] = []  # (index, open file, temporary, final, contents)
    ready: set[Path] = set()
    try:
        for index, (folder, name, data) in enumerate(files):
            try:
                if folder not in ready:
                    for sub in ("tmp", "new", "cur"):
                        (folder / sub).mkdir(parents=True, exist_ok=True)
                    ready.add(folder)
                final = folder / "new" / name
                stored = local_line_endings(data)
                # An earlier version wrote CRLF, and a delivery retried after an upgrade must not add a copy.
                contents = (stored, data) if len(stored) != len(data) else (stored,)
                if _has_content(final, contents):
                    continue
                temporary = folder / "tmp" / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
                written.append((index, _write_unsynced(temporary, stored), temporary, final, contents))
            except Exception as error:  # noqa: BLE001 - one bad file must not fail the others
                results[index] = _file_error(folder, error)
        for index, handle, temporary, final, contents in written:
            try:
                os.fsync(handle.fileno())
                handle.close()
                results[index] = _link_unique(temporary, final, contents)
            except Exception as error:  # noqa: BLE001
                results[index] = _file_error(files[index][0], error)
    finally:
        for _, handle, temporary, _, _ in written:
            handle.close()
            temporary.unlink(missing_ok=True)
    for folder in ready:
        try:
            directory = os.open(folder / "new", os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as error:
            failure = TemporaryDeliveryError(f"fsync of maildir folder {folder / 'new'} failed: {error}")
            for index, (file_folder, _, _) in enumerate(files):
                if file_folder == folder and results[index] is True:
                    results[index] = failure
    return results


def local_line_endings(data: bytes) -> bytes:
    """Return `data` with each CRLF replaced by LF, as a maildir file stores it."""
    return data.replace(b"\r\n", b"\n")


def _link_unique(temporary: Path, final: Path, contents: tuple[bytes, ...]) -> bool:
    """Link `temporary` as `final`, or as the first free NAME.N when another message has that name.

    Return False without linking when one of those names already contains one of `contents`.
    """
    for number in range(MAX_NAME_VARIANTS):
        target = final if number == 0 else final.with_name(f"{final.name}.{number}")
        try:
            os.link(temporary, target)
        except FileExistsError:
            if _has_content(target, contents):
                return False
            continue
        return True
    raise FileExistsError(f"{final} and {MAX_NAME_VARIANTS - 1} variants of its name contain other messages")


def _has_content(path: Path, contents: tuple[bytes, ...]) -> bool:
    """Return True when the file at `path` exists and contains exactly one of `contents`."""
    try:
        size = path.stat().st_size
        if all(size != len(content) for content in contents):
            return False
        stored = path.read_bytes()
    except FileNotFoundError:
        return False
    return stored in contents


def _write_unsynced(temporary: Path, data: bytes) -> BinaryIO:
    """Write `data` to a new file and return it still open for a later fsync. Remove the file if writing fails."""
    handle = open(temporary, "wb")  # noqa: SIM115 - the caller closes it after the fsync
    try:
        handle.write(data)
        handle.flush()
    except BaseException:
        handle.close()
        temporary.unlink(missing_ok=True)
        raise
    return handle


def _file_error(folder: Path, error: Exception) -> Exception:
    if isinstance(error, OSError):
        # Ops can fix a folder, so the row waits for a retry.
        return TemporaryDeliveryError(f"writing to maildir {folder} failed: {error}")
    return error


def unwritable_part(folder: Path) -> Path | None:
    """Return the part of maildir `folder` that this process may not write, or None when a delivery could write it.

    That is tmp/ or new/ when they exist, else the folder itself when it
    exists, else the nearest folder above it, in which the first delivery
    creates it. Without effective ids (not on Linux) the real ids decide.
    """
    if folder.is_dir():
        parts = [part for part in (folder / "tmp", folder / "new") if part.exists()] or [folder]
    else:
        existing = folder.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        parts = [existing]
    effective = os.access in os.supports_effective_ids
    return next((part for part in parts if not os.access(part, os.W_OK | os.X_OK, effective_ids=effective)), None)
