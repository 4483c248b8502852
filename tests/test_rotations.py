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
from guardrail.rotations import (
    Override,
    Rotation,
    handoff_at,
    local_instant,
    next_handoff,
    on_call,
    shift_at,
)
from guardrail.rules import load_rules
from guardrail.rules_sla import Human
from guardrail.tomlcheck import parse_duration

ANA = Human("Ana Early", "ana@example.org")
BEN = Human("Ben Late", "ben@example.org")
CEM = Human("Cem Night", "cem@example.org")
VIC = Human("Vic Swap", "vic@example.org")
WES = Human("Wes Swap", "wes@example.org")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def rotation(zone: str, handoff: str, shift: str, *overrides: Override, people: tuple[Human, ...] = (ANA, BEN, CEM)) -> Rotation:
    return Rotation("oncall", ZoneInfo(zone), datetime.fromisoformat(handoff), parse_duration(shift), people, overrides)


# Weekly from Monday 30 November 2026, 09:00 in Paris (08:00 UTC).
WEEKLY_PARIS = rotation("Europe/Paris", "2026-11-30T09:00", "7d")
# Daily at 09:00 in Paris; clocks go forward on 29 March 2026 and back on 25 October 2026.
DAILY_PARIS_SPRING = rotation("Europe/Paris", "2026-03-27T09:00", "1d")
DAILY_PARIS_AUTUMN = rotation("Europe/Paris", "2026-10-23T09:00", "1d")
# Weekly at 09:00 in New York; clocks go back on 1 November 2026 and forward on 14 March 2027.
WEEKLY_NEW_YORK_AUTUMN = rotation("America/New_York", "2026-10-26T09:00", "7d")
WEEKLY_NEW_YORK_SPRING = rotation("America/New_York", "2027-03-08T09:00", "7d")
# Daily at 02:30 in Paris, a time that 29 March 2026 skips.
NIGHTLY_PARIS = rotation("Europe/Paris", "2026-03-27T02:30", "1d")
# Vic covers 10:00 to 18:00 Paris time on 2 December; Wes covers 12:00 to 14:00 inside it, listed later.
OVERRIDDEN = rotation(
    "Europe/Paris", "2026-11-30T09:00", "7d",
    Override(utc("2026-12-02T09:00"), utc("2026-12-02T17:00"), VIC),
    Override(utc("2026-12-02T11:00"), utc("2026-12-02T13:00"), WES),
)
# The same two overrides listed the other way round: Vic, listed last, wins where they overlap.
OVERRIDDEN_REVERSED = rotation(
    "Europe/Paris", "2026-11-30T09:00", "7d",
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
    (rotation("Europe/Paris", "2026-11-30T09:00", "7d", Override(utc("2026-12-01T00:00"), utc("2026-12-03T00:00"), ANA)),
     "2026-11-30T12:00:00", ("2026-12-07T08:00:00", BEN)),
    # Nobody else in the rotation.
    (rotation("Europe/Paris", "2026-11-30T09:00", "7d", people=(ANA,)), "2026-11-30T12:00:00", None),
])
def test_next_handoff(rotation_: Rotation, instant: str, expected: tuple[str, Human] | None) -> None:
    handoff = next_handoff(rotation_, utc(instant))
    assert handoff == (None if expected is None else (utc(expected[0]), expected[1]))


# Follow the sun from Tuesday 1 December 2026 in Paris (CET, UTC+1): Ana 08:00-16:00, Ben 16:00-24:00, Cem 00:00-08:00,
# so the hand-offs are at 07:00, 15:00 and 23:00 UTC every day. Vic covers 12:00 to 18:00 UTC on 1 December.
EIGHT_HOURS_PARIS = rotation("Europe/Paris", "2026-12-01T08:00", "8h")
EIGHT_HOURS_OVERRIDDEN = rotation(
    "Europe/Paris", "2026-12-01T08:00", "8h", Override(utc("2026-12-01T12:00"), utc("2026-12-01T18:00"), VIC),
)
# Hourly in Paris from the midnight before each daylight-saving change, and the same in New York.
HOURLY_PARIS_SPRING = rotation("Europe/Paris", "2026-03-29T00:00", "1h")
HOURLY_PARIS_AUTUMN = rotation("Europe/Paris", "2026-10-25T00:00", "1h")
HOURLY_NEW_YORK_SPRING = rotation("America/New_York", "2027-03-14T00:00", "1h")
HOURLY_NEW_YORK_AUTUMN = rotation("America/New_York", "2026-11-01T00:00", "1h")
# Eight-hour shifts from 08:00 on the day before each change: Cem's night shift spans it.
EIGHT_HOURS_PARIS_SPRING = rotation("Europe/Paris", "2026-03-28T08:00", "8h")
EIGHT_HOURS_PARIS_AUTUMN = rotation("Europe/Paris", "2026-10-24T08:00", "8h")
EIGHT_HOURS_NEW_YORK_SPRING = rotation("America/New_York", "2027-03-13T08:00", "8h")
EIGHT_HOURS_NEW_YORK_AUTUMN = rotation("America/New_York", "2026-10-31T08:00", "8h")
# Twelve-hour shifts: Ana from 02:30 and Ben from 14:30 in Paris, a hand-off time that spring skips and autumn repeats;
# Ana from 07:00 and Ben from 19:00 in New York.
TWELVE_HOURS_PARIS_SPRING = rotation("Europe/Paris", "2026-03-28T02:30", "12h", people=(ANA, BEN))
TWELVE_HOURS_PARIS_AUTUMN = rotation("Europe/Paris", "2026-10-24T02:30", "12h", people=(ANA, BEN))
TWELVE_HOURS_NEW_YORK_SPRING = rotation("America/New_York", "2027-03-13T07:00", "12h", people=(ANA, BEN))
TWELVE_HOURS_NEW_YORK_AUTUMN = rotation("America/New_York", "2026-10-31T07:00", "12h", people=(ANA, BEN))
# Hourly at half past in Antarctica/Troll, whose clocks go from UTC+0 to UTC+2 at 01:00 UTC on 29 March 2026
# and back at 01:00 UTC on 25 October 2026: the shift estimated from wall-clock time is two shifts off.
HOURLY_TROLL_SPRING = rotation("Antarctica/Troll", "2026-03-29T00:30", "1h")
HOURLY_TROLL_AUTUMN = rotation("Antarctica/Troll", "2026-10-25T00:30", "1h")


@pytest.mark.parametrize(("rotation_", "instant", "expected"), [
    # Around each daily hand-off.
    (EIGHT_HOURS_PARIS, "2026-12-01T06:59:59", CEM),
    (EIGHT_HOURS_PARIS, "2026-12-01T07:00:00", ANA),
    (EIGHT_HOURS_PARIS, "2026-12-01T14:59:59", ANA),
    (EIGHT_HOURS_PARIS, "2026-12-01T15:00:00", BEN),
    (EIGHT_HOURS_PARIS, "2026-12-01T22:59:59", BEN),
    (EIGHT_HOURS_PARIS, "2026-12-01T23:00:00", CEM),
    (EIGHT_HOURS_PARIS, "2026-12-02T06:59:59", CEM),
    (EIGHT_HOURS_PARIS, "2026-12-02T07:00:00", ANA),
    (EIGHT_HOURS_PARIS, "2026-12-24T15:00:00", BEN),
    # Before the first hand-off the order runs backwards, shift by shift.
    (EIGHT_HOURS_PARIS, "2026-11-30T23:00:00", CEM),
    (EIGHT_HOURS_PARIS, "2026-11-30T22:59:59", BEN),
    (EIGHT_HOURS_PARIS, "2026-11-30T15:00:00", BEN),
    (EIGHT_HOURS_PARIS, "2026-11-30T14:59:59", ANA),
    # Paris, spring, hourly: 02:00 is skipped and maps to 01:00 UTC like 03:00 CEST, so Cem's shift is empty.
    (HOURLY_PARIS_SPRING, "2026-03-28T23:00:00", ANA),
    (HOURLY_PARIS_SPRING, "2026-03-29T00:59:59", BEN),
    (HOURLY_PARIS_SPRING, "2026-03-29T01:00:00", ANA),
    (HOURLY_PARIS_SPRING, "2026-03-29T01:59:59", ANA),
    (HOURLY_PARIS_SPRING, "2026-03-29T02:00:00", BEN),
    # Paris, autumn, hourly: Cem's shift from the first 02:00 CEST (00:00 UTC) to 03:00 CET (02:00 UTC) lasts two hours.
    (HOURLY_PARIS_AUTUMN, "2026-10-24T23:59:59", BEN),
    (HOURLY_PARIS_AUTUMN, "2026-10-25T00:00:00", CEM),
    (HOURLY_PARIS_AUTUMN, "2026-10-25T01:00:00", CEM),
    (HOURLY_PARIS_AUTUMN, "2026-10-25T01:59:59", CEM),
    (HOURLY_PARIS_AUTUMN, "2026-10-25T02:00:00", ANA),
    # New York, spring, hourly: 02:00 is skipped, so Cem's shift is empty and Ana follows Ben at 07:00 UTC.
    (HOURLY_NEW_YORK_SPRING, "2027-03-14T06:59:59", BEN),
    (HOURLY_NEW_YORK_SPRING, "2027-03-14T07:00:00", ANA),
    (HOURLY_NEW_YORK_SPRING, "2027-03-14T08:00:00", BEN),
    # New York, autumn, hourly: Ben's shift from the first 01:00 EDT (05:00 UTC) to 02:00 EST (07:00 UTC) lasts two hours.
    (HOURLY_NEW_YORK_AUTUMN, "2026-11-01T04:59:59", ANA),
    (HOURLY_NEW_YORK_AUTUMN, "2026-11-01T05:00:00", BEN),
    (HOURLY_NEW_YORK_AUTUMN, "2026-11-01T06:00:00", BEN),
    (HOURLY_NEW_YORK_AUTUMN, "2026-11-01T06:59:59", BEN),
    (HOURLY_NEW_YORK_AUTUMN, "2026-11-01T07:00:00", CEM),
    # Eight hours: Cem's night from 00:00 local is seven hours long in spring and nine in autumn.
    (EIGHT_HOURS_PARIS_SPRING, "2026-03-28T22:59:59", BEN),
    (EIGHT_HOURS_PARIS_SPRING, "2026-03-28T23:00:00", CEM),
    (EIGHT_HOURS_PARIS_SPRING, "2026-03-29T05:59:59", CEM),
    (EIGHT_HOURS_PARIS_SPRING, "2026-03-29T06:00:00", ANA),
    (EIGHT_HOURS_PARIS_SPRING, "2026-03-29T14:00:00", BEN),
    (EIGHT_HOURS_PARIS_AUTUMN, "2026-10-24T22:00:00", CEM),
    (EIGHT_HOURS_PARIS_AUTUMN, "2026-10-25T06:59:59", CEM),
    (EIGHT_HOURS_PARIS_AUTUMN, "2026-10-25T07:00:00", ANA),
    (EIGHT_HOURS_PARIS_AUTUMN, "2026-10-25T15:00:00", BEN),
    (EIGHT_HOURS_NEW_YORK_SPRING, "2027-03-14T05:00:00", CEM),
    (EIGHT_HOURS_NEW_YORK_SPRING, "2027-03-14T11:59:59", CEM),
    (EIGHT_HOURS_NEW_YORK_SPRING, "2027-03-14T12:00:00", ANA),
    (EIGHT_HOURS_NEW_YORK_AUTUMN, "2026-11-01T04:00:00", CEM),
    (EIGHT_HOURS_NEW_YORK_AUTUMN, "2026-11-01T12:59:59", CEM),
    (EIGHT_HOURS_NEW_YORK_AUTUMN, "2026-11-01T13:00:00", ANA),
    # Twelve hours in Paris: the skipped 02:30 starts Ana's shift at 01:30 UTC, and the repeated 02:30 at its first
    # occurrence, 00:30 UTC.
    (TWELVE_HOURS_PARIS_SPRING, "2026-03-28T13:30:00", BEN),
    (TWELVE_HOURS_PARIS_SPRING, "2026-03-29T01:29:59", BEN),
    (TWELVE_HOURS_PARIS_SPRING, "2026-03-29T01:30:00", ANA),
    (TWELVE_HOURS_PARIS_SPRING, "2026-03-29T12:29:59", ANA),
    (TWELVE_HOURS_PARIS_SPRING, "2026-03-29T12:30:00", BEN),
    (TWELVE_HOURS_PARIS_AUTUMN, "2026-10-25T00:29:59", BEN),
    (TWELVE_HOURS_PARIS_AUTUMN, "2026-10-25T00:30:00", ANA),
    (TWELVE_HOURS_PARIS_AUTUMN, "2026-10-25T01:30:00", ANA),
    (TWELVE_HOURS_PARIS_AUTUMN, "2026-10-25T13:29:59", ANA),
    (TWELVE_HOURS_PARIS_AUTUMN, "2026-10-25T13:30:00", BEN),
    # Twelve hours in New York: Ben's night is eleven hours long in spring and thirteen in autumn.
    (TWELVE_HOURS_NEW_YORK_SPRING, "2027-03-14T00:00:00", BEN),
    (TWELVE_HOURS_NEW_YORK_SPRING, "2027-03-14T10:59:59", BEN),
    (TWELVE_HOURS_NEW_YORK_SPRING, "2027-03-14T11:00:00", ANA),
    (TWELVE_HOURS_NEW_YORK_AUTUMN, "2026-10-31T23:00:00", BEN),
    (TWELVE_HOURS_NEW_YORK_AUTUMN, "2026-11-01T11:59:59", BEN),
    (TWELVE_HOURS_NEW_YORK_AUTUMN, "2026-11-01T12:00:00", ANA),
    # An override over a sub-day shift hides the hand-off at 15:00 UTC under it.
    (EIGHT_HOURS_OVERRIDDEN, "2026-12-01T11:59:59", ANA),
    (EIGHT_HOURS_OVERRIDDEN, "2026-12-01T12:00:00", VIC),
    (EIGHT_HOURS_OVERRIDDEN, "2026-12-01T15:00:00", VIC),
    (EIGHT_HOURS_OVERRIDDEN, "2026-12-01T17:59:59", VIC),
    (EIGHT_HOURS_OVERRIDDEN, "2026-12-01T18:00:00", BEN),
    (EIGHT_HOURS_OVERRIDDEN, "2026-12-01T23:00:00", CEM),
])
def test_on_call_sub_day_shifts(rotation_: Rotation, instant: str, expected: Human) -> None:
    assert on_call(rotation_, utc(instant)) == expected


@pytest.mark.parametrize(("rotation_", "instant", "expected"), [
    (EIGHT_HOURS_PARIS, "2026-12-01T07:00:00", 0),
    (EIGHT_HOURS_PARIS, "2026-12-01T15:00:00", 1),
    (EIGHT_HOURS_PARIS, "2026-12-02T07:00:00", 3),
    (EIGHT_HOURS_PARIS, "2026-12-01T06:59:59", -1),
    (EIGHT_HOURS_PARIS, "2026-11-30T07:00:00", -3),
    (EIGHT_HOURS_PARIS, "2026-11-30T06:59:59", -4),
    # Shift 2, from the skipped 02:00, is empty: shift 3 starts at the same instant.
    (HOURLY_PARIS_SPRING, "2026-03-29T00:59:59", 1),
    (HOURLY_PARIS_SPRING, "2026-03-29T01:00:00", 3),
    # Shift 2, from the first 02:00, runs through the repeated hour.
    (HOURLY_PARIS_AUTUMN, "2026-10-25T00:59:59", 2),
    (HOURLY_PARIS_AUTUMN, "2026-10-25T01:00:00", 2),
    (HOURLY_PARIS_AUTUMN, "2026-10-25T02:00:00", 3),
    # 01:15 UTC is 03:15 at UTC+2, in shift 2 by wall-clock time. Shifts 2 and 1 start at the skipped 02:30 and 01:30,
    # by the old offset 02:30 and 01:30 UTC, both after 01:15 UTC, so it takes two steps back to shift 0 from 00:30 UTC.
    (HOURLY_TROLL_SPRING, "2026-03-29T00:29:59", -1),
    (HOURLY_TROLL_SPRING, "2026-03-29T01:15:00", 0),
    (HOURLY_TROLL_SPRING, "2026-03-29T01:30:00", 3),
    (HOURLY_TROLL_SPRING, "2026-03-29T02:30:00", 4),
    # 01:15 UTC is the second 01:15 at UTC+0, in shift 0 by wall-clock time. Shifts 1 and 2 start at the first 01:30 and
    # 02:30, 23:30 and 00:30 UTC, both before 01:15 UTC, so it takes two steps forward to shift 2, which lasts until 03:30 UTC.
    (HOURLY_TROLL_AUTUMN, "2026-10-25T01:15:00", 2),
    (HOURLY_TROLL_AUTUMN, "2026-10-25T03:29:59", 2),
    (HOURLY_TROLL_AUTUMN, "2026-10-25T03:30:00", 3),
])
def test_shift_at_sub_day_shifts(rotation_: Rotation, instant: str, expected: int) -> None:
    assert shift_at(rotation_, utc(instant)) == expected


@pytest.mark.parametrize("rotation_", [
    HOURLY_PARIS_SPRING, HOURLY_PARIS_AUTUMN, HOURLY_NEW_YORK_SPRING, HOURLY_NEW_YORK_AUTUMN,
    EIGHT_HOURS_PARIS_SPRING, EIGHT_HOURS_NEW_YORK_AUTUMN, TWELVE_HOURS_PARIS_SPRING, TWELVE_HOURS_PARIS_AUTUMN,
    HOURLY_TROLL_SPRING, HOURLY_TROLL_AUTUMN, DAILY_PARIS_SPRING, NIGHTLY_PARIS,
], ids=lambda rotation_: f"{rotation_.zone.key}-{rotation_.handoff:%Y-%m-%dT%H:%M}-{rotation_.shift}")
def test_shift_at_lies_between_handoffs(rotation_: Rotation) -> None:
    # Every five minutes for three days from half a day before `handoff`, which takes in each rotation's change of offset,
    # the shift found started at or before the instant, and the next one starts after it.
    start = local_instant(rotation_.handoff, rotation_.zone) - timedelta(hours=12)
    for step in range(3 * 24 * 12):
        instant = start + step * timedelta(minutes=5)
        shift = shift_at(rotation_, instant)
        assert handoff_at(rotation_, shift) <= instant < handoff_at(rotation_, shift + 1), instant


@pytest.mark.parametrize(("rotation_", "instant", "expected"), [
    (EIGHT_HOURS_PARIS, "2026-12-01T06:59:59", ("2026-12-01T07:00:00", ANA)),
    (EIGHT_HOURS_PARIS, "2026-12-01T07:00:00", ("2026-12-01T15:00:00", BEN)),
    (EIGHT_HOURS_PARIS, "2026-12-01T15:00:00", ("2026-12-01T23:00:00", CEM)),
    (EIGHT_HOURS_PARIS, "2026-12-01T23:00:00", ("2026-12-02T07:00:00", ANA)),
    (EIGHT_HOURS_PARIS, "2026-11-30T12:00:00", ("2026-11-30T15:00:00", BEN)),
    # Cem's empty shift passes Cem over: Ana follows Ben.
    (HOURLY_PARIS_SPRING, "2026-03-29T00:30:00", ("2026-03-29T01:00:00", ANA)),
    (HOURLY_NEW_YORK_SPRING, "2027-03-14T06:30:00", ("2027-03-14T07:00:00", ANA)),
    (HOURLY_PARIS_AUTUMN, "2026-10-25T00:30:00", ("2026-10-25T02:00:00", ANA)),
    (HOURLY_NEW_YORK_AUTUMN, "2026-11-01T05:30:00", ("2026-11-01T07:00:00", CEM)),
    (EIGHT_HOURS_PARIS_SPRING, "2026-03-28T23:30:00", ("2026-03-29T06:00:00", ANA)),
    (EIGHT_HOURS_NEW_YORK_AUTUMN, "2026-11-01T04:30:00", ("2026-11-01T13:00:00", ANA)),
    (TWELVE_HOURS_PARIS_SPRING, "2026-03-28T20:00:00", ("2026-03-29T01:30:00", ANA)),
    (TWELVE_HOURS_PARIS_AUTUMN, "2026-10-24T20:00:00", ("2026-10-25T00:30:00", ANA)),
    (TWELVE_HOURS_NEW_YORK_SPRING, "2027-03-14T00:00:00", ("2027-03-14T11:00:00", ANA)),
    (TWELVE_HOURS_NEW_YORK_AUTUMN, "2026-11-01T00:00:00", ("2026-11-01T12:00:00", ANA)),
    # Ana's shift from 00:30 UTC runs on into shift 3, hers too, which starts at 01:30 UTC; Ben follows at 02:30 UTC.
    (HOURLY_TROLL_SPRING, "2026-03-29T00:45:00", ("2026-03-29T02:30:00", BEN)),
    # The hand-off at 15:00 UTC under the override hands off nothing.
    (EIGHT_HOURS_OVERRIDDEN, "2026-12-01T10:00:00", ("2026-12-01T12:00:00", VIC)),
    (EIGHT_HOURS_OVERRIDDEN, "2026-12-01T13:00:00", ("2026-12-01T18:00:00", BEN)),
    # A two-month override over hourly shifts ends after more hand-offs than next_handoff searches.
    (rotation("Europe/Paris", "2026-12-01T00:00", "1h", Override(utc("2026-12-01T00:00"), utc("2027-02-01T00:00"), VIC)),
     "2026-12-01T00:00:00", ("2027-02-01T00:00:00", BEN)),
])
def test_next_handoff_sub_day_shifts(rotation_: Rotation, instant: str, expected: tuple[str, Human]) -> None:
    assert next_handoff(rotation_, utc(instant)) == (utc(expected[0]), expected[1])


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
SHIFT_EXPECTED = (
    'a positive whole number of days such as "7d", "1w" or "1d", of at most "36500d" (100 years),'
    ' or a whole number of hours that divides 24: "1h", "2h", "3h", "4h", "6h", "8h" or "12h"'
)
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
    *[(team_rules(ON_CALL_LEVEL, ROTATION.replace('shift = "1d"', f"shift = {value}")), f"{PREFIX}.shift",
       f"invalid value {shown}; expected {SHIFT_EXPECTED}")
      for value, shown in [
          ('"0d"', "'0d'"), ('"0h"', "'0h'"), ('"5h"', "'5h'"), ('"90m"', "'90m'"), ('"1.5h"', "'1.5h'"), ('"36h"', "'36h'"),
          ('"25h"', "'25h'"), ('"36501d"', "'36501d'"), ("5400", "5400"), ('"8 hours"', "'8 hours'"),
      ]],
    (team_rules(ON_CALL_LEVEL, ROTATION.replace('shift = "1d"\n', '')), f"{PREFIX}.shift",
     f"missing; this key is required: {SHIFT_EXPECTED}"),
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


@pytest.mark.parametrize(("value", "expected"), [
    ('"1h"', timedelta(hours=1)),
    ('"2h"', timedelta(hours=2)),
    ('"3h"', timedelta(hours=3)),
    ('"4h"', timedelta(hours=4)),
    ('"6h"', timedelta(hours=6)),
    ('"8h"', timedelta(hours=8)),
    ('"12h"', timedelta(hours=12)),
    ("28800", timedelta(hours=8)),
    ('"24h"', timedelta(days=1)),
    ('"48h"', timedelta(days=2)),
    ('"1d"', timedelta(days=1)),
    ('"1w"', timedelta(days=7)),
])
def test_rotation_shift_lengths(tmp_path: Path, value: str, expected: timedelta) -> None:
    rules = load_rules(rules_folder(tmp_path, team_rules(ON_CALL_LEVEL, ROTATION.replace('shift = "1d"', f"shift = {value}"))), tmp_path)
    assert rules.rotations["facilities-oncall"].shift == expected


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


FOLLOW_THE_SUN = """
[[rotation]]
name = "facilities-oncall"
timezone = "Europe/Paris"
handoff = 2026-12-01T08:00:00
shift = "8h"
people = [
    { name = "Ana Early", address = "ana@example.org" },
    { name = "Ben Late", address = "ben@example.org" },
    { name = "Cem Night", address = "cem@example.org" },
]
"""


@pytest.mark.parametrize(("at", "lines"), [
    ("2026-12-01T14:30:00Z", [
        "on call at 2026-12-01T14:30:00Z:",
        "rotation facilities-oncall (Europe/Paris):",
        "  now:  Ana Early <ana@example.org>",
        "  next: Ben Late <ben@example.org> from Tue 1 Dec 2026 16:00 CET (15:00 UTC)",
    ]),
    ("2026-12-01T23:30:00+01:00", [
        "on call at 2026-12-01T22:30:00Z:",
        "rotation facilities-oncall (Europe/Paris):",
        "  now:  Ben Late <ben@example.org>",
        "  next: Cem Night <cem@example.org> from Wed 2 Dec 2026 00:00 CET (23:00 UTC)",
    ]),
    # Before the first hand-off, on the night the clocks go forward: Cem's night shift lasts seven hours.
    ("2026-03-29T00:30:00Z", [
        "on call at 2026-03-29T00:30:00Z:",
        "rotation facilities-oncall (Europe/Paris):",
        "  now:  Cem Night <cem@example.org>",
        "  next: Ana Early <ana@example.org> from Sun 29 Mar 2026 08:00 CEST (06:00 UTC)",
    ]),
])
def test_oncall_command_eight_hour_shifts(tmp_path: Path, capsys: pytest.CaptureFixture[str], at: str, lines: list[str]) -> None:
    config = write_config(tmp_path, rules=team_rules(ON_CALL_LEVEL, FOLLOW_THE_SUN))
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
