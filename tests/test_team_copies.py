"""A message addressed to several teams' inboxes has one owner, and every other team gets a copy."""

from __future__ import annotations

import asyncio
import re
import smtplib
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import (
    TEAMS,
    RecipientSinkHandler,
    maildir_messages,
    message,
    send,
    start_sink,
    wait_until,
    write_config,
)

from guardrail import routing
from guardrail.cli import main
from guardrail.config import load_config
from guardrail.daemon import load_ruleset
from guardrail.errors import ConfigErrors
from guardrail.prepare import Envelope, Site, prepare_message
from guardrail.routing import Facts, RouteMatch
from guardrail.rules import Condition, Destination
from guardrail.team_copies import TeamCopy, addressed_teams, choose_team_copies

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)

# Each inbox has a route that names it, tried before the billing team's subject route.
INBOX_RULES = TEAMS + """
[[team]]
name = "sales"
destination = { maildir = "var/maildir/sales" }
members = [{ name = "Sol Reyes", address = "sol@example.org" }]

[[team]]
name = "archive"
members = [{ name = "Ari Stone", address = "ari@example.org" }]

[[team]]
name = "frontdesk"
destination = { maildir = "var/maildir/frontdesk" }
members = [{ name = "Dana Duty", address = "dana@example.org" }]

[[route]]
name = "key-accounts"
team = "sales"
any = [{ from_domain.is = "bigcorp.example" }]

[[route]]
name = "support-inbox"
team = "support"
any = [{ rcpt.is = "support@example.org" }]

[[route]]
name = "billing-inbox"
team = "billing"
any = [{ rcpt.is = "billing@example.org" }, { subject.contains = "invoice" }]

[[route]]
name = "archive-inbox"
team = "archive"
any = [{ rcpt.is = "archive@example.org" }]

[[route]]
name = "default"
team = "frontdesk"
default = true
"""
INBOXES = ["support@example.org", "billing@example.org", "archive@example.org", "hello@example.org", "info@example.org"]
CUSTOMER = "Alice Example <alice@example.com>"


def prepared(folder: Path, rcpt_tos: tuple[str, ...], *, subject: str = "Question", sender: str = CUSTOMER,
             copy_other_teams: bool = True, extra_headers: str = "", inbox_lists: tuple[str, ...] = ()):
    config = load_config(write_config(
        folder, rules=INBOX_RULES, smtp={"inboxes": INBOXES, "inbox_lists": list(inbox_lists)},
        sections={"conversations": {"copy_other_teams": copy_other_teams}},
    ))
    raw = message(sender=sender, to=", ".join(rcpt_tos), subject=subject, extra_headers=extra_headers)
    envelope = Envelope("alice@example.com", rcpt_tos, "[127.0.0.1]:40000", "client")
    return prepare_message(envelope, raw, load_ruleset(config), Site.from_config(config), NOW)


@pytest.mark.parametrize(
    ("rcpt_tos", "subject", "sender", "owner", "copies"),
    [
        # One recipient: its own route, and nobody else.
        (("support@example.org",), "Question", CUSTOMER, "support", []),
        (("hello@example.org",), "Question", CUSTOMER, "frontdesk", []),
        # Each inbox's route names it, so its team gets the message in either order. The first route tried owns it.
        (("support@example.org", "billing@example.org"), "Question", CUSTOMER, "support", ["billing"]),
        (("billing@example.org", "support@example.org"), "Question", CUSTOMER, "support", ["billing"]),
        (("support@example.org", "billing@example.org", "hello@example.org"), "Question", CUSTOMER, "support",
         ["billing", "frontdesk"]),
        # An inbox that only the default route takes is the default team's.
        (("billing@example.org", "hello@example.org"), "Question", CUSTOMER, "billing", ["frontdesk"]),
        (("hello@example.org", "info@example.org"), "Question", CUSTOMER, "frontdesk", []),
        # hello@ alone routes to billing by its subject, not by naming it: no copy for anyone.
        (("support@example.org", "hello@example.org"), "Your invoice", CUSTOMER, "support", []),
        # A route won by the sender's domain takes every recipient alone too, so no team is pulled in.
        (("support@example.org", "billing@example.org"), "Question", "Bo <bo@bigcorp.example>", "sales", []),
        # A team without a destination gets no copy.
        (("support@example.org", "archive@example.org"), "Question", CUSTOMER, "support", []),
        # Postmaster's copy goes to the postmaster owner, beside the teams'.
        (("postmaster@example.org", "support@example.org", "billing@example.org"), "Question", CUSTOMER, "support",
         ["billing"]),
    ],
)
def test_team_copies_table(tmp_path: Path, rcpt_tos: tuple[str, ...], subject: str, sender: str, owner: str,
                           copies: list[str]) -> None:
    submission = prepared(tmp_path, rcpt_tos, subject=subject, sender=sender)

    assert submission.team == owner
    assert [copy.team for copy in choose_team_copies(submission.addressed_teams, submission.team)] == copies


def test_addressed_teams_name_recipient_and_route(tmp_path: Path) -> None:
    submission = prepared(tmp_path, ("hello@example.org", "billing@example.org", "support@example.org"))

    assert [(copy.team, copy.route, copy.recipient) for copy in submission.addressed_teams] == [
        ("frontdesk", "default", "hello@example.org"),
        ("billing", "billing-inbox", "billing@example.org"),
        ("support", "support-inbox", "support@example.org"),
    ]
    assert submission.addressed_teams[1].members == frozenset({"bea@example.org"})


def test_list_writer_routes_each_recipient(tmp_path: Path) -> None:
    # A group of ours passes Bo's message on as support@, and his domain's route takes each recipient alone too.
    group = "Support group <support@example.org>"
    headers = "List-Id: <support.example.org>\r\nX-Original-From: Bo <bo@bigcorp.example>\r\n"
    submission = prepared(tmp_path, ("support@example.org", "billing@example.org"), sender=group,
                          extra_headers=headers, inbox_lists=("support.example.org",))

    assert submission.list_sender == "bo@bigcorp.example"
    assert submission.team == "sales"
    assert choose_team_copies(submission.addressed_teams, submission.team) == ()


def test_switch_off_addresses_no_team(tmp_path: Path) -> None:
    submission = prepared(tmp_path, ("support@example.org", "billing@example.org"), copy_other_teams=False)

    assert submission.team == "support"
    assert submission.addressed_teams == ()


def test_addressed_teams_one_recipient_not_routed_again(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, rules=INBOX_RULES, smtp={"inboxes": INBOXES}))
    rules = load_ruleset(config)
    submission = prepared(tmp_path, ("billing@example.org",))
    # A match that disagrees with the rules shows whether the routes were tried again.
    facts = Facts(("billing@example.org",), submission.summary)
    support = RouteMatch(rules.routes[1], rules.teams["support"], ())
    assert [copy.team for copy in addressed_teams(rules, facts, support, [])] == []
    assert [copy.team for copy in addressed_teams(rules, facts, support, ["postmaster@example.org"])] == ["billing"]



# A body route before the inbox routes, which no recipient alone can change the outcome of.
BODY_RULES = TEAMS + """
[[route]]
name = "disputes"
team = "billing"
any = [{ body.regex = "chargeback \\\\d+" }, { not = { body.contains = "order" } }]

[[route]]
name = "support-inbox"
team = "support"
any = [{ rcpt.is = "support@example.org" }, { all = [{ rcpt.is = "help@example.org" }, { body.contains = "order" }] }]

[[route]]
name = "default"
team = "billing"
default = true
"""


def test_addressed_teams_evaluate_body_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A body pattern that takes long on a message must not take that long again for each recipient.
    config = load_config(write_config(tmp_path, rules=BODY_RULES, smtp={"inbox_domains": ["example.org"]}))
    rules, site = load_ruleset(config), Site.from_config(config)
    rcpt_tos = ("support@example.org", "help@example.org", *(f"user{number}@example.org" for number in range(98)))
    raw = message(to="support@example.org", body="Where is my order?\r\n")
    read_body: list[int] = []
    original_matched_text = routing._matched_text

    def counting(condition: Condition, value: str) -> str | None:
        if condition.field == "body":
            read_body.append(id(condition))
        return original_matched_text(condition, value)

    monkeypatch.setattr(routing, "_matched_text", counting)
    envelope = Envelope("alice@example.com", rcpt_tos, "[127.0.0.1]:40000", "client")
    submission = prepare_message(envelope, raw, rules, site, NOW)

    assert submission.team == "support"
    # help@ reaches support through the `all`, each other recipient only the default route.
    assert [(copy.team, copy.recipient) for copy in submission.addressed_teams] == [
        ("support", "support@example.org"), ("billing", "user0@example.org"),
    ]
    # Each of the three body conditions is evaluated at most once, for the whole message or a recipient alone.
    assert len(read_body) == len(set(read_body))
    assert len(read_body) <= 3


BILLING_MAILDIR = Destination("maildir", maildir="var/maildir/billing")
BILLING = TeamCopy("billing", "billing-inbox", BILLING_MAILDIR, "billing@example.org", frozenset({"bea@example.org"}))
SUPPORT_MAILDIR = Destination("maildir", maildir="var/maildir/support")
SUPPORT = TeamCopy("support", "support-inbox", SUPPORT_MAILDIR, "support@example.org", frozenset({"sam@example.org"}))
NOWHERE = TeamCopy("archive", "archive-inbox", None, "archive@example.org", frozenset())


@pytest.mark.parametrize(
    ("addressed", "owner", "holding", "expected"),
    [
        ((SUPPORT, BILLING), "support", frozenset(), [BILLING]),
        # A follow-up goes to its conversation's team, whatever its own route, and the others get copies.
        ((SUPPORT, BILLING), "billing", frozenset(), [SUPPORT]),
        ((SUPPORT, BILLING), "frontdesk", frozenset(), [SUPPORT, BILLING]),
        ((BILLING,), "support", frozenset(), [BILLING]),
        ((SUPPORT,), "support", frozenset(), []),
        # A forwarder's copy reaches no team that an earlier arrival reached.
        ((BILLING,), "support", frozenset({"support", "billing"}), []),
        ((SUPPORT, BILLING), "frontdesk", frozenset({"billing"}), [SUPPORT]),
        ((NOWHERE, BILLING), "support", frozenset(), [BILLING]),
        ((), "support", frozenset(), []),
    ],
)
def test_choose_team_copies_table(addressed: tuple[TeamCopy, ...], owner: str, holding: frozenset[str],
                                  expected: list[TeamCopy]) -> None:
    assert list(choose_team_copies(addressed, owner, holding)) == expected



SHARED = Destination("maildir", maildir="var/maildir/shared")
SHARED_BILLING = BILLING._replace(destination=SHARED)
SHARED_SALES = TeamCopy("sales", "sales-inbox", SHARED, "sales@example.org", frozenset({"sol@example.org"}))


@pytest.mark.parametrize(
    ("addressed", "owner_destination", "expected"),
    [
        # A team that shares the owner's destination has the message there already.
        ((SUPPORT, SHARED_BILLING), SHARED, []),
        ((SHARED_BILLING, SHARED_SALES), SHARED, []),
        # Two other teams that share a destination get one copy there, the first's.
        ((SHARED_BILLING, SHARED_SALES), SUPPORT_MAILDIR, [SHARED_BILLING]),
        ((SHARED_BILLING, SHARED_SALES), None, [SHARED_BILLING]),
        ((BILLING, SHARED_SALES), SHARED, [BILLING]),
    ],
)
def test_choose_team_copies_one_per_destination(addressed: tuple[TeamCopy, ...], owner_destination: Destination | None,
                                               expected: list[TeamCopy]) -> None:
    assert list(choose_team_copies(addressed, "support", owner_destination=owner_destination)) == expected


def test_copy_other_teams_must_be_boolean(tmp_path: Path) -> None:
    path = write_config(tmp_path, sections={"conversations": {"copy_other_teams": "yes"}})
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    (error,) = caught.value.errors
    assert str(error).startswith(f"{path}: conversations.copy_other_teams: invalid value 'yes'; expected true or false")
    assert load_config(write_config(tmp_path)).copy_other_teams is True


def test_route_command_shows_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, rules=INBOX_RULES, smtp={"inboxes": INBOXES})
    eml = tmp_path / "both.eml"
    eml.write_bytes(message(to="support@example.org, billing@example.org"))

    assert main(["route", "--config", str(config), str(eml), "--rcpt", "support@example.org", "--rcpt", "billing@example.org"]) == 0

    output = capsys.readouterr().out
    assert "team:        support\n" in output
    maildir = tmp_path / "var" / "maildir" / "billing"
    assert f"copy:        team billing (route billing-inbox, addressed as billing@example.org): maildir {maildir}\n" in output


# -- over SMTP ------------------------------------------------------------------


def rows(database: Path, sql: str, parameters: tuple[object, ...] = ()) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute(sql, parameters).fetchall()


async def start(tmp_path: Path, start_daemon, *, copy_other_teams: bool = True):
    config = write_config(
        tmp_path, rules=INBOX_RULES, smtp={"inboxes": INBOXES},
        sections={"conversations": {"copy_other_teams": copy_other_teams}},
    )
    return await start_daemon(config)


async def settled(database: Path) -> None:
    await wait_until(lambda: rows(database, "SELECT COUNT(*) FROM outbox WHERE state != 'done'") == [(0,)], what="the outbox")


def maildir(tmp_path: Path, team: str) -> list[bytes]:
    return maildir_messages(tmp_path / "var" / "maildir" / team)


def header(data: bytes, name: str) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return re.findall(rf"^{re.escape(name)}: (.*)\r$", head + "\r", flags=re.MULTILINE | re.IGNORECASE)


BOTH = message(to="support@example.org", extra_headers="Cc: billing@example.org\r\n", message_id="<both@example.com>")


async def test_one_transaction_reaches_both_teams(tmp_path: Path, start_daemon) -> None:
    daemon = await start(tmp_path, start_daemon)
    database = daemon.config.database_path

    await send(daemon.port, "alice@example.com", ["support@example.org", "billing@example.org"], BOTH)

    [(reference, team, route, state)] = rows(database, "SELECT reference, team, route, state FROM conversations")
    assert (team, route, state) == ("support", "support-inbox", "open")
    assert rows(database, "SELECT decision FROM acknowledgements") == [("sent",)]
    assert rows(database, "SELECT COUNT(*) FROM conversations WHERE deadline IS NOT NULL") == [(1,)]
    await wait_until(lambda: maildir(tmp_path, "support") and maildir(tmp_path, "billing"), what="both teams' copies")
    await settled(database)

    [owned] = maildir(tmp_path, "support")
    [copy] = maildir(tmp_path, "billing")
    assert header(owned, "X-Guardrail-Copy") == []
    assert header(copy, "X-Guardrail-Copy") == ["for team billing; conversation owned by team support"]
    assert header(copy, "X-Guardrail-Conversation") == [reference]
    assert header(copy, "X-Guardrail-Route") == ["support-inbox"]
    assert re.findall(rb"\tfor <([^>]*)>;", copy) == [b"billing@example.org"]
    assert copy.endswith(BOTH)
    assert not maildir(tmp_path, "frontdesk")

    [(detail,)] = rows(database, "SELECT detail FROM events WHERE kind = 'team_copy'")
    assert '"team": "billing"' in detail
    assert '"recipient": "billing@example.org"' in detail
    [(participants,)] = rows(database, "SELECT participants FROM conversations")
    assert "bea@example.org" in participants


async def test_switch_off_leaves_other_team_out(tmp_path: Path, start_daemon) -> None:
    daemon = await start(tmp_path, start_daemon, copy_other_teams=False)
    database = daemon.config.database_path

    await send(daemon.port, "alice@example.com", ["support@example.org", "billing@example.org"], BOTH)

    assert rows(database, "SELECT team FROM conversations") == [("support",)]
    await wait_until(lambda: maildir(tmp_path, "support"), what="the owner's copy")
    await settled(database)
    assert not maildir(tmp_path, "billing")
    assert rows(database, "SELECT COUNT(*) FROM events WHERE kind = 'team_copy'") == [(0,)]


async def test_copied_team_member_answers(tmp_path: Path, start_daemon) -> None:
    daemon = await start(tmp_path, start_daemon)
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org", "billing@example.org"], BOTH)
    [(reference,)] = rows(database, "SELECT reference FROM conversations")

    # A billing member answers from a program that keeps only the subject's tag, without thread headers.
    reply = message(sender="Bea Keller <bea@example.org>", to="alice@example.com",
                    extra_headers="Cc: billing@example.org\r\n", subject=f"Re: Question [{reference}]",
                    message_id="<answer@example.org>", body="The refund is on its way.\r\n")
    await send(daemon.port, "bea@example.org", ["billing@example.org"], reply)

    assert rows(database, "SELECT disposition, conversation_id FROM messages ORDER BY id") == [("new", 1), ("follow_up", 1)]
    assert rows(database, "SELECT state, answered_by FROM conversations") == [("answered", "bea@example.org")]
    # The owner sees the answer, and so does billing, whose inbox it was sent to.
    await wait_until(lambda: len(maildir(tmp_path, "support")) == 2 and len(maildir(tmp_path, "billing")) == 2,
                     what="the answer in both maildirs")


async def test_uncopied_team_member_does_not_join(tmp_path: Path, start_daemon) -> None:
    daemon = await start(tmp_path, start_daemon)
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<one@example.com>"))
    [(reference,)] = rows(database, "SELECT reference FROM conversations")

    reply = message(sender="Bea Keller <bea@example.org>", subject=f"Re: Question [{reference}]", message_id="<other@example.org>")
    await send(daemon.port, "bea@example.org", ["billing@example.org"], reply)

    assert rows(database, "SELECT disposition FROM messages ORDER BY id") == [("new",), ("new",)]
    assert rows(database, "SELECT state FROM conversations WHERE id = 1") == [("open",)]


# The customer writes again in the thread that support owns: to both inboxes, or to billing@ alone.
@pytest.mark.parametrize("rcpt_tos", [["billing@example.org", "support@example.org"], ["billing@example.org"]],
                         ids=["reply to all", "other inbox alone"])
async def test_follow_up_copies_other_team(tmp_path: Path, start_daemon, rcpt_tos: list[str]) -> None:
    daemon = await start(tmp_path, start_daemon)
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<first@example.com>"))

    again = message(to=", ".join(rcpt_tos), message_id="<again@example.com>",
                    extra_headers="In-Reply-To: <first@example.com>\r\n", subject="Re: Printer on floor 3 jams")
    await send(daemon.port, "alice@example.com", rcpt_tos, again)

    assert rows(database, "SELECT disposition, team FROM messages ORDER BY id") == [("new", "support"), ("follow_up", "support")]
    assert rows(database, "SELECT decision FROM acknowledgements ORDER BY id") == [("sent",), ("suppressed",)]
    await wait_until(lambda: len(maildir(tmp_path, "support")) == 2 and maildir(tmp_path, "billing"), what="deliveries")
    await settled(database)
    [copy] = maildir(tmp_path, "billing")
    assert header(copy, "X-Guardrail-Copy") == ["for team billing; conversation owned by team support"]
    assert copy.endswith(again)


async def test_postmaster_and_two_inboxes(tmp_path: Path, start_daemon) -> None:
    daemon = await start(tmp_path, start_daemon)
    database = daemon.config.database_path

    await send(daemon.port, "alice@example.com", ["postmaster@example.org", "support@example.org", "billing@example.org"], BOTH)

    assert rows(database, "SELECT team FROM conversations") == [("support",)]
    assert rows(database, "SELECT decision FROM acknowledgements") == [("sent",)]
    outbound = tmp_path / "var" / "outbound"
    await wait_until(lambda: maildir(tmp_path, "support") and maildir(tmp_path, "billing") and len(maildir_messages(outbound)) == 2,
                     what="the teams', the acknowledgement and the postmaster owner's copies")
    await settled(database)
    [owner_copy] = [mail for mail in maildir_messages(outbound) if b"X-Guardrail-Envelope-To: ops@example.org\r\n" in mail]
    assert re.findall(rb"\tfor <([^>]*)>;", owner_copy) == [b"postmaster@example.org"]
    assert header(owner_copy, "X-Guardrail-Copy") == []
    [copy] = maildir(tmp_path, "billing")
    assert header(copy, "X-Guardrail-Copy") == ["for team billing; conversation owned by team support"]
    assert len(maildir(tmp_path, "support")) == 1


def send_one(port: int, mail_from: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.sendmail(mail_from, [rcpt], data)


async def test_forwarded_copy_skips_team_reached(tmp_path: Path, start_daemon) -> None:
    daemon = await start(tmp_path, start_daemon)
    database = daemon.config.database_path
    await send(daemon.port, "alice@example.com", ["support@example.org", "billing@example.org"], BOTH)

    # Forwarding rules pass the same message to each inbox again, one transaction each.
    forwarded = b"Received: from relay.example.com by forwarder.example.net\r\n" + BOTH
    await asyncio.to_thread(send_one, daemon.port, "alice@example.com", "billing@example.org", forwarded)
    await asyncio.to_thread(send_one, daemon.port, "alice@example.com", "support@example.org", forwarded)

    assert rows(database, "SELECT disposition FROM messages ORDER BY id") == [("new",), ("copy",), ("copy",)]
    assert rows(database, "SELECT COUNT(*) FROM events WHERE kind = 'team_copy'") == [(1,)]
    await wait_until(lambda: maildir(tmp_path, "support") and maildir(tmp_path, "billing"), what="both teams' copies")
    await settled(database)
    assert len(maildir(tmp_path, "support")) == 1
    assert len(maildir(tmp_path, "billing")) == 1
    assert rows(database, "SELECT decision FROM acknowledgements ORDER BY id") == [("sent",), ("suppressed",), ("suppressed",)]


async def test_forwarded_copies_reach_team_once(tmp_path: Path, start_daemon) -> None:
    daemon = await start(tmp_path, start_daemon)
    database = daemon.config.database_path
    single = message(to="support@example.org", extra_headers="Cc: billing@example.org\r\n", message_id="<fw@example.com>")
    await send(daemon.port, "alice@example.com", ["support@example.org"], single)

    # billing@'s forwarder delivers its copy twice, as after a lost reply to its final dot.
    for hop in (b"one", b"two"):
        forwarded = b"Received: from relay-" + hop + b".example.com by forwarder.example.net\r\n" + single
        await asyncio.to_thread(send_one, daemon.port, "alice@example.com", "billing@example.org", forwarded)

    assert rows(database, "SELECT disposition FROM messages ORDER BY id") == [("new",), ("copy",), ("copy",)]
    await wait_until(lambda: maildir(tmp_path, "support") and maildir(tmp_path, "billing"), what="both teams' copies")
    await settled(database)
    assert len(maildir(tmp_path, "billing")) == 1


SMTP_TEAMS = """
[[team]]
name = "support"
destination = { smtp = ["team-support@example.net"] }
members = [{ name = "Sam Ortiz", address = "sam@example.org" }]

[[team]]
name = "billing"
destination = { smtp = ["team-billing@example.net"] }
members = [{ name = "Bea Keller", address = "bea@example.org" }]

[[route]]
name = "support-inbox"
team = "support"
any = [{ rcpt.is = "support@example.org" }]

[[route]]
name = "default"
team = "billing"
default = true
"""


async def test_failed_copy_listed_with_conversation(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    handler = RecipientSinkHandler(rcpt_replies={"team-billing@example.net": "550 5.1.1 No such user"})
    smarthost = await start_sink(handler=handler)
    config = write_config(tmp_path, rules=SMTP_TEAMS, sections={
        "smarthost": {"host": "127.0.0.1", "port": smarthost.port, "starttls": False},
    })
    try:
        daemon = await start_daemon(config)
        database = daemon.config.database_path
        await send(daemon.port, "alice@example.com", ["support@example.org", "billing@example.org"], BOTH)
        await wait_until(lambda: rows(database, "SELECT COUNT(*) FROM outbox WHERE state = 'pending'") == [(0,)],
                         what="the outbox")
    finally:
        smarthost.server.close()
        await smarthost.server.wait_closed()

    [(reference, delivery_failed)] = rows(database, "SELECT reference, delivery_failed FROM conversations")
    [(copy_id,)] = rows(database, "SELECT id FROM outbox WHERE state = 'failed'")
    # The owner has the message, so the conversation's delivery did not fail.
    assert delivery_failed == 0

    capsys.readouterr()
    assert main(["queue", "--config", str(config), "--failed"]) == 0
    listed = capsys.readouterr().out
    assert re.match(rf"\s*{copy_id} team copy\s+{reference}\s+failed ", listed), listed

    assert main(["retry", "--config", str(config), str(copy_id), "--by", "ops"]) == 0
    assert reference in capsys.readouterr().out
    assert rows(database, "SELECT conversation_id, json_extract(detail, '$.by') FROM events WHERE kind = 'requeued'") == [(1, "ops")]


SHARED_MAILDIR_TEAMS = """
[[team]]
name = "support"
destination = { maildir = "var/maildir/helpdesk" }
members = [{ name = "Sam Ortiz", address = "sam@example.org" }]

[[team]]
name = "billing"
destination = { maildir = "var/maildir/helpdesk" }
members = [{ name = "Bea Keller", address = "bea@example.org" }]

[[route]]
name = "support-inbox"
team = "support"
any = [{ rcpt.is = "support@example.org" }]

[[route]]
name = "billing-inbox"
team = "billing"
any = [{ rcpt.is = "billing@example.org" }]

[[route]]
name = "default"
team = "support"
default = true
"""


async def test_shared_destination_gets_message_once(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=SHARED_MAILDIR_TEAMS))
    database = daemon.config.database_path

    await send(daemon.port, "alice@example.com", ["support@example.org", "billing@example.org"], BOTH)

    await wait_until(lambda: maildir(tmp_path, "helpdesk"), what="the owner's delivery")
    await settled(database)
    [delivered] = maildir(tmp_path, "helpdesk")
    assert header(delivered, "X-Guardrail-Copy") == []
    assert rows(database, "SELECT COUNT(*) FROM events WHERE kind = 'team_copy'") == [(0,)]
