"""A customer's thank-you after the team's answer leaves the conversation answered, where a question reopens it."""

from __future__ import annotations

import json
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
from conftest import maildir_messages, message
from test_escalation import (
    advance_in_ticks,
    at,
    escalations_to,
    open_chain_conversation,
    reply_from,
)
from test_reopening import (
    CHAIN,
    DANA,
    ERIK,
    RULES,
    conversation,
    follow_up,
    loaded,
    prepared,
    send_at,
    utc,
    with_settings,
)

from guardrail.conversations import KnownConversation
from guardrail.deadlines import reopened_clock
from guardrail.plan import plan_submission

THANKS_BODY = (
    "Thanks, that works!\r\n\r\nAlice\r\n\r\n"
    "On Fri, 7 Nov 2025 at 10:30, Sam Ortiz <sam@example.org> wrote:\r\n"
    "> Could you try again? Does it print now?\r\n"
)
THANKS = message(subject="Re: Printer on floor 3 jams", message_id="<m2@example.com>",
                 extra_headers="In-Reply-To: <m1@example.com>\r\n", body=THANKS_BODY)
QUESTION = follow_up()  # "Hello, the printer jams."
THANKS_BUT = message(subject="Re: Printer on floor 3 jams", message_id="<m2@example.com>",
                     extra_headers="In-Reply-To: <m1@example.com>\r\n", body="Thanks, but it still jams.\r\n")
# A request after the thanks, its first word capitalized as a sentence starts.
THANKS_REQUEST = message(subject="Re: Printer on floor 3 jams", message_id="<m2@example.com>",
                         extra_headers="In-Reply-To: <m1@example.com>\r\n", body="Thanks. Replace it.\r\n\r\nAlice\r\n")
NEW_MATTER = message(subject="Re: New toner needed [GR-7K3M9Q]", message_id="<m2@example.com>",
                     extra_headers="In-Reply-To: <m1@example.com>\r\n", body="Thanks!\r\n")
HTML_THANKS = message(
    subject="RE: Printer on floor 3 jams", message_id="<m2@example.com>",
    extra_headers="In-Reply-To: <m1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n",
    body="<html><body><p>Merci beaucoup&nbsp;!</p><hr><p><b>De :</b> Sam<br><b>Envoy\u00e9 :</b> vendredi</p>"
         "<p>\u00c7a marche ?</p></body></html>\r\n",
)
ATTACHED = message(
    subject="Re: Printer on floor 3 jams", message_id="<m2@example.com>",
    extra_headers='In-Reply-To: <m1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n',
    body=(
        "--b\r\nContent-Type: text/plain\r\n\r\nThanks!\r\n"
        "--b\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename=jam.png\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--b--\r\n"
    ),
)
# A body condition makes the summary carry the whole text, which is then read instead of a sample.
BODY_RULES = RULES.replace('[[route]]\nname = "default"', '[[route]]\nname = "toner"\nteam = "billing"\n'
                           'any = [{ body.contains = "toner" }]\n\n[[route]]\nname = "default"')


@pytest.mark.parametrize(
    ("raw", "route", "rules", "reopens", "thanked"),
    [
        pytest.param(THANKS, "default", RULES, False, True, id="thanks"),
        pytest.param(THANKS, "default", BODY_RULES, False, True, id="thanks-body-rules"),
        pytest.param(HTML_THANKS, "default", RULES, False, True, id="html-thanks"),
        pytest.param(QUESTION, "default", RULES, True, False, id="question"),
        pytest.param(THANKS_BUT, "default", RULES, True, False, id="thanks-but"),
        pytest.param(THANKS_BUT, "default", BODY_RULES, True, False, id="thanks-but-body-rules"),
        pytest.param(THANKS_REQUEST, "default", RULES, True, False, id="thanks-request"),
        pytest.param(NEW_MATTER, "default", RULES, True, False, id="new-subject"),
        pytest.param(ATTACHED, "default", RULES, True, False, id="attachment"),
        pytest.param(THANKS, "default", with_settings(team="reopen_on_thanks = true"), True, False, id="team-on"),
        pytest.param(THANKS, "urgent", with_settings(team="reopen_on_thanks = true", route="reopen_on_thanks = false"),
                     False, True, id="route-off-team-on"),
        pytest.param(THANKS, "urgent", with_settings(route="reopen_on_thanks = true"), True, False, id="route-on"),
        # Reopening is off for every reply there: the thank-you is still recorded.
        pytest.param(THANKS, "default", with_settings(team="reopen_on_reply = false\nreopen_on_thanks = true"),
                     False, True, id="replies-off"),
    ],
)
def test_thanks_decision_table(tmp_path: Path, raw: bytes, route: str, rules: str, reopens: bool, thanked: bool) -> None:
    submission, ruleset = prepared(tmp_path, raw, rules)
    known = KnownConversation(7, "GR-7K3M9Q", route, "support", frozenset({"alice@example.com"}), None, "answered",
                              "Printer on floor 3 jams")

    plan = plan_submission(
        submission, is_duplicate=False, reference_prefix="GR", by_message_id={"<m1@example.com>": known},
        by_reference={}, new_conversation=known, reopened_clock=partial(reopened_clock, ruleset),
    )

    assert plan.disposition == "follow_up"
    assert plan.reopens is reopens
    assert plan.thanked is thanked
    assert (plan.clock is not None) is reopens


@pytest.mark.parametrize("state", ["open", "no_reply_needed"])
def test_thanks_outside_answered_records_nothing(tmp_path: Path, state: str) -> None:
    submission, ruleset = prepared(tmp_path, THANKS, RULES)
    known = KnownConversation(7, "GR-7K3M9Q", "default", "support", frozenset({"alice@example.com"}), None, state,
                              "Printer on floor 3 jams")

    plan = plan_submission(
        submission, is_duplicate=False, reference_prefix="GR", by_message_id={"<m1@example.com>": known},
        by_reference={}, new_conversation=known, reopened_clock=partial(reopened_clock, ruleset),
    )

    assert plan.thanked is False
    assert plan.reopens is False


def test_thanks_flag_only_on_replies(tmp_path: Path) -> None:
    # The same text that opens a conversation is no reply, so its text is not read.
    opening, _ = prepared(tmp_path, message(body="Thanks!\r\n"), RULES)
    reply, _ = prepared(tmp_path, THANKS, RULES)
    staff, _ = prepared(tmp_path, message(sender="Sam Ortiz <sam@example.org>", body="Thanks!\r\n",
                                          extra_headers="In-Reply-To: <m1@example.com>\r\n"), RULES, "sam@example.org")

    assert opening.thanks_only is False
    assert reply.thanks_only is True
    assert staff.thanks_only is False


@pytest.mark.parametrize(
    ("route", "rules", "arrival", "expected"),
    [
        ("default", RULES, "2025-11-07T10:00:00Z", None),
        ("default", with_settings(team="reopen_on_thanks = true"), "2025-11-07T10:00:00Z", "2025-11-07T14:00:00Z"),
        ("urgent", with_settings(route="reopen_on_thanks = true"), "2025-11-07T10:00:00Z", "2025-11-07T11:00:00Z"),
        ("default", with_settings(route="reopen_on_thanks = true"), "2025-11-07T10:00:00Z", None),
    ],
)
def test_reopened_clock_for_thanks(tmp_path: Path, route: str, rules: str, arrival: str, expected: str | None) -> None:
    clock = reopened_clock(loaded(tmp_path, rules), "support", route, utc(arrival), True)

    if expected is None:
        assert clock is None
    else:
        assert clock is not None
        assert clock.deadline == utc(expected)


# -- end to end ---------------------------------------------------------------------


def customer_reply(body: str) -> bytes:
    """Return Alice's reply to Carol's answer, with the shared inbox in Cc."""
    return (
        "From: Alice Example <alice@example.com>\r\nTo: Carol Tech <carol@example.org>\r\nCc: support@example.org\r\n"
        "Subject: Re: Water leak in room 12\r\nMessage-ID: <alice-2@example.com>\r\n"
        "In-Reply-To: <carol-1@example.org>\r\nReferences: <leak-12@example.com> <carol-1@example.org>\r\n\r\n"
        f"{body}"
    ).encode()


THANKS_REPLY = customer_reply(
    "Thank you so much, that fixed it!\r\n\r\nAlice\r\n\r\n"
    "On Mon, 17 Nov 2025 at 10:30, Carol Tech <carol@example.org> wrote:\r\n"
    "> Someone is on the way. Is the water still running?\r\n"
)
QUESTION_REPLY = customer_reply(
    "Thanks, but the water is still there. When will someone come back?\r\n\r\n"
    "On Mon, 17 Nov 2025 at 10:30, Carol Tech <carol@example.org> wrote:\r\n"
    "> Someone is on the way.\r\n"
)


async def answered_conversation(tmp_path: Path, start_daemon):
    """Open a conversation at 10:00 with a 11:00 deadline, Dana at 11:00 and Erik at 13:00, and have Carol answer it at 10:30."""
    config, daemon, clock = await open_chain_conversation(tmp_path, start_daemon, CHAIN)
    await send_at(daemon, clock, "2025-11-17T10:30:00", "carol@example.org",
                  reply_from("Carol Tech", "carol@example.org", "<carol-1@example.org>"))
    return daemon, clock


async def test_thanks_keeps_answered(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await answered_conversation(tmp_path, start_daemon)
    answered = await conversation(daemon)
    delivered = len(maildir_messages(tmp_path / "var" / "maildir" / "facilities"))

    await send_at(daemon, clock, "2025-11-17T10:45:00", "alice@example.com", THANKS_REPLY)
    # Past both levels of a deadline that a reopening at 10:45 would set (11:45, 13:45) and of the first one.
    await advance_in_ticks(daemon, clock, at("2025-11-17T15:00:00"), tick=timedelta(minutes=15))
    events = await daemon.store.fetch_all(
        "SELECT kind, detail FROM events WHERE kind IN ('reopened', 'thanked', 'deadline_set') ORDER BY id"
    )

    first_response = ("2025-11-17T10:30:00.000000Z", "carol@example.org")
    assert answered == ("answered", "2025-11-17T11:00:00.000000Z", 0, None, *first_response)
    assert await conversation(daemon) == answered
    assert [(kind, json.loads(detail)) for kind, detail in events] == [
        ("deadline_set", {"deadline": "2025-11-17T11:00:00.000000Z"}),
        ("thanked", {"by": "alice@example.com"}),
    ]
    assert escalations_to(tmp_path, DANA) == []
    assert escalations_to(tmp_path, ERIK) == []
    # The thank-you is stored and delivered to the team, as every follow-up is.
    assert len(maildir_messages(tmp_path / "var" / "maildir" / "facilities")) == delivered + 1
    [(disposition,)] = await daemon.store.fetch_all("SELECT disposition FROM messages WHERE message_id = '<alice-2@example.com>'")
    assert disposition == "follow_up"


async def test_question_after_thanks_reopens(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await answered_conversation(tmp_path, start_daemon)

    await send_at(daemon, clock, "2025-11-17T10:45:00", "alice@example.com", QUESTION_REPLY)
    reopened = await conversation(daemon)
    await advance_in_ticks(daemon, clock, at("2025-11-17T12:00:00"), tick=timedelta(minutes=15))
    kinds = await daemon.store.fetch_all("SELECT kind FROM events WHERE kind IN ('reopened', 'thanked') ORDER BY id")

    assert reopened[:4] == ("open", "2025-11-17T11:45:00.000000Z", 0, "2025-11-17T11:45:00.000000Z")
    assert [kind for (kind,) in kinds] == ["reopened"]
    assert len(escalations_to(tmp_path, DANA)) == 1
