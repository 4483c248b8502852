"""Route matching is a pure function: tables of messages against rule sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TEAMS, message, rules_folder, send, write_config

from guardrail.lists import list_sender
from guardrail.message import summarize
from guardrail.routing import Facts, match_route, matched_recipients
from guardrail.rules import Route, load_rules

RULES = """
[[team]]
name = "vip-desk"
destination = { maildir = "vip" }

[[team]]
name = "billing"
destination = { smtp = "billing-team@corp.example" }

[[team]]
name = "frontdesk"
destination = { maildir = "frontdesk" }

[[route]]
name = "vip"
team = "vip-desk"
any = [{ from.regex = 'ceo@example\\.com' }]

[[route]]
name = "partner-domains"
team = "billing"
any = [{ from_domain.is = ["stripe.com", "paddle.com"] }]

[[route]]
name = "billing-words"
team = "billing"
all = [
    { rcpt.is = "support@example.org" },
    { any = [{ subject.regex = '(?i)\\binvoice\\s+\\d+' }, { body.contains = "refund" }] },
]

[[route]]
name = "urgent-header"
team = "vip-desk"
any = [{ header.X-Priority.is = "1" }]

[[route]]
name = "not-internal"
team = "billing"
all = [{ to.contains = "accounts@" }, { not = { from_domain.is = "example.org" } }]

[[route]]
name = "default"
team = "frontdesk"
default = true
"""


@pytest.fixture
def rules(tmp_path: Path):
    return load_rules(rules_folder(tmp_path, RULES), tmp_path)


def facts(headers: str, body: str = "Hi.\r\n", rcpt: str = "support@example.org") -> Facts:
    raw = (headers.strip().replace("\n", "\r\n") + "\r\n\r\n" + body).encode()
    return Facts((rcpt,), summarize(raw))


@pytest.mark.parametrize(
    ("headers", "body", "route"),
    [
        # The display name is never matched, only the bare address.
        ('From: "ceo@example.com" <attacker@example.net>\nSubject: Approve payment', "", "default"),
        # Address patterns must match the whole address.
        ("From: Chief <ceo@example.com.attacker.example.net>\nSubject: Approve", "", "default"),
        ("From: Chief <xceo@example.com>\nSubject: Approve", "", "default"),
        # Address comparison ignores case.
        ("From: Chief <CEO@Example.COM>\nSubject: Board pack", "", "vip"),
        ("From: Billing <no-reply@Stripe.com>\nSubject: Payout", "", "partner-domains"),
        ("From: Billing <no-reply@mail.stripe.com>\nSubject: Payout", "", "default"),
        ("From: a@b.example\nSubject: About invoice 7781", "", "billing-words"),
        ("From: a@b.example\nSubject: About invoices", "", "default"),
        ("From: a@b.example\nSubject: Hello", "I would like a REFUND please", "billing-words"),
        # A message with only an HTML part is read through the text it shows.
        ("From: a@b.example\nSubject: Hello\nContent-Type: text/html", "<p>I would like a <b>RE</b>FUND</p>", "billing-words"),
        ("From: a@b.example\nSubject: Hello\nContent-Type: text/html", "<p>Hi</p><!-- refund -->", "default"),
        ("From: a@b.example\nSubject: Hello\nX-Priority: 1", "", "urgent-header"),
        ("From: a@b.example\nTo: Accounts <accounts@example.org>\nSubject: x", "", "not-internal"),
        ("From: a@example.org\nTo: accounts@example.org\nSubject: x", "", "default"),
        # No From at all still routes.
        ("Subject: nobody wrote this", "", "default"),
    ],
)
def test_route_table(rules, headers: str, body: str, route: str) -> None:
    match = match_route(rules, facts(headers, body))
    assert match.route.name == route


def test_all_requires_every_condition(rules) -> None:
    match = match_route(rules, facts("From: a@b.example\nSubject: invoice 12", rcpt="billing@example.org"))
    assert match.route.name == "default"


def test_match_explains_the_condition_and_value(rules) -> None:
    match = match_route(rules, facts("From: Chief <CEO@Example.COM>\nSubject: Board pack"))
    assert match.team.name == "vip-desk"
    assert match.reasons == ("from regex 'ceo@example\\\\.com' matched 'ceo@example.com'",)


WRITER_RULES = """
[[team]]
name = "t"

[[route]]
name = "big-customer"
team = "t"
any = [{ from_domain.is = "bigcustomer.com" }]

[[route]]
name = "alice"
team = "t"
any = [{ from.regex = 'alice@smallshop\\.example' }]

[[route]]
name = "list-address"
team = "t"
any = [{ from = "support@lists.example.net" }]

[[route]]
name = "default"
team = "t"
default = true
"""
LIST_HEADERS = "List-Id: <support.lists.example.net>\nList-Post: <mailto:support@lists.example.net>\n"
MUNGED = "From: Bo Li via Support <support@lists.example.net>\n"
OURS = frozenset({"support.lists.example.net"})


@pytest.mark.parametrize(
    ("headers", "inbox_lists", "route", "reason"),
    [
        # The person behind a list of ours, wherever the list kept them.
        (MUNGED + LIST_HEADERS + "Cc: Bo Li <bo@bigcustomer.com>", OURS, "big-customer",
         "from_domain is 'bigcustomer.com' matched 'bigcustomer.com' of the person in Cc"),
        (MUNGED + LIST_HEADERS + "Reply-To: Bo Li <bo@bigcustomer.com>", OURS, "big-customer",
         "from_domain is 'bigcustomer.com' matched 'bigcustomer.com' of the person in Reply-To"),
        (MUNGED + LIST_HEADERS + "X-Original-From: bo@bigcustomer.com", OURS, "big-customer",
         "from_domain is 'bigcustomer.com' matched 'bigcustomer.com' of the person in X-Original-From"),
        ("From: Alice Roe via Support <support@lists.example.net>\n" + LIST_HEADERS + "Cc: Alice Roe <alice@smallshop.example>",
         OURS, "alice", "from regex 'alice@smallshop\\\\.example' matched 'alice@smallshop.example' of the person in Cc"),
        # The list left From as it was: the person is From, and the reason names no other header.
        ("From: Bo Li <bo@bigcustomer.com>\n" + LIST_HEADERS, OURS, "big-customer",
         "from_domain is 'bigcustomer.com' matched 'bigcustomer.com'"),
        # A condition on the list's own From address still matches.
        (MUNGED + LIST_HEADERS + "Cc: Bo Li <bo@other.example>", OURS, "list-address",
         "from is 'support@lists.example.net' matched 'support@lists.example.net'"),
        # No person: a list not named in [smtp] inbox_lists, or two people in Cc.
        (MUNGED + LIST_HEADERS + "Cc: Bo Li <bo@bigcustomer.com>", frozenset(), "list-address",
         "from is 'support@lists.example.net' matched 'support@lists.example.net'"),
        (MUNGED + LIST_HEADERS + "Cc: Bo Li <bo@bigcustomer.com>, Al Ng <al@bigcustomer.com>", OURS, "list-address",
         "from is 'support@lists.example.net' matched 'support@lists.example.net'"),
        # Without a list, From alone.
        ("From: bo@bigcustomer.com\nCc: alice@smallshop.example", OURS, "big-customer",
         "from_domain is 'bigcustomer.com' matched 'bigcustomer.com'"),
    ],
    ids=[
        "cc", "reply-to", "x-original-from", "from-regex-cc", "list-kept-from", "list-address", "list-not-configured",
        "cc-two", "no-list",
    ],
)
def test_list_writer_route_table(tmp_path: Path, headers: str, inbox_lists: frozenset[str], route: str, reason: str) -> None:
    rules = load_rules(rules_folder(tmp_path, WRITER_RULES), tmp_path)
    summary = facts(headers).summary
    writer = list_sender(summary, inbox_lists, frozenset({"support@example.org"}))

    match = match_route(rules, Facts(("support@example.org",), summary, writer))

    assert match.route.name == route
    assert match.reasons == (reason,)


RECIPIENT_RULES = TEAMS + """
[[route]]
name = "by-recipient"
team = "billing"
all = [
    { any = [{ rcpt.is = "billing@example.org" }, { all = [{ rcpt.regex = 'invoices@.*' }, { subject.contains = "x" }] }] },
    { not = { rcpt.is = "support@example.org" } },
]

[[route]]
name = "default"
team = "support"
default = true
"""


@pytest.mark.parametrize(
    ("route_name", "rcpt_tos", "subject", "expected"),
    [
        ("by-recipient", ("support@example.org", "billing@example.org"), "x", ("billing@example.org",)),
        # Nested conditions count, in envelope order; a recipient under `not` does not.
        ("by-recipient", ("invoices@example.org", "billing@example.org"), "x", ("invoices@example.org", "billing@example.org")),
        # A recipient condition beside a false one in an `all` did not take the message.
        ("by-recipient", ("invoices@example.org", "billing@example.org"), "y", ("billing@example.org",)),
        ("by-recipient", ("support@example.org",), "x", ()),
        ("default", ("support@example.org", "billing@example.org"), "x", ()),
    ],
)
def test_matched_recipients_table(
    tmp_path: Path, route_name: str, rcpt_tos: tuple[str, ...], subject: str, expected: tuple[str, ...],
) -> None:
    rules = load_rules(rules_folder(tmp_path, RECIPIENT_RULES), tmp_path)
    route: Route = next(route for route in rules.routes if route.name == route_name)
    summary = summarize(message(subject=subject), with_body=False)
    assert matched_recipients(route, Facts(rcpt_tos, summary)) == expected


def test_default_route_is_tried_last(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, "")
    (folder / "a.toml").write_text(
        '[[team]]\nname = "t"\n\n[[route]]\nname = "fallback"\nteam = "t"\ndefault = true\n'
    )
    (folder / "b.toml").write_text('[[route]]\nname = "subject"\nteam = "t"\nany = [{ subject.is = "hello" }]\n')
    rules = load_rules(folder, tmp_path)
    assert [route.name for route in rules.routes] == ["subject", "fallback"]
    assert match_route(rules, facts("Subject: Hello")).route.name == "subject"


def test_body_is_read_only_when_a_rule_needs_it(rules, tmp_path: Path) -> None:
    assert rules.needs_body
    folder = rules_folder(tmp_path / "plain", '[[team]]\nname = "t"\n[[route]]\nname = "d"\nteam = "t"\ndefault = true\n')
    assert not load_rules(folder, tmp_path).needs_body


def test_body_reason_names_matched_text(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, '[[team]]\nname = "t"\n\n[[route]]\nname = "d"\nteam = "t"\ndefault = true\n')
    (folder / "body.toml").write_text(
        '[[route]]\nname = "refund"\nteam = "t"\nany = [{ body.contains = "refund" }]\n\n'
        "[[route]]\nname = \"rest\"\nteam = \"t\"\nany = [{ body.regex = '(?s)order.*' }]\n"
    )
    rules = load_rules(folder, tmp_path)

    refund = match_route(rules, facts("Subject: Hi", "Hello,\r\nI want a Refund.\r\nMy card is 4111 1111 1111 1111.\r\n"))
    order = match_route(rules, facts("Subject: Hi", "My order " + "x" * 500 + "\r\n"))

    assert refund.reasons == ("body contains 'refund' matched 'refund' in the body",)
    assert order.reasons == ("body regex '(?s)order.*' matched 'order " + "x" * 94 + "...' in the body",)


async def test_line_anchors_match_plain_and_html_bodies(tmp_path: Path, start_daemon) -> None:
    rules = TEAMS + """
[[route]]
name = "refunds"
team = "billing"
any = [{ body.regex = '(?im)^refund please$' }]

[[route]]
name = "default"
team = "support"
default = true
"""
    daemon = await start_daemon(write_config(tmp_path, rules=rules))
    html = "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(
        message_id="<plain@example.com>", body="Hello,\r\nRefund please\r\nAlice\r\n",
    ))
    await send(daemon.port, "bob@example.com", ["support@example.org"], message(
        message_id="<html@example.com>", sender="bob@example.com", extra_headers=html, body="<p>Hello,</p><p>Refund please</p>\r\n",
    ))

    routes = await daemon.store.fetch_all("SELECT message_id, route FROM messages ORDER BY id")
    assert routes == [("<plain@example.com>", "refunds"), ("<html@example.com>", "refunds")]


def test_route_output_into_closed_pipe(tmp_path: Path) -> None:
    message = tmp_path / "message.eml"
    message.write_bytes(b"From: a@b.example\r\nSubject: Printer\r\n\r\nHello.\r\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes, as after `| head -0`
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "guardrail", "route", "--config", str(ROOT / "config.example.toml"), str(message)],
            stdout=write_end, stderr=subprocess.PIPE, timeout=60, cwd=ROOT,
        )
    finally:
        os.close(write_end)

    assert finished.returncode == 141
    assert finished.stderr == b""
