"""Decide which teams get a copy of a message addressed to several inboxes: pure functions over values.

A message has one owner, the team of its conversation, which is
acknowledged, timed and escalated for it. RFC 5321 section 3.3 still
expects every accepted recipient to get the message, so each other team
whose inbox it was addressed to gets a copy of its own.

A recipient is addressed to a team when the message, routed for that
recipient alone, takes a route of the team through a true `rcpt` condition
that names the recipient, or takes the default route. Conditions on other
fields read the same values for every recipient. So a route that wins by
subject or sender, or a route that would only catch a recipient through
such a condition, pulls no team in.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

from .routing import Facts, RouteMatch, match_route, matched_recipients
from .rules import Destination, RuleSet

if TYPE_CHECKING:
    from .plan import Plan

# The header that marks a team's copy of a message whose conversation another team owns.
COPY_HEADER = "X-Guardrail-Copy"


class TeamCopy(NamedTuple):
    """A team that a recipient of the message is addressed to, with what a copy for it needs."""

    team: str
    route: str
    destination: Destination | None
    recipient: str  # the first recipient addressed to the team, which the copy's Received header names
    members: frozenset[str]


def addressed_teams(
    rules: RuleSet, facts: Facts, match: RouteMatch, postmasters: list[str], known: dict[int, str | None] | None = None,
) -> tuple[TeamCopy, ...]:
    """Return the teams that the recipients in `facts` are addressed to, each once, in envelope order.

    `match` is the route of the whole message, which is also the route of
    its only recipient, so a message to one inbox is not routed again.
    Recipients in `postmasters` are left out, since the postmaster owner
    gets a copy of their own. `known` contains the condition results that
    matching the whole message found (see routing.match_route).
    """
    if len(facts.rcpt_tos) == 1 and not postmasters:
        copy = _addressed(match, facts.rcpt_tos[0], facts)
        return (copy,) if copy is not None else ()

    copies: dict[str, TeamCopy] = {}
    # A condition on a field other than `rcpt` is evaluated once for all recipients.
    known = {} if known is None else known
    for recipient in facts.rcpt_tos:
        if recipient in postmasters:
            continue
        alone = replace(facts, rcpt_tos=(recipient,))
        copy = _addressed(match_route(rules, alone, known), recipient, alone, known)
        if copy is not None and copy.team not in copies:
            copies[copy.team] = copy
    return tuple(copies.values())


def _addressed(
    match: RouteMatch, recipient: str, facts: Facts, known: dict[int, str | None] | None = None,
) -> TeamCopy | None:
    """Return the team that `recipient`, the only recipient in `facts`, is addressed to by `match`, or None."""
    if not match.route.is_default and not matched_recipients(match.route, facts, known):
        return None
    return TeamCopy(match.team.name, match.route.name, match.team.destination, recipient, match.team.member_addresses)


def choose_team_copies(
    addressed: tuple[TeamCopy, ...], owner: str, holding: frozenset[str] = frozenset(),
    owner_destination: Destination | None = None,
) -> tuple[TeamCopy, ...]:
    """Return the copies to deliver: one for each team in `addressed` other than `owner` that has a destination.

    Teams in `holding` have the message already, as a forwarder's second
    copy finds when the first transaction reached them, so they get none.
    Nor does a team whose destination is `owner_destination` or that of a
    team chosen before it, because the message reaches that mailbox once.
    """
    reached = {owner_destination}
    copies = []
    for copy in addressed:
        if copy.team == owner or copy.team in holding or copy.destination is None or copy.destination in reached:
            continue
        reached.add(copy.destination)
        copies.append(copy)
    return tuple(copies)


def with_team_copies(plan: Plan, copies: tuple[TeamCopy, ...]) -> None:
    """Record `copies` on `plan` and add the members of their teams to the conversation's participants.

    A reply from a member of such a team marks the conversation answered,
    because the sender wrote to that team too. Such a reply that carries
    only the subject tag joins the conversation because its sender takes part.
    """
    if not copies:
        return
    plan.team_copies = copies
    members = frozenset().union(*(copy.members for copy in copies))
    conversation = plan.conversation
    assert conversation is not None, "only a message in a conversation gets team copies"
    if plan.opens_conversation:
        plan.conversation = replace(conversation, participants=conversation.participants | members)
    else:
        plan.participants_added = plan.participants_added | (members - conversation.participants)
