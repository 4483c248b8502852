"""A customer's message after the team's answer reopens the conversation with a new deadline and a new escalation round."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from conftest import message, rules_folder, send, settle, write_config
from test_config import rule_errors
from test_escalation import (
    DUTY,
    HEAD,
    acknowledgements,
    advance_in_ticks,
    at,
    chain_rules,
    escalations_to,
    open_chain_conversation,
    reply_from,
)
from test_operations import advance_hours, alarms, zombie_daemon

from guardrail.cli import main
from guardrail.clock import ManualClock
from guardrail.committer import Committer
from guardrail.config import load_config
from guardrail.conversations import KnownConversation
from guardrail.daemon import Daemon
from guardrail.deadlines import reopened_clock
from guardrail.plan import Submission, plan_submission
from guardrail.prepare import Envelope, Site, prepare_message
from guardrail.rules import RuleSet, load_rules
from guardrail.store_batch import StoreSettings

WEEKDAY_HOURS = ", ".join(f'{day} = ["09:00-18:00"]' for day in ("mon", "tue", "wed", "thu", "fri"))

# Support works office hours in Paris and promises 4h, or 1h on its urgent
# route. Billing works around the clock in UTC and promises 1h. The helpdesk
# team has no members.
RULES = f"""
[[calendar]]
name = "office"
timezone = "Europe/Paris"
hours = {{ {WEEKDAY_HOURS} }}

[[team]]
name = "support"
destination = {{ maildir = "var/maildir/support" }}
members = [{{ name = "Sam Ortiz", address = "sam@example.org" }}]
calendar = "office"
first_response = "4h"
escalation = [{{ after = "0m", name = "Lee Lead", address = "lead@example.org" }}]

[[team]]
name = "billing"
destination = {{ maildir = "var/maildir/billing" }}
members = [{{ name = "Bea Keller", address = "bea@example.org" }}]
first_response = "1h"

[[team]]
name = "helpdesk"
destination = {{ maildir = "var/maildir/helpdesk" }}
members = []

[[route]]
name = "billing"
team = "billing"
any = [{{ subject.contains = "invoice" }}]

[[route]]
name = "urgent"
team = "support"
first_response = "1h"
any = [{{ subject.contains = "urgent" }}]

[[route]]
name = "default"
team = "support"
default = true
"""

# Friday 7 November 2025, 11:00 in Paris.
ARRIVAL = datetime(2025, 11, 7, 10, 0, tzinfo=UTC)


def with_settings(*, team: str = "", route: str = "") -> str:
    """Return RULES with `team` lines added to team support and `route` lines to route urgent."""
    text = RULES.replace('name = "support"\n', f'name = "support"\n{team}\n', 1)
    return text.replace('name = "urgent"\n', f'name = "urgent"\n{route}\n', 1)


def loaded(folder: Path, rules: str = RULES) -> RuleSet:
    return load_rules(rules_folder(folder, rules), folder)


def follow_up(subject: str = "Re: Printer on floor 3 jams", *, sender: str = "Alice Example <alice@example.com>", headers: str = "") -> bytes:
    """Return a message that threads on <m1@example.com>, the message that opened the conversation."""
    return message(sender=sender, subject=subject, message_id="<m2@example.com>",
                   extra_headers=f"In-Reply-To: <m1@example.com>\r\n{headers}")


PERSON = follow_up()
STAFF = follow_up(sender="Sam Ortiz <sam@example.org>")
AUTO_REPLY = follow_up("Automatic reply: Re: Printer on floor 3 jams", headers="Auto-Submitted: auto-replied\r\n")
SUBJECT_ONLY_AUTO_REPLY = follow_up("Automatic reply: Re: Printer on floor 3 jams")
LIST_MAIL = follow_up(headers="List-Id: <printers.lists.example.com>\r\n")
LOOP = follow_up(headers="X-Guardrail-Loop: mx.test.example\r\n")
BOUNCE = follow_up(
    "Undelivered Mail Returned to Sender", sender="Mail Delivery System <MAILER-DAEMON@mail.example.com>",
    headers='MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n',
)
READ_RECEIPT = follow_up(
    "Read: Re: Printer on floor 3 jams",
    headers='MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=disposition-notification; boundary="b"\r\n',
)
# Its own route would be billing, but the conversation stays with support.
INVOICE = follow_up("Re: Printer on floor 3 jams, and my invoice")


def prepared(folder: Path, raw: bytes, rules: str, mail_from: str = "alice@example.com") -> tuple[Submission, RuleSet]:
    config = load_config(write_config(folder, rules=rules))
    ruleset = loaded(folder, rules)
    envelope = Envelope(mail_from, ("support@example.org",), "[127.0.0.1]:40000", "client")
    result = prepare_message(envelope, raw, ruleset, Site.from_config(config), ARRIVAL)
    assert isinstance(result, Submission)
    return result, ruleset


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- the decision --------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "raw", "mail_from", "route", "rules", "reopens", "starts_clock", "deadline"),
    [
        pytest.param("answered", PERSON, "alice@example.com", "default", RULES, True, False, "2025-11-07T14:00:00Z", id="person"),
        pytest.param("answered", PERSON, "alice@example.com", "urgent", RULES, True, False, "2025-11-07T11:00:00Z", id="urgent-route"),
        pytest.param("answered", INVOICE, "alice@example.com", "default", RULES, True, False, "2025-11-07T14:00:00Z", id="own-route-elsewhere"),
        pytest.param("answered", AUTO_REPLY, "alice@example.com", "default", RULES, False, False, None, id="auto-reply"),
        pytest.param("answered", SUBJECT_ONLY_AUTO_REPLY, "alice@example.com", "default", RULES, False, False, None, id="auto-reply-subject"),
        pytest.param("answered", BOUNCE, "", "default", RULES, False, False, None, id="bounce"),
        pytest.param("answered", READ_RECEIPT, "alice@example.com", "default", RULES, False, False, None, id="read-receipt"),
        pytest.param("answered", LIST_MAIL, "alice@example.com", "default", RULES, False, False, None, id="list"),
        pytest.param("answered", LOOP, "alice@example.com", "default", RULES, False, False, None, id="loop"),
        pytest.param("answered", STAFF, "sam@example.org", "default", RULES, False, False, None, id="staff"),
        pytest.param("open", PERSON, "alice@example.com", "default", RULES, False, False, None, id="open"),
        pytest.param("no_reply_needed", PERSON, "alice@example.com", "default", RULES, False, True, "2025-11-07T14:00:00Z",
                     id="no-reply-needed"),
        pytest.param("answered", PERSON, "alice@example.com", "default", with_settings(team="reopen_on_reply = false"),
                     False, False, None, id="team-off"),
        pytest.param("answered", PERSON, "alice@example.com", "urgent", with_settings(route="reopen_on_reply = false"),
                     False, False, None, id="route-off"),
        pytest.param("answered", PERSON, "alice@example.com", "urgent",
                     with_settings(team="reopen_on_reply = false", route="reopen_on_reply = true"),
                     True, False, "2025-11-07T11:00:00Z", id="route-on-team-off"),
    ],
)
def test_reopen_decision_table(
    tmp_path: Path, state: str, raw: bytes, mail_from: str, route: str, rules: str, reopens: bool, starts_clock: bool,
    deadline: str | None,
) -> None:
    submission, ruleset = prepared(tmp_path, raw, rules, mail_from)
    known = KnownConversation(7, "GR-7K3M9Q", route, "support", frozenset({"alice@example.com"}), None, state)

    plan = plan_submission(
        submission, is_duplicate=False, reference_prefix="GR", by_message_id={"<m1@example.com>": known},
        by_reference={}, new_conversation=known, reopened_clock=partial(reopened_clock, ruleset),
    )

    assert plan.conversation == known
    assert plan.reopens is reopens
    assert plan.starts_clock is starts_clock
    if deadline is None:
        assert plan.clock is None
    else:
        assert plan.clock is not None
        assert plan.clock.deadline == utc(deadline)
    assert (plan.team, plan.route) == ("support", route)
    # A follow-up gets no acknowledgement, except from the person who starts the clock of machine mail.
    assert (plan.ack_decision == "suppressed") is not starts_clock


def test_store_without_planner_keeps_answered(tmp_path: Path) -> None:
    submission, _ = prepared(tmp_path, PERSON, RULES)
    known = KnownConversation(7, "GR-7K3M9Q", "default", "support", frozenset({"alice@example.com"}), None, "answered")

    plan = plan_submission(
        submission, is_duplicate=False, reference_prefix="GR", by_message_id={"<m1@example.com>": known},
        by_reference={}, new_conversation=known,
    )

    assert plan.reopens is False
    assert plan.clock is None


# -- the deadline ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("team", "route", "arrival", "deadline"),
    [
        # Fri 17:30 in Paris: 30 minutes on Friday, 3h30 from Monday 09:00.
        ("support", "default", "2025-11-07T16:30:00Z", "2025-11-10T11:30:00Z"),
        # The route's own first_response of 1h: 30 minutes on Friday, 30 on Monday.
        ("support", "urgent", "2025-11-07T16:30:00Z", "2025-11-10T08:30:00Z"),
        # A route gone from the rules leaves the team's 4h.
        ("support", "removed", "2025-11-07T16:30:00Z", "2025-11-10T11:30:00Z"),
        # Saturday: nothing counts until Monday 09:00.
        ("support", "default", "2025-11-08T10:00:00Z", "2025-11-10T12:00:00Z"),
        # Tuesday 09:00 in Paris, inside office hours.
        ("support", "default", "2025-11-04T08:00:00Z", "2025-11-04T12:00:00Z"),
        # Around the clock in UTC.
        ("billing", "billing", "2025-11-07T16:30:00Z", "2025-11-07T17:30:00Z"),
    ],
)
def test_reopened_deadline_table(tmp_path: Path, team: str, route: str, arrival: str, deadline: str) -> None:
    clock = reopened_clock(loaded(tmp_path), team, route, utc(arrival))

    assert clock is not None
    assert clock.deadline == utc(deadline)
    assert clock.unstaffed == ""


def test_reopened_deadline_as_new_message(tmp_path: Path) -> None:
    # A new message on the same route at the same time gets the same deadline and first escalation.
    submission, ruleset = prepared(tmp_path, message(), RULES)
    clock = reopened_clock(ruleset, submission.team, submission.route, ARRIVAL)

    assert clock == submission.clock
    assert clock is not None
    assert clock.first_escalation_at == clock.deadline


def test_reopened_unstaffed_team_escalates(tmp_path: Path) -> None:
    clock = reopened_clock(loaded(tmp_path), "helpdesk", "default", ARRIVAL)

    assert clock is not None
    assert clock.unstaffed == "the team has no members"


@pytest.mark.parametrize(
    ("rules", "team", "route"),
    [
        (with_settings(team="reopen_on_reply = false"), "support", "default"),
        (with_settings(route="reopen_on_reply = false"), "support", "urgent"),
        (RULES, "removed", "default"),
    ],
)
def test_reopened_clock_off_or_unknown(tmp_path: Path, rules: str, team: str, route: str) -> None:
    assert reopened_clock(loaded(tmp_path, rules), team, route, ARRIVAL) is None


# -- the rule setting -------------------------------------------------------------


def test_reopen_setting_defaults(tmp_path: Path) -> None:
    rules = loaded(tmp_path)

    assert rules.teams["support"].reopen_on_reply is True
    assert [route.reopen_on_reply for route in rules.routes] == [None, None, None]
    assert rules.teams["support"].reopen_on_thanks is False
    assert [route.reopen_on_thanks for route in rules.routes] == [None, None, None]


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        (with_settings(team='reopen_on_reply = "no"'), "team[0] (support).reopen_on_reply"),
        (with_settings(route='reopen_on_reply = "no"'), "route[1] (urgent).reopen_on_reply"),
        (with_settings(team='reopen_on_thanks = "no"'), "team[0] (support).reopen_on_thanks"),
        (with_settings(route='reopen_on_thanks = "no"'), "route[1] (urgent).reopen_on_thanks"),
    ],
)
def test_reopen_setting_wrong_type(tmp_path: Path, rules: str, key: str) -> None:
    errors = rule_errors(tmp_path, rules)

    assert errors == [f"{tmp_path / 'rules' / 'rules.toml'}: {key}: invalid value 'no'; expected true or false"]


@pytest.mark.parametrize(("written", "meant"), [("reopen_on_replies", "reopen_on_reply"), ("reopen_on_thank", "reopen_on_thanks")])
def test_reopen_setting_misspelled(tmp_path: Path, written: str, meant: str) -> None:
    errors = rule_errors(tmp_path, with_settings(team=f"{written} = false"))

    assert errors == [
        f"{tmp_path / 'rules' / 'rules.toml'}: team[0] (support).{written}: unknown key; did you mean '{meant}'?"
    ]


# -- end to end ---------------------------------------------------------------------

CHAIN = f'[{{ after = "0m", {DUTY[2:]}, {{ after = "2h", {HEAD[2:]}]'
DANA = "duty-manager@example.org"
ERIK = "head-of-facilities@example.org"

OUT_OF_OFFICE = (
    b"From: Alice Example <alice@example.com>\r\nTo: support@example.org\r\n"
    b"Subject: Automatic reply: Re: Water leak in room 12\r\nMessage-ID: <alice-away@example.com>\r\n"
    b"Auto-Submitted: auto-replied\r\nIn-Reply-To: <carol-1@example.org>\r\n\r\nI am away until Monday.\r\n"
)
CUSTOMER_FOLLOW_UP = (
    b"From: Alice Example <alice@example.com>\r\nTo: Carol Tech <carol@example.org>\r\nCc: support@example.org\r\n"
    b"Subject: Re: Water leak in room 12\r\nMessage-ID: <alice-2@example.com>\r\n"
    b"In-Reply-To: <carol-1@example.org>\r\nReferences: <leak-12@example.com> <carol-1@example.org>\r\n\r\n"
    b"The plumber did not come, the water is still there.\r\n"
)


async def conversation(daemon: Daemon) -> tuple:
    """Return (state, deadline, escalation_level, next_escalation_at, answered_at, answered_by) of the one conversation."""
    [row] = await daemon.store.fetch_all(
        "SELECT state, deadline, escalation_level, next_escalation_at, answered_at, answered_by FROM conversations"
    )
    return tuple(row)


async def send_at(daemon: Daemon, clock: ManualClock, when: str, mail_from: str, data: bytes) -> None:
    await clock.set(at(when))
    await send(daemon.port, mail_from, ["support@example.org"], data)
    await settle(daemon, clock)


async def test_follow_up_reopens_and_escalates(tmp_path: Path, start_daemon) -> None:
    # The first round: deadline 11:00, Dana at 11:00, Erik at 13:00, Carol answers at 13:30.
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, CHAIN)
    await advance_in_ticks(daemon, clock, at("2025-11-17T13:10:00"), tick=timedelta(minutes=10))
    await send_at(daemon, clock, "2025-11-17T13:30:00", "carol@example.org",
                  reply_from("Carol Tech", "carol@example.org", "<carol-1@example.org>"))
    answered = await conversation(daemon)
    await send_at(daemon, clock, "2025-11-17T13:45:00", "alice@example.com", OUT_OF_OFFICE)
    after_auto_reply = await conversation(daemon)

    await send_at(daemon, clock, "2025-11-17T14:00:00", "alice@example.com", CUSTOMER_FOLLOW_UP)
    reopened = await conversation(daemon)
    events = await daemon.store.fetch_all("SELECT kind, detail FROM events WHERE kind IN ('reopened', 'deadline_set') ORDER BY id")

    # A restart between the reopening and the new deadline.
    await daemon.stop()
    clock = ManualClock(at("2025-11-17T14:30:00"))
    daemon = await start_daemon(config, clock=clock)
    await settle(daemon, clock)
    await advance_in_ticks(daemon, clock, at("2025-11-17T14:59:00"), tick=timedelta(minutes=10))
    dana_early = len(escalations_to(tmp_path, DANA))
    await advance_in_ticks(daemon, clock, at("2025-11-17T15:20:00"), tick=timedelta(minutes=10))
    dana_due = escalations_to(tmp_path, DANA)
    await advance_in_ticks(daemon, clock, at("2025-11-17T16:59:00"), tick=timedelta(minutes=20))
    erik_early = len(escalations_to(tmp_path, ERIK))
    await advance_in_ticks(daemon, clock, at("2025-11-17T17:20:00"), tick=timedelta(minutes=10))
    erik_due = len(escalations_to(tmp_path, ERIK))
    await send_at(daemon, clock, "2025-11-17T17:30:00", "carol@example.org",
                  reply_from("Carol Tech", "carol@example.org", "<carol-2@example.org>"))
    await advance_in_ticks(daemon, clock, at("2025-11-17T20:00:00"), tick=timedelta(minutes=30))

    first_response = ("2025-11-17T13:30:00.000000Z", "carol@example.org")
    assert answered == ("answered", "2025-11-17T11:00:00.000000Z", 2, None, *first_response)
    assert after_auto_reply == answered
    assert reopened == ("open", "2025-11-17T15:00:00.000000Z", 0, "2025-11-17T15:00:00.000000Z", *first_response)
    assert [(kind, json.loads(detail)) for kind, detail in events] == [
        ("deadline_set", {"deadline": "2025-11-17T11:00:00.000000Z"}),
        ("reopened", {"by": "alice@example.com"}),
        ("deadline_set", {"deadline": "2025-11-17T15:00:00.000000Z"}),
    ]
    # Each level fires once in each round, across the restart.
    assert dana_early == 1
    assert len(dana_due) == 2
    assert erik_early == 1
    assert erik_due == 2
    assert len(escalations_to(tmp_path, DANA)) == 2
    assert len(escalations_to(tmp_path, ERIK)) == 2
    text = dana_due[1].get_payload(decode=True).decode()
    assert "The sender wrote again after the team's answer" in text
    assert "Reopened:   Mon 17 Nov 2025 14:00 UTC" in text
    assert "Deadline:   Mon 17 Nov 2025 15:00 UTC" in text
    # Answered again: the first response stays recorded.
    assert await conversation(daemon) == ("answered", "2025-11-17T15:00:00.000000Z", 2, None, *first_response)
    # Only the message that opened the conversation was acknowledged.
    assert len(acknowledgements(tmp_path)) == 1


async def test_two_follow_ups_reopen_once(tmp_path: Path, start_daemon) -> None:
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, CHAIN)
    await send_at(daemon, clock, "2025-11-17T10:30:00", "carol@example.org",
                  reply_from("Carol Tech", "carol@example.org", "<carol-1@example.org>"))
    await daemon.stop()
    # The second message threads on another message of the conversation than the first.
    other = CUSTOMER_FOLLOW_UP.replace(b"<alice-2@", b"<alice-3@").replace(b"<carol-1@example.org>\r\nRef", b"<leak-12@example.com>\r\nRef")
    envelope = Envelope("alice@example.com", ("support@example.org",), "[127.0.0.1]:40000", "client")
    arrival = at("2025-11-17T11:00:00")
    submissions = [prepare_message(envelope, raw, daemon.rules, Site.from_config(daemon.config), arrival)
                   for raw in (CUSTOMER_FOLLOW_UP, other)]
    committer = Committer(daemon.config.database_path, StoreSettings())
    committer.reopened_clock = partial(reopened_clock, daemon.rules)
    try:
        # Both messages are committed in one transaction.
        outcomes = committer.commit(submissions)
        events = committer.db.execute("SELECT kind FROM events WHERE kind IN ('reopened', 'deadline_set') ORDER BY id").fetchall()
        row = committer.db.execute("SELECT state, deadline FROM conversations").fetchall()
    finally:
        committer.close()

    assert [outcome.disposition for outcome in outcomes] == ["follow_up", "follow_up"]
    assert [outcome.reopened for outcome in outcomes] == [True, False]
    assert [kind for (kind,) in events] == ["deadline_set", "reopened", "deadline_set"]
    assert row == [("open", "2025-11-17T12:00:00.000000Z")]


async def test_reload_turns_reopening_off(tmp_path: Path, start_daemon) -> None:
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, CHAIN)
    await send_at(daemon, clock, "2025-11-17T10:30:00", "carol@example.org",
                  reply_from("Carol Tech", "carol@example.org", "<carol-1@example.org>"))
    (tmp_path / "rules" / "rules.toml").write_text(chain_rules(CHAIN, "reopen_on_reply = false\n"))
    assert daemon.reload() is True

    await send_at(daemon, clock, "2025-11-17T11:00:00", "alice@example.com", CUSTOMER_FOLLOW_UP)
    await advance_in_ticks(daemon, clock, at("2025-11-17T15:00:00"), tick=timedelta(minutes=30))

    assert await conversation(daemon) == (
        "answered", "2025-11-17T11:00:00.000000Z", 0, None, "2025-11-17T10:30:00.000000Z", "carol@example.org",
    )
    assert await daemon.store.fetch_all("SELECT kind FROM events WHERE kind = 'reopened'") == []
    assert escalations_to(tmp_path, DANA) == []


async def test_reopened_counts_as_answered(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    # With a share of 60% needed, one reopened conversation left waiting would alarm if it counted as unanswered.
    daemon, clock = await zombie_daemon(tmp_path, start_daemon, conversations=2, min_answered_share=0.6, silent_business_hours="100h")
    for number in range(2):
        await send(daemon.port, f"c{number}@example.com", ["support@example.org"], message(message_id=f"<q{number}@x>"))
    await advance_hours(daemon, clock, 1)
    for number in range(2):
        reply = message(sender="Sam Ortiz <sam@example.org>", message_id=f"<a{number}@x>", extra_headers=f"In-Reply-To: <q{number}@x>\r\n")
        await send(daemon.port, "sam@example.org", ["support@example.org"], reply)
    await advance_hours(daemon, clock, 1)
    for number in range(2):
        again = message(message_id=f"<f{number}@x>", extra_headers=f"In-Reply-To: <a{number}@x>\r\n")
        await send(daemon.port, f"c{number}@example.com", ["support@example.org"], again)
    await advance_hours(daemon, clock, 1)
    reply = message(sender="Sam Ortiz <sam@example.org>", message_id="<a0b@x>", extra_headers="In-Reply-To: <f0@x>\r\n")
    await send(daemon.port, "sam@example.org", ["support@example.org"], reply)
    # Past the second deadline of the conversation left waiting.
    await advance_hours(daemon, clock, 6)
    states = await daemon.store.fetch_all("SELECT state FROM conversations ORDER BY id")
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["status", "--config", str(daemon.config.path)]) == 0
    output = capsys.readouterr().out
    assert [row[0] for row in states] == ["answered", "open"]
    assert alarms(tmp_path) == []
    # Received 2, answered 2, and the median first response is the hour before the first answers.
    assert re.search(r"\n  default\s+2\s+2\s+1\.0h\n", output), output
