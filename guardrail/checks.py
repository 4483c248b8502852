"""Static checks of a loaded rule set: pure functions that return findings.

Loading already rejects what cannot work (errors). These find what works
but is probably wrong: routes that can never match, route patterns that can
backtrack catastrophically, templates missing a shipped language, teams
nobody staffs soon, rules nobody has inspected, teams removed while
conversations of theirs are still open.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from .backtracking import find_backtracking, find_slow_search
from .prepare import Site, is_accepted_recipient
from .rules import ADDRESS_FIELDS, Condition, Route, RuleSet, unstaffed_reason

SHIPPED_LANGUAGES = ("en", "fr", "de", "es")


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    where: str
    message: str

    def to_record(self) -> dict[str, str]:
        return {"level": self.level, "where": self.where, "message": self.message}

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}" if self.where else f"{self.level}: {self.message}"


@dataclass(frozen=True)
class Inspection:
    rules_hash: str
    at: datetime
    inspected_by: str
    note: str


def check_rules(
    rules: RuleSet,
    now: datetime,
    inspections: list[Inspection],
    *,
    inspection_max_age: timedelta = timedelta(days=90),
    staffing_horizon: timedelta = timedelta(days=14),
) -> list[Finding]:
    """Return the warnings for `rules` at `now`."""
    findings = [
        *shadowed_routes(rules), *slow_patterns(rules), *missing_languages(rules), *staff_findings(rules),
        *rotation_findings(rules),
    ]
    for team in rules.teams.values():
        reason = unstaffed_reason(team, now, max(staffing_horizon, rules.unstaffed_horizon))
        if reason:
            where = f"{team.source}: team {team.name}" if team.source else f"team {team.name}"
            findings.append(Finding("warning", where, f"unstaffed: {reason}"))
    findings += inspection_findings(rules.digest, now, inspections, inspection_max_age)
    return findings


def staff_findings(rules: RuleSet) -> list[Finding]:
    """Return a warning when staff replies are verified by a header that any SMTP client may have written."""
    if not rules.staff_authserv_id or rules.staff_authserv_peers:
        return []
    return [Finding(
        "warning", "staff.authserv_id",
        "set without authserv_peers, so the Authentication-Results header is read on mail from any client,"
        " and one that connects to guardrail directly can write it; set authserv_peers to the addresses of the MTA"
        f" that writes {rules.staff_authserv_id}",
    )]


def rotation_findings(rules: RuleSet) -> list[Finding]:
    """Return a warning for each rotation that no escalation level names, because its people never receive an escalation."""
    named = {level.rotation.name for team in rules.teams.values() for level in team.escalation if level.rotation}
    findings = []
    for rotation in rules.rotations.values():
        if rotation.name in named:
            continue
        where = f"{rotation.source}: rotation {rotation.name}" if rotation.source else f"rotation {rotation.name}"
        findings.append(Finding(
            "warning", where,
            f'no escalation level names it, so nobody on it is ever told; add rotation = "{rotation.name}"'
            " to a level of a team's escalation, or remove the rotation",
        ))
    return findings


def shadowed_routes(rules: RuleSet) -> list[Finding]:
    """Return a finding for each live route that an earlier route always wins over."""
    findings = []
    live = [route for route in rules.routes if not route.is_default]
    for index, later in enumerate(live):
        for earlier in live[:index]:
            if route_covers(earlier, later):
                findings.append(Finding(
                    "warning", later.source or f"route {later.name}",
                    f"{_route_key(later)}: can never match: route {earlier.name!r} comes first and matches every message it matches",
                ))
                break
    return findings


def route_covers(earlier: Route, later: Route) -> bool:
    """Return True when every message matching `later` also matches `earlier`.

    The test is conservative: it returns True only when the conditions prove it.
    """
    for required in earlier.all:
        if not any(implies(condition, required) for condition in later.all):
            return False
    if not earlier.any:
        return True
    if any(implies(condition, option) for condition in later.all for option in earlier.any):
        return True
    return bool(later.any) and all(any(implies(branch, option) for option in earlier.any) for branch in later.any)


def slow_patterns(rules: RuleSet) -> list[Finding]:
    """Return a finding for each route regex, live or shadow, that can backtrack catastrophically.

    Patterns for the other fields than addresses and the sender's domain
    are searched for anywhere in the value, so find_slow_search checks them
    as well.
    """
    findings = []
    for route in [*rules.routes, *(route for _, route in rules.shadow_routes)]:
        for key, condition in _regex_conditions(route):
            searched = condition.field not in ADDRESS_FIELDS and condition.field != "from_domain"
            for pattern in condition.patterns:
                backtracking = find_backtracking(pattern) or (find_slow_search(pattern) if searched else None)
                if backtracking:
                    message = f"{_route_key(route)}.{key}: {backtracking.describe(pattern.pattern)}"
                    findings.append(Finding("warning", route.source, message))
    return findings


def _route_key(route: Route) -> str:
    """Return where a route is defined, in the form errors use, such as route[2] (billing)."""
    return route.key or f"route ({route.name})"


def recipient_warnings(rules: RuleSet, site: Site) -> list[Finding]:
    """Return a warning for each `rcpt.is` address of a route that intake rejects with 550.

    Such a condition never matches: the address was left out of `[smtp] inboxes`, or misspelt.
    """
    findings = []
    for route in [*rules.routes, *(route for _, route in rules.shadow_routes)]:
        for key, condition in leaf_conditions(route):
            if condition.field != "rcpt" or condition.operator != "is":
                continue
            for address in condition.values:
                if not is_accepted_recipient(address, site):
                    findings.append(Finding(
                        "warning", route.source or f"route {route.name}",
                        f"{_route_key(route)}.{key}: {address!r} is not an address that [smtp] inboxes"
                        " or inbox_domains accept, so the daemon rejects mail to it with 550 and this condition never"
                        " matches; add it to [smtp] inboxes, or correct it",
                    ))
    return findings


def _regex_conditions(route: Route) -> Iterator[tuple[str, Condition]]:
    """Yield each regex condition of `route` with its key as the rules file spells it, such as all[1].any[0].subject.regex."""
    return ((key, condition) for key, condition in leaf_conditions(route) if condition.operator == "regex")


def leaf_conditions(route: Route) -> Iterator[tuple[str, Condition]]:
    """Yield each condition of `route` that tests a field, inside all, any and not, with its key as the rules file spells it.

    Keys look like all[1].any[0].subject.regex or any[0].header.X-Priority.is.
    """
    for name, conditions in (("all", route.all), ("any", route.any)):
        for index, condition in enumerate(conditions):
            yield from _leaves(condition, f"{name}[{index}]")


def _leaves(condition: Condition, key: str) -> Iterator[tuple[str, Condition]]:
    if condition.field in ("all", "any"):
        for index, child in enumerate(condition.children):
            yield from _leaves(child, f"{key}.{condition.field}[{index}]")
    elif condition.field == "not":
        yield from _leaves(condition.children[0], f"{key}.not")
    else:
        field = f"header.{condition.header_name}" if condition.field == "header" else condition.field
        yield f"{key}.{field}.{condition.operator}", condition


def implies(first: Condition, second: Condition) -> bool:
    """Return True when `first` holding means `second` holds too."""
    if first == second:
        return True
    if first.field != second.field or first.header_name != second.header_name:
        return False
    if first.field in ("all", "any", "not"):
        return False
    if second.operator == "is" and first.operator == "is":
        return set(first.values) <= set(second.values)
    if second.operator == "contains" and first.operator in ("is", "contains"):
        return all(any(needle in value for needle in second.values) for value in first.values)
    return False


def missing_languages(rules: RuleSet) -> list[Finding]:
    """Return a finding for each template a team uses that lacks a shipped language."""
    findings = []
    reported: set[str] = set()
    for team in rules.teams.values():
        languages = set(team.templates)
        name = next(iter(team.templates.values())).name if team.templates else ""
        missing = [language for language in SHIPPED_LANGUAGES if language not in languages]
        if name and missing and name not in reported:
            reported.add(name)
            findings.append(Finding("warning", f"template {name}", f"has no {', '.join(missing)} variant"))
    return findings


def removed_team_findings(rules: RuleSet, open_by_team: dict[str, int]) -> list[Finding]:
    """Return a warning for each team that has open conversations in the database but is missing from `rules`."""
    findings = []
    for team, count in sorted(open_by_team.items()):
        if team in rules.teams or count == 0:
            continue
        findings.append(Finding(
            "warning", f"team {team}",
            f"removed from the rules but has {count} open conversation(s); their follow-ups are routed again"
            " by the current rules, and their escalations go to the fallback human",
        ))
    return findings


def inspection_findings(digest: str, now: datetime, inspections: list[Inspection], max_age: timedelta) -> list[Finding]:
    """Return a finding when the rule set `digest` was never inspected, or not within `max_age`."""
    mine = sorted((item for item in inspections if item.rules_hash == digest), key=lambda item: item.at)
    short = digest[:12]
    if not mine:
        return [Finding(
            "warning", f"rules {short}",
            "never inspected; review the rules, then run: guardrail inspect --config PATH --by NAME --note TEXT",
        )]
    last = mine[-1]
    if now - last.at > max_age:
        days = (now - last.at).days
        return [Finding(
            "warning", f"rules {short}",
            f"last inspected {days} days ago by {last.inspected_by}; inspect again at least every {max_age.days} days",
        )]
    return []
