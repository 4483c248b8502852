"""Deadlines and escalation instants end to end: business hours, DST, overnight windows, holidays."""

from __future__ import annotations

import email
from datetime import date, datetime, timedelta
from email.message import Message
from pathlib import Path

import pytest
from conftest import maildir_messages, message, send, settle, write_config

from guardrail.cli import main
from guardrail.clock import ManualClock
from guardrail.config import load_config
from guardrail.daemon import Daemon
from guardrail.rules import load_rules

LEAD = "lead@example.org"

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri")
EVERY_DAY = (*WEEKDAYS, "sat", "sun")


def hours(days: tuple[str, ...], window: str) -> str:
    return "{ " + ", ".join(f'{day} = ["{window}"]' for day in days) + " }"


def calendar(name: str, days: tuple[str, ...] | None, window: str = "", extra: str = "") -> str:
    spec = '"24x7"' if days is None else hours(days, window)
    return f'\n[[calendar]]\nname = "{name}"\ntimezone = "Europe/Paris"\nhours = {spec}\n{extra}\n'


CALENDARS = "".join([
    calendar("office", WEEKDAYS, "09:00-18:00"),
    calendar("paris-24x7", None),
    calendar("nightdesk", EVERY_DAY, "22:00-06:00"),
    calendar("weeknights", WEEKDAYS, "22:00-06:00"),
    calendar("fullday", EVERY_DAY, "00:00-24:00"),
    # 2025-11-05 is a Wednesday and no public holiday: only the explicit date closes it.
    calendar("office-closed-nov-5", WEEKDAYS, "09:00-18:00", "holidays = [2025-11-05]"),
    calendar("office-fr", WEEKDAYS, "09:00-18:00", 'country = "FR"'),
])


def team(name: str, calendar_name: str, first_response: str) -> str:
    return f"""
[[team]]
name = "{name}"
destination = {{ maildir = "var/maildir/{name}" }}
members = [{{ name = "Sam Ortiz", address = "sam@example.org" }}]
calendar = "{calendar_name}"
first_response = "{first_response}"
escalation = [{{ after = "0m", name = "Lee Lead", address = "{LEAD}" }}]
"""


def one_team_rules(name: str, calendar_name: str, first_response: str, routes: str = "") -> str:
    """Return rules with every calendar, one team, `routes`, and a default route to the team."""
    default = f'\n[[route]]\nname = "default"\nteam = "{name}"\ndefault = true\n'
    return CALENDARS + team(name, calendar_name, first_response) + routes + default


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def stored(text: str) -> str:
    """Return an instant written as "2025-03-31T09:30:00Z" in the form the database stores it."""
    return text.replace("Z", ".000000Z")


def escalations(folder: Path) -> list[Message]:
    found = [email.message_from_bytes(data) for data in maildir_messages(folder / "var" / "outbound")]
    return [mail for mail in found if mail["Auto-Submitted"] == "auto-generated" and mail["X-Guardrail-Envelope-To"] == LEAD]


async def conversation_row(daemon: Daemon, message_id: str) -> tuple:
    """Return (deadline, next_escalation_at, escalation_level) of the conversation `message_id` opened."""
    rows = await daemon.store.fetch_all(
        "SELECT c.deadline, c.next_escalation_at, c.escalation_level FROM conversations c"
        " JOIN messages m ON m.conversation_id = c.id WHERE m.message_id = ? AND m.disposition = 'new'",
        (message_id,),
    )
    assert len(rows) == 1, f"expected one conversation opened by {message_id}, found {rows}"
    return tuple(rows[0])


async def start_at(tmp_path: Path, start_daemon, rules: str, arrival: str) -> tuple[Daemon, ManualClock]:
    clock = ManualClock(utc(arrival))
    daemon = await start_daemon(write_config(tmp_path, rules=rules), clock=clock)
    return daemon, clock


async def receive(daemon: Daemon, clock: ManualClock, message_id: str = "<m1@example.com>", **headers: str) -> None:
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id=message_id, **headers))
    await settle(daemon, clock)


async def move_to(daemon: Daemon, clock: ManualClock, when: datetime) -> None:
    await clock.set(when)
    await settle(daemon, clock)


# -- daylight-saving changes ---------------------------------------------------


@pytest.mark.parametrize(
    ("team_name", "calendar_name", "arrival", "deadline", "wrong"),
    [
        # Fri 16:30 CET: 1h30 on Friday, then 2h30 from Mon 09:00 CEST.
        # Keeping Friday's +01:00 offset would give 10:30Z.
        ("support", "office", "2025-03-28T15:30:00Z", "2025-03-31T09:30:00Z", "2025-03-31T10:30:00Z"),
        # Fri 16:00 CEST: 2h on Friday, then 2h from Mon 09:00 CET.
        # Keeping Friday's +02:00 offset would give 09:00Z.
        ("support", "office", "2025-10-24T14:00:00Z", "2025-10-27T10:00:00Z", "2025-10-27T09:00:00Z"),
        # 24x7 across the repeated hour: four real hours. Adding four
        # wall-clock hours to 00:30 CEST would give 04:30 CET, which is 03:30Z.
        ("oncall", "paris-24x7", "2025-10-25T22:30:00Z", "2025-10-26T02:30:00Z", "2025-10-26T03:30:00Z"),
    ],
)
async def test_deadline_correct_across_dst(
    tmp_path: Path, start_daemon, team_name: str, calendar_name: str, arrival: str, deadline: str, wrong: str
) -> None:
    daemon, clock = await start_at(tmp_path, start_daemon, one_team_rules(team_name, calendar_name, "4h"), arrival)
    await receive(daemon, clock)

    stored_deadline, next_escalation_at, _ = await conversation_row(daemon, "<m1@example.com>")
    assert stored_deadline != stored(wrong)
    assert stored_deadline == stored(deadline)
    assert next_escalation_at == stored(deadline)

    # Approach the deadline in 30-second ticks.
    await move_to(daemon, clock, utc(deadline) - timedelta(minutes=1))
    await move_to(daemon, clock, utc(deadline) - timedelta(seconds=30))
    assert escalations(tmp_path) == []
    await move_to(daemon, clock, utc(deadline))
    assert len(escalations(tmp_path)) == 1
    await move_to(daemon, clock, utc(deadline) + timedelta(seconds=30))
    assert len(escalations(tmp_path)) == 1
    _, _, level = await conversation_row(daemon, "<m1@example.com>")
    assert level == 1


# -- overnight windows ---------------------------------------------------------


@pytest.mark.parametrize(
    ("calendar_name", "first_response", "arrival", "deadline"),
    [
        # Thu 21:00 local, before the window opens at 22:00.
        ("nightdesk", "2h", "2025-11-27T20:00:00Z", "2025-11-27T23:00:00Z"),
        # Fri 05:30 local: 30 min of Thursday's window, then 1h30 from Fri 22:00.
        ("nightdesk", "2h", "2025-11-28T04:30:00Z", "2025-11-28T22:30:00Z"),
        # Sat 03:00 local, inside the window Friday opened.
        ("nightdesk", "2h", "2025-11-29T02:00:00Z", "2025-11-29T04:00:00Z"),
        # Thu 23:00 local: 7h to Fri 06:00, 3h from Fri 22:00.
        ("nightdesk", "10h", "2025-11-27T22:00:00Z", "2025-11-29T00:00:00Z"),
        # Sat 03:00 local still belongs to Friday's window.
        ("weeknights", "2h", "2025-11-29T02:00:00Z", "2025-11-29T04:00:00Z"),
        # Sat noon: nothing until Mon 22:00.
        ("weeknights", "2h", "2025-11-29T11:00:00Z", "2025-12-01T23:00:00Z"),
        # 00:00-24:00 every day has no gap at midnight.
        ("fullday", "1h", "2025-11-27T22:30:00Z", "2025-11-27T23:30:00Z"),
    ],
)
async def test_overnight_window_deadline(
    tmp_path: Path, start_daemon, calendar_name: str, first_response: str, arrival: str, deadline: str
) -> None:
    daemon, clock = await start_at(tmp_path, start_daemon, one_team_rules("desk", calendar_name, first_response), arrival)
    await receive(daemon, clock)

    stored_deadline, next_escalation_at, _ = await conversation_row(daemon, "<m1@example.com>")
    assert stored_deadline == stored(deadline)
    assert next_escalation_at == stored(deadline)

    await move_to(daemon, clock, utc(deadline) - timedelta(seconds=1))
    assert escalations(tmp_path) == []
    await move_to(daemon, clock, utc(deadline))
    assert len(escalations(tmp_path)) == 1


def test_check_accepts_overnight_and_midnight_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = CALENDARS + "".join(team(name, name, "2h") for name in ("nightdesk", "weeknights", "fullday"))
    rules += '\n[[route]]\nname = "default"\nteam = "nightdesk"\ndefault = true\n'
    config = write_config(tmp_path, rules=rules)
    assert main(["inspect", "--config", str(config), "--by", "test", "--note", "overnight windows"]) == 0
    capsys.readouterr()

    assert main(["check", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_check_rejects_end_past_midnight(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = calendar("late", WEEKDAYS, "09:00-24:30") + team("desk", "late", "2h")
    rules += '\n[[route]]\nname = "default"\nteam = "desk"\ndefault = true\n'
    config = write_config(tmp_path, rules=rules)

    assert main(["check", "--config", str(config)]) == 2
    errors = capsys.readouterr().err
    assert "rules.toml" in errors
    assert "hours.mon" in errors
    assert "'09:00-24:30'" in errors


# -- what sets and what keeps the deadline -------------------------------------


async def test_route_first_response_overrides_team(tmp_path: Path, start_daemon) -> None:
    urgent = '\n[[route]]\nname = "urgent"\nteam = "support"\nfirst_response = "1h"\nany = [{ subject.contains = "urgent" }]\n'
    rules = one_team_rules("support", "paris-24x7", "4h", routes=urgent)
    daemon, clock = await start_at(tmp_path, start_daemon, rules, "2025-11-04T10:00:00Z")

    await receive(daemon, clock, "<urgent@example.com>", subject="Urgent: server room is flooding")
    await receive(daemon, clock, "<routine@example.com>", subject="Printer on floor 3 jams")

    urgent_deadline, urgent_next, _ = await conversation_row(daemon, "<urgent@example.com>")
    routine_deadline, _, _ = await conversation_row(daemon, "<routine@example.com>")
    assert urgent_deadline == stored("2025-11-04T11:00:00Z")
    assert urgent_next == stored("2025-11-04T11:00:00Z")
    assert routine_deadline == stored("2025-11-04T14:00:00Z")


async def test_customer_follow_up_keeps_deadline(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await start_at(tmp_path, start_daemon, one_team_rules("support", "paris-24x7", "4h"), "2025-11-04T10:00:00Z")
    await receive(daemon, clock, "<printer@example.com>")
    before = await conversation_row(daemon, "<printer@example.com>")

    await move_to(daemon, clock, utc("2025-11-04T12:00:00Z"))
    await receive(
        daemon, clock, "<printer-again@example.com>", subject="Re: Printer on floor 3 jams",
        extra_headers="In-Reply-To: <printer@example.com>\r\nReferences: <printer@example.com>\r\n",
    )

    dispositions = await daemon.store.fetch_all("SELECT message_id, disposition FROM messages ORDER BY id")
    assert [tuple(row) for row in dispositions] == [("<printer@example.com>", "new"), ("<printer-again@example.com>", "follow_up")]
    assert await conversation_row(daemon, "<printer@example.com>") == before
    assert before[0] == stored("2025-11-04T14:00:00Z")

    # The escalation still fires at the first message's deadline.
    await move_to(daemon, clock, utc("2025-11-04T13:59:59Z"))
    assert escalations(tmp_path) == []
    await move_to(daemon, clock, utc("2025-11-04T14:00:00Z"))
    assert len(escalations(tmp_path)) == 1


async def test_explicit_holiday_is_skipped(tmp_path: Path, start_daemon) -> None:
    # Tue 17:00 local: 1h on Tuesday, Wednesday is closed, 3h from Thu 09:00.
    rules = one_team_rules("support", "office-closed-nov-5", "4h")
    daemon, clock = await start_at(tmp_path, start_daemon, rules, "2025-11-04T16:00:00Z")
    await receive(daemon, clock)

    deadline, _, _ = await conversation_row(daemon, "<m1@example.com>")
    assert deadline != stored("2025-11-05T11:00:00Z")
    assert deadline == stored("2025-11-06T11:00:00Z")

    await move_to(daemon, clock, utc("2025-11-06T10:59:59Z"))
    assert escalations(tmp_path) == []
    await move_to(daemon, clock, utc("2025-11-06T11:00:00Z"))
    assert len(escalations(tmp_path)) == 1


async def test_country_holiday_is_skipped(tmp_path: Path) -> None:
    # Wed 24 Dec 17:00 local: 1h that day, Christmas is closed, 1h from Fri 09:00.
    config_path = write_config(tmp_path, rules=one_team_rules("support", "office-fr", "2h"))
    config = load_config(config_path)
    # Country holidays are loaded around the day the rules are read, so read
    # them as of December 2025 for the test to hold in any year.
    rules = load_rules(config.rules_dir, tmp_path, today=date(2025, 12, 1))
    clock = ManualClock(utc("2025-12-24T16:00:00Z"))
    daemon = Daemon(config, rules, clock=clock)
    await daemon.start()
    try:
        await receive(daemon, clock)
        deadline, _, _ = await conversation_row(daemon, "<m1@example.com>")
    finally:
        await daemon.stop()

    assert date(2025, 12, 25) in rules.teams["support"].calendar.holidays
    assert deadline != stored("2025-12-25T09:00:00Z")
    assert deadline == stored("2025-12-26T09:00:00Z")


# -- machine mail --------------------------------------------------------------


@pytest.mark.parametrize("header", ["Auto-Submitted: auto-generated", "Precedence: bulk"])
async def test_machine_mail_never_escalates(tmp_path: Path, start_daemon, header: str) -> None:
    daemon, clock = await start_at(tmp_path, start_daemon, one_team_rules("support", "paris-24x7", "1h"), "2025-11-04T10:00:00Z")
    await receive(daemon, clock, subject="Nightly backup report", extra_headers=f"{header}\r\n")

    deadline, next_escalation_at, _ = await conversation_row(daemon, "<m1@example.com>")
    assert deadline is None
    assert next_escalation_at is None
    events = await daemon.store.fetch_all("SELECT kind FROM events WHERE kind IN ('no_deadline', 'deadline_set')")
    assert [row[0] for row in events] == ["no_deadline"]

    # Well past any deadline the team's promise would have set.
    await move_to(daemon, clock, utc("2025-11-06T10:00:00Z"))
    assert escalations(tmp_path) == []
    _, _, level = await conversation_row(daemon, "<m1@example.com>")
    assert level == 0
    assert await daemon.store.fetch_all("SELECT state FROM conversations") == [("no_reply_needed",)]


async def test_person_joining_machine_mail_starts_clock(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await start_at(tmp_path, start_daemon, one_team_rules("support", "paris-24x7", "1h"), "2025-11-04T10:00:00Z")
    await receive(daemon, clock, subject="Nightly backup report", extra_headers="Auto-Submitted: auto-generated\r\n")
    await move_to(daemon, clock, utc("2025-11-04T10:30:00Z"))
    # A team member's reply to machine mail neither marks it answered nor starts a clock.
    await send(daemon.port, "sam@example.org", ["support@example.org"], message(
        sender="Sam Ortiz <sam@example.org>", subject="Re: Nightly backup report", message_id="<sam-1@example.org>",
        extra_headers="In-Reply-To: <m1@example.com>\r\n",
    ))
    staff_reply = await daemon.store.fetch_all("SELECT state, deadline, answered_at FROM conversations")

    await receive(daemon, clock, message_id="<m2@example.com>", subject="Re: Nightly backup report",
                  extra_headers="In-Reply-To: <m1@example.com>\r\n")

    assert staff_reply == [("no_reply_needed", None, None)]
    rows = await daemon.store.fetch_all("SELECT state, deadline, next_escalation_at FROM conversations")
    assert rows == [("open", stored("2025-11-04T11:30:00Z"), stored("2025-11-04T11:30:00Z"))]
    events = await daemon.store.fetch_all("SELECT kind FROM events WHERE kind IN ('no_deadline', 'deadline_set') ORDER BY id")
    assert [row[0] for row in events] == ["no_deadline", "deadline_set"]
    # The person who started the clock is acknowledged, with the conversation's reference.
    acknowledgements = await daemon.store.fetch_all("SELECT decision, signal FROM acknowledgements ORDER BY id")
    assert [tuple(row) for row in acknowledgements][-1] == ("sent", "")
    [(reference,)] = await daemon.store.fetch_all("SELECT reference FROM conversations")
    [(payload,)] = await daemon.store.fetch_all("SELECT payload FROM outbox WHERE kind = 'mail'")
    assert f"[{reference}]".encode() in bytes(payload).replace(b"\r\n ", b" ")
    await move_to(daemon, clock, utc("2025-11-04T11:29:00Z"))
    assert escalations(tmp_path) == []
    await move_to(daemon, clock, utc("2025-11-04T11:30:00Z"))
    assert len(escalations(tmp_path)) == 1


async def test_person_moves_machine_conversation(tmp_path: Path, start_daemon) -> None:
    # Machine mail goes to ops, whose chain escalates to Olga. A person's mail goes to support, whose chain escalates to Lee.
    ops = team("ops", "paris-24x7", "4h").replace(LEAD, "olga@example.org")
    routes = '\n[[route]]\nname = "monitoring"\nteam = "ops"\nall = [{ header.Auto-Submitted.is = "auto-generated" }]\n'
    rules = one_team_rules("support", "paris-24x7", "1h", routes=ops + routes)
    daemon, clock = await start_at(tmp_path, start_daemon, rules, "2025-11-04T10:00:00Z")
    await receive(daemon, clock, subject="Nightly backup report", extra_headers="Auto-Submitted: auto-generated\r\n")
    machine = await daemon.store.fetch_all("SELECT team, state FROM conversations")
    await move_to(daemon, clock, utc("2025-11-04T10:30:00Z"))

    await receive(daemon, clock, message_id="<m2@example.com>", subject="Re: Nightly backup report",
                  extra_headers="In-Reply-To: <m1@example.com>\r\n")
    await move_to(daemon, clock, utc("2025-11-04T11:29:00Z"))
    early = escalations(tmp_path)
    await move_to(daemon, clock, utc("2025-11-04T11:30:00Z"))

    assert [tuple(row) for row in machine] == [("ops", "no_reply_needed")]
    rows = await daemon.store.fetch_all("SELECT team, route, state, deadline FROM conversations")
    assert [tuple(row) for row in rows] == [("support", "default", "open", stored("2025-11-04T11:30:00Z"))]
    # The person's message reaches the team that now owns the conversation, and that team's chain escalates it.
    assert len(maildir_messages(tmp_path / "var" / "maildir" / "support")) == 1
    assert len(maildir_messages(tmp_path / "var" / "maildir" / "ops")) == 1
    assert early == []
    assert len(escalations(tmp_path)) == 1
    outbound = [email.message_from_bytes(data) for data in maildir_messages(tmp_path / "var" / "outbound")]
    assert [mail for mail in outbound if mail["X-Guardrail-Envelope-To"] == "olga@example.org"] == []
    [(detail,)] = await daemon.store.fetch_all("SELECT detail FROM events WHERE kind = 'team_changed'")
    assert '"reason": "a person\'s message routed to this team started the clock"' in detail


@pytest.mark.parametrize(
    ("span", "text"),
    [
        (timedelta(days=14), "14 days"),
        (timedelta(days=1), "1 day"),
        (timedelta(hours=12), "12 hours"),
        (timedelta(hours=36), "36 hours"),
        (timedelta(minutes=90), "90 minutes"),
        (timedelta(minutes=1), "1 minute"),
        (timedelta(seconds=45), "45 seconds"),
    ],
)
def test_span_text_table(span: timedelta, text: str) -> None:
    from guardrail.rules import span_text

    assert span_text(span) == text
