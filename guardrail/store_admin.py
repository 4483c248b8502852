"""Synchronous database access for the command-line tools.

The commands run in their own process next to the daemon. They read with
the standard sqlite3 module (WAL lets them read while the daemon writes) and
write only small rows, waiting for the daemon's lock if needed.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import outbox
from .checks import Inspection
from .clock import format_instant, parse_instant
from .errors import DatabaseFileError, DatabaseLockedError, StorageError
from .store_batch import DAEMON_RULES, SCHEMA, alarms_query

# Tables that every version of the schema has, so a file without them was not made by guardrail.
GUARDRAIL_TABLES = ("messages", "conversations")

# The largest SQLite INTEGER, which bounds row ids and LIMIT values.
MAX_INTEGER = 2**63 - 1

# How long a command waits for another process's lock when the caller does not pass [database] busy_timeout.
BUSY_TIMEOUT = timedelta(seconds=5)


@contextmanager
def connect(
    path: Path, *, write: bool = False, busy_timeout: timedelta = BUSY_TIMEOUT, require_tables: bool = True,
) -> Iterator[sqlite3.Connection]:
    """Open the database, or an empty schema in memory for a read-only open of a missing or empty file.

    Raises DatabaseFileError, from the open or from the statements run inside
    the block, when the file is not an SQLite database, is damaged, contains
    another application's tables, or lacks guardrail's tables while
    `require_tables` is true. Raises DatabaseLockedError when another process
    holds a lock for longer than `busy_timeout`.
    """
    with file_errors(path):
        connection = _open(path, write=write, busy_timeout=busy_timeout, require_tables=require_tables)
        try:
            yield connection
        finally:
            connection.close()


def _open(path: Path, *, write: bool, busy_timeout: timedelta, require_tables: bool) -> sqlite3.Connection:
    # SQLite treats an empty file as a new database, which the daemon gives its tables when it starts.
    is_new = not path.exists() or path.stat().st_size == 0
    if is_new and not write:
        connection = sqlite3.connect(":memory:")
        connection.executescript(SCHEMA)
        return connection
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=busy_timeout.total_seconds(), isolation_level=None)
    else:
        # In an SQLite URI, "?" and "#" end the path and "%" starts an escape, so the path is percent-encoded.
        uri = f"file:{quote(str(path.resolve()), safe='/')}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=busy_timeout.total_seconds())
    try:
        if not is_new:
            # Checked first, because the pragmas and the schema below would write into any SQLite file.
            _check_tables(connection, path, require_tables=require_tables)
        if write:
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            connection.executescript(SCHEMA)
    except BaseException:
        connection.close()
        raise
    return connection


def _check_tables(connection: sqlite3.Connection, path: Path, *, require_tables: bool) -> None:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    # SQLite creates tables named sqlite_* itself, such as sqlite_sequence for AUTOINCREMENT.
    names = {name for (name,) in rows if not name.startswith("sqlite_")}
    missing = [name for name in GUARDRAIL_TABLES if name not in names]
    # A table that guardrail never creates, or one of guardrail's names with
    # columns guardrail never gives it, marks another application's file.
    # Without either, guardrail's schema is only unfinished.
    schema = _schema_columns()
    foreign = sorted(
        name for name in names
        if name not in schema or not _columns(connection, name) <= schema[name]
    )
    if missing and foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DatabaseFileError(
            path,
            f"contains another application's tables ({listed}), not guardrail's;"
            " set [database] path to guardrail's database, or to a path where no file exists yet",
        )
    if missing and require_tables:
        raise DatabaseFileError(
            path, f"has no guardrail tables ({', '.join(missing)}); was it created by `guardrail run`?",
        )


@cache
def _schema_columns() -> dict[str, frozenset[str]]:
    """Return the tables that guardrail's schema creates, each with its column names."""
    with closing(sqlite3.connect(":memory:")) as connection:
        connection.executescript(SCHEMA)
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name: _columns(connection, name) for (name,) in rows if not name.startswith("sqlite_")}


def _columns(connection: sqlite3.Connection, table: str) -> frozenset[str]:
    quoted = table.replace('"', '""')
    return frozenset(row[1] for row in connection.execute(f'PRAGMA table_info("{quoted}")'))


@contextmanager
def file_errors(path: Path) -> Iterator[None]:
    """Raise DatabaseFileError in place of an SQLite error that means the file at `path` is not SQLite, is damaged, is locked or cannot be opened.

    Other SQLite errors, such as a disk I/O error, pass through unchanged.
    """
    try:
        yield
    except StorageError as error:
        # The store's writer reports a failed write as a StorageError caused by the SQLite error.
        if isinstance(error.__cause__, sqlite3.DatabaseError):
            with file_errors(path):
                raise error.__cause__ from None
        raise
    except sqlite3.DatabaseError as error:
        # sqlite_errorname (Python 3.11+) names SQLite's result code. Errors that the sqlite3 module raises itself lack it.
        name = getattr(error, "sqlite_errorname", "")
        if name == "SQLITE_NOTADB":
            problem = f"is not an SQLite database, or its header is damaged: {error}; restore it from a backup"
            raise DatabaseFileError(path, problem) from error
        if name.startswith("SQLITE_CORRUPT"):
            raise DatabaseFileError(path, f"is damaged: {error}; restore it from a backup") from error
        if name == "SQLITE_CANTOPEN":
            # SQLite also opens the -wal and -shm files beside the database, so a read-only folder fails here.
            problem = (
                f"cannot be opened: {error}; check that this user may read and write it and its folder,"
                f" where SQLite creates {path.name}-wal and {path.name}-shm"
            )
            raise DatabaseFileError(path, problem) from error
        if name.startswith("SQLITE_READONLY"):
            # A file this user may not write, or, for SQLITE_READONLY_DIRECTORY, a folder where SQLite cannot create the -shm file.
            problem = (
                f"cannot be written: {error} ({name}); check that this user may read and write it and its folder,"
                f" where SQLite creates {path.name}-wal and {path.name}-shm"
            )
            raise DatabaseFileError(path, problem) from error
        if name.startswith("SQLITE_BUSY"):
            # SQLite returns SQLITE_BUSY once the busy timeout has run out.
            problem = "is locked by another process; try again, or stop the process that holds the lock"
            raise DatabaseLockedError(path, problem) from error
        raise


def verify(path: Path, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> None:
    """Raise DatabaseFileError unless the file at `path` is missing, empty or a readable guardrail database."""
    with connect(path, busy_timeout=busy_timeout):
        pass


def verify_writable(path: Path, beside: tuple[Path, ...] = ()) -> None:
    """Raise DatabaseFileError unless this process can create or write the database at `path` and the files beside it.

    The daemon writes the database, SQLite's -wal and -shm files and `beside`
    (its pid file). Without this check a folder that cannot be created stops
    the start with a bare OSError, and a file that this user may only read
    lets the daemon start and then fail every commit with `451`.
    """
    folder = path.parent
    fix = (
        f"give the daemon's user ({_user()}) write access, or set [database] path to a folder that user may write"
        " (a relative path starts at the config file's folder)"
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatabaseFileError(path, f"cannot be created: its folder {folder} cannot be created: {error.strerror}; {fix}") from None
    try:
        # The file is gone as soon as it is closed, so the probe leaves nothing behind.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        problem = (
            f"cannot be written: no file can be created in its folder {folder}: {error.strerror};"
            f" SQLite creates {path.name}-wal and {path.name}-shm there; {fix}"
        )
        raise DatabaseFileError(path, problem) from None
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm"), *beside):
        try:
            descriptor = os.open(file, os.O_RDWR)
        except FileNotFoundError:
            continue
        except OSError as error:
            if file.is_dir():
                continue  # The other checks name a directory where a file belongs.
            named = "it" if file == path else str(file)
            try:
                owner = f", which belongs to {_user(file.stat().st_uid)}"
            except OSError:
                owner = ""
            raise DatabaseFileError(path, (
                f"cannot be written: this user ({_user()}) may not write {named} ({error.strerror}){owner};"
                " change its owner to the daemon's user (a daemon run as root leaves files that only root may write),"
                " or set [database] path to another file"
            )) from None
        os.close(descriptor)


def _user(uid: int | None = None) -> str:
    """Return the name of the user with `uid` (this process's effective user by default), or the number when it has none."""
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def verify_for_daemon(path: Path, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> None:
    """Raise DatabaseFileError when the daemon must not use the file at `path`.

    That is when the file is not SQLite, is damaged or contains another
    application's tables. An SQLite file that lacks some or all of
    guardrail's tables passes, because the daemon creates them.
    """
    with connect(path, busy_timeout=busy_timeout, require_tables=False):
        pass


def inspections(path: Path, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> list[Inspection]:
    # Tables may be missing, as for the daemon, so that `guardrail check` rejects the files that `guardrail run` rejects.
    with connect(path, busy_timeout=busy_timeout, require_tables=False) as connection:
        # Looked up rather than caught as an OperationalError, which a locked database raises too.
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'inspections'").fetchone():
            # A database without tables yet, or one the daemon has not opened since inspections existed.
            return []
        rows = connection.execute("SELECT rules_hash, at, inspected_by, note FROM inspections ORDER BY id").fetchall()
    return [Inspection(rules_hash, parse_instant(at), by, note) for rules_hash, at, by, note in rows]


def record_inspection(
    path: Path, rules_hash: str, at: datetime, inspected_by: str, note: str, *, busy_timeout: timedelta = BUSY_TIMEOUT,
) -> None:
    with connect(path, write=True, busy_timeout=busy_timeout) as connection:
        connection.execute(
            "INSERT INTO inspections (rules_hash, at, inspected_by, note) VALUES (?, ?, ?, ?)",
            (rules_hash, format_instant(at), inspected_by, note),
        )


def open_conversations_by_team(path: Path, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> dict[str, int]:
    """Return the number of open conversations per team."""
    # Tables may be missing, as for `inspections`, so that `guardrail check` reads any file the daemon accepts.
    with connect(path, busy_timeout=busy_timeout, require_tables=False) as connection:
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'conversations'").fetchone():
            return {}
        rows = connection.execute("SELECT team, COUNT(*) FROM conversations WHERE state = 'open' GROUP BY team").fetchall()
    return {team: count for team, count in rows}


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
    emptied: bool = False  # its bytes were removed after `[database] keep_bodies`


def last_messages(path: Path, count: int, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> list[StoredMessage]:
    """Return the `count` newest stored messages, oldest first."""
    with connect(path, busy_timeout=busy_timeout) as connection:
        rows = connection.execute(
            "SELECT id, received_at, mail_from, rcpt_tos, message_id, route, team, disposition, raw, length(raw) = 0 AND size > 0"
            " FROM messages ORDER BY id DESC LIMIT ?",
            (count,),
        ).fetchall()
    return [
        StoredMessage(
            row[0], parse_instant(row[1]), row[2], tuple(json.loads(row[3])), row[4], row[5], row[6], row[7], bytes(row[8]),
            emptied=bool(row[9]),
        )
        for row in reversed(rows)
    ]


def shadow_disagreements(path: Path, since: datetime, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> list[dict[str, Any]]:
    """Return messages since `since` where a shadow route would have won."""
    with connect(path, busy_timeout=busy_timeout) as connection:
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


# `guardrail status` lists the alarms raised within this time, newest first.
ALARMS_SHOWN_FOR = timedelta(days=7)
ALARMS_SHOWN = 20


def _recent_alarms(connection: sqlite3.Connection, since: str) -> list[tuple[str, str, str]]:
    """Return (time, subject, detail) of the newest alarms raised after `since`, routes and addresses together.

    A database last opened by an older daemon may lack either table, which then adds no alarms.
    """
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    sql = alarms_query(tables)
    if sql is None:
        return []
    rows = connection.execute(sql, (since, ALARMS_SHOWN)).fetchall()
    return [(at, f"{kind} {about}", detail) for at, kind, about, detail in rows]


def status_rows(path: Path, now: datetime, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> dict[str, Any]:
    """Return the figures `guardrail status` prints."""
    instant = format_instant(now)
    with connect(path, busy_timeout=busy_timeout) as connection:
        open_by_team = connection.execute(
            "SELECT team, COUNT(*), SUM(deadline IS NOT NULL AND deadline < ?) FROM conversations"
            " WHERE state = 'open' GROUP BY team ORDER BY team",
            (instant,),
        ).fetchall()
        no_reply_by_team = connection.execute(
            "SELECT team, COUNT(*) FROM conversations WHERE state = 'no_reply_needed' GROUP BY team ORDER BY team"
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
            # A conversation counts as answered from its first response on, as the median does.
            "SELECT route, COUNT(*), SUM(answered_at IS NOT NULL) FROM conversations GROUP BY route ORDER BY route"
        ).fetchall()
        response_times = connection.execute(
            "SELECT route, opened_at, answered_at FROM conversations WHERE answered_at IS NOT NULL"
        ).fetchall()
        alarms = _recent_alarms(connection, format_instant(now - ALARMS_SHOWN_FOR))
        pending = connection.execute("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'").fetchone()
        failed = connection.execute(
            "SELECT kind, COUNT(*) FROM outbox WHERE state = 'failed' AND done_at > ? GROUP BY kind ORDER BY kind",
            (format_instant(now - ALARMS_SHOWN_FOR),),
        ).fetchall()
    return {
        "alarms": alarms,
        "outbox_pending": pending,
        "outbox_failed": failed,
        "open_by_team": open_by_team,
        "no_reply_by_team": no_reply_by_team,
        "next_deadlines": next_deadlines,
        "overdue": overdue,
        "routes": routes,
        "response_times": [(route, parse_instant(opened), parse_instant(answered)) for route, opened, answered in response_times],
    }


@dataclass(frozen=True)
class QueuedRow:
    """An outbox row as `guardrail queue` lists it."""

    id: int
    purpose: str
    state: str
    reference: str  # the conversation's reference, or "" for a row without one
    to: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None  # for a pending row
    done_at: datetime | None  # for a failed row
    last_error: str

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id, "purpose": self.purpose, "state": self.state, "reference": self.reference, "to": self.to,
            "attempts": self.attempts, "created_at": format_instant(self.created_at),
            "next_attempt_at": format_instant(self.next_attempt_at) if self.next_attempt_at else None,
            "done_at": format_instant(self.done_at) if self.done_at else None, "last_error": self.last_error,
        }


# The outbox columns that listing and retrying read, with the conversation's
# reference and state and whether the row still has the bytes it sends. A
# delivery outside its message's conversation, such as another team's copy
# or the postmaster owner's, is listed under the message's conversation.
_OUTBOX_COLUMNS = (
    "o.id, o.kind, o.target, o.state, o.attempts, o.created_at, o.next_attempt_at, o.done_at,"
    " COALESCE(o.last_error, ''), COALESCE(c.reference, ''), COALESCE(c.state, ''), c.id,"
    " CASE WHEN o.kind = 'deliver' THEN length(m.raw) > 0 ELSE o.payload IS NOT NULL END"
)
_OUTBOX_FROM = (
    " FROM outbox o LEFT JOIN messages m ON m.id = o.message_row AND o.kind = 'deliver'"
    " LEFT JOIN conversations c ON c.id = COALESCE(o.conversation_id, m.conversation_id)"
)


def queued_rows(path: Path, state: str, limit: int, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> list[QueuedRow]:
    """Return up to `limit` outbox rows in `state`: pending ones by when they are due, failed ones newest first."""
    order = "o.next_attempt_at, o.id" if state == "pending" else "o.done_at DESC, o.id DESC"
    with connect(path, busy_timeout=busy_timeout) as connection:
        rows = connection.execute(
            f"SELECT {_OUTBOX_COLUMNS}{_OUTBOX_FROM} WHERE o.state = ? ORDER BY {order} LIMIT ?", (state, limit),
        ).fetchall()
    return [_queued_row(row) for row in rows]


def _queued_row(row: Any) -> QueuedRow:
    """Return the QueuedRow of a row selected with _OUTBOX_COLUMNS."""
    row_id, kind, target_text, state, attempts, created, next_at, done, error, reference = row[:10]
    target = json.loads(target_text)
    return QueuedRow(
        row_id, outbox.purpose(kind, target), state, reference, outbox.shown_target(kind, target), attempts,
        parse_instant(created), parse_instant(next_at) if state == "pending" else None,
        parse_instant(done) if done else None, error,
    )


@dataclass(frozen=True)
class Requeued:
    """The result of `requeue`: the rows queued again or made due, each skipped row with the reason, and unknown ids."""

    sent_again: list[QueuedRow]
    skipped: list[tuple[QueuedRow, str]]
    unknown: list[int]


def requeue(
    path: Path, now: datetime, by: str, *, ids: tuple[int, ...] = (), failed_deliveries: bool = False,
    pending: bool = False, busy_timeout: timedelta = BUSY_TIMEOUT,
) -> Requeued:
    """Queue failed outbox rows again and make pending ones due at `now`, in one transaction.

    The rows are those numbered `ids`, every failed delivery to a team when
    `failed_deliveries` is set, and every pending row when `pending` is set.
    A failed row starts over: no attempts, and a give-up window from `now`.
    When an id is unknown, nothing changes and the result lists it.
    The daemon's outbox worker looks for due rows at least once a minute.
    """
    conditions = ["o.id IN (SELECT value FROM json_each(?))"]
    parameters: list[Any] = [json.dumps(list(ids))]
    if failed_deliveries:
        conditions.append("(o.state = 'failed' AND o.kind = 'deliver')")
    if pending:
        conditions.append("o.state = 'pending'")
    instant = format_instant(now)
    sent_again: list[QueuedRow] = []
    skipped: list[tuple[QueuedRow, str]] = []
    with connect(path, write=True, busy_timeout=busy_timeout) as connection:
        connection.execute("BEGIN IMMEDIATE")
        try:
            rows = connection.execute(
                f"SELECT {_OUTBOX_COLUMNS}{_OUTBOX_FROM} WHERE {' OR '.join(conditions)} ORDER BY o.id", parameters,
            ).fetchall()
            found = {row[0] for row in rows}
            unknown = [row_id for row_id in ids if row_id not in found]
            if unknown:
                # A mistyped id changes nothing, so the command can be run again once corrected.
                connection.execute("ROLLBACK")
                return Requeued([], [], unknown)
            for row in rows:
                listed = _queued_row(row)
                row_id, kind, state = listed.id, row[1], listed.state
                conversation_state, conversation_id, has_bytes = row[10:]
                reason = outbox.retry_refusal(outbox.RetryCandidate(
                    kind, listed.purpose, state, bool(has_bytes), conversation_state,
                ))
                if reason is not None:
                    skipped.append((listed, reason))
                    continue
                if state == "failed":
                    connection.execute(
                        "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, done_at = NULL,"
                        " target = json_set(target, ?, ?) WHERE id = ?",
                        (instant, f"$.{outbox.REQUEUED_AT}", instant, row_id),
                    )
                else:
                    connection.execute("UPDATE outbox SET next_attempt_at = ? WHERE id = ?", (instant, row_id))
                if conversation_id is not None:
                    detail = {"outbox_id": row_id, "kind": kind, "by": by, "was": state}
                    connection.execute(
                        "INSERT INTO events (conversation_id, message_row, at, kind, detail) VALUES (?, NULL, ?, 'requeued', ?)",
                        (conversation_id, instant, json.dumps(detail)),
                    )
                sent_again.append(replace(listed, state="pending", attempts=0 if state == "failed" else listed.attempts, next_attempt_at=now))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    return Requeued(sent_again, skipped, [])


def daemon_rules(path: Path, *, busy_timeout: timedelta = BUSY_TIMEOUT) -> tuple[Path, Path] | None:
    """Return the rules folder that the daemon last started on `path` reads, and the folder its paths resolve against.

    None when no daemon has recorded them, as in a database from an earlier version.
    """
    with connect(path, busy_timeout=busy_timeout, require_tables=False) as connection:
        if not connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'facts'").fetchone():
            return None
        row = connection.execute("SELECT value FROM facts WHERE name = ?", (DAEMON_RULES,)).fetchone()
    if row is None:
        return None
    recorded = json.loads(row[0])
    return Path(recorded["directory"]), Path(recorded["base"])
