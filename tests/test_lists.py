"""People's mail that a group or mailing list of ours ([smtp] inbox_lists) passes on to guardrail."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from conftest import message

from guardrail.lists import list_identifier, list_sender
from guardrail.loops import DEFAULT_SENDERS, machine_signal
from guardrail.message import summarize

HOSTNAME = "mx.test.example"
NOW = datetime(2025, 11, 4, 9, 0, tzinfo=timezone.utc)
INBOXES = frozenset({"support@example.org", "billing@example.org"})
GROUP = "support.example.org"
MAILMAN_LIST = "support.lists.example.net"

# What a Google Workspace group support@example.org adds to each message it
# passes on, and the per-message bounce address it puts in the envelope.
GOOGLE_HEADERS = (
    "Precedence: list\r\n"
    "Mailing-list: list support@example.org; contact support+owners@example.org\r\n"
    "List-ID: <support.example.org>\r\n"
    "X-Google-Group-Id: 301846579214\r\n"
    "List-Post: <https://groups.google.com/a/example.org/group/support/post>, <mailto:support@example.org>\r\n"
    "List-Help: <https://support.google.com/a/example.org/bin/topic.py?topic=25838>, <mailto:support+help@example.org>\r\n"
    "List-Archive: <https://groups.google.com/a/example.org/group/support/>\r\n"
    "List-Unsubscribe: <mailto:googlegroups-manage+301846579214+unsubscribe@googlegroups.com>,\r\n"
    " <https://groups.google.com/a/example.org/group/support/subscribe>\r\n"
)
GOOGLE_ENVELOPE = "support+bncBCX3NLUEYMORBK5T2WMAMGQEGU4DZ2Q@example.org"
# The group's From for a sender whose domain publishes a strict DMARC policy.
GOOGLE_FROM = "'Alice Doe' via Support <support@example.org>"
GOOGLE_PERSON = "X-Original-From: Alice Doe <alice@customer.example>\r\nReply-To: Alice Doe <alice@customer.example>\r\n"

# What a Mailman 3 list support@lists.example.net, with guardrail's inbox as
# a member, adds to each message, and its bounce address.
MAILMAN_HEADERS = (
    "List-Id: Customer support <support.lists.example.net>\r\n"
    "List-Post: <mailto:support@lists.example.net>\r\n"
    "List-Help: <mailto:support-request@lists.example.net?subject=help>\r\n"
    "List-Subscribe: <mailto:support-join@lists.example.net>\r\n"
    "List-Unsubscribe: <mailto:support-leave@lists.example.net>\r\n"
    "List-Archive: <https://lists.example.net/archives/list/support@lists.example.net/>\r\n"
    "Precedence: list\r\n"
)
MAILMAN_ENVELOPE = "support-bounces@lists.example.net"
MAILMAN_FROM = "Alice Doe via Support <support@lists.example.net>"

ALICE = "Alice Doe <alice@customer.example>"


def google(sender: str = ALICE, extra: str = "", **fields: str) -> bytes:
    return message(sender=sender, extra_headers=GOOGLE_HEADERS + extra, **fields)


def mailman(sender: str = ALICE, extra: str = "", **fields: str) -> bytes:
    return message(sender=sender, extra_headers=MAILMAN_HEADERS + extra, **fields)


# -- which signs count --------------------------------------------------------


def signal_of(data: bytes, mail_from: str, inbox_lists: tuple[str, ...]) -> str | None:
    summary = summarize(data)
    sender = list_sender(summary, frozenset(inbox_lists), INBOXES)
    return machine_signal(summary, mail_from, HOSTNAME, DEFAULT_SENDERS, sender)


@pytest.mark.parametrize(
    ("data", "mail_from", "inbox_lists", "signal"),
    [
        # A person's message through a configured group is a person's.
        (google(), GOOGLE_ENVELOPE, (GROUP,), None),
        (google(GOOGLE_FROM, GOOGLE_PERSON), GOOGLE_ENVELOPE, (GROUP,), None),
        (mailman(), MAILMAN_ENVELOPE, (MAILMAN_LIST,), None),
        (mailman(extra="Errors-To: support-bounces@lists.example.net\r\n"), MAILMAN_ENVELOPE, (MAILMAN_LIST,), None),
        (google(extra="X-Precedence: bulk\r\n"), GOOGLE_ENVELOPE, (GROUP,), None),
        (google().replace(b"<support.example.org>", b"<Support.Example.ORG>"), GOOGLE_ENVELOPE, (GROUP,), None),
        # Without the key, list mail as before.
        (google(), GOOGLE_ENVELOPE, (), "Precedence: list"),
        (google(GOOGLE_FROM, GOOGLE_PERSON), GOOGLE_ENVELOPE, (), "Precedence: list"),
        (mailman(), MAILMAN_ENVELOPE, (), "Precedence: list"),
        # A List-Id other than the configured one.
        (google(), GOOGLE_ENVELOPE, ("sales.example.org",), "Precedence: list"),
        # Machine mail that the group passes on.
        (google(extra="Auto-Submitted: auto-replied\r\n"), GOOGLE_ENVELOPE, (GROUP,), "Auto-Submitted: auto-replied"),
        (google(), "", (GROUP,), "null envelope sender"),
        (google(extra="Return-Path: <>\r\n"), GOOGLE_ENVELOPE, (GROUP,), "Return-Path: <>"),
        (google(extra="Precedence: junk\r\n"), GOOGLE_ENVELOPE, (GROUP,), "Precedence: junk"),
        (google(extra="X-Autoreply: yes\r\n"), GOOGLE_ENVELOPE, (GROUP,), "x-autoreply header"),
        (google(extra="Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n"),
         GOOGLE_ENVELOPE, (GROUP,), "multipart/report"),
        (google(extra="Content-Type: text/calendar; method=REPLY\r\n"), GOOGLE_ENVELOPE, (GROUP,), "calendar reply"),
        (google(extra=f"X-Guardrail-Loop: {HOSTNAME}\r\n"), GOOGLE_ENVELOPE, (GROUP,), "our loop marker"),
        (google("Mail Delivery Subsystem <MAILER-DAEMON@mx.customer.example>"), GOOGLE_ENVELOPE, (GROUP,),
         "From mailer-daemon@mx.customer.example looks automated"),
        (google(GOOGLE_FROM, "X-Original-From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\r\n"),
         GOOGLE_ENVELOPE, (GROUP,), "X-Original-From mailer-daemon@googlemail.com looks automated"),
        (mailman(MAILMAN_FROM, "Reply-To: Shop <noreply@shop.example>\r\n"), MAILMAN_ENVELOPE, (MAILMAN_LIST,),
         "Reply-To noreply@shop.example looks automated"),
        # A newsletter sent to the group keeps the list headers it came with.
        (google(extra="List-Id: Weekly deals <deals.shop.example>\r\n"), GOOGLE_ENVELOPE, (GROUP,), "Precedence: list"),
        (message(extra_headers="List-Id: Weekly deals <deals.shop.example>\r\n" + GOOGLE_HEADERS), GOOGLE_ENVELOPE, (GROUP,),
         "Precedence: list"),
        (google(extra="List-Unsubscribe: <https://shop.example/unsubscribe/7f3a>\r\n"), GOOGLE_ENVELOPE, (GROUP,),
         "list-unsubscribe header"),
        (google(extra="Precedence: bulk\r\n"), GOOGLE_ENVELOPE, (GROUP,), "Precedence: list"),
        # The group's own From, and no person behind it: as without the key.
        (google(GOOGLE_FROM), GOOGLE_ENVELOPE, (GROUP,), "Precedence: list"),
    ],
    ids=[
        "google-person", "google-rewritten", "mailman-person", "mailman-errors-to", "x-precedence-bulk", "list-id-case",
        "google-not-configured", "rewritten-not-configured", "mailman-not-configured",
        "other-list-id",
        "auto-submitted", "null-sender", "return-path-null", "precedence-junk", "x-autoreply", "report",
        "calendar-reply", "loop-marker", "robot-from", "robot-original-from", "robot-reply-to",
        "second-list-id", "second-list-id-first", "second-list-unsubscribe", "second-precedence",
        "no-person",
    ],
)
def test_list_machine_signal_table(data: bytes, mail_from: str, inbox_lists: tuple[str, ...], signal: str | None) -> None:
    assert signal_of(data, mail_from, inbox_lists) == signal


# -- who wrote it ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Google: the person in X-Original-From, and again in Reply-To.
        (google(GOOGLE_FROM, GOOGLE_PERSON), ("alice@customer.example", "Alice Doe", "X-Original-From")),
        (google(GOOGLE_FROM, "X-Original-From: =?utf-8?q?Ren=C3=A9e_Roux?= <renee@customer.example>\r\n"),
         ("renee@customer.example", "Renée Roux", "X-Original-From")),
        (google(GOOGLE_FROM, f"Reply-To: {ALICE}\r\n"), ("alice@customer.example", "Alice Doe", "Reply-To")),
        # Mailman: the person in Reply-To, beside the list's own address or not.
        (mailman(MAILMAN_FROM, f"Reply-To: {ALICE}\r\n"), ("alice@customer.example", "Alice Doe", "Reply-To")),
        (mailman(MAILMAN_FROM, f"Reply-To: {ALICE}, Support <support@lists.example.net>\r\n"),
         ("alice@customer.example", "Alice Doe", "Reply-To")),
        # From names the person: the group left it as it was.
        (google(), ("alice@customer.example", "Alice Doe", "From")),
        (mailman(), ("alice@customer.example", "Alice Doe", "From")),
        # No person to recover.
        (google(GOOGLE_FROM), None),
        (google(GOOGLE_FROM, "Reply-To: support@example.org\r\n"), None),
        (mailman(MAILMAN_FROM, "Reply-To: support@lists.example.net\r\n"), None),
        (google(GOOGLE_FROM, "Reply-To: alice@customer.example, bob@customer.example\r\n"), None),
        (google(GOOGLE_FROM, "X-Original-From: alice@customer.example\r\nX-Original-From: sam@example.org\r\n"), None),
        # Not a configured list.
        (message(sender=GOOGLE_FROM, extra_headers=GOOGLE_PERSON), None),
        (message(sender=GOOGLE_FROM, extra_headers=GOOGLE_PERSON + "List-Id: <sales.example.org>\r\n"), None),
    ],
    ids=[
        "google", "google-encoded-name", "google-reply-to", "mailman", "mailman-reply-to-list-too", "google-from",
        "mailman-from", "nothing", "reply-to-inbox", "reply-to-list", "reply-to-two", "two-original-from",
        "no-list-id", "other-list-id",
    ],
)
def test_list_sender_table(data: bytes, expected: tuple[str, str, str] | None) -> None:
    found = list_sender(summarize(data), frozenset({GROUP, MAILMAN_LIST}), INBOXES)
    assert (None if found is None else (found.address, found.name, found.header)) == expected
    if found is not None:
        assert found.list_id == (GROUP if b"support.example.org" in data else MAILMAN_LIST)


@pytest.mark.parametrize(
    ("value", "identifier"),
    [
        ("<support.example.org>", "support.example.org"),
        ("Customer support <Support.Lists.Example.NET>", "support.lists.example.net"),
        ('"Support <team>" <support.example.org>', "support.example.org"),
        ("support.example.org", ""),
    ],
)
def test_list_identifier_table(value: str, identifier: str) -> None:
    assert list_identifier(value) == identifier
