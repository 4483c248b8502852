"""The outbox worker: maildir batches, a bad folder that fails only its own rows, SMTPUTF8 at the smarthost."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP
from conftest import (
    SMTP_RULES,
    SinkHandler,
    maildir_messages,
    message,
    wait_until,
    write_config,
)
from structlog.testing import capture_logs

from guardrail.clock import ManualClock, format_instant
from guardrail.config import load_config
from guardrail.daemon import load_ruleset
from guardrail.delivery import (
    MAILDIR_BATCH,
    RESCAN_EVERY,
    DeliveryWorker,
    RetryPolicy,
    after_partial,
    gives_up,
    reach,
    retry_policy,
    trace_headers,
)
from guardrail.errors import PartialDeliveryError
from guardrail.plan import Submission
from guardrail.prepare import Envelope, Site, prepare_message
from guardrail.store import Store


def send_many(port: int, messages: list[tuple[str, str, bytes]]) -> None:
    """Send every (sender, recipient, data) over one SMTP connection, so the rows fall due together."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        for sender, recipient, data in messages:
            client.sendmail(sender, [recipient], data)


def outbox_states(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())


async def test_rows_beyond_one_batch_delivered(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    count = MAILDIR_BATCH + 8
    messages = [
        (f"customer{number}@example.com", "support@example.org", message(message_id=f"<b{number}@example.com>"))
        for number in range(count)
    ]

    with capture_logs() as events:
        await asyncio.to_thread(send_many, daemon.port, messages)
        await wait_until(lambda: outbox_states(daemon.config.database_path) == {"done": 2 * count}, what="every delivery")

    support = tmp_path / "var" / "maildir" / "support"
    outbound = tmp_path / "var" / "outbound"
    assert len(maildir_messages(support)) == count
    assert len(maildir_messages(outbound)) == count
    delivered = [event for event in events if event["event"] == "delivered"]
    assert len(delivered) == 2 * count
    forwarded = [event for event in delivered if event["kind"] == "deliver"]
    assert len(forwarded) == count
    # Each line names its own row, though the rows shared a task.
    assert len({event["outbox_id"] for event in delivered}) == 2 * count
    assert all(event["destination"] == f"maildir {support}" and event["route"] == "default" for event in forwarded)
    assert len({event["conversation"] for event in forwarded}) == count


async def test_unwritable_maildir_defers_only_its_rows(tmp_path: Path, start_daemon) -> None:
    # A file where the billing maildir should be: creating its tmp/ folder fails.
    (tmp_path / "var" / "maildir").mkdir(parents=True)
    (tmp_path / "var" / "maildir" / "billing").write_text("not a folder")
    daemon = await start_daemon(write_config(tmp_path))
    messages = []
    for number in range(3):
        messages.append((f"payer{number}@example.com", "billing@example.org", message(message_id=f"<p{number}@example.com>")))
        messages.append((f"user{number}@example.com", "support@example.org", message(message_id=f"<u{number}@example.com>")))

    await asyncio.to_thread(send_many, daemon.port, messages)

    database = daemon.config.database_path
    # Six acknowledgements and three support deliveries succeed; the three billing deliveries wait for a retry.
    await wait_until(lambda: outbox_states(database) == {"done": 9, "pending": 3}, what="the deliveries to be tried")
    with sqlite3.connect(database) as connection:
        deferred = connection.execute(
            "SELECT o.attempts, o.last_error, m.team FROM outbox o JOIN messages m ON m.id = o.message_row"
            " WHERE o.state = 'pending'"
        ).fetchall()
    assert [(attempts, team) for attempts, _, team in deferred] == [(1, "billing")] * 3
    billing = tmp_path / "var" / "maildir" / "billing"
    assert all(error.startswith(f"writing to maildir {billing} failed: ") for _, error, _ in deferred)
    assert len(maildir_messages(tmp_path / "var" / "maildir" / "support")) == 3
    assert len(maildir_messages(tmp_path / "var" / "outbound")) == 6


class DriftingClock(ManualClock):
    """A manual clock that moves a second forward each time it is read, as wall time does while a busy loop works."""

    def now(self) -> datetime:
        current = self._now
        self._now = current + timedelta(seconds=1)
        return current


async def test_row_due_between_clock_readings_is_delivered(tmp_path: Path) -> None:
    start = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    config = load_config(write_config(tmp_path))
    envelope = Envelope("alice@example.com", ("support@example.org",), "[127.0.0.1]:40000", "client")
    submission = prepare_message(envelope, message(), load_ruleset(config), Site.from_config(config), start)
    assert isinstance(submission, Submission)
    store = await Store.open(config.database_path)
    try:
        await store.accept(submission)
        # Both rows fall due after the worker's first reading of the clock and before its second.
        with sqlite3.connect(config.database_path) as connection:
            connection.execute("UPDATE outbox SET next_attempt_at = ?", (format_instant(start + timedelta(milliseconds=500)),))
        worker = DeliveryWorker(store, config, DriftingClock(start))
        task = asyncio.create_task(worker.run())
        try:
            await wait_until(lambda: outbox_states(config.database_path) == {"done": 2}, timeout=5, what="both deliveries")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await store.close()


async def test_row_without_wake_is_found_by_rescan(tmp_path: Path) -> None:
    start = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    config = load_config(write_config(tmp_path))
    clock = ManualClock(start)
    store = await Store.open(config.database_path)
    worker = DeliveryWorker(store, config, clock)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: clock.is_settled(1), what="the idle worker to sleep")
        # Another program queues a row and does not wake the worker.
        with sqlite3.connect(config.database_path) as connection:
            connection.execute(
                "INSERT INTO outbox (id, kind, target, payload, state, created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (1, "mail", json.dumps({"kind": "smtp", "addresses": ["bob@example.com"], "sender": ""}),
                 message(), "pending", format_instant(start), format_instant(start)),
            )
        await clock.advance(RESCAN_EVERY - timedelta(seconds=1))
        await wait_until(lambda: clock.is_settled(1), what="the worker to sleep again")
        assert outbox_states(config.database_path) == {"pending": 1}

        await clock.advance(timedelta(seconds=1))
        await wait_until(lambda: outbox_states(config.database_path) == {"done": 1}, what="the rescan to deliver it")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
    assert len(maildir_messages(tmp_path / "var" / "outbound")) == 1


async def test_smarthost_gets_smtputf8_for_non_ascii_sender(tmp_path: Path, start_daemon, sink) -> None:
    # The acknowledgement goes back to the envelope sender, here an
    # internationalized address (RFC 6531) that needs SMTPUTF8 on the way out.
    config = write_config(tmp_path, sections={"smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False}})
    daemon = await start_daemon(config)
    sender = "jürgen@bücher.example"

    def send_internationalized() -> None:
        with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.test.example", timeout=10) as client:
            client.sendmail(sender, ["support@example.org"], message(sender=f"Jürgen <{sender}>"), mail_options=["SMTPUTF8"])

    await asyncio.to_thread(send_internationalized)
    await wait_until(lambda: sink.to(sender), what="the acknowledgement at the smarthost")

    [acknowledgement] = sink.to(sender)
    assert acknowledgement.mail_from == "<>"
    assert b"Auto-Submitted: auto-replied" in acknowledgement.content
    await wait_until(lambda: outbox_states(daemon.config.database_path) == {"done": 2}, what="both rows recorded as done")


async def test_smarthost_without_smtputf8_fails_permanently(tmp_path: Path, start_daemon) -> None:
    handler = SinkHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test.example", enable_SMTPUTF8=False, loop=loop), "127.0.0.1", 0,
    )
    port = server.sockets[0].getsockname()[1]
    config = write_config(tmp_path, sections={"smarthost": {"host": "127.0.0.1", "port": port, "starttls": False}})
    daemon = await start_daemon(config)
    sender = "jürgen@bücher.example"

    def send_internationalized() -> None:
        with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.test.example", timeout=10) as client:
            client.sendmail(sender, ["support@example.org"], message(sender=f"Jürgen <{sender}>"), mail_options=["SMTPUTF8"])

    try:
        await asyncio.to_thread(send_internationalized)
        await wait_until(lambda: outbox_states(daemon.config.database_path) == {"done": 1, "failed": 1}, what="the failed acknowledgement")
    finally:
        server.close()
        await server.wait_closed()

    with sqlite3.connect(daemon.config.database_path) as connection:
        [(error,)] = connection.execute("SELECT last_error FROM outbox WHERE state = 'failed'").fetchall()
    assert "does not offer SMTPUTF8" in error
    assert handler.messages == []


@pytest.mark.parametrize(
    ("reference", "route", "expected"),
    [
        ("GR-7K3M9Q", "default", ["X-Guardrail-Conversation: GR-7K3M9Q", "X-Guardrail-Route: default"]),
        ("", "postmaster", ["X-Guardrail-Route: postmaster"]),
        (None, "postmaster", ["X-Guardrail-Route: postmaster"]),
        ("GR-7K3M9Q", "", ["X-Guardrail-Conversation: GR-7K3M9Q"]),
        (" \r\n", None, []),
    ],
)
def test_trace_headers_omit_empty_values(reference: str | None, route: str | None, expected: list[str]) -> None:
    envelope = {
        "helo": "client.example", "peer": "[127.0.0.1]:40512", "message_row": 7, "protocol": "ESMTP",
        "received_at": datetime(2026, 12, 4, 20, 9, 59, tzinfo=UTC), "reference": reference, "route": route,
    }

    lines = trace_headers(hostname="mx.test.example", envelope=envelope, for_address="support@example.org").decode().split("\r\n")

    assert lines[:3] == [
        "Received: from client.example ([127.0.0.1]:40512)",
        "\tby mx.test.example (guardrail) with ESMTP id 7",
        "\tfor <support@example.org>; Fri, 04 Dec 2026 20:09:59 +0000",
    ]
    assert lines[3:] == [*expected, "X-Guardrail-Loop: mx.test.example", ""]




async def test_smarthost_gets_body_8bitmime_for_8bit_data(tmp_path: Path, start_daemon, sink) -> None:
    config = write_config(
        tmp_path, rules=SMTP_RULES, sections={"smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False}}
    )
    daemon = await start_daemon(config)
    eight_bit = message(
        message_id="<8bit@example.com>", body="Grüße aus Köln\r\n",
        extra_headers="MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
    )

    def send_both() -> None:
        with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.test.example", timeout=10) as client:
            client.sendmail("alice@example.com", ["support@example.org"], eight_bit, mail_options=["BODY=8BITMIME"])
            client.sendmail("bob@example.com", ["support@example.org"], message(message_id="<7bit@example.com>"))

    await asyncio.to_thread(send_both)
    await wait_until(lambda: len(sink.to("team@example.net")) == 2, what="both forwarded copies")

    options = {
        next(line for line in copy.content.splitlines() if line.startswith(b"Message-ID:")): copy.mail_options
        for copy in sink.to("team@example.net")
    }
    # aiosmtplib adds SIZE= itself.
    assert "BODY=8BITMIME" in options[b"Message-ID: <8bit@example.com>"]
    assert not any(option.startswith("BODY=") for option in options[b"Message-ID: <7bit@example.com>"])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("deliver", RetryPolicy(timedelta(seconds=30), timedelta(hours=1), timedelta(days=5))),
        ("mail", RetryPolicy(timedelta(seconds=30), timedelta(hours=1), timedelta(days=5))),
        ("webhook", RetryPolicy(timedelta(seconds=2), timedelta(minutes=1), timedelta(days=5), attempts=4)),
    ],
)
def test_retry_policy_by_kind(tmp_path: Path, kind: str, expected: RetryPolicy) -> None:
    config = load_config(write_config(tmp_path, sections={
        "delivery": {"retry_initial": "30s", "retry_max": "1h", "give_up_after": "5d"},
        "webhooks": {"attempts": 4, "retry_initial": "2s", "retry_max": "1m"},
    }))

    assert retry_policy(kind, config) == expected


MAIL_POLICY = RetryPolicy(timedelta(seconds=30), timedelta(hours=1), timedelta(days=5))
WEBHOOK_POLICY = RetryPolicy(timedelta(seconds=1), timedelta(seconds=30), timedelta(days=5), attempts=3)


@pytest.mark.parametrize(
    ("policy", "attempts", "age", "expected"),
    [
        (MAIL_POLICY, 1, timedelta(0), False),
        (MAIL_POLICY, 500, timedelta(days=4, hours=23), False),
        (MAIL_POLICY, 2, timedelta(days=5), True),
        (WEBHOOK_POLICY, 1, timedelta(0), False),
        (WEBHOOK_POLICY, 2, timedelta(minutes=1), False),
        (WEBHOOK_POLICY, 3, timedelta(minutes=1), True),
        (WEBHOOK_POLICY, 1, timedelta(days=6), True),
        (RetryPolicy(timedelta(seconds=1), timedelta(seconds=30), timedelta(days=5), attempts=1), 1, timedelta(0), True),
    ],
)
def test_gives_up(policy: RetryPolicy, attempts: int, age: timedelta, expected: bool) -> None:
    assert gives_up(policy, attempts, age) is expected


@pytest.mark.parametrize(
    ("addresses", "attempts", "pending", "failed"),
    [
        # Each attempt is (accepted, deferred, rejected), and reach is read after the last one.
        (("a@example.net", "b@example.net"), [], ((), ()), ((), ("a@example.net", "b@example.net"))),
        (("a@example.net", "b@example.net"), [(("a@example.net",), ("b@example.net",), ())],
         (("a@example.net",), ()), (("a@example.net",), ("b@example.net",))),
        (("a@example.net", "b@example.net", "c@example.net"),
         [(("a@example.net",), ("b@example.net", "c@example.net"), ()), (("b@example.net",), ("c@example.net",), ())],
         (("a@example.net", "b@example.net"), ()), (("a@example.net", "b@example.net"), ("c@example.net",))),
        (("a@example.net", "b@example.net", "c@example.net"), [(("a@example.net",), ("b@example.net",), ("c@example.net",))],
         (("a@example.net",), ("c@example.net",)), (("a@example.net",), ("c@example.net", "b@example.net"))),
        (("b@example.net", "c@example.net"), [((), ("b@example.net",), ("c@example.net",))],
         ((), ("c@example.net",)), ((), ("c@example.net", "b@example.net"))),
    ],
)
def test_reach_after_partial_attempts(
    addresses: tuple[str, ...],
    attempts: list[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]],
    pending: tuple[tuple[str, ...], tuple[str, ...]],
    failed: tuple[tuple[str, ...], tuple[str, ...]],
) -> None:
    target = {"kind": "smtp", "maildir": "", "addresses": list(addresses)}
    for accepted, deferred, rejected in attempts:
        target = after_partial(target, PartialDeliveryError("partial", deferred, rejected, accepted))

    assert reach(target, failed=False) == pending
    assert reach(target, failed=True) == failed


@pytest.mark.parametrize(("helo", "shown"), [
    ("client.example", "client.example"),
    ("[192.0.2.7]", "[192.0.2.7]"),
    ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
    ("bücher.example", "bücher.example"),
    # A comment, a clause end or a quote that the client wrote does not reach the header.
    ('éxémple;"( x', "éxémple????x"),
    ("a)b (by evil.example", "a?b??by?evil.example"),
    ("", "unknown"),
    ("\r\nBcc: x", "??Bcc:?x"),
    # A bracket that does not enclose the whole name would open or close an address literal.
    ("a]b[c", "a?b?c"),
    ("client.example ([", "client.example???"),
    ("[192.0.2.7", "?192.0.2.7"),
    ("[192.0.2.7][", "?192.0.2.7??"),
    ("[]", "??"),
])
def test_received_from_shows_helo_safely(helo: str, shown: str) -> None:
    envelope = {
        "helo": helo, "peer": "[127.0.0.1]:40512", "message_row": 7, "protocol": "ESMTP",
        "received_at": datetime(2026, 12, 4, 20, 9, 59, tzinfo=UTC), "reference": "", "route": "",
    }

    first = trace_headers(hostname="mx.test.example", envelope=envelope, for_address="support@example.org").decode().split("\r\n")[0]

    assert first == f"Received: from {shown} ([127.0.0.1]:40512)"

