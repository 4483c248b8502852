"""The rejected-address alarm: one of a team's addresses rejects its mail for good.

When the smarthost takes a message for some of a destination's addresses
and rejects others with a 5xx reply, the team has the message and its
deadline runs, so that message does not escalate. Without an alarm, the
rejected address would miss every message unnoticed. The store records each
rejection, and `find_rejected_addresses`, a pure function, turns the
rejections of the last period into one alarm per address and team for the
route's owner. An address in the destinations of two teams alarms each
team's owner. The store skips the addresses and teams alarmed within the
period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .acknowledgement import one_line, shortened
from .escalation import Sender, notice_mail
from .rules import RuleSet
from .rules_sla import Human

# The store raises at most one alarm per address and team in this time.
ALARM_PERIOD = timedelta(days=1)
# Characters of the smarthost's reply quoted in the alarm.
QUOTED_REPLY = 300


@dataclass(frozen=True)
class RejectedFigures:
    """Rejections of one address for one team within the period, as the store counts them."""

    address: str
    team: str  # the team whose destination names the address; empty for a postmaster copy
    route: str  # the route of the newest rejected message's conversation
    count: int
    first: datetime
    last: datetime
    reply: str  # the smarthost's reply to the address in the newest rejection


@dataclass(frozen=True)
class AddressAlarm:
    address: str
    team: str
    owner: Human
    detail: str
    data: bytes


def find_rejected_addresses(
    figures: list[RejectedFigures], rules: RuleSet, now: datetime, sender: Sender, recently_alarmed: set[tuple[str, str]]
) -> list[AddressAlarm]:
    """Return an alarm for each rejected address and team that has no alarm within the period and has an owner."""
    alarms = []
    for address_figures in figures:
        if (address_figures.address, address_figures.team) in recently_alarmed:
            continue
        owner = rules.route_owner(address_figures.route, address_figures.team, now)
        if owner is None:
            continue
        of_team = f" of team {address_figures.team}" if address_figures.team else ""
        detail = (
            f"{address_figures.address} rejected {address_figures.count} message(s){of_team}"
            f" from {address_figures.first.isoformat()} to {address_figures.last.isoformat()}"
        )
        mail = _alarm_mail(address_figures, owner, _where(address_figures, rules), now, sender)
        alarms.append(AddressAlarm(address_figures.address, address_figures.team, owner, detail, mail))
    return alarms


def _where(figures: RejectedFigures, rules: RuleSet) -> str:
    """Return where the rules set the team's destination, for the alarm's advice."""
    if not figures.team:
        return "the config's [postmaster] owner or the rule files"
    team = rules.teams.get(figures.team)
    if team is not None and team.source:
        return f"the destination of team {figures.team} in {team.source}"
    return f"the destination of team {figures.team} in the rule files"


def _alarm_mail(figures: RejectedFigures, owner: Human, where: str, now: datetime, sender: Sender) -> bytes:
    reply = shortened(one_line(figures.reply), QUOTED_REPLY)
    # A postmaster copy belongs to no conversation, so it has no team.
    rejected_mail = f"team {figures.team}'s mail" if figures.team else "mail"
    body = "\n".join([
        f"Hello {owner.name},",
        "",
        f"The mail server rejected {rejected_mail} for {figures.address}.",
        f"Its last reply: {reply}",
        "",
        f"Messages rejected: {figures.count}, from {figures.first.isoformat()} to {figures.last.isoformat()}",
        "",
        "The team's other addresses get these messages, so they do not escalate for",
        f"this address alone. But {figures.address} did not get them and will not get",
        "the next ones.",
        f"Correct or remove the address in {where}, then run guardrail check.",
        "",
    ])
    subject = f"Address {figures.address} rejects {rejected_mail}"
    return notice_mail(sender, owner, subject, body, now, ("rejected", figures.team.replace(" ", "-") or "mail"))
