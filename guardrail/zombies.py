"""The zombie-route alarm: a route that keeps receiving mail nobody answers.

`find_zombie_routes` is a pure function over per-route figures. A route
alarms when too small a share of its newest conversations were answered
(of those answered or past their deadline), or
when mail keeps arriving but nothing was answered for a stretch of business
time, counted from the first message that waited after the last answer. The
store records each alarm with its outbox mail in one transaction and skips
routes alarmed within the period, so each route alarms at most once per
period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from .acknowledgement import new_message_id
from .business_hours import add_business_time
from .config import ZombieSettings
from .escalation import Sender
from .loops import LOOP_HEADER
from .rules import RuleSet
from .rules_sla import Human


@dataclass(frozen=True)
class RouteFigures:
    """Figures for the conversations that people opened on one route."""

    route: str
    team: str
    recent_total: int  # newest conversations answered or past their deadline (at most the configured number)
    recent_answered: int
    # The first message still unanswered that came at or after the last answer
    # (the first ever when none was answered), or None when none came since.
    waiting_since: datetime | None
    last_received: datetime
    last_answered: datetime | None


@dataclass(frozen=True)
class ZombieAlarm:
    route: str
    owner: Human
    figures: str
    data: bytes


def find_zombie_routes(
    figures: list[RouteFigures],
    rules: RuleSet,
    settings: ZombieSettings,
    now: datetime,
    sender: Sender,
    recently_alarmed: set[str],
) -> list[ZombieAlarm]:
    """Return an alarm for each route that looks abandoned and was not alarmed within the period."""
    alarms = []
    for route_figures in figures:
        if route_figures.route in recently_alarmed:
            continue
        reason = _zombie_reason(route_figures, rules, settings, now)
        owner = rules.route_owner(route_figures.route, route_figures.team, now)
        if reason and owner is not None:
            alarms.append(ZombieAlarm(route_figures.route, owner, reason, _alarm_mail(route_figures, owner, reason, now, sender)))
    return alarms


def _zombie_reason(figures: RouteFigures, rules: RuleSet, settings: ZombieSettings, now: datetime) -> str:
    if figures.recent_total >= settings.conversations:
        share = figures.recent_answered / figures.recent_total
        if share < settings.min_answered_share:
            return (
                f"{figures.recent_answered} of the route's last {figures.recent_total} conversations were answered"
                f" ({share:.0%}, below {settings.min_answered_share:.0%})"
            )
    team = rules.teams.get(figures.team)
    if team is None:
        return ""
    # The silence counts from the first message that waited after the last
    # answer, and mail must have kept arriving after it: a quiet route is not
    # abandoned because its next message came days after its last answer.
    since = figures.waiting_since
    if since is None or figures.last_received <= since:
        return ""
    silent_until = add_business_time(since, settings.silent_business_hours, team.calendar)
    if silent_until is not None and silent_until <= now:
        hours = settings.silent_business_hours.total_seconds() / 3600
        what = f"last answer {figures.last_answered.isoformat()}" if figures.last_answered else "never answered"
        return f"mail keeps arriving (last {figures.last_received.isoformat()}) but nothing was answered for {hours:g} business hours ({what})"
    return ""


def _alarm_mail(figures: RouteFigures, owner: Human, reason: str, now: datetime, sender: Sender) -> bytes:
    body = "\n".join([
        f"Hello {owner.name},",
        "",
        f"Route {figures.route!r} (team {figures.team}) keeps receiving mail that goes unanswered:",
        reason + ".",
        "",
        f"Conversations looked at: {figures.recent_total}, answered: {figures.recent_answered}",
        f"Last message received:   {figures.last_received.isoformat()}",
        f"Last answer:             {figures.last_answered.isoformat() if figures.last_answered else 'none'}",
        "",
        "Check that the route's destination is read, or change the route. Run guardrail status for details.",
        "",
    ])
    message = EmailMessage(policy=SMTP.clone(max_line_length=78))
    message["From"] = f"guardrail <{sender.from_address}>"
    message["To"] = owner.formatted()
    message["Subject"] = f"Route {figures.route} looks abandoned: mail goes unanswered"
    message["Date"] = format_datetime(now)
    message["Message-ID"] = new_message_id("alarm", figures.route.replace(" ", "-"), sender.hostname)
    message["Auto-Submitted"] = "auto-generated"
    message[LOOP_HEADER] = sender.hostname
    message.set_content(body, charset="utf-8")
    return message.as_bytes()
