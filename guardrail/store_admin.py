"""Synchronous database access for the command-line tools.

The commands run in their own process next to the daemon. They read with
the standard sqlite3 module (WAL lets them read while the daemon writes) and
write only small rows, waiting for the daemon's lock if needed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .checks import Inspection
from .clock import format_instant, parse_instant
from .errors import DatabaseFileError
from .store_batch import SCHEMA

# Tables that every version of the schema has, so a file without them was not made by guardrail.
GUARDRAIL_TABLES = ("messages", "conversations")


@contextmanager
def connect(path: Path, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """Open the database, or an empty schema in memory for a read-only open of a missing or empty file.

    Raises DatabaseFileError, from the open or from the statements run inside
    the block, when the file is not an SQLite database, is damaged, or is an
    SQLite database without guardrail's tables.
    """
    with file_errors(path):
        connection = _open(path, write=write)
        try:
            yield connection
        finally:
            connection.close()


def _open(path: Path, *, write: bool) -> sqlite3.Connection:
    # SQLite treats an empty file as a new database, which the daemon gives its tables when it starts.
    is_new = not path.exists() or path.stat().st_size == 0
    if is_new and not write:
        connection = sqlite3.connect(":memory:")
        connection.executescript(SCHEMA)
        return connection
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=10, isolation_level=None)
    else:
        # In an SQLite URI, "?" and "#" end the path and "%" starts an escape, so the path is percent-encoded.
        uri = f"file:{quote(str(path.resolve()), safe='/')}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=10)
    try:
        if not is_new:
            # Checked first, because the pragmas and the schema below would write into any SQLite file.
            _check_tables(connection, path)
        if write:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            connection.executescript(SCHEMA)
    except BaseException:
        connection.close()
        raise
    return connection


def _check_tables(connection: sqlite3.Connection, path: Path) -> None:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    missing = [name for name in GUARDRAIL_TABLES if (name,) not in rows]
    if missing:
        raise DatabaseFileError(
            path, f"has no guardrail tables ({', '.join(missing)}); was it created by `guardrail run`?",
        )


@contextmanager
def file_errors(path: Path) -> Iterator[None]:
    """Raise DatabaseFileError in place of an SQLite error that means the file at `path` is not SQLite or is damaged.

    Other SQLite errors, such as a locked database, pass through unchanged.
    """
    try:
        yield
    except sqlite3.DatabaseError as error:
        # sqlite_errorname (Python 3.11+) names SQLite's result code. Errors that the sqlite3 module raises itself lack it.
        name = getattr(error, "sqlite_errorname", "")
        if name == "SQLITE_NOTADB":
            problem = f"is not an SQLite database, or its header is damaged: {error}; restore it from a backup"
            raise DatabaseFileError(path, problem) from error
        if name.startswith("SQLITE_CORRUPT"):
            raise DatabaseFileError(path, f"is damaged: {error}; restore it from a backup") from error
        raise


def verify(path: Path) -> None:
    """Raise DatabaseFileError unless the file at `path` is missing, empty or a readable guardrail database."""
    with connect(path):
        pass


def inspections(path: Path) -> list[Inspection]:
    with connect(path) as connection:
        try:
            rows = connection.execute("SELECT rules_hash, at, inspected_by, note FROM inspections ORDER BY id").fetchall()
        except sqlite3.OperationalError:
            # A database the daemon has not opened since inspections existed.
            return []
    return [Inspection(rules_hash, parse_instant(at), by, note) for rules_hash, at, by, note in rows]


def record_inspection(path: Path, rules_hash: str, at: datetime, inspected_by: str, note: str) -> None:
    with connect(path, write=True) as connection:
        connection.execute(
            "INSERT INTO inspections (rules_hash, at, inspected_by, note) VALUES (?, ?, ?, ?)",
            (rules_hash, format_instant(at), inspected_by, note),
        )


@dataclass(frozen=True)
class StoredMessage:
    row: int
    received_at: datetime
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str
    route: str
    team: str
    disposition: str
    raw: bytes


def last_messages(path: Path, count: int) -> list[StoredMessage]:
    """Return the `count` newest stored messages, oldest first."""
    with connect(path) as connection:
        rows = connection.execute(
            "SELECT id, received_at, mail_from, rcpt_tos, message_id, route, team, disposition, raw"
            " FROM messages ORDER BY id DESC LIMIT ?",
            (count,),
        ).fetchall()
    return [
        StoredMessage(row[0], parse_instant(row[1]), row[2], tuple(json.loads(row[3])), row[4], row[5], row[6], row[7], bytes(row[8]))
        for row in reversed(rows)
    ]


def shadow_disagreements(path: Path, since: datetime) -> list[dict[str, Any]]:
    """Return messages since `since` where a shadow route would have won."""
    with connect(path) as connection:
        rows = connection.execute(
            "SELECT received_at, message_id, route, team, shadow FROM messages"
            " WHERE received_at >= ? AND shadow != '[]' ORDER BY id",
            (format_instant(since),),
        ).fetchall()
    found = []
    for received_at, message_id, route, team, shadow in rows:
        for result in json.loads(shadow):
            if result["would_win"]:
                found.append({
                    "received_at": received_at, "message_id": message_id, "live_route": route, "live_team": team,
                    "shadow_route": result["route"], "shadow_team": result["team"],
                })
    return found


def status_rows(path: Path, now: datetime) -> dict[str, Any]:
    """Return the figures `guardrail status` prints."""
    instant = format_instant(now)
    with connect(path) as connection:
        open_by_team = connection.execute(
            "SELECT team, COUNT(*), SUM(deadline IS NOT NULL AND deadline < ?) FROM conversations"
            " WHERE state = 'open' GROUP BY team ORDER BY team",
            (instant,),
        ).fetchall()
        next_deadlines = connection.execute(
            "SELECT reference, team, deadline, subject FROM conversations"
            " WHERE state = 'open' AND deadline IS NOT NULL AND deadline >= ? ORDER BY deadline LIMIT 10",
            (instant,),
        ).fetchall()
        overdue = connection.execute(
            "SELECT reference, team, deadline, escalation_level, subject FROM conversations"
            " WHERE state = 'open' AND deadline IS NOT NULL AND deadline < ? ORDER BY deadline LIMIT 20",
            (instant,),
        ).fetchall()
        routes = connection.execute(
            "SELECT route, COUNT(*), SUM(state = 'answered') FROM conversations GROUP BY route ORDER BY route"
        ).fetchall()
        response_times = connection.execute(
            "SELECT route, opened_at, answered_at FROM conversations WHERE answered_at IS NOT NULL"
        ).fetchall()
    return {
        "open_by_team": open_by_team,
        "next_deadlines": next_deadlines,
        "overdue": overdue,
        "routes": routes,
        "response_times": [(route, parse_instant(opened), parse_instant(answered)) for route, opened, answered in response_times],
    }
