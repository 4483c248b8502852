"""A storage failure answers 451 with no internals; the sender's retries create nothing twice."""

from __future__ import annotations

import asyncio
import smtplib
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import DATA, maildir_messages, send, wait_until, write_config
from structlog.testing import capture_logs

from guardrail.clock import ManualClock

MESSAGE = (DATA / "retry" / "message.eml").read_bytes()


def count(database: Path, table: str, where: str = "1") -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()[0]


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(
        tmp_path,
        smtp={"inboxes": ["support@example.org"]},
        sections={"database": {"busy_timeout": "200ms"}},
    )


async def test_locked_database_answers_451_then_retries_dedupe(config_path: Path, tmp_path: Path, start_daemon) -> None:
    clock = ManualClock(datetime(2025, 11, 5, 8, 12, tzinfo=timezone.utc))
    daemon = await start_daemon(config_path, clock=clock)
    database = daemon.config.database_path

    # T0: another process holds the write lock, so the commit fails.
    # The lock is taken in a thread: blocking the event loop would stall the
    # daemon's own transactions instead of failing them.
    blocker = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    await asyncio.to_thread(blocker.execute, "BEGIN EXCLUSIVE")
    try:
        with capture_logs() as events, pytest.raises(smtplib.SMTPDataError) as refused:
            await send(daemon.port, "billing@example.net", ["support@example.org"], MESSAGE)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error.startswith(b"4.3.0 ")
    assert b"OperationalError" not in refused.value.smtp_error
    assert b"locked" not in refused.value.smtp_error
    assert any(event["event"] == "message_not_accepted" and event["log_level"] == "error" for event in events)
    assert count(database, "messages") == 0
    assert count(database, "conversations") == 0
    assert count(database, "outbox") == 0

    # T0 + 10 min: storage works again and the sender retries.
    await clock.advance(timedelta(minutes=10))
    assert await send(daemon.port, "billing@example.net", ["support@example.org"], MESSAGE) == {}
    # The subject mentions an invoice, so the billing route takes it.
    maildir = tmp_path / "var" / "maildir" / "billing"
    await wait_until(lambda: maildir_messages(maildir), what="delivery of the retried message")

    # T0 + 20 min: the sender never saw our 250 and sends it once more.
    await clock.advance(timedelta(minutes=10))
    with capture_logs() as events:
        assert await send(daemon.port, "billing@example.net", ["support@example.org"], MESSAGE) == {}

    duplicates = [event for event in events if event["event"] == "message_duplicate"]
    assert len(duplicates) == 1
    assert duplicates[0]["log_level"] == "info"
    assert "duplicate of <inv-7781@billing.example.net>" in duplicates[0]["detail"]
    assert count(database, "messages") == 1
    assert count(database, "conversations") == 1
    assert count(database, "conversations", "deadline IS NOT NULL") == 1
    assert count(database, "outbox", "kind = 'deliver'") == 1
    assert count(database, "outbox", "kind = 'mail'") == 1
    assert count(database, "acknowledgements", "decision = 'sent' AND recipient = 'billing@example.net'") == 1
    assert len(maildir_messages(maildir)) == 1


async def test_other_inbox_is_not_duplicate(config_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(config_path.parent))
    await send(daemon.port, "billing@example.net", ["support@example.org"], MESSAGE)
    await send(daemon.port, "billing@example.net", ["billing@example.org"], MESSAGE)
    assert count(daemon.config.database_path, "messages") == 2


async def test_resend_after_window_is_stored_again(config_path: Path, start_daemon) -> None:
    clock = ManualClock(datetime(2025, 11, 5, 8, 12, tzinfo=timezone.utc))
    daemon = await start_daemon(config_path, clock=clock)
    await send(daemon.port, "billing@example.net", ["support@example.org"], MESSAGE)
    await clock.advance(timedelta(days=1, minutes=1))
    await send(daemon.port, "billing@example.net", ["support@example.org"], MESSAGE)
    assert count(daemon.config.database_path, "messages") == 2
