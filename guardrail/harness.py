"""Evaluate messages against a rule set without sending anything: `guardrail test` and `replay`.

Both reuse the decision intake makes (prepare_submission), so a case that
passes here is decided the same way by the daemon, except for what depends
on stored state: threading into an earlier conversation, duplicates and the
acknowledgement rate window.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .message import summarize
from .prepare import Envelope, Site, is_accepted_recipient, prepare_submission
from .rules import RuleSet
from .tomlcheck import read_file, read_toml, toml_text

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
EXPECTATION_KEYS = ("route", "team", "acknowledgement", "signal", "deadline")
CASE_KEYS = ("rcpt", "mail_from", "arrival", "expect")
ACKNOWLEDGEMENT_VALUES = ("sent", "suppressed")
# The route and team that prepare_submission decides for mail only to postmaster.
POSTMASTER = "postmaster"
# Arrivals a case may set. Deadlines are searched up to a year or more past
# the arrival, so a time near the ends of the calendar would overflow.
EARLIEST_ARRIVAL = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_ARRIVAL = datetime(9000, 1, 1, tzinfo=timezone.utc)
# Seconds the rules may take on one message, the time the daemon allows a parse process without a reply.
EVALUATION_LIMIT = 10.0
# Seconds the child process that evaluates the rules may take to start.
STARTUP_LIMIT = 60.0
# Seconds between the child's checks that the command that started it still runs.
PARENT_CHECK_INTERVAL = 1.0


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


class EvaluatorUnavailable(Exception):
    """The child process that evaluates the rules did not start."""


class RoutingStalled(Exception):
    """The rules did not finish on a message within the evaluation limit."""


# The rule sets and site of an Evaluator's child process, set once when it starts.
_child_rules: dict[str, RuleSet] = {}
_child_site: Site | None = None


def _start_child(rule_sets: dict[str, RuleSet], site: Site) -> None:
    global _child_site
    # Ctrl-C is for the command to handle, and the command stops the child by terminating the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A command ended by SIGTERM or SIGKILL cannot stop the child, which may
    # be matching a regex for hours, so the child checks every second that
    # its parent still runs. The re module runs signal handlers while it matches.
    parent = os.getppid()
    signal.signal(signal.SIGALRM, lambda *_: _exit_without_parent(parent))
    signal.setitimer(signal.ITIMER_REAL, PARENT_CHECK_INTERVAL, PARENT_CHECK_INTERVAL)
    _child_rules.update(rule_sets)
    _child_site = site


def _exit_without_parent(parent: int) -> None:
    """End the child process at once when `parent` is no longer its parent, because it has ended."""
    if os.getppid() != parent:
        os._exit(1)


def _is_ready() -> bool:
    """Return True, once the child has started; the Evaluator waits for this before it times any message."""
    return True


def _evaluate_in_child(name: str, raw: bytes, rcpt_tos: tuple[str, ...], mail_from: str, now: datetime) -> Evaluation:
    assert _child_site is not None
    return evaluate(raw, rcpt_tos, mail_from, _child_rules[name], _child_site, now)


class Evaluator:
    """Runs `evaluate` in a child process and gives up on a message after `limit` seconds.

    A route regex that backtracks catastrophically can run for hours on one
    message. The daemon kills a parse process after the same limit. Here the
    child is replaced and the message is reported as stalled, so `guardrail
    test` and `replay` still finish. Rule sets are named, so that `replay`
    can compare two in one child.
    """

    def __init__(self, rule_sets: dict[str, RuleSet], site: Site, limit: float | None = None) -> None:
        self.rule_sets = rule_sets
        self.site = site
        self.limit = EVALUATION_LIMIT if limit is None else limit
        self._pool = self._new_pool()

    def _new_pool(self) -> multiprocessing.pool.Pool:
        # A new interpreter, since fork copies the locks of any other thread in their current state.
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(1, initializer=_start_child, initargs=(self.rule_sets, self.site))
        # The child's start, which imports guardrail, does not count against a message's limit.
        try:
            pool.apply_async(_is_ready).get(STARTUP_LIMIT)
        except multiprocessing.TimeoutError:
            pool.terminate()
            raise EvaluatorUnavailable(f"the process that evaluates the rules did not start within {STARTUP_LIMIT:g} s") from None
        return pool

    def evaluate(self, name: str, raw: bytes, rcpt_tos: tuple[str, ...], mail_from: str, now: datetime) -> Evaluation:
        """Return how rule set `name` decides `raw`; raise RoutingStalled when it takes longer than the limit."""
        pending = self._pool.apply_async(_evaluate_in_child, (name, raw, rcpt_tos, mail_from, now))
        try:
            return pending.get(self.limit)
        except multiprocessing.TimeoutError:
            self._pool.terminate()
            self._pool.join()
            self._pool = self._new_pool()
            raise RoutingStalled(
                f"routing did not finish within {self.limit:g} s; a rule's regular expression may backtrack on this message"
                " (guardrail check warns about such patterns)"
            ) from None

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class CaseResult:
    name: str
    problems: tuple[str, ...]  # empty when the case passed
    # An invalid case cannot happen or cannot be checked, so its problems are
    # errors in the case files, not differences from the rules' decision.
    is_invalid: bool = False


def run_case(eml: Path, evaluator: Evaluator, name: str) -> CaseResult:
    """Run one test case, `eml` with its expectations in the .toml file of the same name, against the evaluator's rule set `name`."""
    rules, site = evaluator.rule_sets[name], evaluator.site
    spec_path = eml.with_suffix(".toml")
    if not spec_path.exists():
        return CaseResult(eml.name, (f"{spec_path}: expectations file not found",), is_invalid=True)
    errors: list[ConfigError] = []
    spec = read_toml(spec_path, errors)
    if spec is None:
        return CaseResult(eml.name, tuple(str(error) for error in errors), is_invalid=True)

    invalid = _misshapen_keys(spec) or _impossible_values(spec, rules, site)
    if invalid:
        return CaseResult(eml.name, tuple(f"{spec_path}: {problem}" for problem in invalid), is_invalid=True)
    raw = read_file(eml, errors, expected="a message file")
    if raw is None:
        return CaseResult(eml.name, tuple(str(error) for error in errors), is_invalid=True)
    summary = summarize(_LINE_ENDING.sub(b"\r\n", raw))
    rcpt_tos = _recipients(spec, site)
    mail_from = _bare_path(spec.get("mail_from", summary.from_address))
    arrival = spec.get("arrival") or datetime.now(timezone.utc)

    try:
        actual = evaluator.evaluate(name, raw, rcpt_tos, mail_from, arrival)
    except RoutingStalled as stalled:
        return CaseResult(eml.name, (str(stalled),))
    return CaseResult(eml.name, tuple(compare(spec.get("expect", {}), actual)))


def _bare_path(path: str) -> str:
    """Return an envelope path without its angle brackets, as intake stores it: "<>" is the null sender, ""."""
    path = path.strip()
    return path[1:-1].strip() if path.startswith("<") and path.endswith(">") else path


def _recipients(spec: dict[str, Any], site: Site) -> tuple[str, ...]:
    """Return the case's envelope recipients: `rcpt`, or the config's first inbox when it is unset or empty."""
    rcpt = spec.get("rcpt") or site.first_inbox
    return tuple(_bare_path(address) for address in (rcpt if isinstance(rcpt, list) else [rcpt]))


def _misshapen_keys(spec: dict[str, Any]) -> list[str]:
    """Return problem lines for unknown case keys and for keys whose value has the wrong TOML type."""
    expect = spec.get("expect", {})
    expected_keys = expect if isinstance(expect, dict) else {}
    problems = []
    unknown_top = sorted(set(spec) - set(CASE_KEYS))
    if unknown_top:
        problems.append(f"unknown keys {unknown_top}; a case has {', '.join(CASE_KEYS)}")
    unknown_expected = sorted(set(expected_keys) - set(EXPECTATION_KEYS))
    if unknown_expected:
        problems.append(f"unknown keys {['expect.' + key for key in unknown_expected]}; expectations are {', '.join(EXPECTATION_KEYS)}")
    if problems:
        return problems

    rcpt = spec.get("rcpt", "")
    if not (isinstance(rcpt, str) or (isinstance(rcpt, list) and all(isinstance(item, str) for item in rcpt))):
        problems.append(_invalid("rcpt", rcpt, "an address or a list of addresses"))
    mail_from = spec.get("mail_from", "")
    if not isinstance(mail_from, str):
        problems.append(_invalid("mail_from", mail_from, 'an address, or "" or "<>" for the null sender'))
    # A TOML date or time without the other half would reach the clock as the wrong type.
    arrival = spec.get("arrival")
    if arrival is not None and not _is_instant(arrival):
        problems.append(_invalid("arrival", arrival, "a date and time with a time zone, such as 2026-03-02T10:00:00Z"))
    elif arrival is not None and not EARLIEST_ARRIVAL <= arrival <= LATEST_ARRIVAL:
        expected = f"a time from {EARLIEST_ARRIVAL.year} to {LATEST_ARRIVAL.year}, such as 2026-03-02T10:00:00Z"
        problems.append(_invalid("arrival", arrival, expected))
    if not isinstance(expect, dict):
        problems.append(_invalid("expect", expect, "a table such as [expect]"))
    # A deadline without a time zone never equals the computed one, and would fail as if the rules were wrong.
    deadline = expected_keys.get("deadline")
    if deadline is not None and not _is_instant(deadline):
        problems.append(_invalid("expect.deadline", deadline, "a date and time with a time zone, such as 2026-03-02T13:00:00Z"))
    signal = expected_keys.get("signal")
    if signal is not None and not isinstance(signal, str):
        problems.append(_invalid("expect.signal", signal, 'text that the suppressing signal contains, such as "Auto-Submitted"'))
    return problems


def _invalid(key: str, value: Any, expected: str) -> str:
    """Return the problem line for a case key whose value is not what it must be."""
    return f"{key}: invalid value {toml_text(value)}; expected {expected}"


def _is_instant(value: Any) -> bool:
    """Return True for a TOML date and time with a time zone (offset), which is one instant."""
    return isinstance(value, datetime) and value.tzinfo is not None


def _impossible_values(spec: dict[str, Any], rules: RuleSet, site: Site) -> list[str]:
    """Return one problem line for each recipient the daemon would reject and each expectation no message can meet."""
    problems = []
    if not site.first_inbox and not spec.get("rcpt"):
        problems.append("rcpt: missing; this config has no [smtp] inboxes to assume, so set rcpt to an address at one of its inbox_domains")
    for address in _recipients(spec, site):
        if not address:
            problems.append('rcpt: invalid value ""; the daemon rejects an empty recipient with 501, so list inbox addresses only')
        elif not is_accepted_recipient(address, site):
            problems.append(
                f"rcpt: {address} is not an inbox of this config; the daemon rejects it with 550,"
                " so use an address of [smtp] inboxes or inbox_domains"
            )

    expect = spec.get("expect", {})
    routes = _unique([route.name for route in rules.routes] + [POSTMASTER])
    shadows = {route.name for _, route in rules.shadow_routes} - set(routes)
    teams = _unique([*rules.teams, POSTMASTER])
    route = expect.get("route")
    if isinstance(route, str) and route in shadows:
        problems.append(
            f"expect.route: {toml_text(route)} is a shadow route, which is recorded but never decides the route;"
            " use `guardrail report shadow` to see where it would have won"
        )
    elif route is not None and route not in routes:
        problems.append(f"expect.route: unknown route {toml_text(route)}; known routes: {', '.join(routes)}")
    team = expect.get("team")
    if team is not None and team not in teams:
        problems.append(f"expect.team: unknown team {toml_text(team)}; known teams: {', '.join(teams)}")
    acknowledgement = expect.get("acknowledgement")
    if acknowledgement is not None and acknowledgement not in ACKNOWLEDGEMENT_VALUES:
        problems.append(_invalid("expect.acknowledgement", acknowledgement, " or ".join(repr(value) for value in ACKNOWLEDGEMENT_VALUES)))
    return problems


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


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
