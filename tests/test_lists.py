"""People's mail that a group or mailing list of ours ([smtp] inbox_lists) passes on to guardrail."""

from __future__ import annotations

import email
import email.policy
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import TEAMS, maildir_messages, message, send, settle, write_config

from guardrail.cli import main
from guardrail.clock import ManualClock
from guardrail.config import load_config
from guardrail.daemon import load_ruleset
from guardrail.errors import ConfigErrors
from guardrail.lists import list_identifier, list_sender
from guardrail.loops import DEFAULT_SENDERS, machine_signal
from guardrail.message import summarize
from guardrail.plan import Submission
from guardrail.prepare import Envelope, Site, prepare_message

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
# A Mailman 3 list that takes no posts from its members writes "List-Post: NO".
NO_POST_HEADERS = MAILMAN_HEADERS.replace("List-Post: <mailto:support@lists.example.net>\r\n", "List-Post: NO\r\n")
MAILMAN_ENVELOPE = "support-bounces@lists.example.net"
MAILMAN_FROM = "Alice Doe via Support <support@lists.example.net>"
# A Mailman list whose replies go to the list keeps the author in Cc.
MAILMAN_CC = "Reply-To: Support <support@lists.example.net>\r\nCc: Alice Doe <alice@customer.example>\r\n"

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
        (mailman("Shop via Support <support@lists.example.net>", "Cc: Shop <noreply@shop.example>\r\n"),
         MAILMAN_ENVELOPE, (MAILMAN_LIST,), "Cc noreply@shop.example looks automated"),
        (mailman(MAILMAN_FROM, MAILMAN_CC), MAILMAN_ENVELOPE, (MAILMAN_LIST,), None),
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
        "calendar-reply", "loop-marker", "robot-from", "robot-original-from", "robot-reply-to", "robot-cc", "mailman-cc",
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
        # Mailman, when replies go to the list: the person in Cc, beside the list's and our own addresses.
        (mailman(MAILMAN_FROM, MAILMAN_CC), ("alice@customer.example", "Alice Doe", "Cc")),
        (mailman(MAILMAN_FROM, "Cc: Alice Doe <alice@customer.example>\r\n"), ("alice@customer.example", "Alice Doe", "Cc")),
        (mailman(MAILMAN_FROM, "Cc: Alice Doe <alice@customer.example>, Support <support@lists.example.net>,\r\n"
                               " billing@example.org\r\n"), ("alice@customer.example", "Alice Doe", "Cc")),
        (mailman(MAILMAN_FROM, "Reply-To: support@lists.example.net\r\nCc: ALICE DOE <alice@customer.example>\r\n"),
         ("alice@customer.example", "ALICE DOE", "Cc")),
        (mailman("=?utf-8?q?Ren=C3=A9e_Roux_via_Support?= <support@lists.example.net>",
                 "Cc: =?utf-8?q?Ren=C3=A9e_Roux?= <renee@customer.example>\r\n"),
         ("renee@customer.example", "Renée Roux", "Cc")),
        # A From without a display name leaves the Cc entry without one too.
        (mailman("alice--- via Support <support@lists.example.net>", "Cc: alice@customer.example\r\n"),
         ("alice@customer.example", "", "Cc")),
        # From names the person: the group left it as it was.
        (google(), ("alice@customer.example", "Alice Doe", "From")),
        (mailman(), ("alice@customer.example", "Alice Doe", "From")),
        # No person to recover.
        (google(GOOGLE_FROM), None),
        (google(GOOGLE_FROM, "Reply-To: support@example.org\r\n"), None),
        (mailman(MAILMAN_FROM, "Reply-To: support@lists.example.net\r\n"), None),
        (google(GOOGLE_FROM, "Reply-To: alice@customer.example, bob@customer.example\r\n"), None),
        (google(GOOGLE_FROM, "X-Original-From: alice@customer.example\r\nX-Original-From: sam@example.org\r\n"), None),
        # No single person in Cc that Mailman put there.
        (mailman(MAILMAN_FROM, "Cc: Alice Doe <alice@customer.example>, Bob Roe <bob@customer.example>\r\n"), None),
        (mailman(MAILMAN_FROM, "Cc: Alice Doe <alice@old.example>, Alice Doe <alice@customer.example>\r\n"), None),
        (mailman(MAILMAN_FROM, "Cc: Bob Roe <bob@customer.example>\r\n"), None),
        (mailman("Support <support@lists.example.net>", "Cc: Alice Doe <alice@customer.example>\r\n"), None),
        (mailman(MAILMAN_FROM, "Cc: Support <support@lists.example.net>, support@example.org\r\n"), None),
        (mailman(MAILMAN_FROM, "Reply-To: a@customer.example, b@customer.example\r\nCc: alice@customer.example\r\n"), None),
        # The address that the List-Id names is the list's own, also without List-Post.
        (message(sender=MAILMAN_FROM, extra_headers=NO_POST_HEADERS), None),
        (message(sender=MAILMAN_FROM, extra_headers=NO_POST_HEADERS + MAILMAN_CC), ("alice@customer.example", "Alice Doe", "Cc")),
        (message(sender=MAILMAN_FROM, extra_headers=NO_POST_HEADERS + f"Reply-To: {ALICE}\r\n"),
         ("alice@customer.example", "Alice Doe", "Reply-To")),
        # Not a configured list.
        (message(sender=GOOGLE_FROM, extra_headers=GOOGLE_PERSON), None),
        (message(sender=GOOGLE_FROM, extra_headers=GOOGLE_PERSON + "List-Id: <sales.example.org>\r\n"), None),
    ],
    ids=[
        "google", "google-encoded-name", "google-reply-to", "mailman", "mailman-reply-to-list-too",
        "mailman-cc", "mailman-cc-no-reply-to", "mailman-cc-beside-list-and-inbox", "mailman-cc-name-case",
        "mailman-cc-encoded-name", "mailman-cc-no-name",
        "google-from", "mailman-from", "nothing", "reply-to-inbox", "reply-to-list", "reply-to-two", "two-original-from",
        "cc-two", "cc-two-same-name", "cc-other-name", "cc-without-via", "cc-only-list-and-inbox", "reply-to-two-beside-cc",
        "no-post", "no-post-cc", "no-post-reply-to", "no-list-id", "other-list-id",
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


# -- the decisions prepare makes from it -------------------------------------------

STAFF = "X-Original-From: Sam Ortiz <sam@example.org>\r\nReply-To: Sam Ortiz <sam@example.org>\r\n"


def prepared(tmp_path: Path, data: bytes, mail_from: str, inbox_lists: list[str], rules: str = "") -> Submission:
    config = load_config(write_config(tmp_path, smtp={"inbox_lists": inbox_lists}, rules=TEAMS + rules + ROUTE))
    envelope = Envelope(mail_from, ("support@example.org",), "[127.0.0.1]:40000", "client")
    submission = prepare_message(envelope, data, load_ruleset(config), Site.from_config(config), NOW)
    assert isinstance(submission, Submission)
    return submission


ROUTE = '\n[[route]]\nname = "default"\nteam = "support"\ndefault = true\n'


@pytest.mark.parametrize(
    ("data", "mail_from", "inbox_lists", "expected"),
    [
        # The person behind the group's From is a customer, and the acknowledgement goes to them.
        (google(GOOGLE_FROM, GOOGLE_PERSON), GOOGLE_ENVELOPE, [GROUP],
         ("alice@customer.example", False, False, True, "alice@customer.example", None)),
        (mailman(MAILMAN_FROM, f"Reply-To: {ALICE}\r\n"), MAILMAN_ENVELOPE, [MAILMAN_LIST],
         ("alice@customer.example", False, False, True, "alice@customer.example", None)),
        (mailman(), MAILMAN_ENVELOPE, [MAILMAN_LIST],
         ("alice@customer.example", False, False, True, "alice@customer.example", None)),
        (mailman(MAILMAN_FROM, MAILMAN_CC), MAILMAN_ENVELOPE, [MAILMAN_LIST],
         ("alice@customer.example", False, False, True, "alice@customer.example", None)),
        # A team member behind the group's From is staff, not the shared inbox.
        (google(GOOGLE_FROM, STAFF), GOOGLE_ENVELOPE, [GROUP],
         ("sam@example.org", True, False, True, None, "sender is a team member")),
        # No person behind the group's From: list mail written as the shared inbox, as without the key.
        (google(GOOGLE_FROM), GOOGLE_ENVELOPE, [GROUP], ("", True, True, False, None, "Precedence: list")),
        (google(GOOGLE_FROM, GOOGLE_PERSON), GOOGLE_ENVELOPE, [], ("", True, True, False, None, "Precedence: list")),
    ],
    ids=["google-customer", "mailman-customer", "mailman-from", "mailman-cc", "google-staff", "no-person", "not-configured"],
)
def test_list_sender_decisions(
    tmp_path: Path, data: bytes, mail_from: str, inbox_lists: list[str],
    expected: tuple[str, bool, bool, bool, str | None, str | None],
) -> None:
    sender, staff, from_inbox, sla_applies, ack_to, ack_signal = expected
    submission = prepared(tmp_path, data, mail_from, inbox_lists)

    assert submission.list_sender == sender
    assert submission.is_staff is staff
    assert submission.from_inbox is from_inbox
    assert submission.sla_applies is sla_applies
    assert (submission.ack.to_address if submission.ack else None) == ack_to
    assert submission.ack_signal == ack_signal
    if sender:
        # Threading and participants read the person, not the group's addresses.
        assert submission.sender_addresses == {sender}
        assert submission.sender == sender


def test_list_ack_names_person(tmp_path: Path) -> None:
    submission = prepared(tmp_path, google(GOOGLE_FROM, GOOGLE_PERSON), GOOGLE_ENVELOPE, [GROUP])
    assert submission.ack is not None
    assert submission.ack.fields["sender"] == "alice@customer.example"
    assert submission.ack.fields["sender_name"] == "Alice Doe"


def test_list_staff_needs_own_domain_verdict(tmp_path: Path) -> None:
    staff = '\n[staff]\nauthserv_id = "mx.test.example"\nauthserv_peers = ["127.0.0.1"]\n'
    customer_pass = "Authentication-Results: mx.test.example; dkim=pass header.d=customer.example\r\n"
    submission = prepared(tmp_path, google(GOOGLE_FROM, STAFF + customer_pass), GOOGLE_ENVELOPE, [GROUP], staff)

    # The verdict must cover the person's domain, not another one the message passed.
    assert submission.is_staff is False
    assert submission.from_inbox is False
    assert submission.staff_unverified == (
        "mx.test.example did not verify the domain of sam@example.org (verified: customer.example)"
    )


# -- the config key -------------------------------------------------------------


def test_inbox_lists_loaded_lower_case(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, smtp={"inbox_lists": ["Support.Example.ORG", MAILMAN_LIST]}))
    assert config.smtp.inbox_lists == {GROUP, MAILMAN_LIST}
    assert Site.from_config(config).inbox_lists == {GROUP, MAILMAN_LIST}


def test_inbox_lists_default_empty(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path)).smtp.inbox_lists == frozenset()


EXPECTED_LIST_ID = "expected the identifier of a List-Id header without its angle brackets, such as support.example.com"


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (["<support.example.org>"], f"invalid value '<support.example.org>'; {EXPECTED_LIST_ID}"),
        (["support"], f"invalid value 'support'; {EXPECTED_LIST_ID}"),
        ([""], f"invalid value ''; {EXPECTED_LIST_ID}"),
        (["support example.org"], f"invalid value 'support example.org'; {EXPECTED_LIST_ID}"),
        (["support@example.org"], f"invalid value 'support@example.org'; {EXPECTED_LIST_ID}"),
        (["a" * 250 + ".example"], f"invalid value '{'a' * 250}.example'; {EXPECTED_LIST_ID}"),
        ("support.example.org", "invalid value 'support.example.org'; expected a list of strings"),
        ([5], "invalid value [5]; expected a list of strings"),
    ],
)
def test_inbox_lists_rejects_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: object, error: str) -> None:
    path = write_config(tmp_path, smtp={"inbox_lists": value})
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    assert [str(found) for found in caught.value.errors] == [f"{path}: smtp.inbox_lists: {error}"]

    assert main(["check", "--config", str(path)]) == 2
    assert f"smtp.inbox_lists: {error}" in capsys.readouterr().err


# -- end to end ---------------------------------------------------------------


def outbound(folder: Path) -> list[EmailMessage]:
    found = maildir_messages(folder / "var" / "outbound")
    return [email.message_from_bytes(data, policy=email.policy.default) for data in found]  # type: ignore[misc]


def acknowledgements(folder: Path) -> list[EmailMessage]:
    return [sent for sent in outbound(folder) if sent["Auto-Submitted"] == "auto-replied"]


SENT = [
    (GOOGLE_ENVELOPE, google(GOOGLE_FROM, GOOGLE_PERSON, subject="Order 1234 arrived damaged")),
    (MAILMAN_ENVELOPE, mailman(MAILMAN_FROM, f"Reply-To: {ALICE}\r\n", subject="Order 1234 arrived damaged")),
    (GOOGLE_ENVELOPE, google(subject="Order 1234 arrived damaged")),
    (MAILMAN_ENVELOPE, mailman(MAILMAN_FROM, MAILMAN_CC, subject="Order 1234 arrived damaged")),
]
SENT_IDS = ["google-rewritten", "mailman-rewritten", "google-person", "mailman-cc"]


@pytest.mark.parametrize(("mail_from", "data"), SENT, ids=SENT_IDS)
async def test_list_mail_acknowledged_to_person(tmp_path: Path, start_daemon, mail_from: str, data: bytes) -> None:
    clock = ManualClock(NOW)
    daemon = await start_daemon(write_config(tmp_path, smtp={"inbox_lists": [GROUP, MAILMAN_LIST]}), clock=clock)
    await send(daemon.port, mail_from, ["support@example.org"], data)
    await settle(daemon, clock)

    conversations = await daemon.store.fetch_all("SELECT state, deadline, customer FROM conversations")
    assert conversations == [("open", "2025-11-04T13:00:00.000000Z", "alice@customer.example")]
    rows = await daemon.store.fetch_all("SELECT recipient, decision FROM acknowledgements")
    assert rows == [("alice@customer.example", "sent")]
    [ack] = acknowledgements(tmp_path)
    assert ack["X-Guardrail-Envelope-To"] == "alice@customer.example"
    assert ack["To"] == "alice@customer.example"
    assert ack["From"] == "support@example.org"


@pytest.mark.parametrize(("mail_from", "data"), SENT, ids=SENT_IDS)
async def test_list_mail_without_key_unchanged(tmp_path: Path, start_daemon, mail_from: str, data: bytes) -> None:
    clock = ManualClock(NOW)
    daemon = await start_daemon(write_config(tmp_path), clock=clock)
    await send(daemon.port, mail_from, ["support@example.org"], data)
    await settle(daemon, clock)

    assert await daemon.store.fetch_all("SELECT state, deadline FROM conversations") == [("no_reply_needed", None)]
    rows = await daemon.store.fetch_all("SELECT decision, signal FROM acknowledgements")
    assert rows == [("suppressed", "Precedence: list")]
    assert acknowledgements(tmp_path) == []


async def test_suppressed_list_mail_recorded_for_person(tmp_path: Path, start_daemon) -> None:
    clock = ManualClock(NOW)
    daemon = await start_daemon(write_config(tmp_path, smtp={"inbox_lists": [GROUP]}), clock=clock)
    # The person's out-of-office reply, passed on by the group with its own bounce address as envelope sender.
    data = google(GOOGLE_FROM, GOOGLE_PERSON + "Auto-Submitted: auto-replied\r\n")
    await send(daemon.port, GOOGLE_ENVELOPE, ["support@example.org"], data)
    await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT recipient, decision FROM acknowledgements")
    assert rows == [("alice@customer.example", "suppressed")]


async def test_rewritten_customer_reply_does_not_answer(tmp_path: Path, start_daemon) -> None:
    clock = ManualClock(NOW)
    daemon = await start_daemon(write_config(tmp_path, smtp={"inbox_lists": [GROUP]}), clock=clock)
    await send(daemon.port, GOOGLE_ENVELOPE, ["support@example.org"], google(GOOGLE_FROM, GOOGLE_PERSON))
    await settle(daemon, clock)

    # Bob, in Cc, replies to all through the group, which writes its own address in From.
    bob = "X-Original-From: Bob Roe <bob@customer.example>\r\n"
    thread = "In-Reply-To: <m1@example.com>\r\n"
    await send(daemon.port, GOOGLE_ENVELOPE, ["support@example.org"],
               google("'Bob Roe' via Support <support@example.org>", bob + thread, message_id="<m2@customer.example>"))
    await settle(daemon, clock)
    assert await daemon.store.fetch_all("SELECT state, answered_by FROM conversations") == [("open", None)]
    participants = await daemon.store.fetch_all("SELECT participants FROM conversations")
    assert "bob@customer.example" in participants[0][0]

    # A team member's reply through the group marks it answered.
    await send(daemon.port, GOOGLE_ENVELOPE, ["support@example.org"],
               google("'Sam Ortiz' via Support <support@example.org>", STAFF + thread, message_id="<m3@example.org>"))
    await settle(daemon, clock)
    assert await daemon.store.fetch_all("SELECT state, answered_by FROM conversations") == [("answered", "sam@example.org")]
    assert len(acknowledgements(tmp_path)) == 1


CUSTOMER_ROUTE = """
[[route]]
name = "customer-domain"
team = "billing"
any = [{ from_domain.is = "customer.example" }]
"""


async def test_mailman_cc_author_routed_and_acknowledged(tmp_path: Path, start_daemon) -> None:
    clock = ManualClock(NOW)
    config = write_config(tmp_path, smtp={"inbox_lists": [MAILMAN_LIST]}, rules=TEAMS + CUSTOMER_ROUTE + ROUTE)
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, MAILMAN_ENVELOPE, ["support@example.org"], mailman(MAILMAN_FROM, MAILMAN_CC))
    await settle(daemon, clock)

    conversations = await daemon.store.fetch_all("SELECT state, team, route, customer FROM conversations")
    assert conversations == [("open", "billing", "customer-domain", "alice@customer.example")]
    assert len(maildir_messages(tmp_path / "var" / "maildir" / "billing")) == 1
    [ack] = acknowledgements(tmp_path)
    assert ack["X-Guardrail-Envelope-To"] == "alice@customer.example"
    assert ack["To"] == "alice@customer.example"


async def test_two_cc_candidates_stay_list_mail(tmp_path: Path, start_daemon) -> None:
    clock = ManualClock(NOW)
    config = write_config(tmp_path, smtp={"inbox_lists": [MAILMAN_LIST]}, rules=TEAMS + CUSTOMER_ROUTE + ROUTE)
    daemon = await start_daemon(config, clock=clock)
    # Alice wrote to the list with Bob in Cc, and Mailman added her beside him, so either of them may have written it.
    cc = "Reply-To: support@lists.example.net\r\nCc: Bob Roe <bob@customer.example>, Alice Doe <alice@customer.example>\r\n"
    await send(daemon.port, MAILMAN_ENVELOPE, ["support@example.org"], mailman(MAILMAN_FROM, cc))
    await settle(daemon, clock)

    conversations = await daemon.store.fetch_all("SELECT state, team, deadline FROM conversations")
    assert conversations == [("no_reply_needed", "support", None)]
    rows = await daemon.store.fetch_all("SELECT recipient, decision, signal FROM acknowledgements")
    assert rows == [(MAILMAN_ENVELOPE, "suppressed", "Precedence: list")]
    assert acknowledgements(tmp_path) == []


def test_route_command_names_person(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, smtp={"inbox_lists": [GROUP]})
    path = tmp_path / "rewritten.eml"
    path.write_bytes(google(GOOGLE_FROM, GOOGLE_PERSON))

    assert main(["route", "--config", str(config), str(path), "--mail-from", GOOGLE_ENVELOPE]) == 0
    output = capsys.readouterr().out
    assert f"sender:      {GOOGLE_ENVELOPE}, a customer\n" in output
    assert "written by:  alice@customer.example, passed on by a list of [smtp] inbox_lists\n" in output


def test_route_command_names_person_in_cc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, smtp={"inbox_lists": [MAILMAN_LIST]}, rules=TEAMS + CUSTOMER_ROUTE + ROUTE)
    path = tmp_path / "munged.eml"
    path.write_bytes(mailman(MAILMAN_FROM, MAILMAN_CC))

    assert main(["route", "--config", str(config), str(path), "--mail-from", MAILMAN_ENVELOPE]) == 0
    output = capsys.readouterr().out
    assert "route:       customer-domain\n" in output
    assert "because:     from_domain is 'customer.example' matched 'customer.example' of the person in Cc\n" in output
    assert "written by:  alice@customer.example, passed on by a list of [smtp] inbox_lists\n" in output
