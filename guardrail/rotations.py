"""On-call rotations: who is on call at an instant, as pure arithmetic over a rotation's values.

A rotation hands off from one person to the next every `shift` of wall-clock
time from its first hand-off. A shift is a whole number of days, or a whole
number of hours that divides a day, so hand-offs fall at the same local times
every day. A shift that spans a daylight-saving change is an hour shorter or
longer in elapsed time. A hand-off time that the change skips maps to an
instant by the offset before the change (see `local_instant`). In a rotation
of one-hour shifts, the shift whose hand-off falls in the skipped hour then
starts at the same instant as the next one: it is empty, and its person is
not on call that night.

Shift numbers count from the first hand-off: shift 0 is the first person's,
and shifts before it continue the order backwards, so the instant before
the first hand-off belongs to the last person. An override replaces the rotation
from its `starts` up to, not including, its `ends`; where overrides overlap,
the one listed last wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from .rules_sla import Human

# The most boundaries `next_handoff` looks at before it reports that nobody else comes on call.
_BOUNDARIES_SEARCHED = 1000
_DAY = timedelta(days=1)


@dataclass(frozen=True)
class Override:
    """A person on call in place of the rotation from `starts` until `ends`, both aware UTC instants."""

    starts: datetime
    ends: datetime
    human: Human


@dataclass(frozen=True)
class Rotation:
    """People taking turns on call, in order, each for one `shift` of wall-clock time from the local date-time `handoff`."""

    name: str
    zone: ZoneInfo
    handoff: datetime  # naive: a wall-clock time in `zone`
    shift: timedelta  # whole days, or whole hours that divide a day
    people: tuple[Human, ...]
    overrides: tuple[Override, ...] = ()
    source: str = ""  # the rule file that defines it

    @property
    def humans(self) -> tuple[Human, ...]:
        """Every person the rotation can name: its people, then the people of its overrides."""
        return self.people + tuple(override.human for override in self.overrides)


def local_instant(wall_time: datetime, zone: ZoneInfo) -> datetime:
    """Return the UTC instant at which the clocks of `zone` show the naive `wall_time`.

    A time that a daylight-saving change skips (02:30 on the night clocks go
    forward) takes the offset from before the change, and a time that occurs
    twice takes its first occurrence (zoneinfo's fold=0).
    """
    return wall_time.replace(tzinfo=zone, fold=0).astimezone(UTC)


def handoff_at(rotation: Rotation, shift: int) -> datetime:
    """Return the UTC instant at which shift number `shift` starts."""
    # Naive datetime arithmetic is wall-clock arithmetic, so the hand-offs keep their local times.
    return local_instant(rotation.handoff + shift * rotation.shift, rotation.zone)


def shift_at(rotation: Rotation, instant: datetime) -> int:
    """Return the number of the shift running at `instant`, negative before the first hand-off.

    That is the shift whose hand-off is at or before `instant` while the next one is after it.
    """
    wall_time = instant.astimezone(rotation.zone).replace(tzinfo=None)
    shift = (wall_time - rotation.handoff) // rotation.shift

    # The estimate from wall-clock time can be off by as many shifts as fit in
    # the change of UTC offset near `instant`: one across a one-hour
    # daylight-saving change, and two one-hour shifts across Antarctica/Troll's
    # two-hour change. Offsets lie within a day of UTC, so a change is under
    # two days. Each step goes the way the first one went: a step back leaves
    # the next hand-off after `instant`, and a step forward leaves this one at
    # or before it.
    for _ in range(2 * _DAY // rotation.shift + 2):
        if handoff_at(rotation, shift) > instant:
            shift -= 1
        elif handoff_at(rotation, shift + 1) <= instant:
            shift += 1
        else:
            break
    return shift


def active_override(rotation: Rotation, instant: datetime) -> Override | None:
    """Return the override in force at `instant`: the last listed of those that cover it, or None."""
    for override in reversed(rotation.overrides):
        if override.starts <= instant < override.ends:
            return override
    return None


def on_call(rotation: Rotation, instant: datetime) -> Human:
    """Return who is on call in `rotation` at `instant`: the person of the override in force, else of the shift."""
    override = active_override(rotation, instant)
    if override is not None:
        return override.human
    return rotation.people[shift_at(rotation, instant) % len(rotation.people)]


def _next_boundary(rotation: Rotation, instant: datetime) -> datetime:
    """Return the first instant after `instant` at which who is on call may change.

    That is the next start or end of an override, or the next hand-off when
    no override is in force. While one is, hand-offs change nobody, and
    skipping them keeps a long override over hour-long shifts from using up
    the boundaries that `next_handoff` searches.
    """
    boundaries = [edge for override in rotation.overrides for edge in (override.starts, override.ends) if edge > instant]
    if active_override(rotation, instant) is None:
        boundaries.append(handoff_at(rotation, shift_at(rotation, instant) + 1))
    return min(boundaries)


def next_handoff(rotation: Rotation, instant: datetime) -> tuple[datetime, Human] | None:
    """Return when someone other than the person on call at `instant` comes on call, and who; None when nobody else ever does.

    A hand-off to the same address, as when one person is listed twice in a row, is no hand-off.
    """
    current = on_call(rotation, instant).address
    boundary = instant
    for _ in range(_BOUNDARIES_SEARCHED):
        boundary = _next_boundary(rotation, boundary)
        person = on_call(rotation, boundary)
        if person.address != current:
            return boundary, person
    return None
