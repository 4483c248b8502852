"""Escalation: each level fires once at its time, across restarts and reloads, and stops on an answer."""

from __future__ import annotations

import asyncio
import email
import hashlib
import hmac
import json
import shlex
import sqlite3
from contextlib import closing
from datetime import datetime, timedelta, timezone
from email.message import Message
from pathlib import Path

import pytest
from conftest import (
    RecipientSinkHandler,
    case_file,
    chain_rules,
    maildir_messages,
    send,
    settle,
    start_sink,
    wait_until,
    write_config,
)
from structlog.testing import capture_logs
from webhook_receiver import webhook_receiver

from guardrail.cli import build_parser, main
from guardrail.clock import ManualClock, format_instant, parse_instant
from guardrail.committer import Committer, EscalationRun
from guardrail.config import load_config
from guardrail.daemon import Daemon, answer_command, load_ruleset
from guardrail.escalation import (
    DueConversation,
    Sender,
    at_once_wording,
    delivery_failure_reason,
    event_target,
    levels_passed,
    plan_escalation,
    slack_body,
    webhook_body,
)
from guardrail.store_batch import (
    WITHDRAWN_ERROR,
    AttemptResult,
    ManualAnswer,
    StoreSettings,
)
from guardrail.webhooks import status_outcome

SECRET = "test-webhook-secret"


def facilities_rules(webhook_url: str) -> str:
    return chain_rules(f"""[
    {{ after = "0m", name = "Dana Duty", address = "duty-manager@example.org", webhook = {{ url = "{webhook_url}", secret_env = "GUARDRAIL_TEST_WEBHOOK_SECRET" }} }},
    {{ after = "2h", name = "Erik Head", address = "head-of-facilities@example.org" }},
]""")

def outbound(folder: Path) -> list[Message]:
    return [email.message_from_bytes(data) for data in maildir_messages(folder / "var" / "outbound")]


def escalations_to(folder: Path, address: str) -> list[Message]:
    return [m for m in outbound(folder) if m["X-Guardrail-Envelope-To"] == address and m["Auto-Submitted"] == "auto-generated"]


def acknowledgements(folder: Path) -> list[Message]:
    return [m for m in outbound(folder) if m["Auto-Submitted"] == "auto-replied"]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


@pytest.fixture
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("GUARDRAIL_TEST_WEBHOOK_SECRET", SECRET)
    return SECRET


async def advance_in_ticks(daemon, clock: ManualClock, until: datetime, tick: timedelta = timedelta(seconds=30)) -> None:
    """Move the clock to `until` in steps, letting the daemon handle each step."""
    while clock.now() < until:
        await clock.set(min(clock.now() + tick, until))
        await settle(daemon, clock)


async def test_each_level_fires_exactly_once(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    message = case_file("escalation", "message.eml")
    with webhook_receiver(statuses=[503]) as receiver:
        config = write_config(
            tmp_path, rules=facilities_rules(receiver.url),
            sections={"webhooks": {"attempts": 3, "retry_initial": "20ms", "retry_max": "50ms"}},
        )
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await start_daemon(config, clock=clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message)
        await settle(daemon, clock)

        await advance_in_ticks(daemon, clock, at("2025-11-17T10:59:30"))
        assert escalations_to(tmp_path, "duty-manager@example.org") == []

        await advance_in_ticks(daemon, clock, at("2025-11-17T11:00:00"))
        assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
        await advance_in_ticks(daemon, clock, at("2025-11-17T11:10:00"))

        # Restart on the same database, then reload the rules.
        await daemon.stop()
        clock = ManualClock(at("2025-11-17T11:10:00"))
        daemon = await start_daemon(config, clock=clock)
        await advance_in_ticks(daemon, clock, at("2025-11-17T11:20:00"))
        assert daemon.reload() is True
        await advance_in_ticks(daemon, clock, at("2025-11-17T12:59:30"))
        assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
        assert escalations_to(tmp_path, "head-of-facilities@example.org") == []

        await advance_in_ticks(daemon, clock, at("2025-11-17T13:05:00"))
        assert len(escalations_to(tmp_path, "head-of-facilities@example.org")) == 1

        await clock.set(at("2025-11-17T13:30:00"))
        reply = (
            b"From: Carol Tech <carol@example.org>\r\nTo: Alice Example <alice@example.com>\r\n"
            b"Cc: support@example.org\r\nSubject: Re: Water leak in room 12\r\nMessage-ID: <carol-1@example.org>\r\n"
            b"In-Reply-To: <leak-12@example.com>\r\nReferences: <leak-12@example.com>\r\n\r\nA plumber is on the way.\r\n"
        )
        await send(daemon.port, "carol@example.org", ["support@example.org"], reply)
        await advance_in_ticks(daemon, clock, at("2025-11-17T16:00:00"), tick=timedelta(minutes=5))

    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
    assert len(escalations_to(tmp_path, "head-of-facilities@example.org")) == 1
    assert len(acknowledgements(tmp_path)) == 1
    # One failed try and one success, both with the same idempotency key.
    assert [json.loads(request.body)["level"] for request in receiver.requests] == [1, 1]
    keys = {request.headers["idempotency-key"] for request in receiver.requests}
    assert len(keys) == 1
    with sqlite3.connect(daemon.config.database_path) as connection:
        state, answered_at, level = connection.execute("SELECT state, answered_at, escalation_level FROM conversations").fetchone()
        webhook_rows = connection.execute("SELECT state FROM outbox WHERE kind = 'webhook'").fetchall()
    assert state == "answered"
    assert answered_at == "2025-11-17T13:30:00.000000Z"
    assert level == 2
    assert webhook_rows == [("done",)]


async def test_webhook_is_signed_with_hmac(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    message = case_file("escalation", "message.eml")
    with webhook_receiver() as receiver:
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await start_daemon(write_config(tmp_path, rules=facilities_rules(receiver.url)), clock=clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message)
        await advance_in_ticks(daemon, clock, at("2025-11-17T11:00:00"), tick=timedelta(minutes=30))
        await wait_until(lambda: receiver.requests, what="the webhook request")

    (request,) = receiver.requests
    timestamp, digest = (part.split("=", 1)[1] for part in request.headers["x-guardrail-signature"].split(","))
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert digest == expected
    body = json.loads(request.body)
    assert body["reference"].startswith("GR-")
    assert body["team"] == "facilities"
    assert body["human"] == {"name": "Dana Duty", "address": "duty-manager@example.org"}


# One retry a minute or two after the first failure, then one after two to three minutes more.
WEBHOOK_RETRIES = {"webhooks": {"attempts": 3, "retry_initial": "1m", "retry_max": "1h"}}


def webhook_only_rules(webhook_url: str) -> str:
    """Return rules whose first level only calls `webhook_url`, so a failed webhook sends the fallback human mail instead."""
    return chain_rules(f"""[
    {{ after = "0m", webhook = {{ url = "{webhook_url}", secret_env = "GUARDRAIL_TEST_WEBHOOK_SECRET" }} }},
    {{ after = "2h", name = "Erik Head", address = "head-of-facilities@example.org" }},
]""")


def webhook_rows(database: Path) -> list[tuple[str, int, datetime, str | None]]:
    """Return (state, attempts, next attempt, last error) of every webhook row in the outbox."""
    with closing(sqlite3.connect(database)) as connection:
        rows = connection.execute(
            "SELECT state, attempts, next_attempt_at, last_error FROM outbox WHERE kind = 'webhook' ORDER BY id"
        ).fetchall()
    return [(state, attempts, parse_instant(next_at), error) for state, attempts, next_at, error in rows]


async def escalated_at_deadline(config: Path, start_daemon, clock: ManualClock):
    """Start a daemon on `config`, send the test message at 10:00 and move the clock to its 11:00 deadline."""
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], case_file("escalation", "message.eml"))
    await settle(daemon, clock)
    await clock.set(at("2025-11-17T11:00:00"))
    await settle(daemon, clock)
    return daemon


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "delivered"), (204, "delivered"), (301, "permanent"), (400, "permanent"), (404, "permanent"),
     (408, "permanent"), (429, "temporary"), (500, "temporary"), (503, "temporary")],
)
def test_webhook_status_outcome(status: int, outcome: str) -> None:
    assert status_outcome(status) == outcome


async def test_webhook_retry_waits_for_stored_time(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    with webhook_receiver(statuses=[503]) as receiver:
        config = write_config(tmp_path, rules=facilities_rules(receiver.url), sections=WEBHOOK_RETRIES)
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await escalated_at_deadline(config, start_daemon, clock)
        database = daemon.config.database_path

        # One POST, and the row waits in the outbox for its stored next attempt.
        assert len(receiver.requests) == 1
        [(state, attempts, retry_at, error)] = webhook_rows(database)
        assert (state, attempts) == ("pending", 1)
        assert error is not None and error.endswith("returned HTTP 503")
        assert at("2025-11-17T11:01:00") <= retry_at <= at("2025-11-17T11:02:00")

        await clock.set(retry_at - timedelta(seconds=1))
        await settle(daemon, clock)
        assert len(receiver.requests) == 1

        await clock.set(retry_at)
        await settle(daemon, clock)

    assert len(receiver.requests) == 2
    assert [row[:2] for row in webhook_rows(database)] == [("done", 2)]
    assert len({request.headers["idempotency-key"] for request in receiver.requests}) == 1


async def test_answer_withdraws_pending_escalation(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    with webhook_receiver(statuses=[503]) as receiver:
        config = write_config(tmp_path, rules=facilities_rules(receiver.url), sections=WEBHOOK_RETRIES)
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await escalated_at_deadline(config, start_daemon, clock)
        database = daemon.config.database_path
        [(_, _, retry_at, _)] = webhook_rows(database)
        ((reference,),) = await daemon.store.fetch_all("SELECT reference FROM conversations")

        assert await daemon.store.mark_answered(reference, "carol", clock.now()) == "open"
        await clock.set(retry_at + timedelta(minutes=5))
        await settle(daemon, clock)

    # The one POST before the answer, and none after it.
    assert len(receiver.requests) == 1
    assert webhook_rows(database) == [("done", 1, retry_at, WITHDRAWN_ERROR)]
    withdrawn = await daemon.store.fetch_all("SELECT detail FROM events WHERE kind = 'escalation_withdrawn'")
    assert [json.loads(detail) for (detail,) in withdrawn] == [
        {"outbox_id": json.loads(withdrawn[0][0])["outbox_id"], "kind": "webhook", "attempts": 1, "reason": "the conversation was answered"},
    ]
    # The escalation mail to Dana went out with the webhook, before the answer, and stays the only one.
    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1


async def test_webhook_attempts_survive_restart(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    with webhook_receiver(statuses=[503, 503]) as receiver:
        config = write_config(tmp_path, rules=facilities_rules(receiver.url), sections=WEBHOOK_RETRIES)
        daemon = await escalated_at_deadline(config, start_daemon, ManualClock(at("2025-11-17T10:00:00")))
        database = daemon.config.database_path
        [(_, attempts, retry_at, _)] = webhook_rows(database)
        assert attempts == 1
        await daemon.stop()

        clock = ManualClock(retry_at)
        daemon = await start_daemon(config, clock=clock)
        await settle(daemon, clock)
        # The second attempt counts on from the stored first one, and its backoff doubles.
        [(state, attempts, second_retry_at, _)] = webhook_rows(database)
        assert (state, attempts) == ("pending", 2)
        assert second_retry_at >= retry_at + timedelta(minutes=2)

        await clock.set(second_retry_at)
        await settle(daemon, clock)

    assert len(receiver.requests) == 3
    assert [row[:2] for row in webhook_rows(database)] == [("done", 3)]
    assert len({request.headers["idempotency-key"] for request in receiver.requests}) == 1


async def test_webhook_fallback_after_last_attempt(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    with webhook_receiver(statuses=[503, 503, 503]) as receiver:
        config = write_config(
            tmp_path, rules=webhook_only_rules(receiver.url),
            sections={"webhooks": {**WEBHOOK_RETRIES["webhooks"], "attempts": 2}},
        )
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await escalated_at_deadline(config, start_daemon, clock)
        database = daemon.config.database_path
        [(state, _, retry_at, _)] = webhook_rows(database)
        assert state == "pending"
        assert escalations_to(tmp_path, "duty-manager@example.org") == []

        await clock.set(retry_at)
        await settle(daemon, clock)
        # Nothing is tried after the last attempt.
        await clock.set(at("2025-11-17T12:00:00"))
        await settle(daemon, clock)

    assert len(receiver.requests) == 2
    [(state, attempts, _, error)] = webhook_rows(database)
    assert (state, attempts) == ("failed", 2)
    assert error is not None and error.startswith("gave up after 2 attempts: webhook ")
    [mail] = escalations_to(tmp_path, "duty-manager@example.org")
    assert "(level 1)" in mail["Subject"]


async def test_webhook_404_fails_at_once(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    with webhook_receiver(statuses=[404]) as receiver:
        config = write_config(tmp_path, rules=webhook_only_rules(receiver.url), sections=WEBHOOK_RETRIES)
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await escalated_at_deadline(config, start_daemon, clock)
        database = daemon.config.database_path

        # Failed at the first attempt, and the fallback mail went out at the same time.
        assert len(receiver.requests) == 1
        [(state, attempts, _, error)] = webhook_rows(database)
        assert (state, attempts) == ("failed", 1)
        assert error is not None and error.endswith("returned HTTP 404; not retried")
        assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
        assert clock.now() == at("2025-11-17T11:00:00")

        await advance_in_ticks(daemon, clock, at("2025-11-17T13:00:00"), tick=timedelta(minutes=30))

    assert len(receiver.requests) == 1
    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
    assert len(escalations_to(tmp_path, "head-of-facilities@example.org")) == 1


async def test_answer_just_before_deadline_prevents_escalation(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    message = case_file("escalation", "message.eml")
    with webhook_receiver() as receiver:
        clock = ManualClock(at("2025-11-17T10:00:00"))
        config = write_config(tmp_path, rules=facilities_rules(receiver.url))
        daemon = await start_daemon(config, clock=clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message)
        await clock.set(at("2025-11-17T10:59:59"))
        ((reference,),) = await daemon.store.fetch_all("SELECT reference FROM conversations")
        # The command runs in its own thread with its own event loop, as from a shell.
        assert await asyncio.to_thread(main, ["answer", "--config", str(config), reference, "--by", "carol"]) == 0
        await advance_in_ticks(daemon, clock, at("2025-11-17T14:00:00"), tick=timedelta(minutes=30))

    assert receiver.requests == []
    assert escalations_to(tmp_path, "duty-manager@example.org") == []
    rows = await daemon.store.fetch_all("SELECT state, answered_by FROM conversations")
    assert rows == [("answered", "manual:carol")]


async def test_escalation_due_while_down_fires_once_after_restart(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    message = case_file("escalation", "message.eml")
    with webhook_receiver() as receiver:
        config = write_config(tmp_path, rules=facilities_rules(receiver.url))
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await start_daemon(config, clock=clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message)
        await settle(daemon, clock)
        await daemon.stop()

        # Down from 10:00 to 11:30: level 1 fell due at 11:00.
        clock = ManualClock(at("2025-11-17T11:30:00"))
        daemon = await start_daemon(config, clock=clock)
        await settle(daemon, clock)
        await daemon.stop()
        daemon = await start_daemon(config, clock=clock)
        await settle(daemon, clock)

    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
    assert escalations_to(tmp_path, "head-of-facilities@example.org") == []
    assert len(receiver.requests) == 1


@pytest.mark.parametrize(("user", "by"), [("carol", "carol"), ("", "operator"), (None, "operator")])
def test_answer_by_defaults_to_user(monkeypatch: pytest.MonkeyPatch, user: str | None, by: str) -> None:
    if user is None:
        monkeypatch.delenv("USER", raising=False)
    else:
        monkeypatch.setenv("USER", user)
    arguments = build_parser().parse_args(["answer", "--config", "guardrail.toml", "GR-7K3M9Q"])
    assert arguments.by == by


def test_answer_command_quotes_config_path(tmp_path: Path) -> None:
    config = tmp_path / "help desk" / "it's guardrail.toml"
    words = shlex.split(f"{answer_command(config)} GR-7K3M9Q")

    assert words[1:] == ["answer", "--config", str(config.resolve()), "GR-7K3M9Q"]
    assert build_parser().parse_args(words[1:]).config == config.resolve()


async def test_answer_command_rejects_unknown_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert await asyncio.to_thread(main, ["answer", "--config", str(config), "GR-000000"]) == 2
    assert "conversation GR-000000 not found" in capsys.readouterr().err


async def test_answer_command_on_machine_mail_changes_nothing(
    tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    daemon = await start_daemon(config)
    auto_reply = (
        b"From: Robot <robot@example.com>\r\nTo: support@example.org\r\nSubject: Out of office\r\n"
        b"Message-ID: <ooo@example.com>\r\nAuto-Submitted: auto-replied\r\n\r\nAway until Monday.\r\n"
    )
    await send(daemon.port, "robot@example.com", ["support@example.org"], auto_reply)
    [(reference,)] = await daemon.store.fetch_all("SELECT reference FROM conversations")
    await daemon.stop()

    assert await asyncio.to_thread(main, ["answer", "--config", str(config), reference]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{reference} needs no reply: machine mail or our own mail opened it; nothing changed"
    )
    with sqlite3.connect(daemon.config.database_path) as connection:
        assert connection.execute("SELECT state FROM conversations").fetchall() == [("no_reply_needed",)]


async def test_locked_database_postpones_escalation(tmp_path: Path, start_daemon, webhook_secret: str) -> None:
    message = case_file("escalation", "message.eml")
    with webhook_receiver() as receiver:
        config = write_config(
            tmp_path, rules=facilities_rules(receiver.url), sections={"database": {"busy_timeout": "200ms"}},
        )
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await start_daemon(config, clock=clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message)
        await settle(daemon, clock)
        scheduler = daemon.scheduler
        assert scheduler is not None

        # Another program has the write lock when level 1 falls due.
        blocker = sqlite3.connect(daemon.config.database_path, isolation_level=None, timeout=5)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with capture_logs() as events:
                await clock.set(at("2025-11-17T11:00:00"))
                await wait_until(
                    lambda: not scheduler.alive or any(event["event"] == "escalations_postponed" for event in events),
                    what="the scheduler to fail to commit",
                )
        finally:
            blocker.rollback()
            blocker.close()
        assert scheduler.alive
        assert escalations_to(tmp_path, "duty-manager@example.org") == []

        # The next try, once the lock is gone, fires the level once.
        await clock.set(at("2025-11-17T11:01:00"))
        await wait_until(lambda: receiver.requests, what="the webhook request")
        await wait_until(lambda: escalations_to(tmp_path, "duty-manager@example.org"), what="the escalation mail")

    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
    assert len(receiver.requests) == 1


async def stored_past_deadline(tmp_path: Path, start_daemon) -> tuple[Path, Committer, EscalationRun]:
    """Store one conversation past its 11:00 deadline, stop the daemon, and return its database, a committer and a due run."""
    config = write_config(tmp_path, rules=facilities_rules("http://127.0.0.1:9/escalate"))
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], case_file("escalation", "message.eml"))
    await settle(daemon, clock)
    await daemon.stop()
    database = daemon.config.database_path
    now = at("2025-11-17T11:00:00")
    sender = Sender("mx.test.example", "guardrail@mx.test.example", "guardrail answer")
    run = EscalationRun(now, lambda conversation: plan_escalation(conversation, daemon.rules, now, sender))
    return database, Committer(database, StoreSettings()), run


async def test_answer_beside_escalation_stops_it(tmp_path: Path, start_daemon) -> None:
    database, committer, run = await stored_past_deadline(tmp_path, start_daemon)
    try:
        # One transaction contains the answer and the run that finds the level due.
        committer.commit([ManualAnswer(1, "manual:carol", run.now), run])
    finally:
        committer.close()

    with closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT state, escalation_level FROM conversations").fetchall() == [("answered", 0)]
        assert connection.execute("SELECT COUNT(*) FROM events WHERE kind = 'escalated'").fetchone() == (0,)
        assert connection.execute("SELECT COUNT(*) FROM outbox WHERE kind = 'webhook'").fetchone() == (0,)


async def test_failed_delivery_beside_escalation_escalates(tmp_path: Path, start_daemon) -> None:
    database, committer, run = await stored_past_deadline(tmp_path, start_daemon)
    failure = AttemptResult(1, 1, 1, run.now, "failed", 1, error="smarthost replied 550 no such user", kind="deliver")
    try:
        # One transaction contains the failed delivery and the run that finds the level due.
        committer.commit([failure, run])
        after_failure = committer.db.execute("SELECT next_escalation_at FROM conversations").fetchone()
        committer.commit([run])
    finally:
        committer.close()

    assert after_failure == (format_instant(run.now),)
    with closing(sqlite3.connect(database)) as connection:
        details = [json.loads(detail) for (detail,) in connection.execute("SELECT detail FROM events WHERE kind = 'escalated'")]
        payloads = [bytes(payload) for (payload,) in connection.execute("SELECT payload FROM outbox WHERE target LIKE '%escalation%'")]
    assert [detail["level"] for detail in details] == ["unstaffed"]
    assert len(payloads) == 1
    assert b"Delivery failed" in payloads[0]


GAVE_UP = "gave up after 3 attempts: smarthost deferred recipients"


@pytest.mark.parametrize(
    ("delivered", "undelivered", "reason", "title", "nobody"),
    [
        ((), (), f"delivery to the destination failed permanently: {GAVE_UP}", "Delivery failed", True),
        ((), ("team@example.net", "second@example.net"), f"delivery to the destination failed permanently: {GAVE_UP}",
         "Delivery failed", True),
        (("team@example.net",), ("second@example.net",),
         "delivery to some of the destination's addresses failed permanently:"
         f" delivered to team@example.net; not delivered to second@example.net: {GAVE_UP}",
         "Delivery failed in part", False),
        (("a@example.net", "b@example.net"), ("c@example.net", "d@example.net"),
         "delivery to some of the destination's addresses failed permanently:"
         f" delivered to a@example.net, b@example.net; not delivered to c@example.net, d@example.net: {GAVE_UP}",
         "Delivery failed in part", False),
        # Long lists name five addresses and count the rest, so the reply still fits.
        (tuple(f"d{n}@example.net" for n in range(7)), tuple(f"u{n}@example.net" for n in range(40)),
         "delivery to some of the destination's addresses failed permanently: delivered to d0@example.net,"
         " d1@example.net, d2@example.net, d3@example.net, d4@example.net and 2 more; not delivered to"
         f" u0@example.net, u1@example.net, u2@example.net, u3@example.net, u4@example.net and 35 more: {GAVE_UP}",
         "Delivery failed in part", False),
    ],
)
def test_failed_delivery_reason_and_wording(
    delivered: tuple[str, ...], undelivered: tuple[str, ...], reason: str, title: str, nobody: bool
) -> None:
    conversation = DueConversation(
        1, "GR-7K3M9Q", "support", "default", "Printer", "alice@example.com", at("2025-11-17T10:00:00"), None, 0,
        delivery_failure_reason(delivered, undelivered, GAVE_UP),
    )

    wording = at_once_wording(conversation)

    assert conversation.reason == reason
    assert wording[0] == title
    assert reason in wording[1]
    assert ("Nobody on the team has it." in wording[1]) is nobody


LEAD_RULES = chain_rules(
    '[{ after = "0m", name = "Dana Duty", address = "duty-manager@example.org" }]',
    'escalation_contact = { name = "Lee Lead", address = "lead@example.org" }\n',
)


async def test_rejected_escalation_mail_goes_to_contact(tmp_path: Path, start_daemon) -> None:
    sink = await start_sink(handler=RecipientSinkHandler(rcpt_replies={"duty-manager@example.org": "550 5.1.1 no such user"}))
    try:
        config = write_config(tmp_path, rules=LEAD_RULES, sections={
            "smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False, "timeout": "10s"},
        })
        clock = ManualClock(at("2025-11-17T10:00:00"))
        daemon = await start_daemon(config, clock=clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], case_file("escalation", "message.eml"))
        await settle(daemon, clock)
        with capture_logs() as logs:
            await advance_in_ticks(daemon, clock, at("2025-11-17T11:05:00"))
            await wait_until(lambda: sink.to("lead@example.org"), what="the escalation mail to the team's contact")
    finally:
        sink.server.close()
        await sink.server.wait_closed()

    [redirected] = [email.message_from_bytes(received.content) for received in sink.to("lead@example.org")]
    body = redirected.get_payload(decode=True).decode()
    assert "could not be delivered" in body
    assert "Dana Duty <duty-manager@example.org>" in body
    assert redirected["Subject"].startswith("[GR-")
    # The person who could not be reached gets nothing, and nobody gets a second copy.
    assert sink.to("duty-manager@example.org") == []
    assert len(sink.to("lead@example.org")) == 1
    [failed] = [entry for entry in logs if entry["event"] == "escalation_failed"]
    assert failed["fallback"] == "escalation mail to lead@example.org"


async def open_chain_conversation(tmp_path: Path, start_daemon, chain: str) -> tuple[Path, Daemon, ManualClock]:
    """Start a daemon at 2025-11-17 10:00 UTC whose team escalates along `chain`, and open a conversation with a 11:00 deadline."""
    config = write_config(tmp_path, rules=chain_rules(chain))
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], case_file("escalation", "message.eml"))
    return config, daemon, clock


DUTY = '{ name = "Dana Duty", address = "duty-manager@example.org" }'
HEAD = '{ name = "Erik Head", address = "head-of-facilities@example.org" }'


@pytest.mark.parametrize(
    ("before", "after", "reload_at", "escalated_at"),
    [
        # A level moved earlier fires at its new time, not the stored one.
        (f'[{{ after = "3h", {DUTY[2:]}]', f'[{{ after = "30m", {DUTY[2:]}]', "2025-11-17T11:10:00", "2025-11-17T11:30:00"),
        # A level moved past the reload fires at once.
        (f'[{{ after = "3h", {DUTY[2:]}]', f'[{{ after = "0m", {DUTY[2:]}]', "2025-11-17T11:10:00", "2025-11-17T11:10:00"),
    ],
)
async def test_reload_moves_stored_escalation(
    tmp_path: Path, start_daemon, before: str, after: str, reload_at: str, escalated_at: str
) -> None:
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, before)
    await advance_in_ticks(daemon, clock, at(reload_at), tick=timedelta(minutes=5))
    assert escalations_to(tmp_path, "duty-manager@example.org") == []

    (tmp_path / "rules" / "rules.toml").write_text(chain_rules(after))
    assert daemon.reload() is True
    assert daemon.rescheduling is not None
    await daemon.rescheduling
    await settle(daemon, clock)
    await advance_in_ticks(daemon, clock, at(escalated_at) - timedelta(minutes=1), tick=timedelta(minutes=1))
    early = len(escalations_to(tmp_path, "duty-manager@example.org"))
    await advance_in_ticks(daemon, clock, at(escalated_at) + timedelta(minutes=1), tick=timedelta(minutes=1))

    assert early == (1 if escalated_at == reload_at else 0)
    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1


async def test_reload_extends_ended_chain(tmp_path: Path, start_daemon) -> None:
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, f'[{{ after = "0m", {DUTY[2:]}]')
    await advance_in_ticks(daemon, clock, at("2025-11-17T11:10:00"), tick=timedelta(minutes=5))
    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1

    # The chain had ended. A second level added by a reload fires at deadline + 2h.
    (tmp_path / "rules" / "rules.toml").write_text(chain_rules(f'[{{ after = "0m", {DUTY[2:]}, {{ after = "2h", {HEAD[2:]}]'))
    with capture_logs() as logs:
        assert daemon.reload() is True
        assert daemon.rescheduling is not None
        await daemon.rescheduling
    await advance_in_ticks(daemon, clock, at("2025-11-17T12:59:00"), tick=timedelta(minutes=10))
    early = escalations_to(tmp_path, "head-of-facilities@example.org")
    await advance_in_ticks(daemon, clock, at("2025-11-17T13:01:00"), tick=timedelta(minutes=1))

    assert early == []
    assert len(escalations_to(tmp_path, "head-of-facilities@example.org")) == 1
    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
    assert [entry["conversations"] for entry in logs if entry["event"] == "escalations_rescheduled"] == [1]


@pytest.mark.parametrize(
    ("before", "after", "address", "escalated_at"),
    [
        # A level added to a chain that had ended fires at deadline + 2h.
        (f'[{{ after = "0m", {DUTY[2:]}]', f'[{{ after = "0m", {DUTY[2:]}, {{ after = "2h", {HEAD[2:]}]',
         "head-of-facilities@example.org", "2025-11-17T13:00:00"),
        # A level moved earlier fires at its new time, not at the one stored under the old rules.
        (f'[{{ after = "0m", {DUTY[2:]}, {{ after = "6h", {HEAD[2:]}]', f'[{{ after = "0m", {DUTY[2:]}, {{ after = "1h", {HEAD[2:]}]',
         "head-of-facilities@example.org", "2025-11-17T12:00:00"),
        # A first level moved earlier, before it fired.
        (f'[{{ after = "5h", {DUTY[2:]}]', f'[{{ after = "1h", {DUTY[2:]}]', "duty-manager@example.org", "2025-11-17T12:00:00"),
    ],
)
async def test_restart_with_changed_chain_reschedules(
    tmp_path: Path, start_daemon, before: str, after: str, address: str, escalated_at: str
) -> None:
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, before)
    await advance_in_ticks(daemon, clock, at("2025-11-17T11:10:00"), tick=timedelta(minutes=5))
    await daemon.stop()

    # The rule files change while the daemon is down.
    (tmp_path / "rules" / "rules.toml").write_text(chain_rules(after))
    clock = ManualClock(at("2025-11-17T11:20:00"))
    daemon = await start_daemon(config, clock=clock)
    if daemon.rescheduling is not None:
        await daemon.rescheduling
    await settle(daemon, clock)
    await advance_in_ticks(daemon, clock, at(escalated_at) - timedelta(minutes=1), tick=timedelta(minutes=10))
    early = escalations_to(tmp_path, address)
    await advance_in_ticks(daemon, clock, at(escalated_at) + timedelta(minutes=1), tick=timedelta(minutes=1))

    assert early == []
    assert len(escalations_to(tmp_path, address)) == 1
    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1


def stored_next_escalation(folder: Path, value: str | None = None) -> str:
    """Return the one conversation's stored next escalation time, after setting it to `value` when given."""
    with closing(sqlite3.connect(folder / "var" / "guardrail.db")) as connection, connection:
        if value is not None:
            connection.execute("UPDATE conversations SET next_escalation_at = ?", (value,))
        (stored,), = connection.execute("SELECT next_escalation_at FROM conversations").fetchall()
    return stored


async def test_restart_with_same_rules_keeps_times(tmp_path: Path, start_daemon) -> None:
    # A start visits every open conversation only when the rules changed since the last complete reschedule.
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, f'[{{ after = "0m", {DUTY[2:]}, {{ after = "6h", {HEAD[2:]}]')
    await daemon.stop()
    marker = "2030-01-01T00:00:00+00:00"
    stored_next_escalation(tmp_path, marker)

    daemon = await start_daemon(config, clock=clock)
    assert daemon.rescheduling is not None
    await daemon.rescheduling
    await daemon.stop()
    unchanged = stored_next_escalation(tmp_path)

    (tmp_path / "rules" / "rules.toml").write_text(chain_rules(f'[{{ after = "1h", {DUTY[2:]}]'))
    daemon = await start_daemon(config, clock=clock)
    assert daemon.rescheduling is not None
    await daemon.rescheduling
    await daemon.stop()

    assert unchanged == marker
    assert stored_next_escalation(tmp_path) == format_instant(at("2025-11-17T12:00:00"))


async def test_restart_with_rules_changed_back_reschedules(tmp_path: Path, start_daemon) -> None:
    late, early = (chain_rules(f'[{{ after = "{after}", {DUTY[2:]}]') for after in ("5h", "1h"))
    config = write_config(tmp_path, rules=late, sections={"database": {"busy_timeout": "200ms"}})
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(config, clock=clock)
    assert daemon.rescheduling is not None
    await daemon.rescheduling

    # The reload's reschedule fails while another program has the write lock,
    # so no pass records the new rules. A conversation then opens under them.
    (tmp_path / "rules" / "rules.toml").write_text(early)
    blocker = sqlite3.connect(daemon.config.database_path, isolation_level=None, timeout=0)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        assert daemon.reload() is True
        await daemon.rescheduling
    finally:
        blocker.rollback()
        blocker.close()
    await send(daemon.port, "alice@example.com", ["support@example.org"], case_file("escalation", "message.eml"))
    await settle(daemon, clock)
    await daemon.stop()
    opened_under_early = stored_next_escalation(tmp_path)

    # The rules are changed back while the daemon is down.
    (tmp_path / "rules" / "rules.toml").write_text(late)
    daemon = await start_daemon(config, clock=clock)
    assert daemon.rescheduling is not None
    await daemon.rescheduling
    await daemon.stop()

    assert opened_under_early == format_instant(at("2025-11-17T12:00:00"))
    assert stored_next_escalation(tmp_path) == format_instant(at("2025-11-17T16:00:00"))


PAT = '{ name = "Pat Shift", address = "pat@example.org" }'
HOOK = 'webhook = { url = "http://127.0.0.1:9/hook" }'


def chain_of(*levels: str) -> str:
    """Return a chain as TOML, each level given as "AFTER PERSON" with PERSON one of DUTY, PAT, HEAD or HOOK."""
    people = {"DUTY": DUTY[2:-2], "PAT": PAT[2:-2], "HEAD": HEAD[2:-2], "HOOK": HOOK}
    written = []
    for level in levels:
        after, person = level.split()
        written.append(f'{{ after = "{after}", {people[person]} }}')
    return "[" + ", ".join(written) + "]"


DANA_AT, PAT_AT, ERIK_AT = ("duty-manager@example.org", ""), ("pat@example.org", ""), ("head-of-facilities@example.org", "")


@pytest.mark.parametrize(("chain", "fired", "passed"), [
    # The chain that fired them: the count of fired levels.
    (["0m DUTY", "1h PAT", "3h HEAD"], [DANA_AT, PAT_AT], 2),
    (["0m DUTY", "1h PAT", "3h HEAD"], [], 0),
    # Pat left the chain after being notified: Erik is next.
    (["0m DUTY", "3h HEAD"], [DANA_AT, PAT_AT], 1),
    # A level added before those that fired is skipped: the conversation escalated past it.
    (["0m DUTY", "30m HEAD", "1h PAT"], [DANA_AT, PAT_AT], 3),
    # A level whose recipient changed after later levels fired sends none of them again.
    (["0m DUTY", "1h HOOK", "3h HEAD"], [DANA_AT, ("", "http://127.0.0.1:9/old-hook"), ERIK_AT], 3),
    # ... and when it is the last level that fired, it is sent to its new recipient.
    (["0m DUTY", "1h PAT", "3h HEAD"], [DANA_AT, ("pat.old@example.org", "")], 1),
    # A person notified twice by a repeated level counts twice, and a third time is still due.
    (["0m DUTY", "1h DUTY", "2h DUTY"], [DANA_AT, DANA_AT], 2),
    # Addresses compare without case, and a webhook level by its URL.
    (["0m HOOK", "1h HEAD"], [("", "http://127.0.0.1:9/hook"), ERIK_AT], 2),
    (["0m DUTY"], [("Duty-Manager@Example.org", "")], 1),
])
def test_levels_passed_match_by_target(tmp_path: Path, chain: list[str], fired: list[tuple[str, str]], passed: int) -> None:
    config = write_config(tmp_path, rules=chain_rules(chain_of(*chain)))
    rules = load_ruleset(load_config(config))
    # As the store reads them back from the `escalated` events.
    targets = [event_target({"level": number, "to": address, "webhook": url}) for number, (address, url) in enumerate(fired, 1)]
    assert levels_passed(rules.teams["facilities"], rules, targets) == passed


async def test_removed_level_keeps_later_ones(tmp_path: Path, start_daemon) -> None:
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, chain_of("0m DUTY", "1h PAT", "3h HEAD"))
    await advance_in_ticks(daemon, clock, at("2025-11-17T12:10:00"), tick=timedelta(minutes=10))
    pat_escalations = len(escalations_to(tmp_path, "pat@example.org"))

    # Pat leaves the chain after being notified. Erik, the level after Pat, still falls due at deadline + 3h.
    (tmp_path / "rules" / "rules.toml").write_text(chain_rules(chain_of("0m DUTY", "3h HEAD")))
    assert daemon.reload() is True
    assert daemon.rescheduling is not None
    await daemon.rescheduling
    await advance_in_ticks(daemon, clock, at("2025-11-17T13:59:00"), tick=timedelta(minutes=10))
    early = escalations_to(tmp_path, "head-of-facilities@example.org")
    await advance_in_ticks(daemon, clock, at("2025-11-17T14:01:00"), tick=timedelta(minutes=1))

    assert pat_escalations == 1
    assert early == []
    assert len(escalations_to(tmp_path, "head-of-facilities@example.org")) == 1
    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
    assert len(escalations_to(tmp_path, "pat@example.org")) == 1


def reply_from(name: str, address: str, message_id: str) -> bytes:
    """Return a reply by `address` to the escalated message, to the sender with the shared inbox in Cc."""
    return (
        f"From: {name} <{address}>\r\nTo: Alice Example <alice@example.com>\r\nCc: support@example.org\r\n"
        f"Subject: Re: Water leak in room 12\r\nMessage-ID: {message_id}\r\n"
        "In-Reply-To: <leak-12@example.com>\r\nReferences: <leak-12@example.com>\r\n\r\nSomeone is on the way.\r\n"
    ).encode()


async def test_escalated_human_reply_answers(tmp_path: Path, start_daemon) -> None:
    # Dana Duty is in the chain and in no team. Her escalation mail instructs her to reply with the inbox in Cc.
    config, daemon, clock = await open_chain_conversation(
        tmp_path, start_daemon, f'[{{ after = "0m", {DUTY[2:]}, {{ after = "2h", {HEAD[2:]}]'
    )
    await advance_in_ticks(daemon, clock, at("2025-11-17T11:10:00"), tick=timedelta(minutes=10))
    [mail] = escalations_to(tmp_path, "duty-manager@example.org")
    assert "shared inbox in Cc" in mail.get_payload(decode=True).decode()

    await send(daemon.port, "duty-manager@example.org", ["support@example.org"],
               reply_from("Dana Duty", "duty-manager@example.org", "<dana-1@example.org>"))
    await advance_in_ticks(daemon, clock, at("2025-11-17T14:00:00"), tick=timedelta(minutes=10))

    rows = await daemon.store.fetch_all("SELECT state, answered_by, next_escalation_at FROM conversations")
    assert [tuple(row) for row in rows] == [("answered", "duty-manager@example.org", None)]
    assert escalations_to(tmp_path, "head-of-facilities@example.org") == []


@pytest.mark.parametrize(
    ("address", "staff"),
    [
        ("carol@example.org", True),  # team member
        ("Duty-Manager@Example.org", True),  # chain level
        ("head-of-facilities@example.org", True),  # escalation_contact
        ("fallback@example.org", True),  # [escalation] fallback
        ("alice@example.com", False),
    ],
)
def test_escalation_humans_are_staff(tmp_path: Path, address: str, staff: bool) -> None:
    rules_text = chain_rules(f'[{{ after = "0m", {DUTY[2:]}]', f"escalation_contact = {HEAD}\n")
    config = write_config(tmp_path, rules=rules_text)
    (tmp_path / "rules" / "00-shared.toml").write_text(
        (tmp_path / "rules" / "00-shared.toml").read_text().replace("duty-manager@example.org", "fallback@example.org")
    )
    rules = load_ruleset(load_config(config))
    assert rules.is_staff(address) is staff


async def test_forwarded_customer_follow_up_answers_nothing(tmp_path: Path, start_daemon) -> None:
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, f'[{{ after = "0m", {DUTY[2:]}]')
    await settle(daemon, clock)
    # The customer writes again through a forwarder that rewrote the envelope sender to a team member's address.
    follow_up = reply_from("Alice Example", "alice@example.com", "<alice-2@example.com>")
    await send(daemon.port, "carol@example.org", ["support@example.org"], follow_up)
    await advance_in_ticks(daemon, clock, at("2025-11-17T11:10:00"), tick=timedelta(minutes=10))

    rows = await daemon.store.fetch_all("SELECT state, answered_by FROM conversations")
    assert [tuple(row) for row in rows] == [("open", None)]
    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1


def moving_rules(*, with_alpha: bool) -> str:
    """Return rules whose default route goes to team alpha, or, without alpha, to team beta with a two-level chain."""
    alpha = """
[[team]]
name = "alpha"
destination = { maildir = "var/maildir/alpha" }
members = [{ name = "Al Alpha", address = "al@example.org" }]
first_response = "1h"
escalation = [{ after = "0m", name = "Ann Alpha", address = "ann@example.org" }]
"""
    beta = """
[[team]]
name = "beta"
destination = { maildir = "var/maildir/beta" }
members = [{ name = "Bo Beta", address = "bo@example.org" }]
first_response = "1h"
escalation = [
    { after = "0m", name = "Ben Beta", address = "ben@example.org" },
    { after = "2h", name = "Bea Boss", address = "bea.boss@example.org" },
]
"""
    default = "alpha" if with_alpha else "beta"
    return (alpha if with_alpha else "") + beta + f'\n[[route]]\nname = "default"\nteam = "{default}"\ndefault = true\n'


async def test_moved_conversation_follows_new_chain(tmp_path: Path, start_daemon) -> None:
    config = write_config(tmp_path, rules=moving_rules(with_alpha=True))
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], case_file("escalation", "message.eml"))
    await advance_in_ticks(daemon, clock, at("2025-11-17T11:10:00"), tick=timedelta(minutes=10))
    assert len(escalations_to(tmp_path, "ann@example.org")) == 1

    # Team alpha leaves the rules. The conversation has no team until the customer's follow-up moves it to beta.
    (tmp_path / "rules" / "rules.toml").write_text(moving_rules(with_alpha=False))
    assert daemon.reload() is True
    assert daemon.rescheduling is not None
    await daemon.rescheduling
    after_reload = daemon.rescheduling
    await advance_in_ticks(daemon, clock, at("2025-11-17T11:20:00"), tick=timedelta(minutes=10))
    await send(daemon.port, "alice@example.com", ["support@example.org"],
               reply_from("Alice Example", "alice@example.com", "<alice-2@example.com>"))
    await settle(daemon, clock)
    await asyncio.gather(*daemon._moves)
    # Only the moved conversation is set again: a pass over every open conversation per move could never end under a stream of moves.
    assert daemon.rescheduling is after_reload
    await advance_in_ticks(daemon, clock, at("2025-11-17T12:59:00"), tick=timedelta(minutes=10))
    boss_early = escalations_to(tmp_path, "bea.boss@example.org")
    await advance_in_ticks(daemon, clock, at("2025-11-17T13:01:00"), tick=timedelta(minutes=1))

    rows = await daemon.store.fetch_all("SELECT team, state, escalation_level FROM conversations")
    assert [tuple(row) for row in rows] == [("beta", "open", 2)]
    # The deadline has passed, so beta's first level fires after the move, and its second at deadline + 2h.
    assert len(escalations_to(tmp_path, "ben@example.org")) == 1
    assert boss_early == []
    assert len(escalations_to(tmp_path, "bea.boss@example.org")) == 1
    assert len(escalations_to(tmp_path, "ann@example.org")) == 1


@pytest.mark.parametrize(("chain", "level", "fired", "told", "next_at"), [
    # Stored under the same chain: Dana fired, Erik is due at deadline + 1h.
    (["0m DUTY", "1h HEAD"], 1, [DANA_AT], ["head-of-facilities@example.org"], None),
    # The chain was reordered after Dana fired: Dana gets no second mail, and Erik comes before her now.
    (["0m HEAD", "1h DUTY"], 1, [DANA_AT], [], None),
    # A level added after the one that fired: it is due, and the stored level counts the old chain.
    (["0m DUTY", "30m PAT", "3h HEAD"], 1, [DANA_AT], ["pat@example.org"], "2025-11-17T14:00:00"),
    # Events that account for fewer levels than stored keep the stored level.
    (["0m DUTY", "1h PAT", "3h HEAD"], 2, [DANA_AT], [], "2025-11-17T14:00:00"),
    # Not read: the stored level counts.
    (["0m DUTY", "1h PAT", "3h HEAD"], 1, None, ["pat@example.org"], "2025-11-17T14:00:00"),
])
def test_plan_matches_fired_levels(
    tmp_path: Path, chain: list[str], level: int, fired: list[tuple[str, str]] | None, told: list[str], next_at: str | None,
) -> None:
    rules = load_ruleset(load_config(write_config(tmp_path, rules=chain_rules(chain_of(*chain)))))
    conversation = DueConversation(
        1, "GR-7K3M9Q", "facilities", "default", "Water leak", "alice@example.com", at("2025-11-17T10:00:00"),
        at("2025-11-17T11:00:00"), level, "", fired=None if fired is None else tuple(fired),
    )
    sender = Sender("mx.test.example", "guardrail@mx.test.example", "guardrail answer")

    plan = plan_escalation(conversation, rules, at("2025-11-17T12:30:00"), sender)

    assert [address for mail in plan.mails for address in mail.recipients] == told
    assert plan.next_at == (at(next_at) if next_at else None)


async def test_restart_with_reordered_chain_fires_nothing_twice(tmp_path: Path, start_daemon) -> None:
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, chain_of("0m DUTY", "1h HEAD"))
    await advance_in_ticks(daemon, clock, at("2025-11-17T11:10:00"), tick=timedelta(minutes=5))
    await daemon.stop()

    # While the daemon is down, Erik moves before Dana, who was escalated to at 11:00. Erik's level counts as passed.
    (tmp_path / "rules" / "rules.toml").write_text(chain_rules(chain_of("0m HEAD", "1h DUTY")))
    clock = ManualClock(at("2025-11-17T12:30:00"))
    daemon = await start_daemon(config, clock=clock)
    assert daemon.rescheduling is not None
    await daemon.rescheduling
    await advance_in_ticks(daemon, clock, at("2025-11-17T14:00:00"), tick=timedelta(minutes=10))

    assert len(escalations_to(tmp_path, "duty-manager@example.org")) == 1
    assert escalations_to(tmp_path, "head-of-facilities@example.org") == []
    rows = await daemon.store.fetch_all("SELECT escalation_level, next_escalation_at FROM conversations")
    assert [tuple(row) for row in rows] == [(2, None)]


@pytest.mark.parametrize(
    ("zone", "received", "deadline"),
    [
        ("UTC", "Mon 17 Nov 2025 10:00 UTC", "Mon 17 Nov 2025 11:00 UTC"),
        ("Europe/Paris", "Mon 17 Nov 2025 11:00 CET (10:00 UTC)", "Mon 17 Nov 2025 12:00 CET (11:00 UTC)"),
        ("America/New_York", "Mon 17 Nov 2025 05:00 EST (10:00 UTC)", "Mon 17 Nov 2025 06:00 EST (11:00 UTC)"),
    ],
)
def test_escalation_mail_shows_team_times(tmp_path: Path, zone: str, received: str, deadline: str) -> None:
    rules_text = chain_rules(chain_of("0m DUTY")).replace('timezone = "UTC"', f'timezone = "{zone}"')
    rules = load_ruleset(load_config(write_config(tmp_path, rules=rules_text)))
    conversation = DueConversation(
        1, "GR-7K3M9Q", "facilities", "default", "Water leak", "alice@example.com", at("2025-11-17T10:00:00"),
        at("2025-11-17T11:00:00"), 0, "",
    )
    sender = Sender("mx.test.example", "guardrail@mx.test.example", "guardrail answer")

    [mail] = plan_escalation(conversation, rules, at("2025-11-17T11:30:00"), sender).mails
    lines = email.message_from_bytes(mail.data).get_payload(decode=True).decode().splitlines()

    assert f"Received:   {received}" in lines
    assert f"Deadline:   {deadline}" in lines


@pytest.mark.parametrize(
    ("reopened_at", "shown", "slack_line"),
    [
        (None, None, ":rotating_light: GR-7K3M9Q unanswered past its deadline (level 1)"),
        (at("2025-11-18T09:00:00"), "2025-11-18T09:00:00+00:00",
         ":rotating_light: GR-7K3M9Q unanswered past its deadline (level 1), written again after the team's answer"),
    ],
)
def test_webhook_body_names_reopening(reopened_at: datetime | None, shown: str | None, slack_line: str) -> None:
    conversation = DueConversation(
        1, "GR-7K3M9Q", "support", "default", "Printer", "alice@example.com", at("2025-11-17T10:00:00"),
        at("2025-11-18T10:00:00"), 0, "", reopened_at=reopened_at,
    )
    sender = Sender(hostname="mx.example.org", from_address="postmaster@example.org", answer_command="guardrail answer")

    body = webhook_body(conversation, 1, None, at("2025-11-18T10:00:00"), sender)

    assert body["received_at"] == "2025-11-17T10:00:00+00:00"
    assert body["reopened_at"] == shown
    assert str(slack_body(body)["text"]).splitlines()[0] == slack_line
