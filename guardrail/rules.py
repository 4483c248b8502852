"""Load rule files (`*.toml` in the rules folder) into one validated RuleSet.

Files are read in name order; within a file, routes keep their order. Loading
is all or nothing: any error rejects the whole set, so the daemon never routes
with half a rule set.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from .business_hours import (
    SEARCH_LIMIT,
    Calendar,
    add_business_time,
    next_open_interval,
    utc_calendar,
)
from .config import is_address
from .errors import ConfigError, ConfigErrors
from .locales import is_supported_language, write_to
from .rotations import Rotation
from .rules_sla import (
    LANGUAGE_EXPECTED,
    EscalationLevel,
    Human,
    Template,
    load_calendar,
    load_escalation,
    load_named_human,
    load_rotation,
    load_template,
)
from .tomlcheck import Table, parse_toml, read_file, toml_text

ADDRESS_FIELDS = ("rcpt", "from", "to")
TEXT_FIELDS = ("subject", "body")
FIELDS = (*ADDRESS_FIELDS, "from_domain", *TEXT_FIELDS, "header")
OPERATORS = ("is", "contains", "regex")
# A header field name (RFC 5322 section 3.6.8): printable ASCII but the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# A domain name as the staff settings take it: labels of letters, digits, hyphens and underscores, or any non-ASCII.
_DOMAIN = re.compile(r"[^\s@.]+(?:\.[^\s@.]+)*")
COMBINATORS = ("all", "any", "not")


@dataclass(frozen=True)
class Member:
    name: str
    address: str


@dataclass(frozen=True)
class Destination:
    """A team's mail destination: a local maildir, or SMTP addresses via the smarthost."""

    kind: str  # "maildir" or "smtp"
    maildir: str = ""
    addresses: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "maildir":
            return f"maildir {self.maildir}"
        return "smtp " + ", ".join(self.addresses)

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, "maildir": self.maildir, "addresses": list(self.addresses)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Destination:
        return cls(record["kind"], record.get("maildir", ""), tuple(record.get("addresses", ())))


@dataclass(frozen=True)
class Team:
    name: str
    destination: Destination | None
    members: tuple[Member, ...]
    calendar: Calendar = field(default_factory=utc_calendar)
    first_response: timedelta = timedelta(hours=4)
    language: str = "en"
    templates: dict[str, Template] = field(default_factory=dict)
    urgent_contact: str = ""
    escalation: tuple[EscalationLevel, ...] = ()
    escalation_contact: Human | None = None
    # The urgent_contact text by language, where the rules give one per language.
    urgent_contacts: dict[str, str] = field(default_factory=dict)
    # The rules file that defines the team, for the warnings of guardrail check.
    source: str = field(default="", compare=False)
    # Whether a customer's message after the team's answer opens the conversation again with a new deadline.
    reopen_on_reply: bool = True
    # Whether such a message that only says thanks opens it again too.
    reopen_on_thanks: bool = False

    def urgent_contact_in(self, language: str) -> str:
        """Return the urgent_contact text for an acknowledgement in `language`."""
        return self.urgent_contacts.get(language, self.urgent_contact)

    @cached_property
    def member_addresses(self) -> frozenset[str]:
        # Cached: intake reads it for every message, for the team that owns it and for each team that gets a copy.
        return frozenset(member.address for member in self.members)


@dataclass(frozen=True)
class Condition:
    """One test on one field of a message, or a combination of conditions."""

    field: str  # one of FIELDS, or "all", "any", "not"
    operator: str = ""
    values: tuple[str, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()
    header_name: str = ""
    children: tuple[Condition, ...] = ()

    def describe(self) -> str:
        if self.field in COMBINATORS:
            inner = ", ".join(child.describe() for child in self.children)
            return f"{self.field}({inner})"
        name = f"header {self.header_name}" if self.field == "header" else self.field
        shown = self.values[0] if len(self.values) == 1 else list(self.values)
        return f"{name} {self.operator} {shown!r}"


@dataclass(frozen=True)
class Route:
    name: str
    team: str
    source: str
    all: tuple[Condition, ...] = ()
    any: tuple[Condition, ...] = ()
    is_default: bool = False
    first_response: timedelta | None = None
    mode: str = "live"  # "live", or "shadow": evaluated and recorded, never acted on
    owner: Human | None = None
    key: str = ""  # where its rules file defines it, as errors name it: route[2] (billing)
    reopen_on_reply: bool | None = None  # None follows the team's setting
    reopen_on_thanks: bool | None = None  # None follows the team's setting


@dataclass(frozen=True)
class RuleSet:
    teams: dict[str, Team]
    routes: tuple[Route, ...]
    files: tuple[Path, ...]
    digest: str
    needs_body: bool = False
    fallback: Human | None = None
    unstaffed_horizon: timedelta = timedelta(days=14)
    staff_addresses: frozenset[str] = frozenset()
    staff_domains: frozenset[str] = frozenset()
    # The authserv-id whose Authentication-Results header must verify a
    # staff sender's domain; empty when staff senders are taken at their word.
    staff_authserv_id: str = ""
    # The networks whose SMTP clients' Authentication-Results headers are read; empty reads them from any client.
    staff_authserv_peers: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Shadow routes with the number of live routes that precede them.
    shadow_routes: tuple[tuple[int, Route], ...] = ()
    rotations: dict[str, Rotation] = field(default_factory=dict)

    @property
    def default_route(self) -> Route:
        return self.routes[-1]

    @cached_property
    def team_names(self) -> frozenset[str]:
        """Return the names of the teams, computed once rather than for every message."""
        return frozenset(self.teams)

    @cached_property
    def member_teams(self) -> dict[str, frozenset[str]]:
        """Return the names of the teams each member address belongs to, computed once."""
        teams: dict[str, set[str]] = {}
        for team in self.teams.values():
            for address in team.member_addresses:
                teams.setdefault(address.lower(), set()).add(team.name)
        return {address: frozenset(names) for address, names in teams.items()}

    def is_staff(self, address: str) -> bool:
        """Return True for team members and configured staff addresses or domains."""
        address = address.lower()
        return address in self.staff_addresses or address.rpartition("@")[2] in self.staff_domains

    def escalation_contact(self, team: Team) -> Human | None:
        """Return whom to tell at once about a problem with `team`."""
        if team.escalation_contact:
            return team.escalation_contact
        return self.fallback

    def route_owner(self, route_name: str, team_name: str, now: datetime) -> Human | None:
        """Return the recipient of an alarm about a route: its owner, else its team's escalation contact, else the fallback human.

        Without a fallback human, the first person in the team's escalation
        chain gets the alarm, or whoever is on call at `now` when that level
        names a rotation. The route or team may be gone from the rules since
        the alarm's data was stored.
        """
        route = next((route for route in self.routes if route.name == route_name), None)
        if route is not None and route.owner is not None:
            return route.owner
        team = self.teams.get(team_name)
        if team is None:
            return self.fallback
        contact = self.escalation_contact(team)
        if contact is None:
            contact = next((level.human_at(now) for level in team.escalation if level.names_human), None)
        return contact


def load_rules(
    directory: Path, base: Path, *, today: date | None = None, fix: str = "set rules.directory in the config",
) -> RuleSet:
    """Load every `*.toml` file in `directory`; relative maildir paths resolve against `base`.

    `fix` tells how to name another folder, in the error for a folder that
    does not exist or has no rule files. Raises ConfigErrors listing every
    problem in every file.
    """
    errors: list[ConfigError] = []
    # Skip names that start with a dot, as a shell's *.toml does. Emacs keeps a
    # lock ".#NAME.toml", a dangling symbolic link, beside a file being edited.
    files = sorted(path for path in directory.glob("*.toml") if not path.name.startswith(".")) if directory.is_dir() else []
    if not files:
        if directory.is_dir():
            problem = "contains no *.toml rule files"
        elif directory.exists():
            problem = "is not a folder"
        else:
            problem = "does not exist"
        raise ConfigErrors([ConfigError(directory, "", f"rules folder {problem}; {fix}")])

    digest = hashlib.sha256()
    entries: dict[str, list[Table]] = {"team": [], "route": [], "calendar": [], "rotation": [], "template": []}
    settings: list[Table] = []
    # A team, calendar or template in a file that did not parse is still named elsewhere. So names that
    # no file defines are reported only when every file was read, because "team 'support' does not
    # exist" is wrong after a typo in the file that defines it.
    every_file_read = True
    for path in files:
        raw = read_file(path, errors)
        data = parse_toml(path, raw, errors) if raw is not None else None
        if raw is None or data is None:
            every_file_read = False
            continue
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
        top = Table(path, data, "", errors)
        for name in entries:
            entries[name] += _entries(top, name)
        if top.has("escalation") or top.has("staff"):
            top.raw("escalation")
            top.raw("staff")
            settings.append(top)
        top.finish()

    today = today or date.today()
    calendars = _by_name(entries["calendar"], lambda table: load_calendar(table, today), "calendar")
    rotations = _by_name(entries["rotation"], load_rotation, "rotation")
    # Every rotation a file names, with None for an invalid one: a level that names it gets no
    # second error saying that the rotation does not exist.
    named = [table.data["name"] for table in entries["rotation"] if isinstance(table.data.get("name"), str)]
    known_rotations: dict[str, Rotation | None] = {**dict.fromkeys(named), **rotations}
    templates: dict[str, dict[str, Template]] = {}
    for table in entries["template"]:
        template = load_template(table)
        if template is None:
            continue
        if template.language in templates.setdefault(template.name, {}):
            table.problem("language", f"template {template.name!r} has two {template.language!r} variants")
        templates[template.name][template.language] = template

    fallback, horizon, staff_addresses, staff_domains, authserv_id, authserv_peers = _load_settings(settings)
    teams = _by_name(
        entries["team"],
        lambda table: _load_team(table, base, calendars, known_rotations, templates, fallback, today, every_file_read),
        "team",
    )
    unreadable = bool(errors)
    routes, shadow_routes = _load_routes(
        entries["route"], teams, errors, directory, today, check_default=not unreadable, check_names=every_file_read,
    )
    if errors:
        raise ConfigErrors(errors)

    needs_body = any(_uses_body(condition) for route in routes for condition in route.all + route.any)
    members = frozenset(address for team in teams.values() for address in team.member_addresses)
    return RuleSet(
        teams, tuple(routes), tuple(files), digest.hexdigest(), needs_body,
        fallback=fallback, unstaffed_horizon=horizon,
        staff_addresses=members | _escalation_addresses(teams, fallback) | staff_addresses,
        staff_domains=staff_domains, staff_authserv_id=authserv_id, staff_authserv_peers=authserv_peers,
        shadow_routes=tuple(shadow_routes), rotations=rotations,
    )


def _escalation_addresses(teams: dict[str, Team], fallback: Human | None) -> frozenset[str]:
    """Return the addresses of the humans that escalations go to: chain levels, escalation contacts and the fallback.

    A level that names a rotation adds every person of the rotation and of
    its overrides. Escalation mail instructs them to reply to the sender
    with the shared inbox in Cc, so their replies must mark the conversation answered.
    """
    humans = [level.human for team in teams.values() for level in team.escalation]
    humans += [human for team in teams.values() for level in team.escalation if level.rotation for human in level.rotation.humans]
    humans += [team.escalation_contact for team in teams.values()]
    humans.append(fallback)
    return frozenset(human.address.lower() for human in humans if human is not None)


def _by_name(tables: list[Table], load: Any, kind: str) -> dict[str, Any]:
    """Load each table with `load` and index the results by name, rejecting duplicates."""
    loaded: dict[str, Any] = {}
    for table in tables:
        item = load(table)
        if item is None:
            continue
        if item.name in loaded:
            table.problem("name", f"{kind} {item.name!r} is defined twice; {kind} names must be unique")
        loaded[item.name] = item
    return loaded


def _load_settings(
    tables: list[Table],
) -> tuple[Human | None, timedelta, frozenset[str], frozenset[str], str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    fallback: Human | None = None
    authserv_id = ""
    peers: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    horizon = timedelta(days=14)
    addresses: set[str] = set()
    domains: set[str] = set()
    peers_table: Table | None = None
    for top in tables:
        if top.has("escalation"):
            escalation = top.table("escalation")
            if escalation.has("fallback"):
                if fallback is not None:
                    escalation.problem("fallback", "the fallback human is defined in more than one file; keep one")
                fallback = load_named_human(escalation, "fallback") or fallback
            horizon = escalation.duration("unstaffed_horizon", horizon)
            escalation.finish()
        if top.has("staff"):
            staff = top.table("staff")
            for index, address in enumerate(staff.strings("addresses")):
                if not is_address(address.strip()):
                    staff.fail(f"addresses[{index}]", address, "an email address such as ann@example.com")
                addresses.add(address.strip().lower())
            for index, domain in enumerate(staff.strings("domains")):
                if not _DOMAIN.fullmatch(domain.strip().strip(".")):
                    staff.fail(f"domains[{index}]", domain, "a domain without @ or spaces, such as example.com")
                domains.add(domain.strip().lower().strip("."))
            if staff.has("authserv_id"):
                if authserv_id:
                    staff.problem("authserv_id", "the authserv-id is set in more than one file; keep one")
                value = (staff.string("authserv_id") or "").strip().lower()
                if value and not re.fullmatch(r"[^\s;()\"]+", value):
                    staff.fail("authserv_id", value, "one word without spaces, such as the host name of the MTA in front")
                elif value:
                    authserv_id = value
            if staff.has("authserv_peers"):
                peers_table = staff
            for index, text in enumerate(staff.strings("authserv_peers")):
                try:
                    peers.append(ipaddress.ip_network(text.strip(), strict=False))
                except ValueError:
                    staff.fail(f"authserv_peers[{index}]", text, "an IP address or network, such as '127.0.0.1' or '10.0.0.0/24'")
            staff.finish()
    if peers_table is not None and not authserv_id:
        peers_table.problem("authserv_peers", "reads the header that authserv_id names, so set authserv_id too, or remove this key")
    return fallback, horizon, frozenset(addresses), frozenset(domains), authserv_id, tuple(peers)


def _entries(top: Table, name: str) -> list[Table]:
    value = top.raw(name, [])
    if not isinstance(value, list):
        top.fail(name, value, f"an array of tables written as [[{name}]]")
        return []
    return [Table(top.path, item, f"{name}[{index}]", top.errors) for index, item in enumerate(value)]


def _load_team(
    table: Table,
    base: Path,
    calendars: dict[str, Calendar],
    rotations: dict[str, Rotation | None],
    templates: dict[str, dict[str, Template]],
    fallback: Human | None,
    today: date,
    check_names: bool = True,
) -> Team | None:
    name = table.string("name", required=True)
    if name:
        table.prefix = f"{table.prefix} ({name})"
    destination = _load_destination(table, base)
    members = _load_members(table)
    calendar = _team_calendar(table, calendars, check_names)
    first_response = table.duration("first_response", timedelta(hours=4))
    _check_reachable(table, first_response, calendar, today)
    language = (table.string("language", "en") or "en").lower()
    template_name = table.string("template", "standard") or "standard"
    urgent_contacts = _urgent_contacts(table) if isinstance(table.raw("urgent_contact"), dict) else {}
    if urgent_contacts:
        urgent_contact = urgent_contacts.get(language, "")
    else:
        urgent_contact = table.string("urgent_contact", "", allow_empty=True) or ""
    escalation = load_escalation(table, "escalation", rotations, check_names=check_names)
    contact = load_named_human(table, "escalation_contact") if table.has("escalation_contact") else None
    reopen_on_reply = table.boolean("reopen_on_reply", True)
    reopen_on_thanks = table.boolean("reopen_on_thanks", False)
    table.finish()

    team_templates = templates.get(template_name, {})
    if not team_templates:
        if check_names:
            known = ", ".join(sorted(templates)) or "none"
            table.problem("template", f"template {template_name!r} does not exist; defined templates: {known}")
    elif not is_supported_language(language):
        table.fail("language", language, LANGUAGE_EXPECTED)
    elif language not in team_templates:
        table.problem("language", f"template {template_name!r} has no {language!r} variant; it has {sorted(team_templates)}")
    # A rotation level is passed over: this text is written once, when the rules load, and would keep
    # naming whoever was on call then.
    first_human = next((level.human for level in escalation if level.human), None) or fallback
    for variant in sorted(urgent_contacts.keys() - team_templates.keys()):
        table.problem(f"urgent_contact.{variant}", f"template {template_name!r} has no {variant!r} variant; it has {sorted(team_templates)}")
    if not urgent_contact and first_human is not None:
        # Without an explicit text, senders are pointed at the first named human, in their language.
        urgent_contact = f"{write_to('en')} {first_human.formatted()}"
        urgent_contacts = {
            variant: urgent_contacts.get(variant) or f"{write_to(variant)} {first_human.formatted()}" for variant in team_templates
        }
    if not escalation and fallback is None:
        table.problem("escalation", "no escalation chain and no [escalation] fallback; every conversation must end with a named human")
    if not name:
        return None
    return Team(
        name, destination, members, calendar, first_response, language, team_templates,
        urgent_contact, escalation, contact, urgent_contacts, str(table.path), reopen_on_reply, reopen_on_thanks,
    )


def _urgent_contacts(table: Table) -> dict[str, str]:
    """Read an urgent_contact given as a table of texts by language, such as { en = "...", fr = "..." }."""
    texts = table.table("urgent_contact", 'a string, or a table of texts by language such as { en = "...", fr = "..." }')
    contacts = {}
    for variant in list(texts.data):
        text = texts.string(variant, "", allow_empty=True)
        if text is not None:
            contacts[variant.lower()] = text
    texts.finish()
    return contacts


def _load_members(table: Table) -> tuple[Member, ...]:
    members = []
    raw_members = table.raw("members", [])
    if not isinstance(raw_members, list):
        table.fail("members", raw_members, 'a list of tables such as { name = "Ann", address = "ann@example.com" }')
        raw_members = []
    for index, item in enumerate(raw_members):
        member_table = Table(table.path, item, table.key(f"members[{index}]"), table.errors)
        member_name = member_table.string("name", required=True)
        address = member_table.string("address", required=True)
        if address is not None and not is_address(address):
            member_table.fail("address", address, "an email address such as ann@example.com")
        member_table.finish()
        if member_name and address:
            members.append(Member(member_name, address.lower()))
    return tuple(members)


def _check_reachable(table: Table, first_response: timedelta, calendar: Calendar, today: date) -> None:
    """Record a problem when `first_response` of business time does not fit in the calendar's SEARCH_LIMIT after `today` began.

    Deadline arithmetic looks no further ahead, so such a first response
    would leave every conversation without a deadline. A calendar with no
    business time at all is left alone: its team is unstaffed, and its
    conversations are escalated at once.
    """
    now = datetime(today.year, today.month, today.day, tzinfo=UTC)
    if first_response <= timedelta(0) or next_open_interval(calendar, now, SEARCH_LIMIT) is None:
        return
    if add_business_time(now, first_response, calendar) is None:
        table.problem(
            "first_response",
            f"{toml_text(table.raw('first_response'))} of business time does not fit in the next"
            f" {SEARCH_LIMIT.days} days of the team's calendar, so no deadline could be set; use a shorter first_response",
        )


def _team_calendar(table: Table, calendars: dict[str, Calendar], check_names: bool = True) -> Calendar:
    calendar_name = table.string("calendar")
    if calendar_name is None:
        return utc_calendar()
    if calendar_name not in calendars:
        if check_names:
            known = ", ".join(sorted(calendars)) or "none"
            table.problem("calendar", f"calendar {calendar_name!r} does not exist; defined calendars: {known}")
        return utc_calendar()
    return calendars[calendar_name]


def unstaffed_reason(team: Team, now: Any, horizon: timedelta) -> str | None:
    """Return why nobody staffs `team` at `now`, or None when it is staffed."""
    if team.destination is None:
        return "the team has no destination"
    if not team.members:
        return "the team has no members"
    if next_open_interval(team.calendar, now, horizon) is None:
        return f"the team has no business hours in the next {span_text(horizon)}"
    return None


def span_text(span: timedelta) -> str:
    """Return `span` in the largest unit that divides it whole: "14 days", "1 day", "12 hours", "90 minutes"."""
    seconds = int(span.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} second{'' if seconds == 1 else 's'}"


def _load_destination(table: Table, base: Path) -> Destination | None:
    if not table.has("destination"):
        return None
    spec = table.table("destination", expected='a table such as { maildir = "PATH" } or { smtp = ["ADDRESS", ...] }')
    maildir = spec.string("maildir")
    smtp = spec.raw("smtp")
    spec.finish()
    if (maildir is None) == (smtp is None):
        spec.problem("", 'set exactly one of maildir = "PATH" or smtp = ["ADDRESS", ...]')
        return None
    if maildir is not None:
        folder = spec.local_path("maildir", base)
        return Destination("maildir", maildir=str(folder)) if folder is not None else None
    addresses = [smtp] if isinstance(smtp, str) else smtp
    if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) and is_address(a) for a in addresses):
        spec.fail("smtp", smtp, "an email address or a list of email addresses")
        return None
    return Destination("smtp", addresses=tuple(address.lower() for address in addresses))


def _load_routes(
    entries: list[Table],
    teams: dict[str, Team],
    errors: list[ConfigError],
    directory: Path,
    today: date,
    *,
    check_default: bool,
    check_names: bool = True,
) -> tuple[list[Route], list[tuple[int, Route]]]:
    routes: list[Route] = []
    defaults: list[Route] = []
    shadows: list[tuple[int, Route]] = []
    names: set[str] = set()
    errors_before = len(errors)
    for table in entries:
        route = _load_route(table, teams, today, check_names)
        if route is None:
            continue
        if route.name in names:
            table.problem("name", f"route {route.name!r} is defined twice; route names must be unique")
        names.add(route.name)
        if route.mode == "shadow":
            shadows.append((len(routes), route))
        elif route.is_default and defaults:
            first = defaults[0]
            table.problem("default", f"a second default route; {first.name!r} in {first.source} is the default already; keep exactly one")
        else:
            (defaults if route.is_default else routes).append(route)

    # A file that did not parse, or a route with an error, may hold the default route, so report nothing then.
    if check_default and not defaults and entries and len(errors) == errors_before:
        errors.append(ConfigError(entries[-1].path, "route", "no default route; add a [[route]] with default = true"))
    if check_default and not entries:
        errors.append(ConfigError(directory, "route", "no routes defined; add at least a [[route]] with default = true"))
    return routes + defaults[:1], shadows


def _load_route(table: Table, teams: dict[str, Team], today: date, check_names: bool = True) -> Route | None:
    name = table.string("name", required=True)
    if name:
        table.prefix = f"{table.prefix} ({name})"
    team = table.string("team", required=True)
    if team is not None and team not in teams and check_names:
        known = ", ".join(sorted(teams)) or "none"
        table.problem("team", f"team {team!r} does not exist; defined teams: {known}")
    is_default = table.boolean("default", False)
    # A value such as default = "true" is an error of its own; whether the route needs conditions is unknown then.
    default_invalid = table.has("default") and not isinstance(table.raw("default"), bool)
    first_response = table.duration("first_response", timedelta(0)) if table.has("first_response") else None
    if first_response and team in teams:
        _check_reachable(table, first_response, teams[team].calendar, today)
    mode = table.choice("mode", "live", ("live", "shadow"))
    owner = load_named_human(table, "owner") if table.has("owner") else None
    reopen_on_reply = table.boolean("reopen_on_reply", True) if table.has("reopen_on_reply") else None
    reopen_on_thanks = table.boolean("reopen_on_thanks", False) if table.has("reopen_on_thanks") else None
    all_conditions = _load_condition_list(table, "all")
    any_conditions = _load_condition_list(table, "any")
    table.finish()

    if is_default and mode == "shadow":
        table.problem("mode", "the default route cannot be a shadow route; shadow a route with conditions")
    if is_default and (all_conditions or any_conditions):
        table.problem("default", "a default route matches everything, so it cannot have all or any conditions")
    if not is_default and not default_invalid and not (table.has("all") or table.has("any")):
        table.problem("", "route has no conditions; add all = [...] or any = [...], or set default = true")
    if not name or team is None:
        return None
    return Route(
        name, team, str(table.path), tuple(all_conditions), tuple(any_conditions), is_default, first_response, mode, owner,
        key=table.prefix, reopen_on_reply=reopen_on_reply, reopen_on_thanks=reopen_on_thanks,
    )


def _load_condition_list(table: Table, key: str) -> list[Condition]:
    value = table.raw(key)
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        table.fail(key, value, 'a non-empty list of conditions such as [{ subject.contains = "invoice" }]')
        return []
    conditions = []
    for index, item in enumerate(value):
        condition = _load_condition(Table(table.path, item, table.key(f"{key}[{index}]"), table.errors))
        if condition is not None:
            conditions.append(condition)
    return conditions


def _load_condition(table: Table) -> Condition | None:
    keys = list(table.data)
    if len(keys) != 1:
        table.problem("", f"a condition has exactly one field ({', '.join(FIELDS)}) or one of all/any/not; found {keys}")
        return None
    (field_name,) = keys
    spec = table.raw(field_name)

    if field_name in ("all", "any"):
        children = _load_condition_list(table, field_name)
        return Condition(field_name, children=tuple(children)) if children else None
    if field_name == "not":
        child = _load_condition(Table(table.path, spec, table.key("not"), table.errors))
        return Condition("not", children=(child,)) if child else None
    if field_name == "header":
        return _load_header_condition(Table(table.path, spec, table.key("header"), table.errors))
    if field_name not in FIELDS:
        table.problem(field_name, f"unknown field; use one of {', '.join(FIELDS)}, all, any or not")
        return None
    return _load_operator(table, field_name, spec, header_name="")


def _load_header_condition(table: Table) -> Condition | None:
    names = list(table.data)
    if len(names) != 1:
        table.problem("", 'name one header per condition, such as { header.X-Priority.is = "1" }')
        return None
    (header_name,) = names
    if not _FIELD_NAME.fullmatch(header_name):
        table.fail(header_name, header_name, "a header field name: printable ASCII without spaces or colons, such as X-Priority")
        return None
    return _load_operator(table, "header", table.raw(header_name), header_name=header_name)


def _load_operator(table: Table, field_name: str, spec: Any, header_name: str) -> Condition | None:
    key = header_name or field_name
    if isinstance(spec, (str, list)):
        spec = {"is": spec}
    if not isinstance(spec, dict) or len(spec) != 1:
        table.fail(key, spec, f"one operator ({', '.join(OPERATORS)}) with a string or a list of strings")
        return None
    ((operator, value),) = spec.items()
    if operator not in OPERATORS:
        table.problem(f"{key}.{operator}", f"unknown operator; use one of {', '.join(OPERATORS)}")
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(item, str) for item in values):
        table.fail(f"{key}.{operator}", value, "a string or a non-empty list of strings")
        return None
    if not all(item.strip() for item in values):
        # "contains" and "regex" would match every message, and "is" none.
        table.fail(f"{key}.{operator}", value, "non-empty strings")
        return None

    patterns = []
    if operator == "regex":
        patterns = _compile_patterns(table, f"{key}.{operator}", field_name, values)
        if patterns is None:
            return None
    if operator != "regex":
        # "is" and "contains" ignore case on every field.
        values = [item.strip().lower() for item in values]
    return Condition(field_name, operator, tuple(values), tuple(patterns), header_name)


def _compile_patterns(table: Table, key: str, field_name: str, values: list[str]) -> list[re.Pattern[str]] | None:
    # Address and domain patterns are full matches and ignore case, so
    # 'ceo@example\.com' never matches 'ceo@example.com.attacker.example'.
    flags = re.IGNORECASE if field_name in (*ADDRESS_FIELDS, "from_domain") else 0
    compiled = []
    for pattern in values:
        regex = table.regex(key, pattern, flags)
        if regex is None:
            return None
        compiled.append(regex)
    return compiled


def _uses_body(condition: Condition) -> bool:
    if condition.field == "body":
        return True
    return any(_uses_body(child) for child in condition.children)
