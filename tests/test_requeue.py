"""`guardrail queue` and `guardrail retry`: listing the outbox and sending failed rows again.

The commands take the real time as now, so the daemons run on a ManualClock
that starts at the real time. The tests move that clock past the outbox
worker's rescan instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import free_port, message, send, settle, start_sink, wait_until
from test_outage import close_sink, delivery_events, outage_config, outbox, wait_for_row

from guardrail import store_admin
from guardrail.cli import main
from guardrail.clock import ManualClock, parse_instant
from guardrail.daemon import Daemon
from guardrail.delivery import RESCAN_EVERY
from guardrail.outbox import (
    REQUEUED_AT,
    RetryCandidate,
    retry_refusal,
    retry_window_start,
    shown_target,
)

NO_SUCH_USER = "550 5.1.1 no such user"
START = datetime(2025, 11, 4, 9, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("candidate", "refusal"),
    [
        (RetryCandidate("deliver", "forward", "failed", True, "open"), None),
        (RetryCandidate("deliver", "forward", "pending", True, "answered"), None),
        (RetryCandidate("mail", "acknowledgement", "failed", True, "answered"), None),
        (RetryCandidate("mail", "alarm", "failed", True), None),
        (RetryCandidate("mail", "escalation", "failed", True, "open"), None),
        (RetryCandidate("deliver", "forward", "done", True, "open"), "it was already sent or withdrawn"),
        (RetryCandidate("webhook", "escalation webhook", "failed", True, "open"),
         "a failed webhook is not sent again: its escalation mail went out instead"),
        (RetryCandidate("webhook", "escalation webhook", "pending", True, "open"), None),
        (RetryCandidate("mail", "escalation", "failed", True, "answered"), "its conversation is answered now"),
        (RetryCandidate("mail", "escalation", "pending", True, "no_reply_needed"), "its conversation is no reply needed now"),
        (RetryCandidate("deliver", "forward", "failed", False, "open"), "retention emptied its bytes ([database] keep_bodies)"),
    ],
)
def test_retry_refusal(candidate: RetryCandidate, refusal: str | None) -> None:
    assert retry_refusal(candidate) == refusal


@pytest.mark.parametrize(
    ("kind", "target", "shown"),
    [
        ("deliver", {"kind": "smtp", "addresses": ["a@example.net", "b@example.net"], "team": "support"},
         "team support: smtp a@example.net, b@example.net"),
        ("deliver", {"kind": "maildir", "maildir": "/srv/mail/billing", "addresses": []}, "maildir /srv/mail/billing"),
        ("mail", {"kind": "smtp", "addresses": ["carol@example.org"], "purpose": "escalation"}, "carol@example.org"),
        # A chat webhook's URL carries its secret in the path.
        ("webhook", {"url": "https://hooks.example.com/services/T000/B000/XXXXSECRET?x=1"}, "https://hooks.example.com"),
        ("webhook", {}, "webhook"),
    ],
)
def test_shown_target(kind: str, target: dict[str, object], shown: str) -> None:
    assert shown_target(kind, target) == shown


def test_retry_window_starts_at_requeue() -> None:
    later = START + timedelta(days=6)
    assert retry_window_start(START, {}) == START
    assert retry_window_start(START, {REQUEUED_AT: "2025-11-10T09:00:00.000000Z"}) == later


async def no_pending(daemon: Daemon) -> bool:
    assert daemon.store is not None
    return not await daemon.store.fetch_all("SELECT id FROM outbox WHERE state = 'pending'")


async def cli(*arguments: str) -> int:
    return await asyncio.to_thread(main, list(arguments))


async def test_failed_delivery_listed_and_sent_again(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    sink = await start_sink()
    sink.handler.reply = NO_SUCH_USER
    try:
        clock = ManualClock(datetime.now(timezone.utc))
        daemon = await start_daemon(outage_config(tmp_path, sink.port, concurrency=1), clock)
        config = str(daemon.config.path)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        failed = await wait_for_row(daemon, "failed", 1)
        # The failure escalates at once, and the smarthost refuses that mail too.
        await wait_until(lambda: no_pending(daemon), what="every outbox row settled")
        capsys.readouterr()

        assert await cli("queue", "--config", config) == 0
        assert capsys.readouterr().out == "no pending outbox rows\n"
        assert await cli("queue", "--config", config, "--failed", "--format", "json") == 0
        [row] = [row for row in json.loads(capsys.readouterr().out)["rows"] if row["purpose"] == "forward"]
        assert row["id"] == failed.id
        assert row["state"] == "failed"
        assert row["to"] == "team support: smtp team@example.net"
        assert row["last_error"] == "smarthost replied 550 5.1.1 no such user"
        assert await cli("queue", "--config", config, "--failed") == 0
        text = capsys.readouterr().out
        assert f"{failed.id:>8} forward" in text
        assert "550 5.1.1 no such user" in text

        # A mistyped id beside a real one changes nothing.
        assert await cli("retry", "--config", config, str(failed.id), "999") == 2
        assert capsys.readouterr().out == ""
        [still_failed] = await outbox(daemon)
        assert (still_failed.state, still_failed.attempts) == ("failed", 1)

        # The team's address is fixed at the smarthost, and the operator sends the message again.
        sink.handler.reply = None
        assert await cli("retry", "--config", config, "--failed-deliveries", "--by", "dana") == 0
        out = capsys.readouterr().out
        assert out.startswith(f"due now: {failed.id:>8} forward")
        assert out.endswith("1 row is due now; a running daemon sends it within a minute\n")
        [requeued] = await outbox(daemon)
        assert (requeued.state, requeued.attempts) == ("pending", 0)

        await clock.advance(RESCAN_EVERY + timedelta(seconds=1))
        await wait_until(lambda: sink.to("team@example.net"), what="the delivery sent again")
        await wait_for_row(daemon, "done", 1)
        assert len(sink.to("team@example.net")) == 1
        assert sink.to("team@example.net")[0].content.endswith(message())
        assert [kind for kind, _ in await delivery_events(daemon)] == ["delivery_failed", "delivered"]
        assert daemon.store is not None
        [(detail,)] = await daemon.store.fetch_all("SELECT detail FROM events WHERE kind = 'requeued'")
        assert json.loads(detail) == {"outbox_id": failed.id, "kind": "deliver", "by": "dana", "was": "failed"}

        # Sent, the row is not sent a third time.
        assert await cli("retry", "--config", config, str(failed.id)) == 1
        assert capsys.readouterr().out.endswith("because it was already sent or withdrawn\n")
        assert await cli("retry", "--config", config, "--failed-deliveries") == 0
        assert capsys.readouterr().out == "nothing to send again\n"
    finally:
        await close_sink(sink)


async def test_requeued_row_gets_a_new_give_up_window(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink()
    sink.handler.reply = NO_SUCH_USER
    try:
        clock = ManualClock(START)
        daemon = await start_daemon(outage_config(tmp_path, sink.port, give_up_after="1h", concurrency=1), clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        failed = await wait_for_row(daemon, "failed", 1)

        # Two hours later the row is older than give_up_after, and the smarthost only defers.
        sink.handler.reply = "451 4.3.0 try later"
        await clock.advance(timedelta(hours=2))
        done = await asyncio.to_thread(store_admin.requeue, daemon.config.database_path, clock.now(), "dana", ids=(failed.id,))
        assert [row.id for row in done.sent_again] == [failed.id]
        await clock.advance(RESCAN_EVERY + timedelta(seconds=1))

        # A new window: deferred and retried, not failed for good after one attempt.
        deferred = await wait_for_row(daemon, "pending", 1)
        assert deferred.next_attempt_at > clock.now()
    finally:
        await close_sink(sink)


async def test_pending_rows_made_due_now(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    smarthost_port = free_port()
    clock = ManualClock(datetime.now(timezone.utc))
    daemon = await start_daemon(outage_config(tmp_path, smarthost_port, retry_initial="1h", retry_max="2h"), clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message())
    deferred = await wait_for_row(daemon, "pending", 1)
    assert deferred.next_attempt_at > clock.now() + timedelta(minutes=50)

    sink = await start_sink(port=smarthost_port)
    try:
        assert await cli("retry", "--config", str(daemon.config.path), "--pending") == 0
        # The message for the team and the acknowledgement, both for the smarthost.
        assert capsys.readouterr().out.endswith("2 rows are due now; a running daemon sends them within a minute\n")
        await clock.advance(RESCAN_EVERY + timedelta(seconds=1))
        await wait_until(lambda: sink.to("team@example.net"), what="the delivery made due now")
        # The attempt made due now counts as the second; its backoff is unchanged.
        await wait_for_row(daemon, "done", 2)
    finally:
        await close_sink(sink)


async def test_retry_usage_errors(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon = await start_daemon(outage_config(tmp_path, free_port()), ManualClock(datetime.now(timezone.utc)))
    config = str(daemon.config.path)
    capsys.readouterr()

    assert await cli("retry", "--config", config) == 2
    assert capsys.readouterr().err == "error: no rows named: give outbox row IDs, --failed-deliveries or --pending\n"
    assert await cli("retry", "--config", config, "999") == 2
    assert capsys.readouterr().err == f"error: outbox row 999 not found in {daemon.config.database_path}; no row was changed\n"
    with pytest.raises(SystemExit):
        main(["retry", "--config", config, "0"])
    assert "expected a whole number from 1" in capsys.readouterr().err


async def conversation_state(daemon: Daemon) -> tuple[int, str, str | None, str | None]:
    """Return delivery_failed, escalation_reason, next_escalation_at and deadline of the only conversation."""
    assert daemon.store is not None
    [row] = await daemon.store.fetch_all("SELECT delivery_failed, escalation_reason, next_escalation_at, deadline FROM conversations")
    return row[0], row[1], row[2], row[3]


async def escalation_levels(daemon: Daemon) -> list[object]:
    assert daemon.store is not None
    rows = await daemon.store.fetch_all("SELECT detail FROM events WHERE kind = 'escalated' ORDER BY id")
    return [json.loads(detail)["level"] for (detail,) in rows]


async def test_delivered_retry_resumes_escalation_chain(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink()
    sink.handler.reply = NO_SUCH_USER
    try:
        clock = ManualClock(START)
        daemon = await start_daemon(outage_config(tmp_path, sink.port, concurrency=1), clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        failed = await wait_for_row(daemon, "failed", 1)
        # The failure escalates at once, and the chain stops there.
        await wait_until(lambda: escalation_levels(daemon), what="the escalation of the failed delivery")
        flag, reason, next_at, deadline = await conversation_state(daemon)
        assert (flag, next_at) == (1, None)
        assert reason.startswith("delivery to the destination failed permanently")
        assert deadline is not None

        sink.handler.reply = None
        await asyncio.to_thread(store_admin.requeue, daemon.config.database_path, clock.now(), "dana", ids=(failed.id,))
        await clock.advance(RESCAN_EVERY + timedelta(seconds=1))
        await wait_until(lambda: sink.to("team@example.net"), what="the delivery sent again")

        async def rescheduled() -> bool:
            return await conversation_state(daemon) == (0, "", deadline, deadline)

        # Woken by the delivery, the scheduler sets the first level's time again: the deadline, for a chain of one level at 0m.
        await wait_until(rescheduled, what="the chain scheduled again")
        # Every loop must be asleep at its new time before the clock moves, or a
        # loop still between its query and its sleep would miss the move.
        await settle(daemon, clock)
        await clock.set(parse_instant(deadline) + timedelta(seconds=1))

        async def fired() -> bool:
            return len(await escalation_levels(daemon)) == 2

        await wait_until(fired, what="the first level at the deadline")
        assert (await escalation_levels(daemon))[1] == 1
    finally:
        await close_sink(sink)
