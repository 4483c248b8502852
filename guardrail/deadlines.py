"""The SLA clock that a person's message starts: a pure function of the rules, a team, a route and the time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .business_hours import add_business_time
from .escalation import next_escalation
from .rules import Route, RuleSet, Team, unstaffed_reason


@dataclass(frozen=True)
class SlaClock:
    """A started SLA clock: the deadline, when the conversation is first escalated, and why it escalates at once."""

    deadline: datetime | None  # None when the calendar has no business time within its search limit
    first_escalation_at: datetime | None  # None without a deadline or an escalation chain
    unstaffed: str = ""  # why nobody staffs the team, or "" when it is staffed


def start_clock(team: Team, route: Route | None, rules: RuleSet, arrival: datetime) -> SlaClock:
    """Return the clock that a message arriving at `arrival` starts for `team`, under `route`'s first_response if it sets one."""
    first_response = (route.first_response if route is not None else None) or team.first_response
    deadline = add_business_time(arrival, first_response, team.calendar)
    return SlaClock(
        deadline,
        None if deadline is None else next_escalation(team, rules, deadline, 0),
        unstaffed_reason(team, arrival, rules.unstaffed_horizon) or "",
    )
