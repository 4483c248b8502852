"""On-call rotations: who is on call when, the rule-file errors, and escalations that go to the person on call."""

from __future__ import annotations

import email
import json
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import (
    case_file,
    chain_rules,
    example_copy,
    maildir_messages,
    rules_folder,
    send,
    settle,
    write_config,
)
from webhook_receiver import webhook_receiver

from guardrail.checks import Finding, rotation_findings
from guardrail.cli import main
from guardrail.clock import ManualClock
from guardrail.config import load_config
from guardrail.daemon import load_ruleset
from guardrail.errors import ConfigErrors
from guardrail.escalation import event_target, level_target, levels_passed, slack_body
from guardrail.rotations import Override, Rotation, next_handoff, on_call
from guardrail.rules import load_rules
from guardrail.rules_sla import Human

ANA = Human("Ana Early", "ana@example.org")
BEN = Human("Ben Late", "ben@example.org")
CEM = Human("Cem Night", "cem@example.org")
VIC = Human("Vic Swap", "vic@example.org")
WES = Human("Wes Swap", "wes@example.org")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def rotation(zone: str, handoff: str, shift_days: int, *overrides: Override, people: tuple[Human, ...] = (ANA, BEN, CEM)) -> Rotation:
    return Rotation("oncall", ZoneInfo(zone), datetime.fromisoformat(handoff), shift_days, people, overrides)


# Weekly from Monday 30 November 2026, 09:00 in Paris (08:00 UTC).
WEEKLY_PARIS = rotation("Europe/Paris", "2026-11-30T09:00", 7)
# Daily at 09:00 in Paris; clocks go forward on 29 March 2026 and back on 25 October 2026.
DAILY_PARIS_SPRING = rotation("Europe/Paris", "2026-03-27T09:00", 1)
DAILY_PARIS_AUTUMN = rotation("Europe/Paris", "2026-10-23T09:00", 1)
# Weekly at 09:00 in New York; clocks go back on 1 November 2026 and forward on 14 March 2027.
WEEKLY_NEW_YORK_AUTUMN = rotation("America/New_York", "2026-10-26T09:00", 7)
WEEKLY_NEW_YORK_SPRING = rotation("America/New_York", "2027-03-08T09:00", 7)
# Daily at 02:30 in Paris, a time that 29 March 2026 skips.
NIGHTLY_PARIS = rotation("Europe/Paris", "2026-03-27T02:30", 1)
# Vic covers 10:00 to 18:00 Paris time on 2 December; Wes covers 12:00 to 14:00 inside it, listed later.
OVERRIDDEN = rotation(
    "Europe/Paris", "2026-11-30T09:00", 7,
    Override(utc("2026-12-02T09:00"), utc("2026-12-02T17:00"), VIC),
    Override(utc("2026-12-02T11:00"), utc("2026-12-02T13:00"), WES),
)
# The same two overrides listed the other way round: Vic, listed last, wins where they overlap.
OVERRIDDEN_REVERSED = rotation(
    "Europe/Paris", "2026-11-30T09:00", 7,
    Override(utc("2026-12-02T11:00"), utc("2026-12-02T13:00"), WES),
    Override(utc("2026-12-02T09:00"), utc("2026-12-02T17:00"), VIC),
)


@pytest.mark.parametrize(("rotation_", "instant", "expected"), [
    # Around the first hand-off: before it, the order runs backwards, so the last person is on call.
    (WEEKLY_PARIS, "2026-11-30T07:59:59", CEM),
    (WEEKLY_PARIS, "2026-11-30T08:00:00", ANA),
    (WEEKLY_PARIS, "2026-11-23T08:00:00", CEM),
    (WEEKLY_PARIS, "2026-11-16T08:00:00", BEN),
    (WEEKLY_PARIS, "2020-01-01T00:00:00", WEEKLY_PARIS.people[-1 - ((utc("2026-11-30T08:00") - utc("2020-01-01")).days // 7) % 3]),
    # Around later hand-offs, and after the order wraps around.
    (WEEKLY_PARIS, "2026-12-07T07:59:59", ANA),
    (WEEKLY_PARIS, "2026-12-07T08:00:00", BEN),
    (WEEKLY_PARIS, "2026-12-14T08:00:00", CEM),
    (WEEKLY_PARIS, "2026-12-21T08:00:00", ANA),
    # Paris, spring: 09:00 is 08:00 UTC on 28 March and 07:00 UTC from 29 March on.
    (DAILY_PARIS_SPRING, "2026-03-28T07:59:59", ANA),
    (DAILY_PARIS_SPRING, "2026-03-28T08:00:00", BEN),
    (DAILY_PARIS_SPRING, "2026-03-29T06:59:59", BEN),
    (DAILY_PARIS_SPRING, "2026-03-29T07:00:00", CEM),
    (DAILY_PARIS_SPRING, "2026-03-30T06:59:59", CEM),
    (DAILY_PARIS_SPRING, "2026-03-30T07:00:00", ANA),
    # Paris, autumn: 09:00 is 07:00 UTC on 24 October and 08:00 UTC from 25 October on.
    (DAILY_PARIS_AUTUMN, "2026-10-24T06:59:59", ANA),
    (DAILY_PARIS_AUTUMN, "2026-10-24T07:00:00", BEN),
    (DAILY_PARIS_AUTUMN, "2026-10-25T07:00:00", BEN),
    (DAILY_PARIS_AUTUMN, "2026-10-25T07:59:59", BEN),
    (DAILY_PARIS_AUTUMN, "2026-10-25T08:00:00", CEM),
    # New York, autumn: the hand-off of 2 November is at 09:00 EST, 14:00 UTC, a week after 09:00 EDT, 13:00 UTC.
    (WEEKLY_NEW_YORK_AUTUMN, "2026-10-26T13:00:00", ANA),
    (WEEKLY_NEW_YORK_AUTUMN, "2026-11-02T13:59:59", ANA),
    (WEEKLY_NEW_YORK_AUTUMN, "2026-11-02T14:00:00", BEN),
    # New York, spring: 09:00 EST is 14:00 UTC on 8 March 2027, 09:00 EDT is 13:00 UTC on 15 March.
    (WEEKLY_NEW_YORK_SPRING, "2027-03-08T13:59:59", CEM),
    (WEEKLY_NEW_YORK_SPRING, "2027-03-08T14:00:00", ANA),
    (WEEKLY_NEW_YORK_SPRING, "2027-03-15T12:59:59", ANA),
    (WEEKLY_NEW_YORK_SPRING, "2027-03-15T13:00:00", BEN),
    # A hand-off at 02:30 on the night that skips it happens at 02:30 by the offset before the change, 01:30 UTC.
    (NIGHTLY_PARIS, "2026-03-29T01:29:59", BEN),
    (NIGHTLY_PARIS, "2026-03-29T01:30:00", CEM),
    (NIGHTLY_PARIS, "2026-03-30T00:29:59", CEM),
    (NIGHTLY_PARIS, "2026-03-30T00:30:00", ANA),
    # Overrides cover from their start up to, not including, their end.
    (OVERRIDDEN, "2026-12-02T08:59:59", ANA),
    (OVERRIDDEN, "2026-12-02T09:00:00", VIC),
    (OVERRIDDEN, "2026-12-02T10:59:59", VIC),
    (OVERRIDDEN, "2026-12-02T11:00:00", WES),
    (OVERRIDDEN, "2026-12-02T12:59:59", WES),
    (OVERRIDDEN, "2026-12-02T13:00:00", VIC),
    (OVERRIDDEN, "2026-12-02T16:59:59", VIC),
    (OVERRIDDEN, "2026-12-02T17:00:00", ANA),
    # Where overrides overlap, the one listed last wins.
    (OVERRIDDEN_REVERSED, "2026-12-02T11:00:00", VIC),
    (OVERRIDDEN_REVERSED, "2026-12-02T12:59:59", VIC),
    (OVERRIDDEN_REVERSED, "2026-12-02T17:00:00", ANA),
])
def test_on_call(rotation_: Rotation, instant: str, expected: Human) -> None:
    assert on_call(rotation_, utc(instant)) == expected


@pytest.mark.parametrize(("rotation_", "instant", "expected"), [
    (WEEKLY_PARIS, "2026-11-30T07:59:59", ("2026-11-30T08:00:00", ANA)),
    (WEEKLY_PARIS, "2026-11-30T08:00:00", ("2026-12-07T08:00:00", BEN)),
    (DAILY_PARIS_SPRING, "2026-03-28T12:00:00", ("2026-03-29T07:00:00", CEM)),
    # An override's edges are hand-offs too.
    (OVERRIDDEN, "2026-12-02T08:00:00", ("2026-12-02T09:00:00", VIC)),
    (OVERRIDDEN, "2026-12-02T11:30:00", ("2026-12-02T13:00:00", VIC)),
    (OVERRIDDEN, "2026-12-02T16:00:00", ("2026-12-02T17:00:00", ANA)),
    # An override for the person on call anyway hands off nothing, so the next regular shift is next.
    (rotation("Europe/Paris", "2026-11-30T09:00", 7, Override(utc("2026-12-01T00:00"), utc("2026-12-03T00:00"), ANA)),
     "2026-11-30T12:00:00", ("2026-12-07T08:00:00", BEN)),
    # Nobody else in the rotation.
    (rotation("Europe/Paris", "2026-11-30T09:00", 7, people=(ANA,)), "2026-11-30T12:00:00", None),
])
def test_next_handoff(rotation_: Rotation, instant: str, expected: tuple[str, Human] | None) -> None:
    handoff = next_handoff(rotation_, utc(instant))
    assert handoff == (None if expected is None else (utc(expected[0]), expected[1]))


ROTATION = """
[[rotation]]
name = "facilities-oncall"
timezone = "Europe/Paris"
handoff = 2026-03-27T09:00:00
shift = "1d"
people = [
    { name = "Ana Early", address = "ana@example.org" },
    { name = "Ben Late", address = "ben@example.org" },
]
"""


def team_rules(escalation: str, rotation_text: str = ROTATION, team_lines: str = "") -> str:
    """Return rules with `rotation_text` and one 24x7 team with a first response of 1h that escalates along `escalation`."""
    return rotation_text + chain_rules(escalation, team_lines)


ON_CALL_LEVEL = '[{ after = "0m", rotation = "facilities-oncall" }]'
PREFIX = "rotation[0] (facilities-oncall)"


@pytest.mark.parametrize(("rules", "key", "problem"), [
    (team_rules('[{ after = "0m", rotation = "facility-oncall" }]'), "team[0] (facilities).escalation[0].rotation",
     "rotation 'facility-oncall' does not exist; defined rotations: facilities-oncall"),
    (team_rules('[{ after = "0m", rotation = "facilities-oncall", name = "Ana Early", address = "ana@example.org" }]'),
     "team[0] (facilities).escalation[0].rotation",
     "a level names a rotation or a human, not both; remove name and address, or remove rotation"),
    (team_rules(ON_CALL_LEVEL, team_lines='escalation_contact = { rotation = "facilities-oncall" }'),
     "team[0] (facilities).escalation_contact.rotation",
     "a rotation cannot be named here; give a fixed human's name and address, and name the rotation in an escalation level"),
    (team_rules(ON_CALL_LEVEL, ROTATION.split("people")[0] + "people = []\n"), f"{PREFIX}.people",
     'invalid value []; expected a non-empty list of people in order, such as [{ name = "Sam Ortiz", address = "sam.ortiz@example.com" }, ...]'),
    (team_rules(ON_CALL_LEVEL, ROTATION.replace('    { name = "Ben Late", address = "ben@example.org" },\n', '    { name = "Ben Late" },\n')),
     f"{PREFIX}.people[1].address", "a named human needs both name and address"),
    (team_rules(ON_CALL_LEVEL, ROTATION.replace('{ name = "Ben Late", address = "ben@example.org" }', "{}")),
     f"{PREFIX}.people[1]", 'missing name and address; give both, such as { name = "Sam Ortiz", address = "sam.ortiz@example.com" }'),
    (team_rules(ON_CALL_LEVEL, ROTATION.replace('shift = "1d"', 'shift = "0d"')), f"{PREFIX}.shift",
     'invalid value \'0d\'; expected a positive whole number of days such as "7d", "1w" or "1d", of at most "36500d" (100 years)'),
    (team_rules(ON_CALL_LEVEL, ROTATION.replace('shift = "1d"', 'shift = "12h"')), f"{PREFIX}.shift",
     'invalid value \'12h\'; expected a positive whole number of days such as "7d", "1w" or "1d", of at most "36500d" (100 years)'),
    (team_rules(ON_CALL_LEVEL, ROTATION.replace('shift = "1d"\n', '')), f"{PREFIX}.shift",
     'missing; this key is required: a whole number of days such as "7d" or "1d"'),
    (team_rules(ON_CALL_LEVEL, ROTATION.replace("Europe/Paris", "Europe/Pariss")), f"{PREFIX}.timezone",
     "invalid value 'Europe/Pariss'; expected an IANA time zone such as \"Europe/Paris\""),
    (team_rules(ON_CALL_LEVEL, ROTATION.replace("handoff = 2026-03-27T09:00:00", "handoff = 2026-03-27T09:00:00+01:00")),
     f"{PREFIX}.handoff", "2026-03-27T09:00:00+01:00 has a UTC offset; remove it, because the timezone key gives the zone"),
    (team_rules(ON_CALL_LEVEL, ROTATION.replace("handoff = 2026-03-27T09:00:00", 'handoff = "next monday"')),
     f"{PREFIX}.handoff",
     "invalid value 'next monday'; expected a local date-time in the rotation's time zone, such as 2026-11-30T09:00:00 or \"2026-11-30T09:00\""),
    (team_rules(ON_CALL_LEVEL, ROTATION + 'overrides = [{ from = 2026-04-02T09:00:00, until = "2026-04-02T09:00",'
                ' name = "Vic Swap", address = "vic@example.org" }]'),
     f"{PREFIX}.overrides[0].until", "2026-04-02T09:00:00 is not after from (2026-04-02T09:00:00); set until after from"),
    (team_rules(ON_CALL_LEVEL, ROTATION + 'overrides = [{ from = 2026-04-02T09:00:00, until = 2026-04-03T09:00:00, name = "Vic Swap" }]'),
     f"{PREFIX}.overrides[0].address", "a named human needs both name and address"),
])
def test_rotation_rule_errors(tmp_path: Path, rules: str, key: str, problem: str) -> None:
    folder = rules_folder(tmp_path, rules)
    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)
    assert [str(error) for error in caught.value.errors] == [f"{folder / 'rules.toml'}: {key}: {problem}"]


def test_fallback_cannot_be_a_rotation(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, team_rules(ON_CALL_LEVEL))
    (folder / "20-fallback.toml").write_text('[escalation]\nfallback = { rotation = "facilities-oncall" }\n')
    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)
    # The shared rules define a fallback too, which is an error of its own.
    assert f"{folder / '20-fallback.toml'}: escalation.fallback.rotation: a rotation cannot be named here;" \
        " give a fixed human's name and address, and name the rotation in an escalation level" in [str(error) for error in caught.value.errors]


def test_rotation_level_ends_chain(tmp_path: Path) -> None:
    rules = load_rules(rules_folder(tmp_path, team_rules('[{ after = "0m", name = "Carol Tech", address = "carol@example.org" },'
                                                         ' { after = "1h", rotation = "facilities-oncall" }]')), tmp_path)
    [first, second] = rules.teams["facilities"].escalation
    assert first.human == Human("Carol Tech", "carol@example.org")
    assert second.rotation is rules.rotations["facilities-oncall"]
    # The people of a rotation that a chain names are escalation humans, whose replies answer.
    assert rules.is_staff("ana@example.org")
    assert rules.is_staff("ben@example.org")



@pytest.mark.parametrize(("escalation", "warned"), [
    (ON_CALL_LEVEL, False),
    ('[{ after = "0m", name = "Carol Tech", address = "carol@example.org" }]', True),
])
def test_unnamed_rotation_warning(tmp_path: Path, escalation: str, warned: bool) -> None:
    folder = rules_folder(tmp_path, team_rules(escalation))
    findings = rotation_findings(load_rules(folder, tmp_path))
    expected = [Finding(
        "warning", f"{folder / 'rules.toml'}: rotation facilities-oncall",
        'no escalation level names it, so nobody on it is ever told; add rotation = "facilities-oncall" to a level'
        " of a team's escalation, or remove the rotation",
    )]
    assert findings == (expected if warned else [])

def test_levels_passed_matches_rotation_by_name(tmp_path: Path) -> None:
    rules = load_rules(rules_folder(tmp_path, team_rules(
        '[{ after = "0m", rotation = "facilities-oncall" }, { after = "3h", name = "Erik Head", address = "erik@example.org" }]'
    )), tmp_path)
    team = rules.teams["facilities"]
    # Ben was on call when the level fired; Ana is now.
    fired = [event_target({"level": 1, "to": "ben@example.org", "rotation": "facilities-oncall"})]

    assert level_target(team.escalation[0]) == ("rotation:facilities-oncall", "")
    assert levels_passed(team, rules, fired) == 1
    assert levels_passed(team, rules, [("ben@example.org", "")]) == 0


def test_slack_text_names_rotation() -> None:
    body = {
        "reference": "GR-7K3M9Q", "level": 1, "human": {"name": "Ben Late", "address": "ben@example.org"},
        "rotation": "facilities-oncall", "subject": "Water leak", "sender": "alice@example.com", "team": "facilities",
        "route": "default", "answer_command": "guardrail answer GR-7K3M9Q",
    }
    assert slack_body(body)["text"].splitlines()[0] == (
        ":rotating_light: GR-7K3M9Q unanswered past its deadline (level 1) for Ben Late, on call for facilities-oncall"
    )


@pytest.mark.parametrize(("at", "lines"), [
    ("2026-12-15T00:00:00Z", [
        "on call at 2026-12-15T00:00:00Z:",
        "rotation support-oncall (Europe/Paris):",
        "  now:  Lea Martin <lea.martin@example.com>, by override until Mon 21 Dec 2026 09:00 CET (08:00 UTC)",
        "  next: Sam Ortiz <sam.ortiz@example.com> from Mon 28 Dec 2026 09:00 CET (08:00 UTC)",
    ]),
    ("2026-11-30T09:00:00+01:00", [
        "on call at 2026-11-30T08:00:00Z:",
        "rotation support-oncall (Europe/Paris):",
        "  now:  Sam Ortiz <sam.ortiz@example.com>",
        "  next: Lea Martin <lea.martin@example.com> from Mon 7 Dec 2026 09:00 CET (08:00 UTC)",
    ]),
])
def test_oncall_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], at: str, lines: list[str]) -> None:
    config = example_copy(tmp_path)
    assert main(["oncall", "--config", str(config), "--at", at]) == 0
    assert capsys.readouterr().out.splitlines() == lines


def test_oncall_command_needs_offset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = example_copy(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["oncall", "--config", str(config), "--at", "2026-12-15T09:00"])
    assert exited.value.code == 2
    assert "--at: invalid value '2026-12-15T09:00'; expected an ISO 8601 date-time with a UTC offset" in capsys.readouterr().err


def escalations(folder: Path) -> list[Message]:
    outbound = [email.message_from_bytes(data) for data in maildir_messages(folder / "var" / "outbound")]
    return [mail for mail in outbound if mail["Auto-Submitted"] == "auto-generated"]


def escalated_to(folder: Path) -> list[tuple[str, str]]:
    """Return the recipient and subject reference of each escalation mail, in the order of their subjects."""
    return sorted((mail["X-Guardrail-Conversation"], mail["X-Guardrail-Envelope-To"]) for mail in escalations(folder))


def message(number: int) -> bytes:
    return case_file("escalation", "message.eml").replace(b"<leak-12@example.com>", f"<leak-{number}@example.com>".encode())


async def advance(daemon, clock: ManualClock, until: datetime) -> None:
    """Move the clock to `until` in steps of five minutes, letting the daemon handle each step."""
    while clock.now() < until:
        await clock.set(min(clock.now() + timedelta(minutes=5), until))
        await settle(daemon, clock)


async def references(daemon) -> list[str]:
    rows = await daemon.store.fetch_all("SELECT reference FROM conversations ORDER BY id")
    return [row[0] for row in rows]


async def test_escalation_goes_to_person_on_call(tmp_path: Path, start_daemon) -> None:
    # Paris clocks go forward on 29 March 2026, so the 09:00 hand-off from Ben to Ana is at 07:00 UTC.
    with webhook_receiver() as receiver:
        chain = f'[{{ after = "0m", rotation = "facilities-oncall", webhook = {{ url = "{receiver.url}" }} }}]'
        config = write_config(tmp_path, rules=team_rules(chain))
        clock = ManualClock(utc("2026-03-29T05:30:00"))
        daemon = await start_daemon(config, clock=clock)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message(1))
        await advance(daemon, clock, utc("2026-03-29T06:15:00"))
        await send(daemon.port, "alice@example.com", ["support@example.org"], message(2))

        await advance(daemon, clock, utc("2026-03-29T06:35:00"))
        first, second = await references(daemon)
        before_handoff = escalated_to(tmp_path)
        await advance(daemon, clock, utc("2026-03-29T07:20:00"))
        bodies = [json.loads(request.body) for request in receiver.requests]
        events = await daemon.store.fetch_all("SELECT detail FROM events WHERE kind = 'escalated' ORDER BY id")

    assert before_handoff == [(first, "ben@example.org")]
    assert escalated_to(tmp_path) == sorted([(first, "ben@example.org"), (second, "ana@example.org")])
    texts = {mail["X-Guardrail-Conversation"]: mail.get_payload(decode=True).decode() for mail in escalations(tmp_path)}
    assert texts[first].startswith("Hello Ben Late,")
    assert "You are on call for rotation facilities-oncall, so this escalation comes to you." in texts[first]
    assert [(body["reference"], body["human"], body["rotation"]) for body in bodies] == [
        (first, {"name": "Ben Late", "address": "ben@example.org"}, "facilities-oncall"),
        (second, {"name": "Ana Early", "address": "ana@example.org"}, "facilities-oncall"),
    ]
    details = [json.loads(row[0]) for row in events]
    assert [(detail["to"], detail["rotation"]) for detail in details] == [
        ("ben@example.org", "facilities-oncall"), ("ana@example.org", "facilities-oncall"),
    ]


async def test_reload_after_handoff_fires_nothing_twice(tmp_path: Path, start_daemon) -> None:
    erik = '{ after = "HOURS", name = "Erik Head", address = "erik@example.org" }'
    config = write_config(tmp_path, rules=team_rules(f'[{{ after = "0m", rotation = "facilities-oncall" }}, {erik.replace("HOURS", "3h")}]'))
    clock = ManualClock(utc("2026-03-29T05:30:00"))
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(1))
    await advance(daemon, clock, utc("2026-03-29T07:10:00"))
    (reference,) = await references(daemon)

    # Ana came on call at 07:00 UTC, after Ben got the escalation at 06:30. The reload finds the level that fired by its rotation.
    (tmp_path / "rules" / "rules.toml").write_text(
        team_rules(f'[{{ after = "0m", rotation = "facilities-oncall" }}, {erik.replace("HOURS", "2h")}]')
    )
    assert daemon.reload() is True
    assert daemon.rescheduling is not None
    await daemon.rescheduling
    await advance(daemon, clock, utc("2026-03-29T08:35:00"))

    assert escalated_to(tmp_path) == [(reference, "ben@example.org"), (reference, "erik@example.org")]


async def test_restart_escalates_to_current_on_call(tmp_path: Path, start_daemon) -> None:
    config = write_config(tmp_path, rules=team_rules(ON_CALL_LEVEL))
    clock = ManualClock(utc("2026-03-29T05:30:00"))
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(1))
    await advance(daemon, clock, utc("2026-03-29T06:00:00"))
    (reference,) = await references(daemon)
    await daemon.stop()

    # Ben was on call at the 06:30 deadline; the daemon starts again after Ana came on call at 07:00.
    clock = ManualClock(utc("2026-03-29T07:30:00"))
    daemon = await start_daemon(config, clock=clock)
    await advance(daemon, clock, utc("2026-03-29T07:40:00"))

    assert escalated_to(tmp_path) == [(reference, "ana@example.org")]


def test_example_rules_name_a_rotation() -> None:
    rules = load_ruleset(load_config(Path(__file__).resolve().parents[1] / "config.example.toml"))
    assert on_call(rules.rotations["support-oncall"], utc("2026-12-15T00:00:00")) == Human("Lea Martin", "lea.martin@example.com")
