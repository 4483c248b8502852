"""The group committer: batches share a transaction, a bad job fails alone, close commits what is queued."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import message, write_config
from structlog.testing import capture_logs

from guardrail.clock import format_instant
from guardrail.config import load_config
from guardrail.daemon import load_ruleset
from guardrail.errors import StorageError
from guardrail.plan import Submission
from guardrail.prepare import Envelope, Site, prepare_message
from guardrail.store import AttemptResult, Store
from guardrail.store_batch import SCHEMA

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)


def submissions(folder: Path, count: int, body: str = "Hello,\r\nthe printer jams.\r\n") -> list[Submission]:
    config = load_config(write_config(folder))
    rules, site = load_ruleset(config), Site.from_config(config)
    prepared = []
    for number in range(count):
        envelope = Envelope(f"customer{number}@example.com", ("support@example.org",), "[127.0.0.1]:40000", "client")
        result = prepare_message(envelope, message(message_id=f"<s{number}@example.com>", body=body), rules, site, NOW)
        assert isinstance(result, Submission)
        prepared.append(result)
    return prepared


def stored_message_ids(database: Path) -> list[str]:
    with sqlite3.connect(database) as connection:
        return [row[0] for row in connection.execute("SELECT message_id FROM messages ORDER BY id")]


async def hold_writer(store: Store) -> tuple[asyncio.Future[object], threading.Event]:
    """Queue a job that keeps the writer thread busy until the returned event is set."""
    entered, release = threading.Event(), threading.Event()

    def planner(figures: object, alarmed: object) -> list[object]:
        entered.set()
        release.wait(10)
        return []

    zombie_run = asyncio.ensure_future(store.raise_zombie_alarms(NOW, 10, timedelta(days=1), [], planner))
    # Nothing else is queued until the writer is inside this job.
    assert await asyncio.to_thread(entered.wait, 10)
    return zombie_run, release


async def test_bad_job_fails_alone(tmp_path: Path) -> None:
    database = tmp_path / "store.db"
    store = await Store.open(database)
    try:
        zombie_run, release = await hold_writer(store)
        good = [asyncio.ensure_future(store.accept(submission)) for submission in submissions(tmp_path, 3)]
        # An error text that SQLite cannot bind makes the whole transaction fail.
        bad = asyncio.ensure_future(store.record_attempt(AttemptResult(1, None, None, NOW, "failed", 1, error={"x": 1})))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        with capture_logs() as events:
            release.set()
            await zombie_run
            outcomes = await asyncio.gather(*good)
            with pytest.raises(StorageError):
                await bad
    finally:
        await store.close()

    assert [outcome.disposition for outcome in outcomes] == ["new", "new", "new"]
    assert stored_message_ids(database) == ["<s0@example.com>", "<s1@example.com>", "<s2@example.com>"]
    retried = [event for event in events if event["event"] == "commit_retried_one_by_one"]
    assert len(retried) == 1
    assert retried[0]["batch_size"] == 4


async def test_close_commits_queued_jobs(tmp_path: Path) -> None:
    database = tmp_path / "store.db"
    store = await Store.open(database)
    zombie_run, release = await hold_writer(store)
    queued = [asyncio.ensure_future(store.accept(submission)) for submission in submissions(tmp_path, 2)]
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0.05)
    assert not closing.done()
    release.set()
    await closing

    assert await zombie_run == []
    assert [outcome.disposition for outcome in await asyncio.gather(*queued)] == ["new", "new"]
    assert stored_message_ids(database) == ["<s0@example.com>", "<s1@example.com>"]
    with pytest.raises(StorageError):
        await store.accept(submissions(tmp_path, 1)[0])


async def test_commit_after_rows_from_another_program(tmp_path: Path) -> None:
    database = tmp_path / "store.db"
    store = await Store.open(database)
    try:
        first, second = submissions(tmp_path, 2)
        assert (await store.accept(first)).disposition == "new"
        # Another program writes to the same database while the store is open.
        with sqlite3.connect(database) as other:
            other.execute(
                "INSERT INTO messages (id, received_at, peer, helo, mail_from, rcpt_tos, message_id, dedupe_key, size,"
                " summary, route, team, route_reasons, disposition, raw)"
                " SELECT MAX(id) + 1, received_at, peer, helo, mail_from, rcpt_tos, '<other@example.com>', 'other', 0,"
                " summary, route, team, route_reasons, disposition, x'' FROM messages"
            )
            other.execute(
                "INSERT INTO outbox (id, kind, target, state, created_at, next_attempt_at)"
                " SELECT MAX(id) + 1, 'mail', '{}', 'done', created_at, next_attempt_at FROM outbox"
            )
            other.execute(
                "INSERT INTO conversations (id, reference, route, team, state, opened_at, updated_at, subject, customer, participants)"
                " SELECT MAX(id) + 1, 'GR-OTHER', route, team, 'answered', opened_at, updated_at, '', '', '[]' FROM conversations"
            )
        outcome = await store.accept(second)
    finally:
        await store.close()

    assert outcome.disposition == "new"
    assert stored_message_ids(database) == ["<s0@example.com>", "<other@example.com>", "<s1@example.com>"]


async def test_database_without_later_columns_is_upgraded(tmp_path: Path) -> None:
    database = tmp_path / "store.db"
    old_schema = SCHEMA.replace(",\n    protocol TEXT NOT NULL DEFAULT 'ESMTP'", "").replace(",\n    team TEXT NOT NULL DEFAULT ''", "")
    assert old_schema.count("team TEXT NOT NULL DEFAULT ''") == 0
    with sqlite3.connect(database) as connection:
        connection.executescript(old_schema)

    store = await Store.open(database)
    try:
        outcome = await store.accept(submissions(tmp_path, 1)[0])
        _, envelope = await store.message_for_delivery(outcome.message_row)
    finally:
        await store.close()

    assert envelope["protocol"] == "ESMTP"
    with closing(sqlite3.connect(database)) as connection:
        for table in ("rejections", "address_alarms"):
            assert "team" in {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}


async def test_old_alarm_covers_every_team(tmp_path: Path) -> None:
    # An alarm raised by a version whose alarms named no team, within the period.
    database = tmp_path / "store.db"
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.executescript(SCHEMA.replace(",\n    team TEXT NOT NULL DEFAULT ''", ""))
        connection.execute(
            "INSERT INTO address_alarms (address, at, detail) VALUES ('second@example.net', ?, 'earlier alarm')",
            (format_instant(NOW - timedelta(hours=2)),),
        )

    store = await Store.open(database)
    try:
        # A rejection recorded after the upgrade, for one team.
        with closing(sqlite3.connect(database)) as connection, connection:
            connection.execute(
                "INSERT INTO rejections (address, conversation_id, at, reply, team) VALUES ('second@example.net', NULL, ?, '550 no', 'support')",
                (format_instant(NOW - timedelta(hours=1)),),
            )
        seen: list[object] = []
        await store.raise_rejection_alarms(NOW, timedelta(days=1), lambda figures, alarmed: seen.extend(figures) or [])
    finally:
        await store.close()

    assert seen == []


def store_path(folder: Path) -> Path:
    return folder / "store.db"


async def test_migration_moves_machine_conversations(tmp_path: Path) -> None:
    database = store_path(tmp_path)
    config = load_config(write_config(tmp_path))
    rules, site = load_ruleset(config), Site.from_config(config)

    def prepared(sender: str, number: int, extra_headers: str = "") -> Submission:
        envelope = Envelope(sender, ("support@example.org",), "[127.0.0.1]:40000", "client")
        raw = message(message_id=f"<old{number}@example.com>", extra_headers=extra_headers)
        result = prepare_message(envelope, raw, rules, site, NOW)
        assert isinstance(result, Submission)
        return result

    store = await Store.open(database)
    try:
        await store.accept(prepared("robot@example.com", 1, "Auto-Submitted: auto-replied\r\n"))
        await store.accept(prepared("robot@example.com", 2, "Auto-Submitted: auto-replied\r\n"))
        await store.accept(prepared("alice@example.com", 3))
    finally:
        await store.close()
    with closing(sqlite3.connect(database)) as connection, connection:
        # As an earlier version left them: every conversation open, the
        # person's without a deadline too (a team with no business hours
        # ahead), and the second machine one escalated after a failed delivery.
        connection.execute("UPDATE conversations SET state = 'open', deadline = NULL, next_escalation_at = NULL")
        connection.execute("UPDATE conversations SET escalation_reason = 'delivery failed' WHERE id = 2")
        connection.execute("PRAGMA user_version = 0")

    store = await Store.open(database)
    await store.close()
    with closing(sqlite3.connect(database)) as connection:
        states = connection.execute("SELECT id, state FROM conversations ORDER BY id").fetchall()
        version = connection.execute("PRAGMA user_version").fetchone()[0]
    assert states == [(1, "no_reply_needed"), (2, "open"), (3, "open")]
    assert version == 1
