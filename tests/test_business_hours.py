"""Deadline arithmetic in business hours: tables across DST changes, overnight windows and holidays."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from guardrail.business_hours import (
    ALWAYS_OPEN,
    Calendar,
    Window,
    add_business_time,
    parse_window,
)

PARIS = ZoneInfo("Europe/Paris")
SANTIAGO = ZoneInfo("America/Santiago")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")


def weekly(days: dict[str, list[str]]) -> tuple[tuple[Window, ...], ...]:
    names = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    return tuple(tuple(parse_window(text) for text in days.get(name, [])) for name in names)  # type: ignore[misc]


WEEKDAYS = {day: ["09:00-18:00"] for day in ("mon", "tue", "wed", "thu", "fri")}
OFFICE = Calendar("office", PARIS, weekly(WEEKDAYS))
ALWAYS_PARIS = Calendar("always", PARIS, ALWAYS_OPEN)
NIGHTDESK = Calendar("nightdesk", PARIS, weekly({day: ["22:00-06:00"] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}))
WEEKNIGHTS = Calendar("weeknights", PARIS, weekly({day: ["22:00-06:00"] for day in ("mon", "tue", "wed", "thu", "fri")}))
FULLDAY = Calendar("fullday", PARIS, weekly({day: ["00:00-24:00"] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}))
# Windows whose edges fall in a daylight-saving gap: local clocks skip
# 00:00-00:59 in Santiago on 2025-09-07, 02:00-02:59 in Paris on 2025-03-30,
# and 02:00-02:29 on Lord Howe Island on 2025-10-05.
SANTIAGO_SUNDAY = Calendar("santiago", SANTIAGO, weekly({"sun": ["00:30-09:30"]}))
PARIS_SATURDAY_NIGHT = Calendar("paris-night", PARIS, weekly({"sat": ["22:00-02:30"]}))
LORD_HOWE_SUNDAY = Calendar("lord-howe", LORD_HOWE, weekly({"sun": ["02:15-03:00"]}))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("calendar", "arrival", "hours", "deadline"),
    [
        # Spring forward: Fri 16:30 CET, 1h30 on Friday, 2h30 from Mon 09:00 CEST.
        (OFFICE, "2025-03-28T15:30:00Z", 4, "2025-03-31T09:30:00Z"),
        # Fall back: Fri 16:00 CEST, 2h on Friday, 2h from Mon 09:00 CET.
        (OFFICE, "2025-10-24T14:00:00Z", 4, "2025-10-27T10:00:00Z"),
        # 24x7 across the repeated hour: four real hours.
        (ALWAYS_PARIS, "2025-10-25T22:30:00Z", 4, "2025-10-26T02:30:00Z"),
        # 24x7 across the skipped hour.
        (ALWAYS_PARIS, "2025-03-29T23:30:00Z", 4, "2025-03-30T03:30:00Z"),
        # Inside the window, and arriving before the window opens.
        (OFFICE, "2025-11-04T09:00:00Z", 2, "2025-11-04T11:00:00Z"),
        (OFFICE, "2025-11-04T05:00:00Z", 2, "2025-11-04T10:00:00Z"),
        # Arriving at the exact close counts from the next opening.
        (OFFICE, "2025-11-04T17:00:00Z", 1, "2025-11-05T09:00:00Z"),
        # Overnight windows belong to the day they start.
        (NIGHTDESK, "2025-11-27T20:00:00Z", 2, "2025-11-27T23:00:00Z"),
        (NIGHTDESK, "2025-11-28T04:30:00Z", 2, "2025-11-28T22:30:00Z"),
        (NIGHTDESK, "2025-11-29T02:00:00Z", 2, "2025-11-29T04:00:00Z"),
        (NIGHTDESK, "2025-11-27T22:00:00Z", 10, "2025-11-29T00:00:00Z"),
        (WEEKNIGHTS, "2025-11-29T02:00:00Z", 2, "2025-11-29T04:00:00Z"),
        (WEEKNIGHTS, "2025-11-29T11:00:00Z", 2, "2025-12-01T23:00:00Z"),
        # 00:00-24:00 every day has no gap at midnight.
        (FULLDAY, "2025-11-27T22:30:00Z", 1, "2025-11-27T23:30:00Z"),
        # A window that opens at a skipped time opens when the clocks jump
        # past it: 04:00Z, when 00:00 -04 becomes 01:00 -03.
        (SANTIAGO_SUNDAY, "2025-09-06T12:00:00Z", 1, "2025-09-07T05:00:00Z"),
        # One that closes at a skipped time closes then too: 22:00 CET to the
        # change at 01:00Z is 4 hours, and the fifth starts a week later, at
        # 22:00 CEST.
        (PARIS_SATURDAY_NIGHT, "2025-03-29T20:00:00Z", 5, "2025-04-05T21:00:00Z"),
        # A half-hour change: 02:15 is skipped, so the window runs from the
        # change at 15:30Z (02:00 +10:30, which becomes 02:30 +11) to 03:00 +11.
        (LORD_HOWE_SUNDAY, "2025-10-04T12:00:00Z", 0.5, "2025-10-04T16:00:00Z"),
    ],
)
def test_deadline_table(calendar: Calendar, arrival: str, hours: float, deadline: str) -> None:
    assert add_business_time(utc(arrival), timedelta(hours=hours), calendar) == utc(deadline)


NEW_YORK = ZoneInfo("America/New_York")
SYDNEY = ZoneInfo("Australia/Sydney")
KOLKATA = ZoneInfo("Asia/Kolkata")
NY_OFFICE = Calendar("ny-office", NEW_YORK, weekly({day: ["09:00-17:00"] for day in ("mon", "tue", "wed", "thu", "fri")}))
NY_ALWAYS = Calendar("ny-always", NEW_YORK, ALWAYS_OPEN)
# 2025-11-02 is the Sunday on which New York repeats 01:00-01:59 (EDT, then EST).
NY_SUNDAY_EARLY = Calendar("ny-sunday", NEW_YORK, weekly({"sun": ["00:00-03:00"]}))
NY_SATURDAY_NIGHT = Calendar("ny-saturday-night", NEW_YORK, weekly({"sat": ["22:00-06:00"]}))
SYDNEY_OFFICE = Calendar("sydney-office", SYDNEY, weekly({day: ["09:00-17:00"] for day in ("mon", "tue", "wed", "thu", "fri")}))
SYDNEY_ALWAYS = Calendar("sydney-always", SYDNEY, ALWAYS_OPEN)
KOLKATA_OFFICE = Calendar("kolkata-office", KOLKATA, weekly({day: ["09:00-17:00"] for day in ("mon", "tue", "wed", "thu", "fri")}))
KOLKATA_NIGHTS = Calendar("kolkata-nights", KOLKATA, weekly({day: ["22:00-02:00"] for day in ("mon", "tue", "wed", "thu", "fri")}))
PARIS_WEEKENDS = Calendar("paris-weekends", PARIS, weekly({"sat": ["00:00-24:00"], "sun": ["00:00-24:00"]}))


@pytest.mark.parametrize(
    ("calendar", "arrival", "hours", "deadline"),
    [
        # New York spring forward (2025-03-09): Fri 16:00 EST, 1h on Friday, 3h from Mon 09:00 EDT.
        (NY_OFFICE, "2025-03-07T21:00:00Z", 4, "2025-03-10T16:00:00Z"),
        # 24x7 across the repeated hour: two real hours, ending at 01:30 EST.
        (NY_ALWAYS, "2025-11-02T04:30:00Z", 2, "2025-11-02T06:30:00Z"),
        # 00:00 EDT to 03:00 EST is four real hours on the day clocks fall back.
        (NY_SUNDAY_EARLY, "2025-11-01T12:00:00Z", 4, "2025-11-02T08:00:00Z"),
        # An overnight window across the change: 22:00 EDT to 06:00 EST is nine hours...
        (NY_SATURDAY_NIGHT, "2025-11-01T12:00:00Z", 9, "2025-11-02T11:00:00Z"),
        # ...and across the spring change, 22:00 EST to 06:00 EDT is seven.
        (NY_SATURDAY_NIGHT, "2025-03-08T12:00:00Z", 7, "2025-03-09T10:00:00Z"),
        # Sydney falls back on 2025-04-06: Fri 16:00 AEDT, 1h, then 3h from Mon 09:00 AEST.
        (SYDNEY_OFFICE, "2025-04-04T05:00:00Z", 4, "2025-04-07T02:00:00Z"),
        # Sydney springs forward on 2025-10-05 at 02:00: two real hours from 02:00 AEST are 05:00 AEDT.
        (SYDNEY_ALWAYS, "2025-10-04T15:00:00Z", 2, "2025-10-04T17:00:00Z"),
        # Kolkata's half-hour offset: Fri 15:30 IST, 1h30 on Friday, 30m from Mon 09:00.
        (KOLKATA_OFFICE, "2025-11-07T10:00:00Z", 2, "2025-11-10T04:00:00Z"),
        # Fri 23:30 IST in Friday's 22:00-02:00 window: 2h30 to Sat 02:00, then Mon 22:00-22:30.
        (KOLKATA_NIGHTS, "2025-11-07T18:00:00Z", 3, "2025-11-10T17:00:00Z"),
        # Arriving exactly at opening counts from then.
        (KOLKATA_OFFICE, "2025-11-10T03:30:00Z", 1, "2025-11-10T04:30:00Z"),
        # A long weekend: Saturday's 2h, Sunday's 25 hours (clocks fall back), then 3h of the next Saturday.
        (PARIS_WEEKENDS, "2025-10-25T20:00:00Z", 30, "2025-11-01T02:00:00Z"),
        # A zero first response on a closed day falls on the next opening.
        (OFFICE, "2025-11-08T10:00:00Z", 0, "2025-11-10T08:00:00Z"),
    ],
)
def test_deadline_table_other_zones(calendar: Calendar, arrival: str, hours: float, deadline: str) -> None:
    assert add_business_time(utc(arrival), timedelta(hours=hours), calendar) == utc(deadline)


# Windows that overlap on one day, and an overnight window that runs into the next day's first one.
OVERLAPPING = Calendar(
    "overlapping", PARIS, weekly({"mon": ["08:00-12:00", "10:00-14:00", "22:00-06:00"], "tue": ["05:00-09:00"]})
)


@pytest.mark.parametrize(
    ("arrival", "hours", "deadline"),
    [
        # Mon 08:00 CET: 08:00-14:00 is six hours, the overlap counted once.
        ("2025-11-03T07:00:00Z", 5, "2025-11-03T12:00:00Z"),
        ("2025-11-03T07:00:00Z", 6, "2025-11-03T13:00:00Z"),
        # Mon 11:00 CET, inside both windows.
        ("2025-11-03T10:00:00Z", 2, "2025-11-03T12:00:00Z"),
        # Mon 21:00 CET: eight hours overnight, then Tue 06:00-09:00 past the overlap.
        ("2025-11-03T20:00:00Z", 9, "2025-11-04T06:00:00Z"),
        ("2025-11-03T20:00:00Z", 11, "2025-11-04T08:00:00Z"),
        # Beyond Tuesday's last window: the next Monday.
        ("2025-11-03T20:00:00Z", 12, "2025-11-10T08:00:00Z"),
    ],
)
def test_overlapping_windows_count_once(arrival: str, hours: float, deadline: str) -> None:
    assert add_business_time(utc(arrival), timedelta(hours=hours), OVERLAPPING) == utc(deadline)


def test_deadline_agrees_with_merged_intervals() -> None:
    from guardrail.business_hours import _intervals_from

    def merged_deadline(start: datetime, duration: timedelta, calendar: Calendar) -> datetime | None:
        remaining = duration
        for opens, closes in _intervals_from(calendar, start, start + timedelta(days=60)):
            begin = max(opens, start)
            if remaining <= closes - begin:
                return begin + remaining
            remaining -= closes - begin
        return None

    calendars = (OFFICE, ALWAYS_PARIS, NIGHTDESK, WEEKNIGHTS, FULLDAY, OVERLAPPING, PARIS_SATURDAY_NIGHT)
    start = utc("2025-03-24T00:00:00Z")
    for step in range(400):  # every 7h13m across a month with a daylight-saving change
        arrival = start + timedelta(minutes=433 * step)
        calendar = calendars[step % len(calendars)]
        duration = timedelta(minutes=37 * (step % 50) + 1)
        assert add_business_time(arrival, duration, calendar) == merged_deadline(arrival, duration, calendar), (
            calendar.name, arrival, duration,
        )


def test_deadline_is_utc() -> None:
    result = add_business_time(utc("2025-03-28T15:30:00Z"), timedelta(hours=4), OFFICE)
    assert result is not None
    assert result.tzinfo == timezone.utc


def test_holidays_are_skipped() -> None:
    calendar = Calendar("office", PARIS, OFFICE.weekly, frozenset({date(2025, 12, 25), date(2025, 12, 26)}))
    # Wed 24 Dec 17:00 local: one hour left that day, then Mon 29 Dec.
    assert add_business_time(utc("2025-12-24T16:00:00Z"), timedelta(hours=2), calendar) == utc("2025-12-29T09:00:00Z")


def test_calendar_without_windows_has_no_deadline() -> None:
    closed = Calendar("closed", PARIS, tuple(() for _ in range(7)))
    assert add_business_time(utc("2025-11-04T09:00:00Z"), timedelta(hours=1), closed) is None


@pytest.mark.parametrize(
    ("text", "window"),
    [
        ("09:00-18:00", Window(540, 1080)),
        ("22:00-06:00", Window(1320, 1800)),
        ("00:00-24:00", Window(0, 1440)),
        ("9:30-10:00", Window(570, 600)),
        ("24:00-06:00", None),
        ("09:00-24:30", None),
        ("09:60-10:00", None),
        ("nine to five", None),
    ],
)
def test_parse_window_table(text: str, window: Window | None) -> None:
    assert parse_window(text) == window
