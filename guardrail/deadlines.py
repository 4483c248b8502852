"""The SLA clock that a person's message starts: a pure function of the rules, a team, a route and the time.

A message that opens a conversation starts the clock of its own route's
team, which intake decides before the commit. A customer's message after
the team's answer starts the clock of the conversation's team and route,
which only the commit knows, so the store calls `reopened_clock` through a
`ClockPlanner` that the daemon gives it with each rule set.
"""

from __future__ import annotations

from collections.abc import Callable
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


# planner(team, route, arrival, thanks): the clock that a customer's message
# arriving at `arrival` starts again in a conversation of that team and
# route. `thanks` is True for a message that is only a thank-you. The clock
# is None when the rules turn reopening off there or no longer contain the team.
ClockPlanner = Callable[[str, str, datetime, bool], SlaClock | None]


def start_clock(team: Team, route: Route | None, rules: RuleSet, arrival: datetime) -> SlaClock:
    """Return the clock that a message arriving at `arrival` starts for `team`, under `route`'s first_response if it sets one."""
    first_response = (route.first_response if route is not None else None) or team.first_response
    deadline = add_business_time(arrival, first_response, team.calendar)
    return SlaClock(
        deadline,
        None if deadline is None else next_escalation(team, rules, deadline, 0),
        unstaffed_reason(team, arrival, rules.unstaffed_horizon) or "",
    )


def is_reopen_on(team: Team, route: Route | None, thanks: bool = False) -> bool:
    """Return whether a customer's message after the team's answer reopens a conversation: the route's setting, else the team's.

    A message that only says thanks (`thanks`) reopens it only where reopen_on_thanks is set too.
    """
    if route is not None and route.reopen_on_reply is not None:
        reopens = route.reopen_on_reply
    else:
        reopens = team.reopen_on_reply
    if not thanks or not reopens:
        return reopens
    if route is not None and route.reopen_on_thanks is not None:
        return route.reopen_on_thanks
    return team.reopen_on_thanks


def reopened_clock(
    rules: RuleSet, team_name: str, route_name: str, arrival: datetime, thanks: bool = False,
) -> SlaClock | None:
    """Return the clock that a customer's message arriving at `arrival` starts again in an answered conversation, or None.

    The route may be gone from the rules since the conversation opened: the
    team's first_response and settings then apply. None comes when reopening
    is off for the route or team, for a message that only says thanks
    (`thanks`) unless reopen_on_thanks is on, and when the team is not in `rules`.
    """
    team = rules.teams.get(team_name)
    if team is None:
        return None
    route = next((route for route in rules.routes if route.name == route_name), None)
    if not is_reopen_on(team, route, thanks):
        return None
    return start_clock(team, route, rules, arrival)
