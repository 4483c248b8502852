"""A message that forwarding rules deliver once per inbox is one conversation, acknowledged once."""

from __future__ import annotations

import asyncio
import base64
import quopri
import re
import smtplib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import maildir_messages, message, wait_until, write_config
from test_store import hold_writer

from guardrail import store_batch
from guardrail.config import load_config
from guardrail.conversations import KnownConversation
from guardrail.daemon import load_ruleset
from guardrail.loops import LOOP_HEADER
from guardrail.plan import (
    COPY_SIGNAL,
    EarlierCopy,
    Submission,
    content_signature,
    copy_signature,
    find_copy,
    plan_submission,
)
from guardrail.prepare import Envelope, Site, prepare_message
from guardrail.store import Store

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
BODY = "Hello,\r\nmy invoice 7781 shows the wrong amount.\r\n"
ORIGINAL = message(sender="Alice Example <alice@example.com>", to="support@example.org, billing@example.org",
                   subject="Wrong amount", message_id="<copy-1@mail.example.com>", body=BODY)
# What a forwarder passes on: a trace header of its own in front, the rest unchanged.
FORWARDED = b"Received: from relay.example.com by forwarder.example.net; Mon, 2 Mar 2026 09:30:01 +0000\r\n" + ORIGINAL
CONVERSATION = KnownConversation(7, "GR-AAAA-BBBB", "default", "support", frozenset({"alice@example.com"}), None, "open")


def prepared(folder: Path, raw: bytes, *, rcpt: str = "support@example.org") -> Submission:
    config = load_config(write_config(folder))
    envelope = Envelope("alice@example.com", (rcpt,), "[127.0.0.1]:40000", "client")
    result = prepare_message(envelope, raw, load_ruleset(config), Site.from_config(config), NOW)
    assert isinstance(result, Submission)
    return result


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"Subject: a\r\nReceived: x\r\n\r\nbody\r\n", b"subject:a\n\nbody\r\n"),
        (b"To: b\r\nFROM:  c\r\n\r\n", b"from:c\nto:b\n\n"),
        (b"Subject: a\r\n", b"subject:a\n\n"),
        (b"Subject: a\r\n\tb\r\n\r\n\r\nafter a blank line", b"subject:a b\n\n\r\nafter a blank line"),
        (b"no header\r\n\r\nbody", b"\n\nbody"),
    ],
)
def test_copy_signature_table(raw: bytes, expected: bytes) -> None:
    assert copy_signature(raw) == expected


@pytest.mark.parametrize(
    ("earlier", "is_copy"),
    [
        (ORIGINAL, True),
        (FORWARDED, True),
        # Forwarders add trace fields and may fold lines anew.
        (b"Delivered-To: billing@example.org\r\nDKIM-Signature: v=1; d=forwarder.example.net\r\n" + ORIGINAL, True),
        (ORIGINAL.replace(b"Subject: Wrong amount", b"Subject: Wrong\r\n amount"), True),
        # A mail program that reuses a Message-ID for a new text.
        (ORIGINAL.replace(b"wrong amount", b"right amount"), False),
        (ORIGINAL.replace(b"Subject: Wrong amount", b"Subject: Right amount"), False),
        (ORIGINAL.replace(b"10:00:00", b"10:05:00"), False),
        # Someone else's message under the same id.
        (ORIGINAL.replace(b"alice@example.com", b"mallory@example.net"), False),
        # The same text under another MIME type is another message.
        (ORIGINAL.replace(b"Message-ID:", b"Content-Type: text/html\r\nMessage-ID:"), False),
        # A forwarder that re-encodes the body changes it: taken for a new message.
        (ORIGINAL.replace(b"\r\nmy", b"=\r\nmy"), False),
    ],
)
def test_find_copy_table(tmp_path: Path, earlier: bytes, is_copy: bool) -> None:
    submission = prepared(tmp_path, FORWARDED)
    candidates = [EarlierCopy(3, CONVERSATION, earlier)]
    assert (find_copy(submission, candidates) is candidates[0]) is is_copy


# A message with 8-bit text, and what relays that re-encode it pass on.
GERMAN = "Grüße,\r\ndie Rechnung 7781 zeigt den falschen Betrag. \r\nWer kann helfen?\r\n"


def eight_bit(*, subject: str = "=?utf-8?q?Falscher_Betrag_f=C3=BCr_M=C3=A4rz?=", body: bytes = GERMAN.encode(),
              charset: str = "utf-8", encoding: str = "8bit", extra: bytes = b"") -> bytes:
    head = message(sender="Jörg Beispiel <joerg@example.com>", to="support@example.org", subject=subject,
                   message_id="<copy-8@mail.example.com>", body="")
    return head.replace(b"\r\n\r\n", (
        f"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode(), 1) + extra + body



def multipart(*, filename: str = "invoice.pdf", payload: bytes = base64.encodebytes(b"%PDF-1.4 invoice"),
              report: bytes = b"Reporting-MTA: dns;mx.example.com\r\n") -> bytes:
    """Return the mixed message of `EIGHT_BIT`'s header with a text, an attachment and a delivery status part."""
    body = (
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + GERMAN.encode()
        + f"--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename={filename}\r\n".encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\n" + payload.replace(b"\n", b"\r\n")
        + b"--b1\r\nContent-Type: message/delivery-status\r\n\r\n" + report + b"\r\nFinal-Recipient: rfc822;a@example.com\r\n"
        + b"--b1--\r\n"
    )
    return eight_bit(body=body).replace(b"text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
                                        b'multipart/mixed; boundary="b1"\r\n\r\n', 1)

EIGHT_BIT = eight_bit()
QUOTED = quopri.encodestring(GERMAN.encode().replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
BASE64 = base64.encodebytes(GERMAN.encode()).replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    ("copy", "is_copy"),
    [
        (EIGHT_BIT, True),
        # A relay to a server without 8BITMIME writes the text as quoted-printable or base64.
        (eight_bit(body=QUOTED, encoding="quoted-printable"), True),
        (eight_bit(body=BASE64, encoding="base64"), True),
        # Or drops the trailing space of a line.
        (eight_bit(body=GERMAN.replace(" \r\n", "\r\n").encode()), True),
        # Or writes an 8-bit subject as RFC 2047 words, or the other way round.
        (eight_bit(subject="Falscher Betrag für März"), True),
        # A footer, another text or another subject makes another message.
        (eight_bit(body=QUOTED + b"--\r\nSent through the forwarder\r\n", encoding="quoted-printable"), False),
        (eight_bit(body=QUOTED.replace(b"7781", b"7782"), encoding="quoted-printable"), False),
        (eight_bit(subject="Falscher Betrag"), False),
        (eight_bit(body=GERMAN.replace("Wer", "wer").encode()), False),
        # The same text as an attachment, in another charset or in a part of
        # another name is another message.
        (eight_bit(body=BASE64, encoding="base64").replace(b"text/plain", b"application/octet-stream"), False),
        (eight_bit(body=GERMAN.encode("iso-8859-1"), charset="iso-8859-1"), False),
        (eight_bit(extra=b"", body=GERMAN.encode()).replace(b"Content-Type: text/plain; charset=utf-8\r\n", b""), False),
        (eight_bit(body=GERMAN.encode()).replace(b"MIME-Version", b"Content-Disposition: inline; filename=a.txt\r\nMIME-Version"), False),
    ],
)
def test_find_copy_re_encoded_table(tmp_path: Path, copy: bytes, is_copy: bool) -> None:
    submission = prepared(tmp_path, copy)
    candidates = [EarlierCopy(3, CONVERSATION, EIGHT_BIT)]
    assert (find_copy(submission, candidates) is candidates[0]) is is_copy



@pytest.mark.parametrize(
    ("copy", "is_copy"),
    [
        (multipart(), True),
        # The attachment wrapped at another line length.
        (multipart(payload=b"\n".join(re.findall(rb".{1,8}", base64.b64encode(b"%PDF-1.4 invoice"))) + b"\n"), True),
        # The fields of a nested part count: another file name, or another
        # field in a delivery report, is another message.
        (multipart(filename="invoice-2.pdf"), False),
        (multipart(payload=base64.encodebytes(b"%PDF-1.4 invoice 2")), False),
        (multipart(report=b"Reporting-MTA: dns;mx.example.net\r\n"), False),
        # So does the text before the first part and after the last.
        (multipart().replace(b"\r\n\r\n--b1\r\n", b"\r\n\r\nThis is a message in MIME format.\r\n--b1\r\n", 1), False),
        (multipart() + b"Sent through the list\r\n", False),
    ],
)
def test_find_copy_multipart_table(tmp_path: Path, copy: bytes, is_copy: bool) -> None:
    submission = prepared(tmp_path, copy.replace(b"8bit", b"quoted-printable").replace("ß".encode(), b"=C3=9F").replace("ü".encode(), b"=C3=BC"))
    candidates = [EarlierCopy(3, CONVERSATION, multipart())]
    assert (find_copy(submission, candidates) is candidates[0]) is is_copy

def test_content_signature_unreadable_parts() -> None:
    # Unknown charsets and broken base64 still give a signature, the same for identical copies.
    odd = eight_bit(charset="x-no-such-charset", body=b"\xff\xfe text\r\n")
    assert content_signature(odd) == content_signature(odd) is not None
    broken = eight_bit(body=b"%%%not base64\r\n", encoding="base64")
    assert content_signature(broken) is not None
    assert content_signature(broken) != content_signature(eight_bit(body=b"other\r\n", encoding="base64"))

def test_find_copy_picks_the_matching_message(tmp_path: Path) -> None:
    submission = prepared(tmp_path, FORWARDED)
    other = EarlierCopy(3, CONVERSATION, ORIGINAL.replace(b"wrong amount", b"an older text"))
    match = EarlierCopy(5, CONVERSATION, ORIGINAL)
    assert find_copy(submission, [other, match]) is match
    assert find_copy(submission, []) is None


@pytest.mark.parametrize(("raw", "disposition"), [(FORWARDED, "copy"), (f"{LOOP_HEADER}: mx.test.example\r\n".encode() + ORIGINAL, "loop")])
def test_plan_of_copy_table(tmp_path: Path, raw: bytes, disposition: str) -> None:
    # Our own delivery coming back is a loop before it is a copy.
    submission = prepared(tmp_path, raw)
    plan = plan_submission(
        submission, is_duplicate=False, reference_prefix="GR", by_message_id={}, by_reference={},
        new_conversation=CONVERSATION, copy_of=EarlierCopy(3, CONVERSATION, ORIGINAL),
    )
    assert plan.disposition == disposition
    assert plan.conversation == CONVERSATION


def rows(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute(sql).fetchall()


def send_with_reply(port: int, mail_from: str, rcpt: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.ehlo()
        client.mail(mail_from)
        client.rcpt(rcpt)
        return client.data(data)


async def test_copy_for_second_inbox_joins(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    database = daemon.config.database_path
    first = await asyncio.to_thread(send_with_reply, daemon.port, "alice@example.com", "support@example.org", ORIGINAL)
    # The forwarder of billing@ rewrote the envelope sender, as SRS does.
    second = await asyncio.to_thread(
        send_with_reply, daemon.port, "SRS0=x1=AB=example.com=alice@forwarder.example.net", "billing@example.org", FORWARDED,
    )

    assert first[0] == second[0] == 250
    [(reference,)] = rows(database, "SELECT reference FROM conversations")
    assert reference.encode() in first[1]
    assert reference.encode() in second[1]
    assert rows(database, "SELECT disposition, conversation_id FROM messages ORDER BY id") == [("new", 1), ("copy", 1)]
    assert rows(database, "SELECT decision, signal, recipient FROM acknowledgements ORDER BY id") == [
        ("sent", "", "alice@example.com"),
        ("suppressed", COPY_SIGNAL, "srs0=x1=ab=example.com=alice@forwarder.example.net"),
    ]
    # billing@ routes to the billing team, which gets the copy that reached billing@.
    assert rows(database, "SELECT kind, message_row FROM outbox ORDER BY id") == [("deliver", 1), ("mail", 1), ("deliver", 2)]
    events = rows(database, "SELECT kind, detail FROM events WHERE message_row = 2 ORDER BY id")
    assert [kind for kind, _ in events] == ["received", "team_copy", "ack_suppressed"]
    assert '"thread": "copy of message 1"' in events[0][1]
    assert '"team": "billing"' in events[1][1]

    # Each team gets the message once, and the sender gets one acknowledgement.
    support = tmp_path / "var" / "maildir" / "support"
    billing = tmp_path / "var" / "maildir" / "billing"
    await wait_until(lambda: maildir_messages(support) and maildir_messages(billing), what="delivery to both teams")
    await wait_until(lambda: rows(database, "SELECT COUNT(*) FROM outbox WHERE state != 'done'") == [(0,)], what="the outbox")
    assert len(maildir_messages(support)) == 1
    [copy] = maildir_messages(billing)
    assert b"X-Guardrail-Copy: for team billing; conversation owned by team support\r\n" in copy
    assert f"X-Guardrail-Conversation: {reference}\r\n".encode() in copy
    assert b"forwarder.example.net" in copy
    assert b"X-Guardrail-Copy" not in maildir_messages(support)[0]


async def test_re_encoded_copy_joins(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    database = daemon.config.database_path
    await asyncio.to_thread(send_with_reply, daemon.port, "joerg@example.com", "support@example.org", EIGHT_BIT)
    # The forwarder of billing@ passed the message on to a server without 8BITMIME.
    downgraded = b"Received: from relay.example.com by forwarder.example.net\r\n" + eight_bit(body=QUOTED, encoding="quoted-printable")
    await asyncio.to_thread(send_with_reply, daemon.port, "joerg@example.com", "billing@example.org", downgraded)

    assert rows(database, "SELECT disposition, conversation_id FROM messages ORDER BY id") == [("new", 1), ("copy", 1)]
    assert rows(database, "SELECT decision, signal FROM acknowledgements ORDER BY id") == [("sent", ""), ("suppressed", COPY_SIGNAL)]

async def test_reused_message_id_opens_new(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    database = daemon.config.database_path
    await asyncio.to_thread(send_with_reply, daemon.port, "alice@example.com", "support@example.org", ORIGINAL)
    changed = ORIGINAL.replace(b"wrong amount", b"right amount, sorry")
    await asyncio.to_thread(send_with_reply, daemon.port, "alice@example.com", "billing@example.org", changed)

    assert rows(database, "SELECT disposition, conversation_id FROM messages ORDER BY id") == [("new", 1), ("new", 2)]
    assert rows(database, "SELECT decision FROM acknowledgements ORDER BY id") == [("sent",), ("sent",)]


async def test_copies_in_one_commit(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "store.db")
    try:
        blocking_job, release = await hold_writer(store)
        first = asyncio.ensure_future(store.accept(prepared(tmp_path, ORIGINAL)))
        second = asyncio.ensure_future(store.accept(prepared(tmp_path, FORWARDED, rcpt="billing@example.org")))
        await asyncio.sleep(0.05)
        release.set()
        await blocking_job
        outcomes = [await first, await second]
    finally:
        await store.close()

    assert [outcome.disposition for outcome in outcomes] == ["new", "copy"]
    assert outcomes[0].reference == outcomes[1].reference
    assert [outcome.ack_decision for outcome in outcomes] == ["sent", "suppressed"]


async def test_copy_check_reads_few_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A sender can thread any number of new texts under one Message-ID into
    # its conversation; the copy check must not read every one of them.
    compared: list[int] = []
    original_find_copy = store_batch.find_copy

    def counting(submission: Submission, earlier: list[EarlierCopy]) -> EarlierCopy | None:
        compared.append(len(earlier))
        return original_find_copy(submission, earlier)

    monkeypatch.setattr(store_batch, "find_copy", counting)
    threaded = ORIGINAL.replace(b"Subject:", b"In-Reply-To: <copy-1@mail.example.com>\r\nSubject:")
    store = await Store.open(tmp_path / "store.db")
    try:
        assert (await store.accept(prepared(tmp_path, ORIGINAL))).disposition == "new"
        for number in range(store_batch.COPY_CANDIDATES + 4):
            text = threaded.replace(b"wrong amount", f"wrong amount, part {number}".encode())
            assert (await store.accept(prepared(tmp_path, text))).disposition == "follow_up"
        outcome = await store.accept(prepared(tmp_path, FORWARDED, rcpt="billing@example.org"))
    finally:
        await store.close()

    assert outcome.disposition == "copy"
    assert max(compared) == store_batch.COPY_CANDIDATES
