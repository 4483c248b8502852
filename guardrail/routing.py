"""Match a message to a route: a pure function over a RuleSet and message values.

Routes are tried in order and the first match wins; the default route is last
and matches everything. Address fields compare bare addresses (never display
names); address and domain patterns must match the whole value. Of a message
that one of `[smtp] inbox_lists` passed on, `from` and `from_domain` read the
person who wrote it as well as the From header, which may be the list's own
address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .lists import ListSender
from .message import Summary
from .rules import ADDRESS_FIELDS, Condition, Route, RuleSet, Team

_WHITESPACE = re.compile(r"\s+")
# A body condition's reason names the text it matched, cut to this many
# characters, rather than the body. Reasons are stored with the message,
# shown by the API and kept after `[database] keep_bodies` empties its bytes.
BODY_REASON_LIMIT = 100


@dataclass(frozen=True)
class Facts:
    """The values routes test: the envelope recipients, the message summary and the person behind a list of ours."""

    rcpt_tos: tuple[str, ...]
    summary: Summary
    writer: ListSender | None = None  # see lists.list_sender


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    team: Team
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class ShadowResult:
    """What a shadow route makes of a message: whether it matches, and whether it would win."""

    route: str
    team: str
    would_win: bool
    reasons: tuple[str, ...]


def shadow_results(rules: RuleSet, facts: Facts, live: RouteMatch) -> tuple[ShadowResult, ...]:
    """Evaluate every shadow route at its place among the live routes; return those that match."""
    live_index = rules.routes.index(live.route)
    results = []
    for position, route in rules.shadow_routes:
        reasons = _route_reasons(route, facts)
        if reasons is None:
            continue
        # A shadow route placed before the live winner would have been tried first.
        results.append(ShadowResult(route.name, route.team, position <= live_index, tuple(reasons)))
    return tuple(results)


def match_route(rules: RuleSet, facts: Facts, known: dict[int, str | None] | None = None) -> RouteMatch:
    """Return the first route whose conditions hold for `facts`, with the reasons.

    `known` keeps the results of conditions on fields other than `rcpt`,
    keyed by `id(condition)`, for matching the same message again with other
    recipients: those conditions read the same values, and a body pattern
    can take long.
    """
    for route in rules.routes:
        reasons = _route_reasons(route, facts, known)
        if reasons is not None:
            return RouteMatch(route, rules.teams[route.team], tuple(reasons))
    raise AssertionError("a loaded RuleSet always ends with a default route")


def _route_reasons(route: Route, facts: Facts, known: dict[int, str | None] | None = None) -> list[str] | None:
    if route.is_default:
        return ["default route"]
    reasons: list[str] = []
    for condition in route.all:
        reason = _evaluate(condition, facts, known)
        if reason is None:
            return None
        reasons.append(reason)
    if route.any:
        for condition in route.any:
            reason = _evaluate(condition, facts, known)
            if reason is not None:
                reasons.append(reason)
                break
        else:
            return None
    return reasons


def _evaluate(condition: Condition, facts: Facts, known: dict[int, str | None] | None = None) -> str | None:
    """Return why `condition` holds for `facts`, or None when it does not; see match_route for `known`."""
    if condition.field == "all":
        reasons = [_evaluate(child, facts, known) for child in condition.children]
        return None if None in reasons else "all(" + "; ".join(reasons) + ")"  # type: ignore[arg-type]
    if condition.field == "any":
        for child in condition.children:
            reason = _evaluate(child, facts, known)
            if reason is not None:
                return reason
        return None
    if condition.field == "not":
        reason = _evaluate(condition.children[0], facts, known)
        return None if reason is not None else f"not({condition.children[0].describe()})"
    if known is None or condition.field == "rcpt":
        return _evaluate_field(condition, facts)
    key = id(condition)
    if key not in known:
        known[key] = _evaluate_field(condition, facts)
    return known[key]


def _evaluate_field(condition: Condition, facts: Facts) -> str | None:
    """Return why `condition`, a test on one field, holds for `facts`, or None when it does not."""
    for value in _field_values(condition, facts):
        matched = _matched_text(condition, value)
        if matched is None:
            continue
        if condition.field != "body":
            return f"{condition.describe()} matched {value!r}{_writer_note(condition, facts, value)}"
        if len(matched) > BODY_REASON_LIMIT:
            matched = matched[:BODY_REASON_LIMIT] + "..."
        return f"{condition.describe()} matched {matched!r} in the body"
    return None


def matched_recipients(route: Route, facts: Facts, known: dict[int, str | None] | None = None) -> tuple[str, ...]:
    """Return the recipients that a true recipient condition of `route` matches, in envelope order.

    `route` is the one that `facts` matched. A recipient condition counts
    only when the combination around it is true: beside a false condition
    in an `all`, it did not take the message. Conditions under `not` are
    left out, because they name recipients the route is not for. `known` is
    as for match_route.
    """
    named: set[str] = set()
    # Every condition of the route's `all` is true, since the route matched.
    for condition in route.all:
        named |= _held_recipients(condition, facts, known, known_true=True)
    for condition in route.any:
        named |= _held_recipients(condition, facts, known, known_true=False)
    return tuple(address for address in facts.rcpt_tos if address in named)


def _held_recipients(
    condition: Condition, facts: Facts, known: dict[int, str | None] | None, *, known_true: bool,
) -> set[str]:
    """Return the recipients that the recipient conditions in `condition` match, in the parts of it that are true.

    `known_true` is True when `condition` is known to be true, which spares evaluating it again.
    """
    if condition.field == "rcpt":
        return {address for address in facts.rcpt_tos if _matched_text(condition, address) is not None}
    if condition.field not in ("all", "any") or not _names_recipients(condition):
        return set()
    if condition.field == "any":
        return set().union(*(_held_recipients(child, facts, known, known_true=False) for child in condition.children))
    # Only an `all` with a recipient condition in it is evaluated again, and only when not known to be true.
    if not known_true and _evaluate(condition, facts, known) is None:
        return set()
    return set().union(*(_held_recipients(child, facts, known, known_true=True) for child in condition.children))


def _names_recipients(condition: Condition) -> bool:
    if condition.field in ("all", "any"):
        return any(_names_recipients(child) for child in condition.children)
    return condition.field == "rcpt"


def _field_values(condition: Condition, facts: Facts) -> tuple[str, ...]:
    summary = facts.summary
    match condition.field:
        case "rcpt":
            return facts.rcpt_tos
        case "from" | "from_domain":
            return _sender_values(condition.field, facts)
        case "to":
            return summary.to + summary.cc
        case "subject":
            return (summary.subject,)
        case "body":
            return (summary.body_text,)
        case "header":
            return summary.header(condition.header_name)
    return ()


def _sender_values(field: str, facts: Facts) -> tuple[str, ...]:
    """Return the From address, or its domain for `from_domain`, after that of the person behind a list of ours, each once.

    The From address stays, so that a condition written for the list's own
    From address still matches.
    """
    from_address = facts.summary.from_address
    if facts.writer is None:
        return (_address_part(field, from_address),) if from_address else ()
    values = [_address_part(field, facts.writer.address)]
    if from_address:
        values.append(_address_part(field, from_address))
    return tuple(dict.fromkeys(values))


def _address_part(field: str, address: str) -> str:
    return address.rpartition("@")[2] if field == "from_domain" else address


def _writer_note(condition: Condition, facts: Facts, value: str) -> str:
    """Return " of the person in <header>" when a matched `from` or `from_domain` value is the person's and not From's, else ""."""
    writer = facts.writer
    if writer is None or condition.field not in ("from", "from_domain"):
        return ""
    if value != _address_part(condition.field, writer.address):
        return ""
    if facts.summary.from_address and value == _address_part(condition.field, facts.summary.from_address):
        return ""
    return f" of the person in {writer.header}"


def _matched_text(condition: Condition, value: str) -> str | None:
    """Return the part of `value` that `condition` matched (for `contains`, the needle), or None when it does not match."""
    whole_value = condition.field in ADDRESS_FIELDS or condition.field == "from_domain"
    if condition.operator == "regex":
        for pattern in condition.patterns:
            found = pattern.fullmatch(value) if whole_value else pattern.search(value)
            if found is not None:
                return found.group()
        return None

    folded = _WHITESPACE.sub(" ", value).strip().lower()
    if condition.operator == "is":
        return folded if folded in condition.values else None
    return next((needle for needle in condition.values if needle in folded), None)
