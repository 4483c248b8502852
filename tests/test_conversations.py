"""Which conversation a message joins: by thread headers, or by our reference and a known sender."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sqlite3
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path

import pytest
from conftest import (
    ROUTES,
    TEAMS,
    maildir_messages,
    message,
    send,
    wait_until,
    write_config,
)
from structlog.testing import capture_logs

from guardrail.checks import removed_team_findings
from guardrail.cli import main
from guardrail.config import load_config
from guardrail.conversations import (
    KnownConversation,
    choose_conversation,
    find_references,
    new_reference,
)
from guardrail.daemon import load_ruleset
from guardrail.plan import Submission, is_team_removed
from guardrail.prepare import Envelope, Site, peer_in, prepare_message
from guardrail.store_admin import open_conversations_by_team

NOW = datetime(2025, 11, 4, 9, 0, tzinfo=UTC)
KNOWN = KnownConversation(7, "GR-7K3M9Q", "default", "support", frozenset({"alice@example.com"}), None)


@pytest.mark.parametrize(
    ("subject", "found"),
    [
        ("VS: [GR-7K3M9Q] Printer on floor 3 jams", ("GR-7K3M9Q",)),
        ("AW: [gr-7k3m9q] Printer", ("GR-7K3M9Q",)),
        ("Re: [ GR-7K3M9Q ] Printer", ("GR-7K3M9Q",)),
        ("[GR-7K3M9Q] no prefix", ("GR-7K3M9Q",)),
        ("Re: GR-7K3M9Q without brackets", ()),
        ("Re: [GR-7K3M9] too short", ()),
        ("Re: [GR-7K3M9QX] too long", ()),
        ("Re: [XY-7K3M9Q] other prefix", ()),
    ],
)
def test_find_references_table(subject: str, found: tuple[str, ...]) -> None:
    assert find_references(subject, "GR") == found


def test_new_reference_format() -> None:
    references = {new_reference("GR") for _ in range(200)}
    assert len(references) == 200
    for reference in references:
        assert find_references(f"[{reference}]", "GR") == (reference,)


@pytest.mark.parametrize(
    ("thread_ids", "tags", "senders", "from_inbox", "member_of", "expected"),
    [
        (("<known@x>",), (), frozenset({"mallory@example.net"}), False, frozenset(), 7),
        (("<unknown@x>", "<known@x>"), (), frozenset(), False, frozenset(), 7),
        ((), ("GR-7K3M9Q",), frozenset({"alice@example.com"}), False, frozenset(), 7),
        # A reference alone is not enough: the sender must take part already.
        ((), ("GR-7K3M9Q",), frozenset({"mallory@example.net"}), False, frozenset(), None),
        ((), ("GR-0000000",), frozenset({"alice@example.com"}), False, frozenset(), None),
        (("<unknown@x>",), (), frozenset({"alice@example.com"}), False, frozenset(), None),
        # Mail written as a shared inbox joins by the reference alone.
        ((), ("GR-7K3M9Q",), frozenset({"support@example.org"}), True, frozenset(), 7),
        ((), ("GR-0000000",), frozenset({"support@example.org"}), True, frozenset(), None),
        # A member of the conversation's team now, such as one added after it opened.
        ((), ("GR-7K3M9Q",), frozenset({"dave@example.org"}), False, frozenset({"support"}), 7),
        ((), ("GR-7K3M9Q",), frozenset({"dave@example.org"}), False, frozenset({"billing"}), None),
    ],
)
def test_choose_conversation_table(thread_ids, tags, senders, from_inbox, member_of, expected) -> None:
    chosen, _ = choose_conversation(
        thread_ids, tags, senders, {"<known@x>": KNOWN}, {"GR-7K3M9Q": KNOWN}, from_inbox=from_inbox, member_of=member_of,
    )
    assert (chosen.id if chosen else None) == expected


def rows(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute(sql).fetchall()


async def test_follow_ups_join_and_keep_their_team(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<printer-3@example.com>"))
    ((reference,),) = rows(database, "SELECT reference FROM conversations")

    # A reply by thread header joins even though its subject would route to billing.
    reply = message(subject="Re: invoice question", message_id="<r1@example.com>",
                    extra_headers="In-Reply-To: <printer-3@example.com>\r\n")
    await send(daemon.port, "alice@example.com", ["support@example.org"], reply)
    # A reply with no thread headers joins through the reference in its subject.
    tagged = message(subject=f"VS: [{reference}] Printer on floor 3 jams", message_id="<r2@example.com>")
    await send(daemon.port, "alice@example.com", ["support@example.org"], tagged)
    # A stranger using the reference starts a conversation of their own.
    stranger = message(subject=f"[{reference}] hello", sender="Mallory <mallory@example.net>", message_id="<r3@example.com>")
    await send(daemon.port, "mallory@example.net", ["support@example.org"], stranger)

    conversations = rows(database, "SELECT id, reference FROM conversations ORDER BY id")
    assert len(conversations) == 2
    dispositions = dict(rows(database, "SELECT message_id, disposition || ':' || team || ':' || conversation_id FROM messages"))
    assert dispositions["<printer-3@example.com>"] == "new:support:1"
    assert dispositions["<r1@example.com>"] == "follow_up:support:1"
    assert dispositions["<r2@example.com>"] == "follow_up:support:1"
    assert dispositions["<r3@example.com>"] == "new:support:2"

    maildir = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: len(maildir_messages(maildir)) == 4, what="four deliveries to support")
    assert maildir_messages(tmp_path / "var" / "maildir" / "billing") == []


@pytest.mark.parametrize(
    ("from_header", "mail_from", "staff"),
    [
        ("Alice <alice@example.com>", "alice@example.com", False),
        # Written as the shared inbox: the team's own mail.
        ("Support <support@example.org>", "support@example.org", True),
        ("Support <SUPPORT@Example.ORG>", "agent7@helpdesk.example.net", True),
        ("billing@example.org", "billing@example.org", True),
        # A forwarder that puts the inbox in the envelope sender of a customer's message.
        ("Alice <alice@example.com>", "support@example.org", False),
        # Or a team member's address: the writer is still the customer.
        ("Alice <alice@example.com>", "sam@example.org", False),
        # The inbox's domain is not the inbox.
        ("Pat <pat@example.org>", "pat@example.org", False),
        # A team member still counts.
        ("Sam Ortiz <sam@example.org>", "sam@example.org", True),
    ],
)
def test_staff_sender_table(tmp_path: Path, from_header: str, mail_from: str, staff: bool) -> None:
    config = load_config(write_config(tmp_path))
    envelope = Envelope(mail_from, ("support@example.org",), "[127.0.0.1]:40000", "client")
    submission = prepare_message(envelope, message(sender=from_header), load_ruleset(config), Site.from_config(config), NOW)

    assert isinstance(submission, Submission)
    assert submission.is_staff is staff
    # An acknowledgement to the envelope sender would come back to the inbox.
    own_envelope = mail_from in config.smtp.inboxes
    assert (submission.ack is None) is (staff or own_envelope)
    expected = None
    if staff:
        expected = "sender is a team member"
    elif own_envelope:
        expected = "envelope sender is one of our own addresses"
    assert submission.ack_signal == expected
    # Mail written as the inbox itself needs no reply, but a team member's new mail still starts the clock.
    assert submission.sla_applies is (parseaddr(from_header)[1].lower() not in config.smtp.inboxes)


@pytest.mark.parametrize(
    ("mail_from", "signal"),
    [
        ("alice@example.com", None),
        # Without a domain, an MTA further on would pick one: the acknowledgement could reach anyone.
        ("root", "envelope sender has no domain"),
        ("alice", "envelope sender has no domain"),
        # Our own inboxes, as from a forwarder that puts the inbox in every envelope.
        ("support@example.org", "envelope sender is one of our own addresses"),
        ("Billing@Example.ORG", "envelope sender is one of our own addresses"),
    ],
)
def test_reply_address_table(tmp_path: Path, mail_from: str, signal: str | None) -> None:
    config = load_config(write_config(tmp_path))
    envelope = Envelope(mail_from, ("support@example.org",), "[127.0.0.1]:40000", "client")
    raw = message(sender="Carl Customer <carl@customer.example>")
    submission = prepare_message(envelope, raw, load_ruleset(config), Site.from_config(config), NOW)

    assert isinstance(submission, Submission)
    assert submission.ack_signal == signal
    assert (submission.ack is None) is (signal is not None)
    # A person may still be behind it, so the team's deadline runs.
    assert submission.sla_applies is True


@pytest.mark.parametrize(
    ("rcpt_tos", "subject", "team", "from_address"),
    [
        (("support@example.org",), "Printer", "support", "support@example.org"),
        # Sent to both inboxes, routed to billing by its recipient: acknowledged from billing@.
        (("support@example.org", "billing@example.org"), "Printer", "billing", "billing@example.org"),
        (("billing@example.org", "support@example.org"), "Printer", "billing", "billing@example.org"),
        # Routed to billing by its subject, on a route whose other condition names billing@.
        (("support@example.org", "billing@example.org"), "My invoice", "billing", "billing@example.org"),
    ],
)
def test_acknowledgement_inbox_table(tmp_path: Path, rcpt_tos: tuple[str, ...], subject: str, team: str, from_address: str) -> None:
    config = load_config(write_config(tmp_path))
    envelope = Envelope("carl@customer.example", rcpt_tos, "[127.0.0.1]:40000", "client")
    raw = message(sender="Carl Customer <carl@customer.example>", subject=subject)
    submission = prepare_message(envelope, raw, load_ruleset(config), Site.from_config(config), NOW)

    assert isinstance(submission, Submission)
    assert submission.team == team
    assert submission.ack is not None
    assert submission.ack.from_address == from_address


NESTED_RECIPIENT_ROUTES = TEAMS + """
[[route]]
name = "billing"
team = "billing"
any = [{ all = [{ rcpt.is = "support@example.org" }, { subject.contains = "invoice" }] }, { rcpt.is = "billing@example.org" }]

[[route]]
name = "default"
team = "support"
default = true
"""


@pytest.mark.parametrize(
    ("subject", "from_address"),
    [
        ("My invoice", "support@example.org"),
        # support@ takes the message to billing only with an invoice in the subject; here billing@ took it.
        ("Printer", "billing@example.org"),
    ],
)
def test_acknowledgement_inbox_of_a_nested_condition(tmp_path: Path, subject: str, from_address: str) -> None:
    config = load_config(write_config(tmp_path, rules=NESTED_RECIPIENT_ROUTES))
    envelope = Envelope("carl@customer.example", ("support@example.org", "billing@example.org"), "[127.0.0.1]:40000", "client")
    raw = message(sender="Carl Customer <carl@customer.example>", subject=subject)
    submission = prepare_message(envelope, raw, load_ruleset(config), Site.from_config(config), NOW)

    assert isinstance(submission, Submission)
    assert submission.team == "billing"
    assert submission.ack is not None
    assert submission.ack.from_address == from_address


# Staff and inbox senders count only when the MTA in front verified their domain.
VERIFIED_STAFF_RULES = TEAMS + ROUTES + """
[staff]
domains = ["example.org", "eu.example.org"]
authserv_id = "MX.example.org"
"""


@pytest.mark.parametrize(
    ("from_header", "mail_from", "results", "staff", "reason"),
    [
        # No header from our MTA: a forged reply proves nothing.
        ("Sam Ortiz <sam@example.org>", "sam@example.org", "", False,
         "sam@example.org not verified: no Authentication-Results header from mx.example.org"),
        ("Sam Ortiz <sam@example.org>", "sam@example.org", "mx.example.org; dmarc=pass header.from=example.org", True, ""),
        # A parent domain verified by DKIM covers a subdomain's address.
        ("Pat <pat@eu.example.org>", "", "mx.example.org; dkim=pass header.d=example.org", True, ""),
        ("Pat <pat@example.org>", "", "mx.example.org; dkim=pass header.d=eu.example.org", False,
         "mx.example.org did not verify the domain of pat@example.org (verified: eu.example.org)"),
        ("Sam Ortiz <sam@example.org>", "bounce@mailer.example.net",
         "mx.example.org; spf=pass smtp.mailfrom=bounce@mailer.example.net; dkim=pass header.d=example.org", True, ""),
        # Another server's verdict, or a failed one, does not count.
        ("Sam Ortiz <sam@example.org>", "sam@example.org", "relay.example.net; dmarc=pass header.from=example.org", False,
         "sam@example.org not verified: no Authentication-Results header from mx.example.org"),
        ("Sam Ortiz <sam@example.org>", "sam@example.org", "mx.example.org; dmarc=fail header.from=example.org", False,
         "mx.example.org did not verify the domain of sam@example.org (verified: none)"),
        # An encoded word that the sender wrote into the envelope sender stays encoded, so it adds no result.
        ("Sam Ortiz <sam@example.org>", "=?utf-8?q?=3Bdkim=3Dpass_header.d=3Dexample.org_x.y=3D?=@evil.example",
         "mx.example.org; spf=pass smtp.mailfrom==?utf-8?q?=3Bdkim=3Dpass_header.d=3Dexample.org_x.y=3D?=@evil.example;"
         " dmarc=fail header.from=example.org", False,
         "mx.example.org did not verify the domain of sam@example.org (verified: evil.example)"),
        # Written as the shared inbox, verified or not.
        ("Support <support@example.org>", "support@example.org", "mx.example.org; spf=pass smtp.mailfrom=support@example.org", True, ""),
        ("Support <support@example.org>", "support@example.org", "", False,
         "support@example.org not verified: no Authentication-Results header from mx.example.org"),
        # A second header with our id may be the sender's.
        ("Sam Ortiz <sam@example.org>", "sam@example.org",
         "mx.example.org; dmarc=pass header.from=example.org\r\nAuthentication-Results: mx.example.org; none", False,
         "sam@example.org not verified: 2 Authentication-Results headers name mx.example.org, so a sender may have added one"),
        # A customer claims nothing, so there is nothing to verify.
        ("Alice <alice@example.com>", "alice@example.com", "", False, ""),
        # A forwarder on a staff domain rewrote the envelope sender (SRS), and SPF passes for it.
        ("Alice <alice@example.com>", "srs0=hq1=ab=example.com=alice@example.org",
         "mx.example.org; spf=pass smtp.mailfrom=srs0=hq1=ab=example.com=alice@example.org", False, ""),
    ],
)
def test_verified_staff_table(tmp_path: Path, from_header: str, mail_from: str, results: str, staff: bool, reason: str) -> None:
    config = load_config(write_config(tmp_path, rules=VERIFIED_STAFF_RULES))
    envelope = Envelope(mail_from, ("support@example.org",), "[127.0.0.1]:40000", "client")
    extra = f"Authentication-Results: {results}\r\n" if results else ""
    raw = message(sender=from_header, extra_headers=extra)
    submission = prepare_message(envelope, raw, load_ruleset(config), Site.from_config(config), NOW)

    assert isinstance(submission, Submission)
    assert submission.is_staff is staff
    assert submission.staff_unverified == reason
    expected_from_inbox = staff and "support@" in from_header
    assert submission.from_inbox is expected_from_inbox


@pytest.mark.parametrize(
    ("peer", "staff", "reason"),
    [
        ("[127.0.0.1]:40000", True, ""),
        ("[10.1.2.3]:25", True, ""),
        # A client that reached guardrail without passing the MTA could have written the header itself.
        ("[192.0.2.7]:40000", False, "sam@example.org not verified: sent from [192.0.2.7]:40000, not from [staff] authserv_peers"),
        ("", False, "sam@example.org not verified: sent from an unknown client, not from [staff] authserv_peers"),
    ],
)
def test_verified_staff_peer_table(tmp_path: Path, peer: str, staff: bool, reason: str) -> None:
    rules = VERIFIED_STAFF_RULES + 'authserv_peers = ["127.0.0.1", "10.0.0.0/8"]\n'
    config = load_config(write_config(tmp_path, rules=rules))
    envelope = Envelope("sam@example.org", ("support@example.org",), peer, "client")
    verified = "Authentication-Results: mx.example.org; dmarc=pass header.from=example.org\r\n"
    raw = message(sender="Sam Ortiz <sam@example.org>", extra_headers=verified)
    submission = prepare_message(envelope, raw, load_ruleset(config), Site.from_config(config), NOW)

    assert isinstance(submission, Submission)
    assert submission.is_staff is staff
    assert submission.staff_unverified == reason


@pytest.mark.parametrize(
    ("peer", "inside"),
    [
        ("[127.0.0.1]:4000", True), ("[::1]:4000", True), ("[10.0.0.9]:25", False), ("", False), ("garbage", False),
        ("[::ffff:zz]:1", False),
        # An IPv4 client as a dual-stack listener reports it.
        ("[::ffff:127.0.0.1]:4000", True), ("[::ffff:10.0.0.9]:4000", False),
    ],
)
def test_peer_in_table(peer: str, inside: bool) -> None:
    networks = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert peer_in(peer, networks) is inside


async def test_forged_staff_reply_does_not_answer(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=VERIFIED_STAFF_RULES))
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<q@example.com>"))
    thread = "In-Reply-To: <q@example.com>\r\n"
    forged = message(sender="Sam Ortiz <sam@example.org>", subject="Re: Printer", message_id="<f@example.org>", extra_headers=thread)
    with capture_logs() as logs:
        await send(daemon.port, "sam@example.org", ["support@example.org"], forged)
    assert rows(database, "SELECT state FROM conversations") == [("open",)]
    [detail] = rows(database, "SELECT detail FROM events WHERE kind = 'received' AND message_row = 2")
    unverified = "sam@example.org not verified: no Authentication-Results header from mx.example.org"
    assert json.loads(detail[0])["staff_unverified"] == unverified
    assert [entry["reason"] for entry in logs if entry["event"] == "staff_sender_not_verified"] == [unverified]

    verified = "Authentication-Results: mx.example.org; dmarc=pass header.from=example.org\r\n" + thread
    reply = message(sender="Sam Ortiz <sam@example.org>", subject="Re: Printer", message_id="<r@example.org>", extra_headers=verified)
    await send(daemon.port, "sam@example.org", ["support@example.org"], reply)
    assert rows(database, "SELECT state, answered_by FROM conversations") == [("answered", "sam@example.org")]


async def test_member_added_later_joins_by_reference(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<q@example.com>"))
    [(reference,)] = rows(database, "SELECT reference FROM conversations")
    rules_file = tmp_path / "rules" / "rules.toml"
    dave = '{ name = "Sam Ortiz", address = "sam@example.org" }, { name = "Dave New", address = "dave@example.org" }'
    rules_file.write_text(rules_file.read_text().replace('{ name = "Sam Ortiz", address = "sam@example.org" }', dave))
    assert daemon.reload() is True

    # No thread headers: only the reference in the subject ties the reply to the conversation.
    reply = message(sender="Dave New <dave@example.org>", subject=f"Re: [{reference}] Printer", message_id="<d@example.org>")
    await send(daemon.port, "dave@example.org", ["support@example.org"], reply)

    assert rows(database, "SELECT state, answered_by FROM conversations") == [("answered", "dave@example.org")]
    [(thread,)] = rows(database, "SELECT detail FROM events WHERE kind = 'received' AND message_row = 2")
    assert json.loads(thread)["thread"] == f"subject carries [{reference}] and the sender is a member of team support"


async def test_reply_written_as_the_inbox_answers(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<q@example.com>"))
    reply = message(
        sender="Support <support@example.org>", subject="Re: Printer on floor 3 jams", message_id="<a@example.org>",
        extra_headers="In-Reply-To: <q@example.com>\r\n",
    )
    await send(daemon.port, "support@example.org", ["support@example.org"], reply)
    # New mail written as the inbox gets no acknowledgement addressed to the inbox.
    note = message(sender="Support <support@example.org>", subject="Shift notes", message_id="<n@example.org>")
    await send(daemon.port, "support@example.org", ["support@example.org"], note)

    assert rows(database, "SELECT state, answered_by FROM conversations ORDER BY id") == [
        ("answered", "support@example.org"),
        # The team's own mail needs no reply.
        ("no_reply_needed", None),
    ]
    assert rows(database, "SELECT detail FROM events WHERE conversation_id = 2 AND kind = 'no_deadline'") == [
        ('{"reason": "written as the shared inbox"}',),
    ]
    assert rows(database, "SELECT recipient, decision, signal FROM acknowledgements ORDER BY id") == [
        ("alice@example.com", "sent", ""),
        ("support@example.org", "suppressed", "follow-up in an existing conversation"),
        ("support@example.org", "suppressed", "sender is a team member"),
    ]


async def test_reply_written_as_the_inbox_joins_by_reference(tmp_path: Path, start_daemon) -> None:
    # Some help-desk tools thread only by the reference in the subject.
    daemon = await start_daemon(write_config(tmp_path))
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<q@example.com>"))
    [(reference,)] = rows(database, "SELECT reference FROM conversations")
    reply = message(sender="Support <support@example.org>", subject=f"Re: [{reference}] Printer", message_id="<a@example.org>")
    await send(daemon.port, "support@example.org", ["support@example.org"], reply)

    assert rows(database, "SELECT state, answered_by FROM conversations") == [("answered", "support@example.org")]
    assert rows(database, "SELECT disposition FROM messages ORDER BY id") == [("new",), ("follow_up",)]


async def test_reply_to_team_forward_joins(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<q@example.com>"))
    answer = message(
        sender="Sam Ortiz <sam@example.org>", subject="Re: Printer on floor 3 jams", message_id="<a@example.org>",
        extra_headers="In-Reply-To: <q@example.com>\r\nReferences: <q@example.com>\r\n",
    )
    await send(daemon.port, "sam@example.org", ["support@example.org"], answer)
    assert rows(daemon.config.database_path, "SELECT COUNT(DISTINCT conversation_id) FROM messages") == [(1,)]


async def test_long_references_thread_by_newest_ids(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<parent@example.com>"))
    references = " ".join(f"<thread-{index:03}@lists.example.net>" for index in range(120)) + " <parent@example.com>"
    folded = references.replace(" ", "\r\n ")
    reply = message(message_id="<child@example.com>", extra_headers=f"References: {folded}\r\n")
    await send(daemon.port, "alice@example.com", ["support@example.org"], reply)
    assert rows(daemon.config.database_path, "SELECT disposition FROM messages ORDER BY id") == [("new",), ("follow_up",)]


@pytest.mark.parametrize(
    ("team", "team_names", "removed"),
    [
        ("frontdesk", frozenset({"frontdesk", "support"}), False),
        ("frontdesk", frozenset({"support"}), True),
        ("frontdesk", frozenset(), True),
        # Without the current teams every conversation keeps its team.
        ("frontdesk", None, False),
    ],
)
def test_is_team_removed_table(team: str, team_names: frozenset[str] | None, removed: bool) -> None:
    assert is_team_removed(team, team_names) is removed


FRONTDESK_RULES = """
[[team]]
name = "frontdesk"
destination = { maildir = "var/maildir/frontdesk" }

[[team]]
name = "support"
destination = { maildir = "var/maildir/support" }
members = [{ name = "Sam Ortiz", address = "sam@example.org" }]

[[route]]
name = "default"
team = "frontdesk"
default = true
"""

WITHOUT_FRONTDESK = FRONTDESK_RULES.replace(
    '[[team]]\nname = "frontdesk"\ndestination = { maildir = "var/maildir/frontdesk" }\n', ""
).replace('team = "frontdesk"', 'team = "support"')


async def test_follow_up_of_removed_team_is_routed_again(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=FRONTDESK_RULES))
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<printer-3@example.com>"))
    (tmp_path / "rules" / "rules.toml").write_text(WITHOUT_FRONTDESK)
    assert daemon.reload() is True
    (before,) = removed_team_findings(daemon.rules, open_conversations_by_team(database))

    reply = message(subject="Re: Printer on floor 3 jams", message_id="<r1@example.com>",
                    extra_headers="In-Reply-To: <printer-3@example.com>\r\n")
    with capture_logs() as events:
        await send(daemon.port, "alice@example.com", ["support@example.org"], reply)

    assert rows(database, "SELECT message_id, disposition, team, conversation_id FROM messages ORDER BY id") == [
        ("<printer-3@example.com>", "new", "frontdesk", 1),
        ("<r1@example.com>", "follow_up", "support", 1),
    ]
    ((team, route, destination, participants),) = rows(database, "SELECT team, route, destination, participants FROM conversations")
    assert team == "support"
    assert route == "default"
    assert json.loads(destination)["maildir"].endswith("var/maildir/support")
    assert "sam@example.org" in json.loads(participants)
    ((detail,),) = rows(database, "SELECT detail FROM events WHERE kind = 'team_changed'")
    assert json.loads(detail) == {"from": "frontdesk", "to": "support", "route": "default", "reason": "team removed from the rules"}
    (warning,) = [event for event in events if event["event"] == "conversation_team_changed"]
    assert warning["log_level"] == "warning"
    assert warning["from_team"] == "frontdesk"
    support = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: len(maildir_messages(support)) == 1, what="the follow-up in the new team's maildir")
    assert len(maildir_messages(tmp_path / "var" / "maildir" / "frontdesk")) == 1
    assert str(before).startswith("warning: team frontdesk: removed from the rules but has 1 open conversation(s)")
    assert removed_team_findings(daemon.rules, open_conversations_by_team(database)) == []


async def test_check_warns_of_removed_team(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, rules=FRONTDESK_RULES)
    daemon = await start_daemon(config)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<printer-3@example.com>"))
    (tmp_path / "rules" / "rules.toml").write_text(WITHOUT_FRONTDESK)

    status = await asyncio.to_thread(main, ["check", "--config", str(config)])

    assert status == 1
    assert "warning: team frontdesk: removed from the rules but has 1 open conversation(s)" in capsys.readouterr().err
