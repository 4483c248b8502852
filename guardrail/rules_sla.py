"""Rule-file parts for promises and people: calendars, templates, escalation chains.

`rules.load_rules` calls these loaders; each records errors on the Table it
reads, so a bad calendar or template is reported with its file and key.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .business_hours import ALWAYS_OPEN, DAYS, Calendar, Window, parse_window
from .config import is_address
from .locales import is_supported_language
from .rotations import Override, Rotation, local_instant, on_call
from .tomlcheck import MAX_DURATION, MAX_DURATION_TEXT, Table, parse_duration, toml_text

# Merge fields an acknowledgement template may use.
TEMPLATE_FIELDS = {
    "sender_name": "the sender's display name, or their address",
    "sender": "the sender's address",
    "subject": "the subject of the message",
    "reference": "the conversation reference, such as GR-7K3M9Q",
    "team": "the team's name",
    "deadline": "when a human will answer, in the team's time zone and the sender's language",
    "urgent_contact": "the team's urgent_contact text",
}
WEBHOOK_FORMATS = ("json", "slack")
LANGUAGE_EXPECTED = 'a BCP 47 language tag that Babel has dates for, such as "en", "fr", "pt-BR" or "zh-Hant"'


@dataclass(frozen=True)
class Human:
    """A named person who can be told about a conversation."""

    name: str
    address: str

    def formatted(self) -> str:
        return f"{self.name} <{self.address}>"


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str  # "json" or "slack"
    secret_env: str | None = None


@dataclass(frozen=True)
class EscalationLevel:
    """One step of a chain: who is told, how long after the deadline.

    A level names a fixed `human` or a `rotation`, whose person on call at
    the moment the level fires gets the escalation. A level that only calls
    a webhook names neither.
    """

    after: timedelta
    human: Human | None
    webhook: Webhook | None
    rotation: Rotation | None = None

    @property
    def names_human(self) -> bool:
        return self.human is not None or self.rotation is not None

    def human_at(self, instant: datetime) -> Human | None:
        """Return the human that this level notifies when it fires at `instant`."""
        if self.rotation is not None:
            return on_call(self.rotation, instant)
        return self.human


@dataclass(frozen=True)
class Template:
    """An acknowledgement in one language, with a plain variant that has no merge fields."""

    name: str
    language: str
    subject: str
    body: str
    plain_subject: str
    plain_body: str

    @cached_property
    def fields(self) -> frozenset[str]:
        return frozenset(template_fields(self.subject) | template_fields(self.body))


def template_fields(text: str) -> set[str]:
    """Return the merge-field names used in `text` (raises ValueError on bad syntax)."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def formatted_fields(text: str) -> list[str]:
    """Return the merge fields of `text` that carry a format spec or a conversion, as written.

    Every merge field is text, so a spec such as `:d` raises when the
    acknowledgement is rendered, and every acknowledgement would then fall
    back to the plain variant.
    """
    written = []
    for _, name, spec, conversion in string.Formatter().parse(text):
        if name is None or not (spec or conversion):
            continue
        field = name
        if conversion:
            field += f"!{conversion}"
        if spec:
            field += f":{spec}"
        written.append("{" + field + "}")
    return written


def load_human(table: Table, name_key: str = "name", address_key: str = "address") -> Human | None:
    errors_before = len(table.errors)
    name = table.string(name_key)
    address = table.string(address_key)
    if address is not None and not is_address(address):
        table.fail(address_key, address, "an email address such as dana@example.com")
    if len(table.errors) > errors_before:
        return None
    if name and address:
        return Human(name, address.lower())
    if name or address:
        table.problem(name_key if not name else address_key, "a named human needs both name and address")
    return None


def load_named_human(parent: Table, key: str) -> Human | None:
    """Load the table under `key`, which must contain only a human's name and address."""
    table = parent.table(key)
    if table.has("rotation"):
        # The fallback human and an escalation contact get the mail that an
        # on-call person could not be sent, so they must not depend on a rotation.
        table.raw("rotation")
        table.problem("rotation", "a rotation cannot be named here; give a fixed human's name and address,"
                      " and name the rotation in an escalation level")
    human = load_human(table)
    table.finish(allowed=("name", "address"))
    return human


def load_calendar(table: Table, today: date) -> Calendar | None:
    """Load one [[calendar]] table."""
    name = table.string("name", required=True)
    if name:
        table.prefix = f"{table.prefix} ({name})"
    # An empty name goes to ZoneInfo like any other, so it gets the unknown-zone error.
    zone_name = table.string("timezone", allow_empty=True)
    try:
        zone = ZoneInfo(zone_name if zone_name is not None else "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        table.fail("timezone", zone_name, 'an IANA time zone such as "Europe/Paris"')
        zone = ZoneInfo("UTC")
    weekly = _load_hours(table, table.raw("hours", "24x7"))
    holidays = _load_holidays(table, today)
    table.finish()
    if not name or weekly is None:
        return None
    return Calendar(name, zone, weekly, holidays)


def _load_hours(table: Table, hours: Any) -> tuple[tuple[Window, ...], ...] | None:
    if hours == "24x7":
        return ALWAYS_OPEN
    if not isinstance(hours, dict):
        table.fail("hours", hours, '"24x7" or a table such as { mon = ["09:00-18:00"], ... }')
        return None
    weekly: list[tuple[Window, ...]] = []
    for day in DAYS:
        windows = []
        texts = hours.get(day, [])
        if not isinstance(texts, list):
            texts = [texts]
        for text in texts:
            window = parse_window(text) if isinstance(text, str) else None
            if window is None:
                table.fail(f"hours.{day}", text, 'a window "HH:MM-HH:MM" (22:00-06:00 runs past midnight; 24:00 ends a day)')
                continue
            windows.append(window)
        weekly.append(tuple(sorted(windows, key=lambda window: window.start)))
    for day in hours:
        if day not in DAYS:
            table.problem(f"hours.{day}", f"unknown day; use {', '.join(DAYS)}")
    return tuple(weekly)


def _load_holidays(table: Table, today: date) -> frozenset[date]:
    dates: set[date] = set()
    values = table.raw("holidays", [])
    if not isinstance(values, list):
        table.fail("holidays", values, "a list of dates such as [2026-12-24]")
        values = []
    for index, value in enumerate(values):
        day = _holiday(value)
        if day is None:
            table.fail(f"holidays[{index}]", value, "a date such as 2026-12-24")
        else:
            dates.add(day)
    country = table.string("country")
    subdivision = table.string("subdivision")
    if subdivision is not None and country is None and not table.has("country"):
        table.problem("subdivision", f"{subdivision!r} is set without country; set country to its country code, such as \"DE\"")
    if country:
        import holidays as holiday_calendars

        # NOTE: country holidays are loaded for last year to three years
        # ahead of the day the rules were loaded; reload yearly.
        years = range(today.year - 1, today.year + 4)
        try:
            dates |= set(holiday_calendars.country_holidays(country, subdiv=subdivision, years=years))
        except NotImplementedError:
            # holidays (0.109) raises NotImplementedError for an unknown country and for an unknown subdivision.
            subdivisions = holiday_calendars.list_supported_countries().get(country)
            if subdivisions is None:
                table.fail("country", country, 'a country code known to the holidays package, such as "FR"')
            else:
                table.fail("subdivision", subdivision, f"a subdivision of {country}: {_shortened(subdivisions)}")
    return frozenset(dates)


def _shortened(names: list[str], limit: int = 20) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f" and {len(names) - limit} more"


def _holiday(value: Any) -> date | None:
    """Return `value` as a date when it is a TOML date or an ISO date string, else None."""
    # A TOML date-time is a datetime, which is a subclass of date but never equals one.
    if isinstance(value, datetime):
        return None
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            return None
    return None


def load_template(table: Table) -> Template | None:
    """Load one [[template]] table and check its merge fields."""
    name = table.string("name", required=True)
    language = table.string("language", required=True)
    if name and language:
        table.prefix = f"{table.prefix} ({name}/{language})"
    texts = {key: table.string(key, required=True) for key in ("subject", "body", "plain_subject", "plain_body")}
    table.finish()
    if language and not is_supported_language(language):
        table.fail("language", language, LANGUAGE_EXPECTED)
        language = None
    for key, text in texts.items():
        if text is None:
            continue
        try:
            fields = template_fields(text)
        except ValueError as error:
            table.problem(key, f"invalid template: {error}; write a literal brace as {{{{ or }}}}")
            continue
        if key.startswith("plain_") and fields:
            table.problem(key, f"the plain variant must have no merge fields, found {sorted(fields)}")
        unknown = fields - TEMPLATE_FIELDS.keys()
        if unknown and not key.startswith("plain_"):
            table.problem(key, f"unknown merge fields {sorted(unknown)}; use {', '.join(sorted(TEMPLATE_FIELDS))}")
        formatted = formatted_fields(text)
        if formatted and not key.startswith("plain_"):
            table.problem(key, f"write merge fields as {{name}}, without a format or conversion: {', '.join(formatted)}")
        if key in ("subject", "plain_subject") and ("\n" in text or "\r" in text):
            table.problem(key, "a subject must be one line")
    if not (name and language) or None in texts.values():
        return None
    return Template(name, language.lower(), **texts)  # type: ignore[arg-type]


def load_escalation(
    table: Table, key: str, rotations: dict[str, Rotation | None], *, check_names: bool = True,
) -> tuple[EscalationLevel, ...]:
    """Load a team's escalation chain from `key`, a list of level tables.

    `rotations` maps the name of an invalid rotation to None. `check_names`
    is False when a rule file did not parse, so that a rotation it may
    define is not reported as unknown.
    """
    value = table.raw(key, [])
    if not isinstance(value, list):
        table.fail(key, value, 'a list such as [{ after = "0m", name = "Dana Duty", address = "dana@example.com" }]')
        return ()
    levels = []
    # Whether the chain's last level names a person, counting a rotation that could not be looked up.
    ends: list[tuple[timedelta, bool]] = []
    for index, item in enumerate(value):
        level_table = Table(table.path, item, table.key(f"{key}[{index}]"), table.errors)
        after = _level_after(level_table)
        errors_before = len(level_table.errors)
        rotation = _level_rotation(level_table, rotations, check_names)
        human = load_human(level_table)
        webhook = _load_webhook(level_table) if level_table.has("webhook") else None
        # An invalid human, rotation or webhook has an error of its own that explains the level.
        invalid = len(level_table.errors) > errors_before
        level_table.finish()
        if level_table.has("rotation"):
            ends.append((after, True))
            if rotation is None:
                continue
        elif human is None and webhook is None:
            if not invalid:
                level_table.problem("", "a level needs a named human (name and address) or a rotation, a webhook, or both")
            continue
        else:
            ends.append((after, human is not None))
        levels.append(EscalationLevel(after, human, webhook, rotation))
    levels.sort(key=lambda level: level.after)
    ends.sort(key=lambda end: end[0])
    if ends and not ends[-1][1]:
        table.problem(key, "the chain ends without a named human; give its last level a name and address, or a rotation")
    return tuple(levels)


def _level_after(table: Table) -> timedelta:
    value = table.raw("after", "0m")
    after = parse_duration(value)
    if after is None:
        table.fail("after", value, 'a duration such as "0m" or "2h"')
        return timedelta(0)
    if after > MAX_DURATION:
        table.fail("after", value, f"a duration of at most {MAX_DURATION_TEXT}")
        return timedelta(0)
    return after


def _level_rotation(table: Table, rotations: dict[str, Rotation | None], check_names: bool) -> Rotation | None:
    """Return the rotation that a level names, or None when it names none, an unknown one or an invalid one.

    `rotations` maps the name of an invalid rotation to None, because its own errors explain it.
    """
    name = table.string("rotation")
    if name is None:
        return None
    if table.has("name") or table.has("address"):
        table.problem("rotation", "a level names a rotation or a human, not both; remove name and address, or remove rotation")
    if name not in rotations:
        if check_names:
            known = ", ".join(sorted(rotations)) or "none"
            table.problem("rotation", f"rotation {name!r} does not exist; defined rotations: {known}")
        return None
    return rotations[name]


def load_rotation(table: Table) -> Rotation | None:
    """Load one [[rotation]] table."""
    name = table.string("name", required=True)
    if name:
        table.prefix = f"{table.prefix} ({name})"
    zone_name = table.string("timezone", required=True, allow_empty=True)
    zone = None
    if zone_name is not None:
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            table.fail("timezone", zone_name, 'an IANA time zone such as "Europe/Paris"')
    handoff = _local_time(table, "handoff", required=True)
    shift = _shift(table)
    people = _rotation_people(table)
    overrides = _overrides(table, zone) if zone is not None else ()
    table.finish()
    if not (name and zone and handoff and shift and people) or overrides is None:
        return None
    return Rotation(name, zone, handoff, shift, people, overrides, str(table.path))


_LOCAL_TIME_EXPECTED = "a local date-time in the rotation's time zone, such as 2026-11-30T09:00:00 or \"2026-11-30T09:00\""


def _local_time(table: Table, key: str, *, required: bool = False) -> datetime | None:
    """Return the naive local date-time under `key`, written bare in TOML (with seconds) or as an ISO 8601 string."""
    value = table.raw(key)
    if value is None:
        if required:
            table.problem(key, f"missing; this key is required: {_LOCAL_TIME_EXPECTED}")
        return None
    when = value if isinstance(value, datetime) else None
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            when = None
    if when is None:
        table.fail(key, value, _LOCAL_TIME_EXPECTED)
        return None
    if when.tzinfo is not None:
        table.problem(key, f"{toml_text(value)} has a UTC offset; remove it, because the timezone key gives the zone")
        return None
    return when


# Shifts shorter than a day divide it, so the hand-offs fall at the same local times every day.
_SHIFT_HOURS = (1, 2, 3, 4, 6, 8, 12)
_SHIFT_HOURS_TEXT = ", ".join(f'"{hours}h"' for hours in _SHIFT_HOURS[:-1]) + f' or "{_SHIFT_HOURS[-1]}h"'
_SHIFT_EXPECTED = (
    f'a positive whole number of days such as "7d", "1w" or "1d", of at most {MAX_DURATION_TEXT},'
    f" or a whole number of hours that divides 24: {_SHIFT_HOURS_TEXT}"
)


def _shift(table: Table) -> timedelta | None:
    """Return the length of a shift under `shift`: whole days, or whole hours that divide a day ("24h" is "1d")."""
    value = table.raw("shift")
    if value is None:
        table.problem("shift", f"missing; this key is required: {_SHIFT_EXPECTED}")
        return None
    shift = parse_duration(value)
    if shift is None or not _is_shift_length(shift):
        table.fail("shift", value, _SHIFT_EXPECTED)
        return None
    return shift


def _is_shift_length(shift: timedelta) -> bool:
    if shift in {timedelta(hours=hours) for hours in _SHIFT_HOURS}:
        return True
    return timedelta(0) < shift <= MAX_DURATION and shift % timedelta(days=1) == timedelta(0)


def _rotation_people(table: Table) -> tuple[Human, ...]:
    value = table.raw("people")
    example = '[{ name = "Sam Ortiz", address = "sam.ortiz@example.com" }, ...]'
    if value is None:
        table.problem("people", f"missing; list who takes turns on call, in order, such as {example}")
        return ()
    if not isinstance(value, list) or not value:
        table.fail("people", value, f"a non-empty list of people in order, such as {example}")
        return ()
    people = []
    for index, item in enumerate(value):
        person_table = Table(table.path, item, table.key(f"people[{index}]"), table.errors)
        person = _required_human(person_table)
        person_table.finish(allowed=("name", "address"))
        if person is not None:
            people.append(person)
    return tuple(people) if len(people) == len(value) else ()


def _required_human(table: Table) -> Human | None:
    """Load a human whose name and address are both required."""
    errors_before = len(table.errors)
    human = load_human(table)
    if human is None and len(table.errors) == errors_before:
        table.problem("", 'missing name and address; give both, such as { name = "Sam Ortiz", address = "sam.ortiz@example.com" }')
    return human


def _overrides(table: Table, zone: ZoneInfo) -> tuple[Override, ...] | None:
    """Return the rotation's overrides in the order written, or None when one is invalid."""
    value = table.raw("overrides", [])
    if not isinstance(value, list):
        table.fail("overrides", value, 'a list such as [{ from = 2026-12-21T09:00:00, until = 2026-12-28T09:00:00, name = "...", address = "..." }]')
        return None
    overrides = []
    for index, item in enumerate(value):
        override_table = Table(table.path, item, table.key(f"overrides[{index}]"), table.errors)
        starts = _local_time(override_table, "from", required=True)
        ends = _local_time(override_table, "until", required=True)
        human = _required_human(override_table)
        override_table.finish(allowed=("from", "until", "name", "address"))
        if starts is None or ends is None or human is None:
            continue
        if ends <= starts:
            override_table.problem("until", f"{ends.isoformat()} is not after from ({starts.isoformat()}); set until after from")
            continue
        overrides.append(Override(local_instant(starts, zone), local_instant(ends, zone), human))
    return tuple(overrides) if len(overrides) == len(value) else None


def _load_webhook(table: Table) -> Webhook | None:
    spec = table.table("webhook")
    url = spec.string("url", required=True)
    format_name = spec.choice("format", "json", WEBHOOK_FORMATS)
    secret_env = spec.string("secret_env")
    spec.finish()
    if url is not None and not url.startswith(("http://", "https://")):
        spec.fail("url", url, "an http:// or https:// URL")
        return None
    return Webhook(url, format_name, secret_env) if url else None
