"""Retention: with [database] keep_bodies, old message bytes and outbox payloads are emptied; rows and history stay."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import (
    ROUTES,
    TEAMS,
    maildir_messages,
    message,
    send,
    settle,
    write_config,
)
from structlog.testing import capture_logs
from test_store import NOW, submissions

from guardrail.cli import main
from guardrail.clock import ManualClock, format_instant
from guardrail.config import load_config
from guardrail.errors import ConfigErrors
from guardrail.plan import Submission
from guardrail.store import Store


def rows(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute(sql).fetchall()


@pytest.mark.parametrize(
    ("database", "expected"),
    [
        ({}, None),
        ({"keep_bodies": "90d"}, timedelta(days=90)),
        ({"keep_bodies": "6d"}, timedelta(days=6)),
    ],
)
def test_keep_bodies_config_table(tmp_path: Path, database: dict[str, str], expected: timedelta | None) -> None:
    assert load_config(write_config(tmp_path, sections={"database": database})).keep_bodies == expected


@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        ({"database": {"keep_bodies": "5d"}}, "'5d' is not longer than delivery.give_up_after ('5d')"),
        ({"database": {"keep_bodies": "20d"}, "delivery": {"give_up_after": "30d"}}, "delivery.give_up_after ('30d')"),
        ({"database": {"keep_bodies": "20d"}, "conversations": {"duplicate_window": "21d"}}, "duplicate_window ('21d')"),
        ({"database": {"keep_bodies": "soon"}}, "invalid value 'soon'; expected a positive duration"),
    ],
)
def test_keep_bodies_config_errors(tmp_path: Path, sections: dict[str, dict[str, str]], reason: str) -> None:
    with pytest.raises(ConfigErrors) as raised:
        load_config(write_config(tmp_path, sections=sections))
    [error] = raised.value.errors
    assert error.key == "database.keep_bodies"
    assert reason in str(error)


def set_state(database: Path, state: str, where: str) -> None:
    with sqlite3.connect(database) as connection:
        connection.execute(f"UPDATE outbox SET state = ? WHERE {where}", (state,))


async def store_with(database: Path, prepared: list[Submission]) -> Store:
    """Open a store at `database` and commit each of `prepared` in turn."""
    store = await Store.open(database)
    for submission in prepared:
        await store.accept(submission)
    return store


async def test_pending_delivery_keeps_bytes(tmp_path: Path) -> None:
    database = tmp_path / "store.db"
    store = await store_with(database, submissions(tmp_path, 3))
    try:
        # The store runs no delivery here: the second message's delivery is still pending, everything else is done.
        set_state(database, "done", "NOT (kind = 'deliver' AND message_row = 2)")
        later = NOW + timedelta(days=1)

        first = await store.empty_old_bytes(later)
        assert (first.messages, first.outbox, first.more) == (1, 1, False)
        assert rows(database, "SELECT id, length(raw) > 0, size > 0 FROM messages ORDER BY id") == [
            (1, 0, 1), (2, 1, 1), (3, 1, 1),
        ]
        assert rows(database, "SELECT message_row, kind, payload IS NOT NULL FROM outbox ORDER BY id") == [
            (1, "deliver", 0), (1, "mail", 0), (2, "deliver", 0), (2, "mail", 1), (3, "deliver", 0), (3, "mail", 1),
        ]

        set_state(database, "done", "1")
        second = await store.empty_old_bytes(later)
        assert (second.messages, second.outbox, second.more) == (2, 2, False)
        assert rows(database, "SELECT COUNT(*) FROM messages WHERE length(raw) > 0") == [(0,)]
        assert rows(database, "SELECT COUNT(*) FROM outbox WHERE payload IS NOT NULL") == [(0,)]
        # The rows themselves stay, with what status and the timeline read.
        assert rows(database, "SELECT COUNT(*) FROM messages WHERE summary != '' AND size > 0") == [(3,)]
        assert rows(database, "SELECT COUNT(*) FROM events WHERE message_row IS NOT NULL") != [(0,)]
    finally:
        await store.close()


async def test_cutoff_and_batches(tmp_path: Path) -> None:
    database = tmp_path / "store.db"
    store = await store_with(database, submissions(tmp_path, 5))
    try:
        set_state(database, "done", "1")

        # Nothing was created before the cutoff.
        none = await store.empty_old_bytes(NOW)
        assert (none.messages, none.outbox, none.more) == (0, 0, False)

        # Two transactions of two rows of each table leave the rest for the
        # next call: 5 messages, and 10 outbox rows of which 5 have a payload.
        later = NOW + timedelta(seconds=1)
        results = [await store.empty_old_bytes(later, batch=2, max_batches=2) for _ in range(3)]
        assert [(result.messages, result.outbox, result.more) for result in results] == [
            (4, 2, True), (1, 2, True), (0, 1, False),
        ]
        assert rows(database, "SELECT COUNT(*) FROM messages WHERE length(raw) > 0") == [(0,)]
        assert rows(database, "SELECT COUNT(*) FROM outbox WHERE payload IS NOT NULL") == [(0,)]
    finally:
        await store.close()


async def test_fallback_mails_emptied(tmp_path: Path) -> None:
    # A webhook or escalation mail row keeps, inside its target, the mail to send if it fails.
    database = tmp_path / "store.db"
    store = await Store.open(database)
    try:
        with sqlite3.connect(database) as connection:
            connection.executemany(
                "INSERT INTO outbox (id, kind, target, payload, state, created_at, next_attempt_at) VALUES (?, ?, ?, ?, 'done', ?, ?)",
                [
                    (1, "webhook", '{"url": "http://127.0.0.1:9/hook", "fallback": "U3ViamVjdA=="}', b"{}", format_instant(NOW), format_instant(NOW)),
                    (2, "mail", '{"addresses": ["a@example.org"], "fallback": {"addresses": ["b@example.org"], "payload": "U3ViamVjdA=="}}',
                     b"Subject: x", format_instant(NOW), format_instant(NOW)),
                ],
            )
        emptied = await store.empty_old_bytes(NOW + timedelta(days=1))
    finally:
        await store.close()

    assert emptied.outbox == 2
    assert rows(database, "SELECT target, payload FROM outbox ORDER BY id") == [
        ('{"url":"http://127.0.0.1:9/hook"}', None),
        ('{"addresses":["a@example.org"]}', None),
    ]


async def test_row_dated_ahead_holds_nothing_back(tmp_path: Path) -> None:
    # A clock that ran a year ahead and was set back dated the second message.
    database = tmp_path / "store.db"
    offsets = [timedelta(minutes=0), timedelta(days=365), timedelta(minutes=2), timedelta(minutes=3)]
    prepared = submissions(tmp_path, 4)
    dated = [dataclasses.replace(submission, received_at=NOW + offset) for submission, offset in zip(prepared, offsets)]
    store = await store_with(database, dated)
    try:
        set_state(database, "done", "1")

        emptied = await store.empty_old_bytes(NOW + timedelta(days=200))
    finally:
        await store.close()

    assert (emptied.messages, emptied.more) == (4, False)
    assert rows(database, "SELECT COUNT(*) FROM messages WHERE length(raw) > 0") == [(0,)]


async def test_daemon_empties_old_bytes(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, sections={"database": {"keep_bodies": "10d"}})
    clock = ManualClock(datetime(2026, 3, 2, 9, 30, tzinfo=UTC))
    daemon = await start_daemon(config, clock=clock)
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<old@x>"))
    await settle(daemon, clock)
    await clock.advance(timedelta(days=5))
    await send(daemon.port, "bob@example.com", ["support@example.org"], message(message_id="<new@x>", sender="bob@example.com"))
    await settle(daemon, clock)
    assert rows(database, "SELECT COUNT(*) FROM outbox WHERE state != 'done'") == [(0,)]

    with capture_logs() as events:
        await clock.advance(timedelta(days=5, hours=1))
        await settle(daemon, clock)

    assert rows(database, "SELECT message_id, length(raw) > 0 FROM messages ORDER BY id") == [("<old@x>", 0), ("<new@x>", 1)]
    # Acknowledgements; the escalation mails were all written in the last ten days.
    acknowledgements = "SELECT message_row, payload IS NOT NULL FROM outbox WHERE kind = 'mail' AND message_row IS NOT NULL ORDER BY id"
    assert rows(database, acknowledgements) == [(1, 0), (2, 1)]
    [emptied] = [event for event in events if event["event"] == "old_bytes_emptied"]
    assert (emptied["messages"], emptied["outbox"]) == (1, 1)
    # The team's copy and the acknowledgement were delivered before; they stay where they are.
    assert len(maildir_messages(tmp_path / "var" / "maildir" / "support")) == 2

    proposed = tmp_path / "rules"
    capsys.readouterr()
    status = await asyncio.to_thread(main, ["replay", "--config", str(config), "--rules", str(proposed), "--last", "10"])
    captured = capsys.readouterr()
    assert status == 0
    assert "note: 1 of the 2 newest messages are older than [database] keep_bodies" in captured.err
    assert "0 of 1 messages would change" in captured.out


async def test_body_reason_keeps_no_body_text(tmp_path: Path, start_daemon) -> None:
    rules = TEAMS + """
[[route]]
name = "refunds"
team = "billing"
any = [{ body.regex = '(?im)^refund please$' }]
""" + ROUTES
    config = write_config(tmp_path, rules=rules, sections={"database": {"keep_bodies": "10d"}})
    clock = ManualClock(datetime(2026, 3, 2, 9, 30, tzinfo=UTC))
    daemon = await start_daemon(config, clock=clock)
    database = daemon.config.database_path
    body = "<p>Refund please</p><p>My IBAN is DE89 3704 0044 0532 0130 00</p>\r\n"
    html = message(extra_headers="MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n", body=body)
    await send(daemon.port, "alice@example.com", ["support@example.org"], html)
    await settle(daemon, clock)

    await clock.advance(timedelta(days=10, hours=1))
    await settle(daemon, clock)

    [(route, reasons, size)] = rows(database, "SELECT route, route_reasons, length(raw) FROM messages")
    assert route == "refunds"
    assert size == 0
    assert json.loads(reasons) == ["body regex '(?im)^refund please$' matched 'Refund please' in the body"]
