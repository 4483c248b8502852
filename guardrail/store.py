"""The SQLite store: this module, committer.py and store_batch.py hold all of guardrail's SQL.

The database is in WAL mode with synchronous=FULL. Reads go through an
aiosqlite connection. Writes go through a group committer: everything queued
while one transaction commits shares the next transaction, so many messages
pay for one fsync, yet each caller's future resolves only after the
transaction holding its rows has committed.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from .clock import format_instant, parse_instant
from .committer import (
    Committer,
    EscalationRun,
    RejectionRun,
    RescheduleRun,
    RetentionRun,
    WriteItem,
    ZombieRun,
)
from .deadlines import ClockPlanner
from .errors import StorageError
from .escalation import DueConversation, EscalationPlan
from .plan import Submission
from .store_batch import (
    SCHEDULE_RULES,
    SCHEMA,
    AttemptResult,
    Emptied,
    ManualAnswer,
    Outcome,
    Rescheduled,
    ReschedulePlanner,
    StoreSettings,
)

log = structlog.get_logger("guardrail.store")

# At most this many queued writes share one transaction.
MAX_BATCH = 256
# Seconds close() waits for queued writes before it gives up on them.
CLOSE_TIMEOUT = 30.0
# Rows of each table that one retention transaction visits, and how many
# such transactions one call of empty_old_bytes runs at most.
RETENTION_BATCH = 500
RETENTION_MAX_BATCHES = 200


def _settle(settled: list[tuple[_Job, Any, Exception | None]]) -> None:
    """Resolve each job's future with its result or error; runs on the event loop."""
    for job, result, error in settled:
        if job.future.done():
            continue
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)


_ENVELOPE_COLUMNS = (
    "m.raw, m.mail_from, m.rcpt_tos, m.peer, m.helo, m.received_at, m.route, COALESCE(c.reference, ''), m.id, m.protocol"
)


def _message_for_delivery(row: Any) -> tuple[bytes, dict[str, Any]]:
    """Return the raw bytes and envelope facts from the columns listed in _ENVELOPE_COLUMNS."""
    raw, mail_from, rcpt_tos, peer, helo, received_at, route, reference, row_id, protocol = row
    return bytes(raw), {
        "mail_from": mail_from,
        "rcpt_tos": json.loads(rcpt_tos),
        "peer": peer,
        "helo": helo,
        "received_at": parse_instant(received_at),
        "route": route,
        "reference": reference,
        "message_row": row_id,
        "protocol": protocol,
    }


# Columns added after a table's first release, each with its definition. An
# address alarm raised before alarms named a team covers every team ("*").
_LATER_COLUMNS = (
    ("messages", "protocol", "TEXT NOT NULL DEFAULT 'ESMTP'"),
    ("rejections", "team", "TEXT NOT NULL DEFAULT ''"),
    ("address_alarms", "team", "TEXT NOT NULL DEFAULT '*'"),
)


async def _add_missing_columns(db: aiosqlite.Connection) -> None:
    """Add the columns that a database made by an earlier version lacks."""
    for table, column, definition in _LATER_COLUMNS:
        async with db.execute(f"PRAGMA table_info({table})") as cursor:
            columns = {row[1] for row in await cursor.fetchall()}
        if column not in columns:
            await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


# PRAGMA user_version after the data changes in _migrate.
SCHEMA_VERSION = 1


async def _migrate(db: aiosqlite.Connection) -> None:
    """Bring rows written by an earlier version up to date, once per database, as PRAGMA user_version records."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = row[0] if row else 0
    if version >= SCHEMA_VERSION:
        return
    await db.execute("BEGIN IMMEDIATE")
    try:
        # Before version 1, machine mail and loop messages opened conversations
        # as open, without a deadline, and they never closed.
        await db.execute(
            "UPDATE conversations SET state = 'no_reply_needed' WHERE state = 'open' AND deadline IS NULL"
            " AND escalation_reason = '' AND next_escalation_at IS NULL AND (SELECT m.machine_signal != '' OR m.disposition = 'loop'"
            " FROM messages m WHERE m.conversation_id = conversations.id ORDER BY m.id LIMIT 1)"
        )
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise


__all__ = ["AttemptResult", "OutboxRow", "Outcome", "Store", "StoreSettings"]


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: str
    conversation_id: int | None
    message_row: int | None
    target: dict[str, Any]
    attempts: int
    created_at: datetime
    # Read with the row, so an attempt needs no second query: the payload of
    # a mail or webhook row, and the raw message and its envelope facts for
    # a delivery to a team.
    payload: bytes | None = None
    message: tuple[bytes, dict[str, Any]] | None = None


@dataclass
class _Job:
    item: WriteItem
    future: asyncio.Future[Any]


class Store:
    """The database handle the daemon shares between intake and workers."""

    def __init__(self, db: aiosqlite.Connection, writer: Committer, thread: ThreadPoolExecutor, settings: StoreSettings) -> None:
        self._db = db
        self._writer = writer
        self._thread = thread
        self.settings = settings
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._committer: asyncio.Future[None] | None = None
        self._closing = False
        # Called in the writer thread after each transaction with its duration in seconds and its number of writes.
        self._observe_commit: Callable[[float, int], None] = lambda seconds, size: None

    def observe_commits(self, observer: Callable[[float, int], None]) -> None:
        """Call `observer(seconds, writes)` in the writer thread after each transaction, as metrics do."""
        self._observe_commit = observer

    @classmethod
    async def open(cls, path: Path, settings: StoreSettings | None = None, *, busy_timeout: timedelta = timedelta(seconds=5)) -> Store:
        """Open (creating if needed) the database at `path` and start the committer.

        Reads go through an aiosqlite connection. Writes use a second
        connection owned by the writer thread, which takes queued jobs,
        commits them together and hands the results back to the event loop.
        The next transaction starts as soon as the previous one is durable,
        without waiting for the event loop.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        busy_ms = int(busy_timeout.total_seconds() * 1000)
        db = await aiosqlite.connect(path, isolation_level=None)
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardrail-writer")
        loop = asyncio.get_running_loop()
        writer: Committer | None = None
        try:
            await db.execute(f"PRAGMA busy_timeout = {busy_ms}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.executescript(SCHEMA)
            await _add_missing_columns(db)
            await _migrate(db)
            chosen = settings or StoreSettings()
            writer = await loop.run_in_executor(thread, lambda: Committer(path, chosen, busy_timeout=busy_timeout))
            store = cls(db, writer, thread, chosen)
        except BaseException:
            if writer is not None:
                await loop.run_in_executor(thread, writer.close)
            thread.shutdown(wait=False)
            await db.close()
            raise
        store._committer = loop.run_in_executor(thread, store._write_until_closed, loop)
        return store

    async def close(self) -> None:
        """Commit what is queued, stop the writer thread and close both connections."""
        self._closing = True
        if self._committer is not None:
            self._jobs.put(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._committer), CLOSE_TIMEOUT)
            except TimeoutError:
                log.error("store_close_timed_out", queued=self._jobs.qsize())
            except Exception as error:  # noqa: BLE001 - closing goes on
                log.error("store_writer_failed", error=repr(error))
        if self._committer is None or self._committer.done():
            await asyncio.get_running_loop().run_in_executor(self._thread, self._writer.close)
        self._thread.shutdown(wait=False)
        await self._db.close()

    # -- writes, through the group committer --------------------------------

    async def accept(self, submission: Submission) -> Outcome:
        """Commit a received message with its conversation and outbox rows."""
        return await self._submit(submission)

    async def record_attempt(self, result: AttemptResult) -> None:
        """Commit the outcome of a delivery attempt."""
        await self._submit(result)

    async def fire_escalations(self, now: datetime, planner: Callable[[DueConversation], EscalationPlan]) -> int:
        """Escalate up to a batch of conversations due at `now`; return how many fired."""
        return await self._submit(EscalationRun(now, planner))

    async def raise_zombie_alarms(
        self, now: datetime, recent: int, period: timedelta, routes: list[str], planner: Callable[..., list[Any]]
    ) -> list[Any]:
        """Raise alarms for those of `routes` whose mail goes unanswered; return the alarms raised."""
        return await self._submit(ZombieRun(now, recent, period, routes, planner))

    async def raise_rejection_alarms(self, now: datetime, period: timedelta, planner: Callable[..., list[Any]]) -> list[Any]:
        """Raise alarms for the addresses that rejected mail within `period` before `now`; return the alarms raised."""
        return await self._submit(RejectionRun(now, period, planner))

    async def reschedule_escalations(
        self, planner: ReschedulePlanner, *, digest: str = "", batch: int = RETENTION_BATCH
    ) -> tuple[int, datetime | None]:
        """Set again when every open conversation on the SLA clock is next escalated, as after a rule reload.

        Each batch is a transaction of its own, so intake's commits go
        between them. The last one records `digest`, the digest of the
        rules that `planner` follows, which `schedule_rules` returns. Return
        how many conversations changed, and the earliest of their new times.
        """
        changed, after, earliest = 0, 0, None
        while True:
            done: Rescheduled = await self._submit(RescheduleRun(planner, after, batch, digest))
            changed += done.changed
            after = done.last_id
            if done.earliest is not None and (earliest is None or done.earliest < earliest):
                earliest = done.earliest
            if not done.more:
                return changed, earliest

    async def reschedule_conversation(self, planner: ReschedulePlanner, conversation_id: int) -> datetime | None:
        """Set again when one open conversation on the SLA clock is next escalated; return that time if it changed."""
        done: Rescheduled = await self._submit(RescheduleRun(planner, 0, 1, only=conversation_id))
        return done.earliest

    def follow_rules(self, digest: str, reopened_clock: ClockPlanner | None = None) -> None:
        """Note that writes from now on follow the rules with `digest`, and that `reopened_clock` computes clocks under them.

        The next transaction removes a stored schedule digest for other
        rules, so that a start after rules changed and changed back still
        sets escalation times again. Call it before queueing any write made
        under those rules. `reopened_clock` gives the clock that a customer's
        message starts again in an answered conversation. Without it, such a
        message leaves the conversation answered.
        """
        self._writer.rules_digest = digest
        self._writer.reopened_clock = reopened_clock

    async def record_fact(self, name: str, value: str) -> None:
        """Store `value` as the fact `name`, replacing an earlier one, outside the group committer."""
        await self._db.execute("INSERT OR REPLACE INTO facts (name, value) VALUES (?, ?)", (name, value))

    async def schedule_rules(self) -> str:
        """Return the digest of the rules under which every open conversation's next escalation was last set, or ""."""
        async with self._db.execute("SELECT value FROM facts WHERE name = ?", (SCHEDULE_RULES,)) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else ""

    async def empty_old_bytes(self, cutoff: datetime, *, batch: int = RETENTION_BATCH, max_batches: int = RETENTION_MAX_BATCHES) -> Emptied:
        """Empty the bytes of messages and outbox rows created before `cutoff`; return the totals.

        Each batch is a transaction of its own, so intake's commits go
        between them. After `max_batches` the rest waits for the next call.
        """
        messages = outbox = 0
        for _ in range(max_batches):
            emptied: Emptied = await self._submit(RetentionRun(cutoff, batch))
            messages += emptied.messages
            outbox += emptied.outbox
            if not emptied.more:
                return Emptied(messages, outbox, False)
        return Emptied(messages, outbox, True)

    def queue_submission(self, submission: Submission) -> asyncio.Future[Outcome]:
        """Queue a received message for the next commit and return the future of its Outcome.

        Unlike `accept`, the commit's result stays reachable when the caller
        is cancelled while it waits, as when a client disconnects.
        """
        return self._queue(submission)

    async def _submit(self, item: WriteItem) -> Any:
        return await self._queue(item)

    def _queue(self, item: WriteItem) -> asyncio.Future[Any]:
        if self._committer is None or self._committer.done() or self._closing:
            raise StorageError("the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Job(item, future))
        return future

    def _write_until_closed(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit queued jobs in batches until the stop marker; runs in the writer thread."""
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            started = time.perf_counter()
            settled = self._commit_or_split(batch)
            loop.call_soon_threadsafe(_settle, settled)
            self._observe_commit(time.perf_counter() - started, len(batch))
            if stop:
                return

    def _commit_or_split(self, batch: list[_Job]) -> list[tuple[_Job, Any, Exception | None]]:
        pairs = self._writer.commit_or_split([job.item for job in batch])
        return [(job, result, error) for job, (result, error) in zip(batch, pairs)]

    # -- reads ----------------------------------------------------------------

    async def fetch_all(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        async with self._db.execute(sql, parameters) as cursor:
            return list(await cursor.fetchall())

    async def due_outbox(self, now: datetime, skip: set[int], limit: int) -> list[OutboxRow]:
        """Return pending outbox rows due at `now`, oldest first, except those in `skip`, with what delivering them needs."""
        marks = ",".join("?" * len(skip))
        rows = await self.fetch_all(
            "SELECT o.id, o.kind, o.conversation_id, o.message_row, o.target, o.attempts, o.created_at, o.payload,"
            f" {_ENVELOPE_COLUMNS} FROM outbox o"
            " LEFT JOIN messages m ON m.id = o.message_row AND o.kind = 'deliver'"
            " LEFT JOIN conversations c ON c.id = m.conversation_id"
            f" WHERE o.state = 'pending' AND o.next_attempt_at <= ? AND o.id NOT IN ({marks})"
            " ORDER BY o.next_attempt_at, o.id LIMIT ?",
            (format_instant(now), *sorted(skip), limit),
        )
        return [
            OutboxRow(
                row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], parse_instant(row[6]),
                payload=None if row[7] is None else bytes(row[7]),
                message=_message_for_delivery(row[8:]) if row[16] is not None else None,
            )
            for row in rows
        ]

    async def next_outbox_due(self, after: datetime) -> datetime | None:
        """Return when the earliest pending outbox row due later than `after` falls due."""
        rows = await self.fetch_all(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' AND next_attempt_at > ?",
            (format_instant(after),),
        )
        return parse_instant(rows[0][0]) if rows and rows[0][0] else None

    async def next_escalation_due(self) -> datetime | None:
        """Return when the earliest open conversation is next due for escalation."""
        rows = await self.fetch_all(
            "SELECT MIN(next_escalation_at) FROM conversations WHERE next_escalation_at IS NOT NULL AND state = 'open'"
        )
        return parse_instant(rows[0][0]) if rows and rows[0][0] else None

    async def outbox_payload(self, outbox_id: int) -> bytes:
        rows = await self.fetch_all("SELECT payload FROM outbox WHERE id = ?", (outbox_id,))
        if not rows or rows[0][0] is None:
            raise StorageError(f"outbox row {outbox_id} has no payload")
        return bytes(rows[0][0])

    async def message_for_delivery(self, message_row: int) -> tuple[bytes, dict[str, Any]]:
        """Return a stored message's raw bytes and the envelope facts for its trace headers."""
        rows = await self.fetch_all(
            f"SELECT {_ENVELOPE_COLUMNS} FROM messages m LEFT JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?",
            (message_row,),
        )
        if not rows:
            raise StorageError(f"message row {message_row} not found")
        return _message_for_delivery(rows[0])

    async def mark_answered(self, reference: str, by: str, at: datetime) -> str:
        """Mark an open conversation answered by hand; return its state before."""
        rows = await self.fetch_all("SELECT id, state FROM conversations WHERE reference = ?", (reference,))
        if not rows:
            return ""
        conversation_id, state = rows[0]
        if state == "open":
            await self._submit(ManualAnswer(conversation_id, by, at))
        return str(state)
