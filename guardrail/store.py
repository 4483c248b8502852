"""The SQLite store: the only module that speaks SQL.

One connection in WAL mode with synchronous=FULL. Writes go through a group
committer: everything queued while one transaction commits shares the next
transaction, so many messages pay for one fsync, yet each caller's future
resolves only after the transaction holding its rows has committed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from .clock import format_instant, parse_instant
from .conversations import KnownConversation, find_references, new_reference
from .errors import StorageError
from .plan import Plan, Submission, opening_participants, plan_submission
from .rules import Destination

log = structlog.get_logger("guardrail.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER,
    received_at TEXT NOT NULL,
    peer TEXT NOT NULL,
    helo TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,
    message_id TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    size INTEGER NOT NULL,
    summary TEXT NOT NULL,
    route TEXT NOT NULL,
    team TEXT NOT NULL,
    route_reasons TEXT NOT NULL,
    disposition TEXT NOT NULL,
    raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_dedupe ON messages (dedupe_key, received_at);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id);

CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    reference TEXT NOT NULL UNIQUE,
    route TEXT NOT NULL,
    team TEXT NOT NULL,
    destination TEXT,
    state TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    subject TEXT NOT NULL,
    customer TEXT NOT NULL,
    participants TEXT NOT NULL,
    delivery_failed INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS message_ids (
    message_id TEXT PRIMARY KEY,
    conversation_id INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    conversation_id INTEGER,
    message_row INTEGER,
    target TEXT NOT NULL,
    payload BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL,
    done_at TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';

CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER,
    message_row INTEGER,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_conversation ON events (conversation_id);
"""

# At most this many queued writes share one transaction.
MAX_BATCH = 256


@dataclass(frozen=True)
class Outcome:
    """What the store did with one submitted message."""

    disposition: str
    message_row: int | None = None
    conversation_id: int | None = None
    reference: str = ""
    team: str = ""
    route: str = ""
    destination: Destination | None = None
    thread_reason: str = ""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: str
    conversation_id: int | None
    message_row: int | None
    target: dict[str, Any]
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class AttemptResult:
    """The outcome of one delivery attempt, to be recorded."""

    outbox_id: int
    conversation_id: int | None
    message_row: int | None
    at: datetime
    state: str  # "done", "pending" (retry later) or "failed"
    attempts: int
    next_attempt_at: datetime | None = None
    error: str = ""


@dataclass
class _Job:
    item: Submission | AttemptResult
    future: asyncio.Future[Any]


class Store:
    """The database handle the daemon shares between intake and workers."""

    def __init__(self, db: aiosqlite.Connection, *, reference_prefix: str, duplicate_window: timedelta) -> None:
        self._db = db
        self._prefix = reference_prefix
        self._duplicate_window = duplicate_window
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._committer: asyncio.Task[None] | None = None
        self._next_id: dict[str, int] = {}
        self.committed = asyncio.Event()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        busy_timeout: timedelta = timedelta(seconds=5),
        reference_prefix: str = "GR",
        duplicate_window: timedelta = timedelta(days=1),
    ) -> Store:
        """Open (creating if needed) the database at `path` and start the committer."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout.total_seconds() * 1000)}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.executescript(SCHEMA)
            store = cls(db, reference_prefix=reference_prefix, duplicate_window=duplicate_window)
            for table in ("messages", "conversations", "outbox"):
                async with db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}") as cursor:
                    (store._next_id[table],) = await cursor.fetchone()  # type: ignore[misc]
        except Exception:
            await db.close()
            raise
        store._committer = asyncio.create_task(store._run_committer(), name="guardrail-committer")
        return store

    async def close(self) -> None:
        """Finish queued writes, stop the committer and close the database."""
        if self._committer is not None:
            while not self._queue.empty():
                await asyncio.sleep(0.01)
            self._committer.cancel()
            try:
                await self._committer
            except asyncio.CancelledError:
                pass
        await self._db.close()

    # -- writes, through the group committer --------------------------------

    async def accept(self, submission: Submission) -> Outcome:
        """Commit a received message with its conversation and outbox rows."""
        return await self._submit(submission)

    async def record_attempt(self, result: AttemptResult) -> None:
        """Commit the outcome of a delivery attempt."""
        await self._submit(result)

    async def _submit(self, item: Submission | AttemptResult) -> Any:
        if self._committer is None or self._committer.done():
            raise StorageError("the store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(item, future))
        return await future

    async def _run_committer(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                results = await self._commit(batch)
            except Exception as error:  # noqa: BLE001 - every waiter must hear of it
                log.error("commit_failed", error=repr(error), batch_size=len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(StorageError("the database write failed"))
                continue
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)
            self.committed.set()
            self.committed = asyncio.Event()

    async def _commit(self, batch: list[_Job]) -> list[Any]:
        submissions = [job.item for job in batch if isinstance(job.item, Submission)]
        attempts = [job.item for job in batch if isinstance(job.item, AttemptResult)]
        saved_ids = dict(self._next_id)
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            writer = _BatchWriter(self, saved_ids)
            outcomes = await writer.add_submissions(submissions)
            writer.add_attempts(attempts)
            await writer.flush(self._db)
            await self._db.execute("COMMIT")
        except BaseException:
            self._next_id = saved_ids
            try:
                await self._db.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
        self._next_id = writer.next_id
        by_item = iter(outcomes)
        return [next(by_item) if isinstance(job.item, Submission) else None for job in batch]

    # -- reads ----------------------------------------------------------------

    async def fetch_all(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        async with self._db.execute(sql, parameters) as cursor:
            return list(await cursor.fetchall())

    async def due_outbox(self, now: datetime, skip: set[int], limit: int) -> list[OutboxRow]:
        """Return pending outbox rows due at `now`, oldest first, except those in `skip`."""
        rows = await self.fetch_all(
            "SELECT id, kind, conversation_id, message_row, target, attempts, created_at FROM outbox"
            " WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
            (format_instant(now), limit + len(skip)),
        )
        due = [
            OutboxRow(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], parse_instant(row[6]))
            for row in rows
            if row[0] not in skip
        ]
        return due[:limit]

    async def next_outbox_due(self, after: datetime) -> datetime | None:
        """Return when the earliest pending outbox row due later than `after` falls due."""
        rows = await self.fetch_all(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' AND next_attempt_at > ?",
            (format_instant(after),),
        )
        return parse_instant(rows[0][0]) if rows and rows[0][0] else None

    async def message_for_delivery(self, message_row: int) -> tuple[bytes, dict[str, Any]]:
        """Return a stored message's raw bytes and the envelope facts for its trace headers."""
        rows = await self.fetch_all(
            "SELECT m.raw, m.mail_from, m.rcpt_tos, m.peer, m.helo, m.received_at, m.route,"
            " COALESCE(c.reference, ''), m.id FROM messages m"
            " LEFT JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?",
            (message_row,),
        )
        if not rows:
            raise StorageError(f"message row {message_row} not found")
        raw, mail_from, rcpt_tos, peer, helo, received_at, route, reference, row_id = rows[0]
        return bytes(raw), {
            "mail_from": mail_from,
            "rcpt_tos": json.loads(rcpt_tos),
            "peer": peer,
            "helo": helo,
            "received_at": parse_instant(received_at),
            "route": route,
            "reference": reference,
            "message_row": row_id,
        }


class _BatchWriter:
    """Collects the rows of one transaction and writes them with executemany."""

    def __init__(self, store: Store, next_id: dict[str, int]) -> None:
        self.store = store
        self.next_id = dict(next_id)
        self.messages: list[tuple[Any, ...]] = []
        self.conversations: list[tuple[Any, ...]] = []
        self.conversation_updates: list[tuple[Any, ...]] = []
        self.message_ids: list[tuple[Any, ...]] = []
        self.outbox: list[tuple[Any, ...]] = []
        self.outbox_updates: list[tuple[Any, ...]] = []
        self.failed_conversations: list[tuple[Any, ...]] = []
        self.events: list[tuple[Any, ...]] = []

    def _allocate(self, table: str) -> int:
        self.next_id[table] += 1
        return self.next_id[table]

    async def add_submissions(self, submissions: list[Submission]) -> list[Outcome]:
        if not submissions:
            return []
        db = self.store._db
        cutoff = format_instant(min(s.received_at for s in submissions) - self.store._duplicate_window)
        seen_keys = await self._existing_keys(db, [s.dedupe_key for s in submissions], cutoff)
        by_message_id, by_reference = await self._known_conversations(db, submissions)
        fresh_references = await self._fresh_references(db, len(submissions))

        outcomes = []
        for submission, reference in zip(submissions, fresh_references):
            key = submission.dedupe_key
            plan = plan_submission(
                submission,
                is_duplicate=key in seen_keys,
                reference_prefix=self.store._prefix,
                by_message_id=by_message_id,
                by_reference=by_reference,
                new_conversation=self._blank_conversation(submission, reference),
            )
            seen_keys.add(key)
            outcomes.append(self._add_plan(submission, plan, by_message_id, by_reference))
        return outcomes

    async def _fresh_references(self, db: aiosqlite.Connection, count: int) -> list[str]:
        """Return `count` distinct references that no stored conversation uses."""
        fresh: set[str] = set()
        while len(fresh) < count:
            candidates = {new_reference(self.store._prefix) for _ in range(count - len(fresh))} - fresh
            marks = ",".join("?" * len(candidates))
            sql = f"SELECT reference FROM conversations WHERE reference IN ({marks})"
            async with db.execute(sql, sorted(candidates)) as cursor:
                taken = {row[0] for row in await cursor.fetchall()}
            fresh |= candidates - taken
        return sorted(fresh)

    def _blank_conversation(self, submission: Submission, reference: str) -> KnownConversation:
        # The id is allocated only if the plan opens the conversation.
        return KnownConversation(
            id=self.next_id["conversations"] + 1,
            reference=reference,
            route=submission.route,
            team=submission.team,
            participants=opening_participants(submission),
            destination=submission.destination,
        )

    def _add_plan(
        self,
        submission: Submission,
        plan: Plan,
        by_message_id: dict[str, KnownConversation],
        by_reference: dict[str, KnownConversation],
    ) -> Outcome:
        if plan.disposition == "duplicate":
            return Outcome("duplicate")

        at = format_instant(submission.received_at)
        conversation = plan.conversation
        if conversation is not None and plan.opens_conversation:
            self._allocate("conversations")
            self.conversations.append((
                conversation.id, conversation.reference, conversation.route, conversation.team,
                json.dumps(conversation.destination.to_record()) if conversation.destination else None,
                "open", at, at, submission.summary.subject, submission.summary.from_address or submission.mail_from,
                json.dumps(sorted(conversation.participants)),
            ))
            by_reference[conversation.reference] = conversation
        elif conversation is not None and plan.participants_added:
            conversation = KnownConversation(
                conversation.id, conversation.reference, conversation.route, conversation.team,
                conversation.participants | plan.participants_added, conversation.destination,
            )
            by_reference[conversation.reference] = conversation
            self.conversation_updates.append((json.dumps(sorted(conversation.participants)), at, conversation.id))

        row = self._allocate("messages")
        conversation_id = conversation.id if conversation else None
        self.messages.append((
            row, conversation_id, at, submission.peer, submission.helo, submission.mail_from,
            json.dumps(list(submission.rcpt_tos)), submission.summary.message_id, submission.dedupe_key,
            len(submission.raw), json.dumps(submission.summary.to_record()), plan.route, plan.team,
            json.dumps(list(submission.route_reasons)), plan.disposition, submission.raw,
        ))
        if conversation is not None and submission.summary.message_id:
            self.message_ids.append((submission.summary.message_id, conversation.id))
            by_message_id[submission.summary.message_id] = conversation

        detail = {"route": plan.route, "team": plan.team, "disposition": plan.disposition}
        if plan.thread_reason:
            detail["thread"] = plan.thread_reason
        self.events.append((conversation_id, row, at, "received", json.dumps(detail)))
        if plan.disposition != "loop" and plan.destination is not None:
            self.outbox.append((
                self._allocate("outbox"), "deliver", conversation_id, row,
                json.dumps(plan.destination.to_record()), None, "pending", 0, at, at,
            ))
        elif plan.disposition != "loop":
            self.events.append((conversation_id, row, at, "not_delivered", json.dumps({"reason": "team has no destination"})))

        return Outcome(
            plan.disposition, row, conversation_id, conversation.reference if conversation else "",
            plan.team, plan.route, plan.destination, plan.thread_reason,
        )

    def add_attempts(self, attempts: list[AttemptResult]) -> None:
        for result in attempts:
            at = format_instant(result.at)
            next_at = format_instant(result.next_attempt_at) if result.next_attempt_at else at
            done_at = at if result.state != "pending" else None
            self.outbox_updates.append((result.state, result.attempts, next_at, done_at, result.error or None, result.outbox_id))
            kind = {"done": "delivered", "pending": "delivery_deferred", "failed": "delivery_failed"}[result.state]
            detail = {"outbox_id": result.outbox_id, "attempts": result.attempts}
            if result.error:
                detail["error"] = result.error
            self.events.append((result.conversation_id, result.message_row, at, kind, json.dumps(detail)))
            if result.state == "failed" and result.conversation_id is not None:
                self.failed_conversations.append((at, result.conversation_id))

    async def flush(self, db: aiosqlite.Connection) -> None:
        statements = [
            ("INSERT INTO conversations (id, reference, route, team, destination, state, opened_at, updated_at,"
             " subject, customer, participants) VALUES (?,?,?,?,?,?,?,?,?,?,?)", self.conversations),
            ("UPDATE conversations SET participants = ?, updated_at = ? WHERE id = ?", self.conversation_updates),
            ("INSERT INTO messages (id, conversation_id, received_at, peer, helo, mail_from, rcpt_tos, message_id,"
             " dedupe_key, size, summary, route, team, route_reasons, disposition, raw)"
             " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", self.messages),
            ("INSERT OR IGNORE INTO message_ids (message_id, conversation_id) VALUES (?,?)", self.message_ids),
            ("INSERT INTO outbox (id, kind, conversation_id, message_row, target, payload, state, attempts,"
             " created_at, next_attempt_at) VALUES (?,?,?,?,?,?,?,?,?,?)", self.outbox),
            ("UPDATE outbox SET state = ?, attempts = ?, next_attempt_at = ?, done_at = ?, last_error = ?"
             " WHERE id = ?", self.outbox_updates),
            ("UPDATE conversations SET delivery_failed = 1, updated_at = ? WHERE id = ?", self.failed_conversations),
            ("INSERT INTO events (conversation_id, message_row, at, kind, detail) VALUES (?,?,?,?,?)", self.events),
        ]
        for sql, rows in statements:
            if rows:
                await db.executemany(sql, rows)

    @staticmethod
    async def _existing_keys(db: aiosqlite.Connection, keys: list[str], cutoff: str) -> set[str]:
        marks = ",".join("?" * len(keys))
        sql = f"SELECT dedupe_key FROM messages WHERE dedupe_key IN ({marks}) AND received_at >= ?"
        async with db.execute(sql, (*keys, cutoff)) as cursor:
            return {row[0] for row in await cursor.fetchall()}

    async def _known_conversations(
        self, db: aiosqlite.Connection, submissions: list[Submission]
    ) -> tuple[dict[str, KnownConversation], dict[str, KnownConversation]]:
        thread_ids = sorted({mid for s in submissions for mid in s.thread_ids})
        references = sorted({ref for s in submissions for ref in find_references(s.summary.subject, self.store._prefix)})
        by_message_id: dict[str, KnownConversation] = {}
        by_reference: dict[str, KnownConversation] = {}
        columns = "c.id, c.reference, c.route, c.team, c.participants, c.destination"
        if thread_ids:
            marks = ",".join("?" * len(thread_ids))
            sql = (f"SELECT m.message_id, {columns} FROM message_ids m"
                   f" JOIN conversations c ON c.id = m.conversation_id WHERE m.message_id IN ({marks})")
            async with db.execute(sql, thread_ids) as cursor:
                for row in await cursor.fetchall():
                    by_message_id[row[0]] = _known(row[1:])
        if references:
            marks = ",".join("?" * len(references))
            sql = f"SELECT {columns} FROM conversations c WHERE c.reference IN ({marks})"
            async with db.execute(sql, references) as cursor:
                for row in await cursor.fetchall():
                    by_reference[row[1]] = _known(row)
        return by_message_id, by_reference


def _known(row: Any) -> KnownConversation:
    conversation_id, reference, route, team, participants, destination = row
    return KnownConversation(
        conversation_id, reference, route, team, frozenset(json.loads(participants)),
        Destination.from_record(json.loads(destination)) if destination else None,
    )
