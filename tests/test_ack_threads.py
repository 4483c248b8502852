"""Replies to our acknowledgement, subject-reference fallbacks and the ping-pong rate limit."""

from __future__ import annotations

import email
from datetime import datetime, timedelta, timezone
from email.message import Message
from pathlib import Path

import pytest
from conftest import case_file, maildir_messages, send, settle, write_config
from structlog.testing import capture_logs

from guardrail.clock import ManualClock
from guardrail.daemon import Daemon


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def acks_to(folder: Path, address: str) -> list[Message]:
    messages = [email.message_from_bytes(data) for data in maildir_messages(folder / "var" / "outbound")]
    return [m for m in messages if m["Auto-Submitted"] == "auto-replied" and m["X-Guardrail-Envelope-To"] == address]


@pytest.mark.parametrize("prefix", ["VS:", "AW:", "SV:", "Antw:", "RE:", "Fwd:", ""])
async def test_replies_to_ack_thread_by_header_or_reference(tmp_path: Path, start_daemon, prefix: str) -> None:
    clock = ManualClock(at("2025-11-11T08:00:00"))
    daemon = await start_daemon(write_config(tmp_path), clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], case_file("threading", "original.eml"))
    await settle(daemon, clock)
    (ack,) = acks_to(tmp_path, "alice@example.com")
    tag = ack["Subject"].rsplit(" ", 1)[1]

    assert ack["Message-ID"] != "<printer-3@example.com>"
    assert ack["In-Reply-To"] == "<printer-3@example.com>"
    assert ack["References"] == "<printer-3@example.com>"

    r1 = case_file("threading", "r1-reply-to-ack.eml")
    r1 = r1.replace(b"<ACK-MESSAGE-ID>", ack["Message-ID"].encode()).replace(b"{ACK-SUBJECT}", ack["Subject"].encode())
    await send(daemon.port, "alice@example.com", ["support@example.org"], r1)
    r2 = case_file("threading", "r2-no-thread-headers-vs-prefix.eml").replace(b"VS: {TAG}", f"{prefix} {tag}".strip().encode())
    await send(daemon.port, "alice@example.com", ["support@example.org"], r2)
    r3 = case_file("threading", "r3-foreign-sender-with-tag.eml").replace(b"{TAG}", tag.encode())
    await send(daemon.port, "mallory@example.net", ["support@example.org"], r3)
    await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT message_id, conversation_id, disposition FROM messages ORDER BY id")
    assert rows == [
        ("<printer-3@example.com>", 1, "new"),
        ("<printer-3-r1@example.com>", 1, "follow_up"),
        ("<printer-3-r2@example.com>", 1, "follow_up"),
        ("<printer-3-x@example.net>", 2, "new"),
    ]
    assert await daemon.store.fetch_all("SELECT id, state FROM conversations ORDER BY id") == [(1, "open"), (2, "open")]
    assert len(acks_to(tmp_path, "alice@example.com")) == 1
    assert len(acks_to(tmp_path, "mallory@example.net")) == 1


VENDOR = case_file("ping-pong", "vendor-autoack-template.eml")


def vendor_message(number: int, minute: int) -> bytes:
    return VENDOR.replace(b"{N}", str(number).encode()).replace(b"{MM}", f"{minute:02}".encode())


async def test_ack_ping_pong_dies_at_the_limit(tmp_path: Path, start_daemon) -> None:
    clock = ManualClock(at("2025-11-07T09:00:00"))
    config = write_config(tmp_path, sections={"acknowledgements": {"max_per_sender": 3, "window": "1h"}})
    daemon = await start_daemon(config, clock=clock)
    vendor = "helpdesk@vendor.example.net"

    with capture_logs() as events:
        for index in range(20):
            minute = index // 2
            await clock.set(at("2025-11-07T09:00:00") + timedelta(seconds=30 * index))
            refused = await send(daemon.port, vendor, ["support@example.org"], vendor_message(1001 + index, minute))
            assert refused == {}
            await settle(daemon, clock)
            if index == 10:
                alice = b"From: Alice <alice@example.com>\r\nSubject: Question\r\nMessage-ID: <alice-q@example.com>\r\n\r\nHi\r\n"
                await send(daemon.port, "alice@example.com", ["support@example.org"], alice)
        await clock.set(at("2025-11-07T09:30:00"))
        await send(daemon.port, "announce@lists.example.net", ["support@example.org"], case_file("ping-pong", "mailing-list.eml"))
        await settle(daemon, clock)

    vendor_acks = acks_to(tmp_path, vendor)
    assert len(vendor_acks) == 3
    for ack in vendor_acks:
        assert ack["Auto-Submitted"] == "auto-replied"
        assert ack["In-Reply-To"].startswith("<vendor-ticket-")
        assert ack["References"] == ack["In-Reply-To"]
        assert ack["To"] == vendor
    warnings = [event for event in events if event["event"] == "ack_limit_reached"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["detail"] == f"acknowledgement limit reached for {vendor}"
    assert len(acks_to(tmp_path, "alice@example.com")) == 1
    assert acks_to(tmp_path, "announce@lists.example.net") == []
    list_decision = await daemon.store.fetch_all(
        "SELECT decision, signal FROM acknowledgements WHERE recipient = 'announce@lists.example.net'"
    )
    assert list_decision == [("suppressed", "Precedence: list")]

    stored = await daemon.store.fetch_all("SELECT COUNT(*) FROM messages WHERE mail_from = ?", (vendor,))
    assert stored == [(20,)]
    delivered = await daemon.store.fetch_all("SELECT COUNT(*) FROM outbox WHERE kind = 'deliver' AND state = 'done'")
    assert delivered == [(22,)]
    signals = await daemon.store.fetch_all(
        "SELECT signal, COUNT(*) FROM acknowledgements WHERE recipient = ? GROUP BY signal ORDER BY signal", (vendor,)
    )
    assert signals == [("", 3), ("rate limit", 17)]


async def test_ack_limit_resets_after_window(tmp_path: Path, start_daemon) -> None:
    clock = ManualClock(at("2025-11-07T09:00:00"))
    daemon = await start_daemon(write_config(tmp_path), clock=clock)
    vendor = "helpdesk@vendor.example.net"
    for index in range(4):
        await send(daemon.port, vendor, ["support@example.org"], vendor_message(2001 + index, 0))
    await clock.set(at("2025-11-07T10:00:01"))
    await send(daemon.port, vendor, ["support@example.org"], vendor_message(2005, 0))
    await settle(daemon, clock)
    assert len(acks_to(tmp_path, vendor)) == 4


async def acknowledge(tmp_path: Path, start_daemon, message_id: str, references: str) -> tuple[Daemon, Message]:
    """Send Alice's question with these Message-ID and References headers; return the daemon and its one acknowledgement."""
    clock = ManualClock(at("2025-11-07T09:00:00"))
    daemon = await start_daemon(write_config(tmp_path), clock=clock)
    request = (
        f"From: Alice <alice@example.com>\r\nSubject: Question\r\nMessage-ID: {message_id}\r\n"
        f"References: {references}\r\n\r\nHi\r\n"
    ).encode()
    await send(daemon.port, "alice@example.com", ["support@example.org"], request)
    await settle(daemon, clock)
    (ack,) = acks_to(tmp_path, "alice@example.com")
    return daemon, ack


@pytest.mark.parametrize("control", ["\x00", "\x1b", "\x7f"])
async def test_ack_drops_control_message_id(tmp_path: Path, start_daemon, control: str) -> None:
    # RFC 5322 message ids are printable. A NUL or escape copied from the
    # customer's Message-ID would reach In-Reply-To and References of our mail.
    daemon, ack = await acknowledge(tmp_path, start_daemon, f"<q{control}1@example.com>", f"<root@example.com> <bad{control}@example.com>")
    assert ack["In-Reply-To"] is None
    assert ack["References"] == "<root@example.com>"
    stored = await daemon.store.fetch_all("SELECT message_id FROM messages")
    assert stored == [("",)]


@pytest.mark.parametrize(
    ("message_id", "kept"),
    [
        # RFC 6532 allows UTF-8 in an id; our header would carry it as
        # encoded words, which no mail program takes for the id.
        ("<question-é@example.com>", False),
        ("<" + "q" * 1000 + "@example.com>", False),
        ("<question-1@example.com>", True),
    ],
)
async def test_ack_leaves_out_ids_it_cannot_write(tmp_path: Path, start_daemon, message_id: str, kept: bool) -> None:
    daemon, ack = await acknowledge(tmp_path, start_daemon, message_id, "<root@example.com> <réf@example.com>")
    assert ack["In-Reply-To"] == (message_id if kept else None)
    assert ack["References"] == ("<root@example.com> " + message_id if kept else "<root@example.com>")
    # The customer's message is still stored under its id, so replies to it thread.
    stored = await daemon.store.fetch_all("SELECT message_id FROM messages")
    assert stored == [(message_id,)]


async def test_ack_keeps_case_of_local_part(tmp_path: Path, start_daemon) -> None:
    # RFC 5321 section 2.4: a local part may be case-sensitive, so the
    # acknowledgement goes to the envelope sender as written. The limit per
    # sender still counts every spelling of the address as one.
    clock = ManualClock(at("2025-11-07T09:00:00"))
    config = write_config(tmp_path, sections={"acknowledgements": {"max_per_sender": 2, "window": "1h"}})
    daemon = await start_daemon(config, clock=clock)
    for index, sender in enumerate(["J.Smith@Example.com", "j.smith@example.com", "J.SMITH@example.com"]):
        question = (
            f"From: John <{sender}>\r\nSubject: Question {index}\r\nMessage-ID: <q{index}@example.com>\r\n\r\nHi\r\n"
        ).encode()
        await send(daemon.port, sender, ["support@example.org"], question)
        await settle(daemon, clock)

    messages = [email.message_from_bytes(data) for data in maildir_messages(tmp_path / "var" / "outbound")]
    sent = sorted((m["X-Guardrail-Envelope-To"], m["To"]) for m in messages if m["Auto-Submitted"] == "auto-replied")
    assert sent == [("J.Smith@Example.com", "J.Smith@Example.com"), ("j.smith@example.com", "j.smith@example.com")]
    rows = await daemon.store.fetch_all("SELECT recipient, decision, signal FROM acknowledgements ORDER BY id")
    assert [tuple(row) for row in rows] == [
        ("j.smith@example.com", "sent", ""), ("j.smith@example.com", "sent", ""),
        ("j.smith@example.com", "suppressed", "rate limit"),
    ]
