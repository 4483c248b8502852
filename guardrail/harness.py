"""Evaluate messages against a rule set without sending anything: `guardrail test` and `replay`.

Both reuse the decision intake makes (prepare_submission), so a case that
passes here is decided the same way by the daemon, except for what depends
on stored state: threading into an earlier conversation, duplicates and the
acknowledgement rate window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .message import summarize
from .prepare import Envelope, Site, prepare_submission
from .rules import RuleSet
from .tomlcheck import read_toml, toml_text

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
EXPECTATION_KEYS = ("route", "team", "acknowledgement", "signal", "deadline")


@dataclass(frozen=True)
class Evaluation:
    route: str
    team: str
    acknowledgement: str  # "sent" or "suppressed"
    signal: str
    deadline: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


def evaluate(raw: bytes, rcpt_tos: tuple[str, ...], mail_from: str, rules: RuleSet, site: Site, now: datetime) -> Evaluation:
    """Return how intake would decide `raw` arriving at `now` as a new message."""
    raw = _LINE_ENDING.sub(b"\r\n", raw)
    summary = summarize(raw, with_body=True)
    envelope = Envelope(mail_from=mail_from, rcpt_tos=tuple(address.lower() for address in rcpt_tos), peer="", helo="")
    submission = prepare_submission(envelope, raw, summary, rules, site, now)
    sent = submission.ack_signal is None and submission.ack is not None
    signal = "" if sent else (submission.ack_signal or "no acknowledgement template")
    deadline = submission.deadline if submission.sla_applies and not submission.is_postmaster else None
    return Evaluation(submission.route, submission.team, "sent" if sent else "suppressed", signal, deadline)


@dataclass(frozen=True)
class CaseResult:
    name: str
    problems: tuple[str, ...]  # empty when the case passed


def run_case(eml: Path, rules: RuleSet, site: Site) -> CaseResult:
    """Run one test case: `eml` with its expectations in the .toml file of the same name."""
    spec_path = eml.with_suffix(".toml")
    if not spec_path.exists():
        return CaseResult(eml.name, (f"expectations file {spec_path.name} not found",))
    errors: list[ConfigError] = []
    spec = read_toml(spec_path, errors)
    if spec is None:
        return CaseResult(eml.name, tuple(str(replace(error, path=spec_path.name)) for error in errors))

    misshapen = _misshapen_key(spec)
    if misshapen:
        return CaseResult(eml.name, (misshapen,))
    raw = eml.read_bytes()
    summary = summarize(_LINE_ENDING.sub(b"\r\n", raw))
    rcpt = spec.get("rcpt") or site.first_inbox
    rcpt_tos = tuple(rcpt) if isinstance(rcpt, list) else (rcpt,)
    mail_from = spec.get("mail_from", summary.from_address)
    arrival = spec.get("arrival") or datetime.now(timezone.utc)
    if arrival.tzinfo is None:
        return CaseResult(eml.name, ("arrival needs a time zone, such as 2026-03-02T10:00:00Z",))
    expected = spec.get("expect", {})
    unknown = sorted(set(expected) - set(EXPECTATION_KEYS)) + sorted(set(spec) - {"rcpt", "mail_from", "arrival", "expect"})
    if unknown:
        return CaseResult(eml.name, (f"unknown keys {unknown}; expectations are {', '.join(EXPECTATION_KEYS)}",))

    actual = evaluate(raw, rcpt_tos, mail_from, rules, site, arrival)
    return CaseResult(eml.name, tuple(compare(expected, actual)))


def _misshapen_key(spec: dict[str, Any]) -> str:
    """Return the first case key whose value has the wrong TOML type, as a problem line, or ""."""
    rcpt = spec.get("rcpt", "")
    if not (isinstance(rcpt, str) or (isinstance(rcpt, list) and all(isinstance(item, str) for item in rcpt))):
        return f"rcpt: invalid value {toml_text(rcpt)}; expected an address or a list of addresses"
    mail_from = spec.get("mail_from", "")
    if not isinstance(mail_from, str):
        return f'mail_from: invalid value {toml_text(mail_from)}; expected an address, or "" for the null sender'
    # A TOML date or time without the other half would reach the clock as the wrong type.
    arrival = spec.get("arrival")
    if arrival is not None and not isinstance(arrival, datetime):
        return (
            f"arrival: invalid value {toml_text(arrival)};"
            " expected a date and time with a time zone, such as 2026-03-02T10:00:00Z"
        )
    expect = spec.get("expect", {})
    if not isinstance(expect, dict):
        return f"expect: invalid value {toml_text(expect)}; expected a table such as [expect]"
    return ""


def _shown(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return repr(value)


def compare(expected: dict[str, Any], actual: Evaluation) -> list[str]:
    """Return one line per expectation that `actual` does not meet."""
    problems = []
    for key, want in expected.items():
        got = getattr(actual, key)
        if key == "signal":
            ok = str(want).lower() in got.lower()
        elif key == "deadline":
            ok = got is not None and isinstance(want, datetime) and got == want
        else:
            ok = got == want
        if not ok:
            problems.append(f"{key}: expected {_shown(want)}, got {_shown(got)}")
    return problems
