"""Business-hours calendars and the pure arithmetic of deadlines in them.

A calendar has an IANA time zone, a weekly schedule of windows and holidays.
A window whose end is not after its start (22:00-06:00) runs past midnight
and belongs to the day it starts; "24:00" is a valid end; "24x7" means every
day, all day. Local times are converted to UTC per date with zoneinfo, so a
deadline is right on both sides of a daylight-saving change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")

# Maximum stretch searched for business time before a calendar counts as
# having none. It also bounds every loop below.
SEARCH_LIMIT = timedelta(days=400)


@dataclass(frozen=True)
class Window:
    """Working time from `start` to `end` (minutes after local midnight; end may pass 1440)."""

    start: int
    end: int


@dataclass(frozen=True)
class Calendar:
    name: str
    zone: ZoneInfo
    weekly: tuple[tuple[Window, ...], ...]  # indexed by date.weekday()
    holidays: frozenset[date] = field(default_factory=frozenset)

    @property
    def is_always_open(self) -> bool:
        return not self.holidays and all(windows == (Window(0, 1440),) for windows in self.weekly)


def parse_window(text: str) -> Window | None:
    """Parse "HH:MM-HH:MM"; return None when it is not a valid window."""
    match = _WINDOW.match(text)
    if not match:
        return None
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
        return None
    start = start_h * 60 + start_m
    end = end_h * 60 + end_m
    if end <= start:
        # An overnight window ends on the next day.
        end += 1440
    return Window(start, end)


ALWAYS_OPEN = tuple((Window(0, 1440),) for _ in DAYS)


def utc_calendar(name: str = "always") -> Calendar:
    """Return a 24x7 calendar in UTC."""
    return Calendar(name, ZoneInfo("UTC"), ALWAYS_OPEN)


def _local_instant(day: date, minutes: int, zone: ZoneInfo) -> datetime:
    """Return the UTC instant at which local clocks in `zone` show `minutes` after midnight of `day`.

    A time that the clocks skip when they move forward (a daylight-saving
    gap) is reached at the change itself, when the clocks jump past it.
    """
    local = datetime.combine(day + timedelta(days=minutes // 1440), time(0), tzinfo=zone)
    # Add wall-clock minutes on the local date, then convert: zoneinfo picks
    # the offset in force at that local time, per date.
    wall = local.replace(hour=(minutes % 1440) // 60, minute=minutes % 60)
    instant = wall.astimezone(timezone.utc)
    naive = wall.replace(tzinfo=None)
    if instant.astimezone(zone).replace(tzinfo=None) == naive:
        return instant
    # In a gap, zoneinfo converts with the offset from before the change
    # (fold=0) or after it (fold=1). The change lies between the two
    # instants, at the first second whose local time is not before `wall`.
    low, high = sorted(int(wall.replace(fold=fold).timestamp()) for fold in (0, 1))
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).replace(tzinfo=None) >= naive:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, timezone.utc)


@lru_cache(maxsize=4096)
def _day_intervals(calendar: Calendar, day: date) -> tuple[tuple[datetime, datetime], ...]:
    """Return the UTC intervals of the windows that start on local date `day`, in order."""
    if day in calendar.holidays:
        return ()
    intervals = []
    for window in calendar.weekly[day.weekday()]:
        opens = _local_instant(day, window.start, calendar.zone)
        closes = _local_instant(day, window.end, calendar.zone)
        if closes > opens:
            intervals.append((opens, closes))
    return tuple(sorted(intervals))


def _window_intervals(calendar: Calendar, start: datetime, limit: datetime):
    """Yield the (open, close) UTC interval of each window that ends after `start`, by opening time.

    Windows may touch or overlap: an overnight window runs into the next
    day's first one, and a 24x7 calendar is one window a day.
    """
    local_day = start.astimezone(calendar.zone).date() - timedelta(days=1)
    last_day = limit.astimezone(calendar.zone).date() + timedelta(days=1)
    while local_day <= last_day:
        for opens, closes in _day_intervals(calendar, local_day):
            if closes > start:
                yield opens, closes
        local_day += timedelta(days=1)


def _intervals_from(calendar: Calendar, start: datetime, limit: datetime):
    """Yield (open, close) UTC intervals of business time that end after `start`, in order, with touching windows merged."""
    pending: tuple[datetime, datetime] | None = None
    for opens, closes in _window_intervals(calendar, start, limit):
        if pending and opens <= pending[1]:
            pending = (pending[0], max(pending[1], closes))
            continue
        if pending:
            yield pending
        pending = (opens, closes)
    if pending:
        yield pending


def add_business_time(start: datetime, duration: timedelta, calendar: Calendar) -> datetime | None:
    """Return the instant `duration` of business time after `start`, or None if the calendar has none.

    `start` must be aware; the result is an aware UTC datetime.
    """
    start = start.astimezone(timezone.utc)
    remaining = duration
    # Windows are read one at a time rather than merged first, because on a
    # 24x7 calendar the merged interval would span the whole search limit.
    # Time before `counted` was counted already, so overlaps count once.
    counted = start
    for opens, closes in _window_intervals(calendar, start, start + SEARCH_LIMIT):
        begin = max(opens, counted)
        if closes <= begin:
            continue
        available = closes - begin
        if remaining <= available:
            return begin + remaining
        remaining -= available
        counted = closes
    return None


def next_open_interval(calendar: Calendar, start: datetime, within: timedelta) -> tuple[datetime, datetime] | None:
    """Return the first business interval ending after `start` and opening within `within`."""
    start = start.astimezone(timezone.utc)
    for opens, closes in _intervals_from(calendar, start, start + within):
        if opens <= start + within:
            return max(opens, start), closes
        return None
    return None
