"""Smarthost outages: temporary failures are retried from the database, and permanent ones are recorded.

Each daemon runs on a ManualClock, so a retry falls due when the test moves
the clock rather than after real waiting.
"""

from __future__ import annotations

import asyncio
import email
import json
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import (
    SMTP_RULES,
    RecipientSinkHandler,
    Sink,
    free_port,
    message,
    send,
    start_sink,
    wait_until,
    write_config,
)
from structlog.testing import capture_logs

from guardrail.cli import main
from guardrail.clock import ManualClock, parse_instant
from guardrail.daemon import Daemon

START = datetime(2025, 11, 4, 9, 0, tzinfo=timezone.utc)




def outage_config(folder: Path, smarthost_port: int, **delivery: object) -> Path:
    return write_config(
        folder,
        rules=SMTP_RULES,
        sections={
            "smarthost": {"host": "127.0.0.1", "port": smarthost_port, "starttls": False, "timeout": "10s"},
            "delivery": {"retry_initial": "30s", "retry_max": "5m", **delivery},
        },
    )


@dataclass(frozen=True)
class OutboxState:
    id: int
    state: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime


async def outbox(daemon: Daemon) -> list[OutboxState]:
    assert daemon.store is not None
    rows = await daemon.store.fetch_all(
        "SELECT id, state, attempts, next_attempt_at, created_at FROM outbox WHERE kind = 'deliver' ORDER BY id"
    )
    return [OutboxState(row[0], row[1], row[2], parse_instant(row[3]), parse_instant(row[4])) for row in rows]


async def delivery_events(daemon: Daemon) -> list[tuple[str, dict[str, object]]]:
    """Return (kind, detail) of every outcome event of forwarding to the team, oldest first."""
    assert daemon.store is not None
    rows = await daemon.store.fetch_all(
        "SELECT kind, detail FROM events WHERE kind IN ('delivered', 'delivery_deferred', 'delivery_failed') ORDER BY id"
    )
    events = [(kind, json.loads(detail)) for kind, detail in rows]
    return [(kind, detail) for kind, detail in events if detail["kind"] == "deliver"]


async def delivery_failed_flags(daemon: Daemon) -> list[int]:
    assert daemon.store is not None
    return [row[0] for row in await daemon.store.fetch_all("SELECT delivery_failed FROM conversations ORDER BY id")]


async def escalations(daemon: Daemon) -> list[str]:
    assert daemon.store is not None
    return [row[0] for row in await daemon.store.fetch_all("SELECT detail FROM events WHERE kind = 'escalated'")]


async def wait_for_row(daemon: Daemon, state: str, attempts: int, *, row: int = 0) -> OutboxState:
    """Wait until outbox row number `row` (0-based) has `state` after `attempts` attempts."""

    async def reached() -> bool:
        rows = await outbox(daemon)
        return len(rows) > row and rows[row].state == state and rows[row].attempts == attempts

    await wait_until(reached, timeout=10, what=f"outbox row {row + 1} {state} after {attempts} attempts")
    return (await outbox(daemon))[row]


async def close_sink(sink: Sink) -> None:
    sink.server.close()
    await sink.server.wait_closed()


async def test_outage_retried_after_restart(tmp_path: Path, start_daemon) -> None:
    smarthost_port = free_port()
    config = outage_config(tmp_path, smarthost_port)
    clock = ManualClock(START)
    daemon = await start_daemon(config, clock)

    refused = await send(daemon.port, "alice@example.com", ["support@example.org"], message())
    assert refused == {}
    deferred = await wait_for_row(daemon, "pending", 1)
    assert deferred.next_attempt_at > clock.now()
    assert [kind for kind, _ in await delivery_events(daemon)] == ["delivery_deferred"]
    await daemon.stop()

    sink = await start_sink(port=smarthost_port)
    try:
        restarted = await start_daemon(config, ManualClock(deferred.next_attempt_at + timedelta(seconds=1)))
        await wait_until(lambda: sink.to("team@example.net"), what="delivery to the smarthost after restart")
        done = await wait_for_row(restarted, "done", 2)

        assert done.id == deferred.id
        assert len(sink.to("team@example.net")) == 1
        assert sink.to("team@example.net")[0].rcpt_tos == ["team@example.net"]
        assert sink.to("team@example.net")[0].content.endswith(message())
        assert [kind for kind, _ in await delivery_events(restarted)] == ["delivery_deferred", "delivered"]
    finally:
        await close_sink(sink)


async def test_550_reply_fails_without_retry(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink()
    sink.handler.reply = "550 5.1.1 no such user"
    try:
        clock = ManualClock(START)
        # One delivery at a time, so the worker finishes any due attempt before it starts the next.
        daemon = await start_daemon(outage_config(tmp_path, sink.port, concurrency=1), clock)

        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        failed = await wait_for_row(daemon, "failed", 1)
        assert await delivery_failed_flags(daemon) == [1]
        assert [kind for kind, _ in await delivery_events(daemon)] == ["delivery_failed"]
        # The failure escalates at once, without waiting for the deadline or for more mail.
        await wait_until(lambda: escalations(daemon), what="an escalation of the failed delivery")
        assert clock.now() == START

        await clock.advance(timedelta(hours=6))
        # A retry of the first row would be due before the second message's row,
        # so by the time the second row has failed, such a retry would be recorded.
        await send(daemon.port, "bob@example.com", ["support@example.org"], message(message_id="<m2@example.com>", subject="Scanner"))
        await wait_for_row(daemon, "failed", 1, row=1)

        rows = await outbox(daemon)
        assert rows[0] == failed
        events = await delivery_events(daemon)
        assert [detail["outbox_id"] for _, detail in events] == [failed.id, rows[1].id]
    finally:
        await close_sink(sink)


async def test_451_reply_retried_until_accepted(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink()
    sink.handler.reply = "451 4.3.0 try later"
    try:
        clock = ManualClock(START)
        daemon = await start_daemon(outage_config(tmp_path, sink.port), clock)

        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        deferred = await wait_for_row(daemon, "pending", 1)
        assert deferred.next_attempt_at > clock.now()

        sink.handler.reply = None
        await clock.set(deferred.next_attempt_at + timedelta(seconds=1))
        await wait_until(lambda: sink.to("team@example.net"), what="delivery once the smarthost accepts")
        await wait_for_row(daemon, "done", 2)

        assert len(sink.to("team@example.net")) == 1
        assert sink.to("team@example.net")[0].content.endswith(message())
        assert await delivery_failed_flags(daemon) == [0]
    finally:
        await close_sink(sink)


async def test_give_up_after_marks_failed(tmp_path: Path, start_daemon) -> None:
    clock = ManualClock(START)
    daemon = await start_daemon(outage_config(tmp_path, free_port(), give_up_after="1h"), clock)

    await send(daemon.port, "alice@example.com", ["support@example.org"], message())
    deferred = await wait_for_row(daemon, "pending", 1)
    assert await delivery_failed_flags(daemon) == [0]

    await clock.set(deferred.created_at + timedelta(hours=1, seconds=1))
    await wait_for_row(daemon, "failed", 2)

    assert await delivery_failed_flags(daemon) == [1]
    assert [kind for kind, _ in await delivery_events(daemon)] == ["delivery_deferred", "delivery_failed"]


# The support team's mail goes to two addresses at the smarthost.
TWO_ADDRESS_RULES = SMTP_RULES.replace('["team@example.net"]', '["team@example.net", "second@example.net"]')


BUSY = "450 4.2.1 mailbox busy, try later"
NO_SUCH_USER = "550 5.1.1 no such user"


async def two_address_daemon(tmp_path: Path, start_daemon, sink: Sink, clock: ManualClock):
    """Start a daemon that delivers support mail to team@ and second@example.net through `sink`."""
    config = write_config(tmp_path, rules=TWO_ADDRESS_RULES, sections={
        "smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False, "timeout": "10s"},
        "delivery": {"retry_initial": "30s", "retry_max": "5m"},
    })
    return await start_daemon(config, clock)


async def test_deferred_recipient_retried_alone(tmp_path: Path, start_daemon) -> None:
    handler = RecipientSinkHandler(rcpt_replies={"second@example.net": BUSY})
    sink = await start_sink(handler=handler)
    try:
        clock = ManualClock(START)
        daemon = await two_address_daemon(tmp_path, start_daemon, sink, clock)

        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        deferred = await wait_for_row(daemon, "pending", 1)
        assert len(sink.to("team@example.net")) == 1
        assert sink.to("second@example.net") == []

        handler.rcpt_replies.clear()
        await clock.set(deferred.next_attempt_at + timedelta(seconds=1))
        await wait_for_row(daemon, "done", 2)
    finally:
        await close_sink(sink)

    assert len(sink.to("team@example.net")) == 1
    assert [received.rcpt_tos for received in sink.to("second@example.net")] == [["second@example.net"]]
    assert sink.to("second@example.net")[0].content.endswith(message())
    assert [kind for kind, _ in await delivery_events(daemon)] == ["delivery_deferred", "delivered"]
    assert await delivery_failed_flags(daemon) == [0]


async def test_rejected_recipient_not_retried(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink(handler=RecipientSinkHandler(rcpt_replies={"second@example.net": NO_SUCH_USER}))
    try:
        daemon = await two_address_daemon(tmp_path, start_daemon, sink, ManualClock(START))
        with capture_logs() as logs:
            await send(daemon.port, "alice@example.com", ["support@example.org"], message())
            await wait_for_row(daemon, "done", 1)
    finally:
        await close_sink(sink)

    assert len(sink.to("team@example.net")) == 1
    [(kind, detail)] = await delivery_events(daemon)
    assert kind == "delivered"
    assert "second@example.net: 550" in str(detail["error"])
    assert [entry["rejected"] for entry in logs if entry["event"] == "delivery_failed"] == [["second@example.net"]]


async def test_mixed_refusals_retry_deferred_only(tmp_path: Path, start_daemon) -> None:
    handler = RecipientSinkHandler(rcpt_replies={"team@example.net": NO_SUCH_USER, "second@example.net": BUSY})
    sink = await start_sink(handler=handler)
    try:
        clock = ManualClock(START)
        daemon = await two_address_daemon(tmp_path, start_daemon, sink, clock)

        # Every recipient is refused: one for good, one for now.
        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        deferred = await wait_for_row(daemon, "pending", 1)
        # Only the acknowledgement to the sender, and the alarm about the rejected address, may have arrived.
        await wait_until(lambda: sink.to("duty-manager@example.org"), what="the rejected-address alarm")
        others = [received.rcpt_tos for received in sink.messages if received.rcpt_tos != ["alice@example.com"]]
        assert others == [["duty-manager@example.org"]]
        alarm = email.message_from_bytes(sink.to("duty-manager@example.org")[0].content)
        assert alarm["Subject"] == "Address team@example.net rejects team support's mail"
        # Its own reply, not the other recipient's deferral.
        assert "Its last reply: 550 5.1.1 no such user\r\n" in alarm.get_payload(decode=True).decode()

        del handler.rcpt_replies["second@example.net"]
        await clock.set(deferred.next_attempt_at + timedelta(seconds=1))
        await wait_for_row(daemon, "done", 2)
    finally:
        await close_sink(sink)

    # The second attempt names only the deferred recipient, and nothing is retried after it.
    assert [address for address in handler.asked if address.endswith("@example.net")] == [
        "team@example.net", "second@example.net", "second@example.net",
    ]
    assert [received.rcpt_tos for received in sink.to("second@example.net")] == [["second@example.net"]]
    assert sink.to("team@example.net") == []
    assert [kind for kind, _ in await delivery_events(daemon)] == ["delivery_deferred", "delivered"]


async def test_partial_delivery_failure_names_addresses(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink(handler=RecipientSinkHandler(rcpt_replies={"second@example.net": BUSY}))
    try:
        clock = ManualClock(START)
        config = write_config(tmp_path, rules=TWO_ADDRESS_RULES, sections={
            "smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False, "timeout": "10s"},
            "delivery": {"retry_initial": "30s", "retry_max": "5m", "give_up_after": "1h"},
        })
        daemon = await start_daemon(config, clock)

        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        deferred = await wait_for_row(daemon, "pending", 1)
        # The second attempt, to second@ alone, falls past give_up_after.
        await clock.set(deferred.created_at + timedelta(hours=1, seconds=1))
        await wait_for_row(daemon, "failed", 2)
        await wait_until(lambda: sink.to("duty-manager@example.org"), what="the escalation mail")
    finally:
        await close_sink(sink)

    assert len(sink.to("team@example.net")) == 1
    assert sink.to("second@example.net") == []
    [(flag, reason)] = await daemon.store.fetch_all("SELECT delivery_failed, escalation_reason FROM conversations")
    assert flag == 1
    assert reason.startswith(
        "delivery to some of the destination's addresses failed permanently:"
        " delivered to team@example.net; not delivered to second@example.net: gave up after 2 attempts: "
    )
    [escalation] = [email.message_from_bytes(received.content) for received in sink.to("duty-manager@example.org")]
    assert "Delivery failed in part: team support" in escalation["Subject"]
    body = escalation.get_payload(decode=True).decode()
    assert "delivered to team@example.net; not delivered to second@example.net" in body
    assert "Nobody on the team has it" not in body


def rejection_alarms(sink: Sink) -> list[email.message.Message]:
    """Return the rejected-address alarms sent to the fallback human, who also gets the escalations."""
    mails = [email.message_from_bytes(received.content) for received in sink.to("duty-manager@example.org")]
    return [mail for mail in mails if mail["Subject"].startswith("Address ")]


async def test_rejected_address_alarms_once_per_period(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink(handler=RecipientSinkHandler(rcpt_replies={"second@example.net": NO_SUCH_USER}))
    try:
        daemon = await two_address_daemon(tmp_path, start_daemon, sink, ManualClock(START))
        for number in range(3):
            await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id=f"<r{number}@example.com>"))
            await wait_for_row(daemon, "done", 1, row=number)
        await wait_until(lambda: rejection_alarms(sink), what="the rejected-address alarm")
        # Every rejection was recorded, and checking again raises nothing new within the period.
        assert daemon.rejections is not None
        assert await daemon.rejections.check() == []
        [alarm] = rejection_alarms(sink)
        assert daemon.metrics.registry.get_sample_value("guardrail_alarms_total", {"kind": "address"}) == 1
        assert alarm["Subject"] == "Address second@example.net rejects team support's mail"
        assert alarm["To"] == "Dana Duty <duty-manager@example.org>"
        assert alarm["Auto-Submitted"] == "auto-generated"
        body = alarm.get_payload(decode=True).decode()
        # Only this address's reply, not the whole delivery's error.
        assert "Its last reply: 550 5.1.1 no such user\r\n" in body
        assert "rules.toml, then run guardrail check" in body
        [(address, detail)] = await daemon.store.fetch_all("SELECT address, detail FROM address_alarms")
        assert address == "second@example.net"
        assert detail.startswith("second@example.net rejected ")
        assert len(await daemon.store.fetch_all("SELECT id FROM rejections WHERE address = 'second@example.net'")) == 3
        await daemon.stop()

        # A restart within the period raises nothing again.
        restarted = await start_daemon(daemon.config.path, ManualClock(START + timedelta(hours=20)))
        assert await restarted.rejections.check() == []
        await restarted.stop()

        # After the period, the next rejection alarms again, counting only the rejections since.
        later = await start_daemon(daemon.config.path, ManualClock(START + timedelta(days=1, hours=1)))
        await send(later.port, "alice@example.com", ["support@example.org"], message(message_id="<r3@example.com>"))
        await wait_for_row(later, "done", 1, row=3)
        await wait_until(lambda: len(rejection_alarms(sink)) == 2, what="the second alarm")
        # Rejections older than the period are no longer kept.
        assert len(await later.store.fetch_all("SELECT id FROM rejections")) == 1
    finally:
        await close_sink(sink)

    second = rejection_alarms(sink)[1].get_payload(decode=True).decode()
    assert "Messages rejected: 1, from 2025-11-05T10:00:00+00:00" in second


# Both teams' mail also goes to shared@example.net; billing's route has an owner.
SHARED_ADDRESS_RULES = TWO_ADDRESS_RULES.replace("second@example.net", "shared@example.net") + """
[[team]]
name = "billing"
destination = { smtp = ["billing-team@example.net", "shared@example.net"] }
members = [{ name = "Bo Berg", address = "bo@example.org" }]

[[route]]
name = "invoices"
team = "billing"
owner = { name = "Olga Owner", address = "olga@example.org" }
all = [{ rcpt.is = "billing@example.org" }]
"""


async def test_address_of_two_teams_alarms_each_team(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink(handler=RecipientSinkHandler(rcpt_replies={"shared@example.net": NO_SUCH_USER}))
    try:
        config = write_config(tmp_path, rules=SHARED_ADDRESS_RULES, sections={
            "smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False, "timeout": "10s"},
        })
        daemon = await start_daemon(config, ManualClock(START))
        await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<s1@example.com>"))
        await wait_for_row(daemon, "done", 1, row=0)
        await wait_until(lambda: rejection_alarms(sink), what="support's alarm")
        # Support's alarm within the period does not cover billing's mail to the same address.
        await send(daemon.port, "bob@example.com", ["billing@example.org"], message(message_id="<b0@example.com>"))
        await wait_until(lambda: sink.to("olga@example.org"), what="billing's alarm")
        # Billing's own alarm does.
        await send(daemon.port, "bob@example.com", ["billing@example.org"], message(message_id="<b1@example.com>"))
        await wait_for_row(daemon, "done", 1, row=2)
        assert daemon.rejections is not None
        assert await daemon.rejections.check() == []
    finally:
        await close_sink(sink)

    [support] = rejection_alarms(sink)
    assert support["Subject"] == "Address shared@example.net rejects team support's mail"
    [billing] = [email.message_from_bytes(received.content) for received in sink.to("olga@example.org")]
    assert billing["Subject"] == "Address shared@example.net rejects team billing's mail"
    assert "Messages rejected: 1," in billing.get_payload(decode=True).decode()
    rows = await daemon.store.fetch_all("SELECT address, team FROM address_alarms ORDER BY id")
    assert [tuple(row) for row in rows] == [("shared@example.net", "support"), ("shared@example.net", "billing")]


async def test_status_lists_recent_alarms(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    sink = await start_sink(handler=RecipientSinkHandler(rcpt_replies={"second@example.net": NO_SUCH_USER}))
    try:
        daemon = await two_address_daemon(tmp_path, start_daemon, sink, ManualClock(datetime.now(timezone.utc)))
        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        await wait_until(lambda: rejection_alarms(sink), what="the rejected-address alarm")
    finally:
        await close_sink(sink)
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["status", "--config", str(daemon.config.path)]) == 0
    alarms = capsys.readouterr().out.split("alarms in the last 7 days (newest first):\n")[1].splitlines()
    assert len(alarms) == 1
    assert " address second@example.net: second@example.net rejected 1 message(s) of team support from " in alarms[0]


async def test_status_without_alarm_tables(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    daemon = await start_daemon(config)
    await daemon.stop()
    # A database written by a version without alarms lacks these tables.
    with closing(sqlite3.connect(tmp_path / "var" / "guardrail.db")) as connection, connection:
        connection.execute("DROP TABLE address_alarms")
        connection.execute("DROP TABLE alarms")
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["status", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert output.startswith("open conversations by team (overdue):\n")
    assert "alarms" not in output


async def test_status_shows_outbox_problems(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    sink = await start_sink()
    sink.handler.reply = "550 5.1.1 no such user"
    try:
        daemon = await start_daemon(outage_config(tmp_path, sink.port), ManualClock(datetime.now(timezone.utc)))
        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        await wait_for_row(daemon, "failed", 1)
        # Then the smarthost goes away, and the next message waits.
        await close_sink(sink)
        await send(daemon.port, "bob@example.com", ["support@example.org"], message(message_id="<m2@example.com>"))
        await wait_for_row(daemon, "pending", 1, row=1)
    finally:
        await close_sink(sink)
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["status", "--config", str(daemon.config.path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    [pending] = [line for line in lines if line.startswith("outbox: ")]
    assert re.fullmatch(r"outbox: [1-9]\d* pending, the oldest queued \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", pending)
    [failed] = [line for line in lines if line.startswith("outbox rows that failed")]
    assert failed.startswith("outbox rows that failed in the last 7 days: deliver 1")
