"""The commands behind `guardrail COMMAND`, one function each, named as on the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import pidfile, store_admin
from .checks import Finding, check_rules, recipient_warnings, removed_team_findings
from .clock import parse_instant
from .config import Config, load_config
from .errors import ConfigError, ConfigErrors, DatabaseFileError
from .escalation import shown_time
from .harness import Evaluator, RoutingStalled, run_case
from .logs import terminal_safe
from .message import summarize
from .plan import Submission
from .prepare import (
    Envelope,
    Site,
    TooManyHops,
    is_accepted_recipient,
    prepare_message,
)
from .rotations import Rotation, active_override, next_handoff, on_call
from .rules import RuleSet, load_rules
from .storage import free_bytes, storage_problem
from .team_copies import choose_team_copies
from .tomlcheck import MAX_DURATION, MAX_DURATION_TEXT, parse_duration, read_toml

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _load(arguments: argparse.Namespace, *, require_secrets: bool = False) -> tuple[Config, RuleSet]:
    """Load the config and its rules. Only `run` requires the secrets' environment variables to be set."""
    from .daemon import load_ruleset

    config = load_config(arguments.config, require_secrets=require_secrets)
    return config, load_ruleset(config)


def _unset_variable_warnings(config: Config) -> list[Finding]:
    """Return a warning for each secret whose environment variable this process lacks but `guardrail run` requires."""
    return [
        Finding(
            "warning", str(config.path),
            f"{item.key}: environment variable {item.variable!r} {item.state};"
            " the daemon will not start unless it is set in the daemon's environment",
        )
        for item in config.unset_variables
    ]


def storage_warnings(config: Config) -> list[Finding]:
    """Return a warning when one message sent without SIZE could use up the free space that MAIL requires.

    Such a message is checked against `min_free_space` alone, and its bytes
    go to the WAL, the database file and a maildir, so it needs about three
    times its size.
    """
    needed = 3 * config.smtp.max_message_size
    if config.min_free_space >= needed:
        return []
    mib = 1024**2
    return [Finding(
        "warning", str(config.path),
        f"database.min_free_space: {config.min_free_space // mib} MiB is less than three times smtp.max_message_size"
        f" ({config.smtp.max_message_size // mib} MiB), so a message sent without SIZE can fill the disk;"
        f" set it to at least \"{-(-needed // mib)}MiB\"",
    )]


def free_space_warnings(config: Config) -> list[Finding]:
    """Return a warning when the database's file system has less free space than MAIL requires, so that every MAIL gets 452."""
    folder = config.database_path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # The daemon creates the missing folders on this file system.
    try:
        problem = storage_problem(free_bytes(folder), config.min_free_space)
    except OSError:
        return []
    if problem is None:
        return []
    return [Finding(
        "warning", str(config.path),
        f"database.min_free_space: {problem}, so the daemon would answer 452 4.3.1 to every MAIL;"
        " free some space there, or set a lower min_free_space",
    )]


def maildir_warnings(rules: RuleSet) -> list[Finding]:
    """Return a warning for each team whose maildir destination is a path that exists and is not a folder.

    Every delivery to it fails and is retried until the message escalates.
    A folder that does not exist yet is fine: the first delivery creates it.
    """
    findings = []
    for team in rules.teams.values():
        destination = team.destination
        if destination is None or destination.kind != "maildir":
            continue
        folder = Path(destination.maildir)
        if folder.exists() and not folder.is_dir():
            where = f"{team.source}: team {team.name}" if team.source else f"team {team.name}"
            findings.append(Finding(
                "warning", where,
                f"destination.maildir: {folder} exists and is not a folder, so no delivery to it can succeed; name a folder",
            ))
    return findings


def pid_file(config: Config) -> Path:
    """Return where the running daemon writes its process id: beside the database, named after its whole file name.

    `a.db` gets `a.db.pid`, so that databases whose names differ only in
    their extension (`a.db`, `a.sqlite`, `a`) each get a pid file of their own.
    """
    database = config.database_path
    return database.with_name(f"{database.name}.pid")


def run(arguments: argparse.Namespace) -> int:
    from .daemon import Daemon
    from .logs import configure_logging

    config, rules = _load(arguments, require_secrets=True)
    # A folder or file that this user may not write would stop the daemon after it started, or fail every commit.
    store_admin.verify_writable(config.database_path, beside=(pid_file(config),))
    # The daemon creates its tables in any SQLite file, so one that belongs to another application is rejected first.
    store_admin.verify_for_daemon(config.database_path, busy_timeout=config.busy_timeout)
    configure_logging(config.log_format, config.log_level)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(Daemon(config, rules).serve(pid_file=pid_file(config)))
    except OSError as error:
        # The message names the address: SMTP or the HTTP listener.
        print(f"error: cannot start the daemon: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except sqlite3.DatabaseError as error:
        print(f"error: cannot use the database {config.database_path}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _rules_folder(config_path: Path) -> Path | None:
    """Return the rules folder a config names, read without validating the rest; None if the file is not TOML."""
    data = read_toml(config_path, [])
    if data is None:
        return None
    section = data.get("rules")
    directory = section.get("directory", "rules") if isinstance(section, dict) else "rules"
    return config_path.resolve().parent / directory if isinstance(directory, str) and directory else None


def check(arguments: argparse.Namespace) -> int:
    errors: list[ConfigError] = []
    findings: list[Finding] = []
    rules = None
    try:
        config = load_config(arguments.config, require_secrets=False)
    except ConfigErrors as problems:
        errors += problems.errors
        config = None
    else:
        findings += _unset_variable_warnings(config) + storage_warnings(config) + free_space_warnings(config)
    # The rules are checked even when the config has errors, so one run lists every problem.
    folder = config.rules_dir if config is not None else _rules_folder(arguments.config)
    if folder is not None:
        try:
            rules = load_rules(folder, arguments.config.resolve().parent)
        except ConfigErrors as problems:
            errors += problems.errors
        else:
            findings += maildir_warnings(rules)
            if config is not None:
                findings += recipient_warnings(rules, Site.from_config(config))
    if config is not None and rules is not None:
        try:
            inspections = store_admin.inspections(config.database_path, busy_timeout=config.busy_timeout)
            open_by_team = store_admin.open_conversations_by_team(config.database_path, busy_timeout=config.busy_timeout)
        except DatabaseFileError as error:
            errors.append(ConfigError(config.path, "database.path", str(error)))
        except sqlite3.DatabaseError as error:
            # Another SQLite error, such as a disk I/O error.
            errors.append(ConfigError(config.path, "database.path", f"cannot read {config.database_path}: {error}"))
        else:
            findings += check_rules(rules, datetime.now(timezone.utc), inspections, inspection_max_age=config.inspection_max_age)
            findings += removed_team_findings(rules, open_by_team)
    findings = [Finding("error", str(error.path), f"{error.key}: {error.problem}" if error.key else error.problem) for error in errors] + findings
    has_errors = any(finding.level == "error" for finding in findings)
    status = EXIT_OK
    if has_errors:
        status = EXIT_USAGE
    elif findings:
        status = EXIT_FAILURE

    if arguments.format == "json":
        print(json.dumps({
            "config": str(arguments.config),
            "rules": rules.digest if rules else None,
            "findings": [finding.to_record() for finding in findings],
            "exit": status,
        }, indent=2))
        return status
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    for finding in findings[len(errors):]:
        print(finding, file=sys.stderr)
    if findings:
        print(f"{len(errors)} error(s), {len(findings) - len(errors)} warning(s)", file=sys.stderr)
    if rules is not None and not has_errors:
        print(f"ok: {arguments.config}: {len(rules.teams)} teams, {len(rules.routes)} routes, rules {rules.digest[:12]}")
    return status


def route(arguments: argparse.Namespace) -> int:
    config, rules = _load(arguments)
    try:
        raw = arguments.message.read_bytes()
    except OSError as error:
        print(f"error: cannot read {arguments.message}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    domains = ", ".join(sorted(config.smtp.inbox_domains))
    if not arguments.rcpt and not config.smtp.first_inbox:
        print(
            f"error: --rcpt: missing; {arguments.config} has no [smtp] inboxes to assume,"
            f" so give --rcpt an address at one of inbox_domains ({domains})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    rcpt_tos = tuple(address.lower() for address in arguments.rcpt) or (config.smtp.first_inbox,)
    site = Site.from_config(config)
    unknown = [address for address in rcpt_tos if not is_accepted_recipient(address, site)]
    if unknown:
        accepted = "an address of [smtp] inboxes or inbox_domains" if domains else "one of [smtp] inboxes"
        print(f"error: --rcpt {unknown[0]!r} is not an inbox in {arguments.config}; use {accepted}", file=sys.stderr)
        return EXIT_USAGE
    if arguments.mail_from is None:
        mail_from = summarize(raw, with_body=False).from_address
    else:
        mail_from = arguments.mail_from.strip()
        # Written as in MAIL FROM. The daemon gets the address without its brackets, and "<>" as empty.
        if mail_from.startswith("<") and mail_from.endswith(">"):
            mail_from = mail_from[1:-1].strip()
    # The daemon's own decision, so that postmaster mail and loops are shown as they would be handled.
    decision = prepare_message(Envelope(mail_from, rcpt_tos, "", ""), raw, rules, site, datetime.now(timezone.utc))
    if isinstance(decision, TooManyHops):
        print(f"rejected:    554 5.4.6, {decision.received_count} Received headers (max_received_headers is {site.max_received_headers})")
        return EXIT_OK
    destination = decision.destination.describe() if decision.destination else "none (team has no destination)"
    print(f"route:       {decision.route}")
    print(f"team:        {decision.team}")
    print(f"destination: {destination}")
    print(f"recipients:  {', '.join(rcpt_tos)}")
    if decision.postmaster_copy is not None and not decision.is_postmaster:
        print(f"postmaster:  a copy goes to {site.postmaster_owner}")
    for copy in choose_team_copies(decision.addressed_teams, decision.team, owner_destination=decision.destination):
        where = copy.destination.describe() if copy.destination else ""
        print(f"copy:        team {copy.team} (route {copy.route}, addressed as {copy.recipient}): {where}")
    # The message's sender chose the text that reasons and signals quote.
    for reason in decision.route_reasons:
        print(f"because:     {terminal_safe(reason)}")
    print(f"sender:      {terminal_safe(mail_from or '<>')}, {terminal_safe(_sender_kind(decision))}")
    if decision.list_sender:
        print(f"written by:  {terminal_safe(decision.list_sender)}, passed on by a list of [smtp] inbox_lists")
    if arguments.mail_from is None and not mail_from:
        print("note:        the message has no From address, so the null sender is assumed; give --mail-from to choose one")
    if decision.ack is not None:
        print(f"ack:         from {decision.ack.from_address}, in {decision.ack.language}, if the message opens a conversation")
    else:
        print(f"ack:         none ({terminal_safe(decision.ack_signal or 'the team has no templates')})")
    return EXIT_OK


def _sender_kind(decision: Submission) -> str:
    """Return how the daemon takes the message's sender, for guardrail route."""
    if decision.is_postmaster:
        return "not checked (mail to postmaster)"
    if decision.from_inbox:
        return "written as a shared inbox"
    if decision.is_staff:
        return "staff"
    if decision.staff_unverified:
        return f"taken as a customer: {decision.staff_unverified}"
    if decision.machine_signal:
        return f"software ({decision.machine_signal})"
    return "a customer"


def answer(arguments: argparse.Namespace) -> int:
    from .store import Store

    config = load_config(arguments.config, require_secrets=False)
    reference = arguments.reference.strip().upper()
    if not config.database_path.exists():
        print(f"error: conversation {reference} not found: {config.database_path} does not exist", file=sys.stderr)
        return EXIT_USAGE

    async def mark() -> str:
        store = await Store.open(config.database_path, busy_timeout=config.busy_timeout)
        try:
            return await store.mark_answered(reference, f"manual:{arguments.by}", datetime.now(timezone.utc))
        finally:
            await store.close()

    # Store.open would add guardrail's tables to any SQLite file, so the file is checked first.
    store_admin.verify(config.database_path, busy_timeout=config.busy_timeout)
    with store_admin.file_errors(config.database_path):
        before = asyncio.run(mark())
    if not before:
        print(f"error: conversation {reference} not found in {config.database_path}", file=sys.stderr)
        return EXIT_USAGE
    if before == "no_reply_needed":
        print(f"{reference} needs no reply: machine mail or our own mail opened it; nothing changed")
        return EXIT_OK
    if before != "open":
        print(f"{reference} was already {before}; nothing changed")
        return EXIT_OK
    print(f"{reference} marked answered by {arguments.by}; its escalations stop")
    return EXIT_OK


def reload(arguments: argparse.Namespace) -> int:
    config, rules = _load(arguments)
    for warning in _unset_variable_warnings(config):
        print(warning, file=sys.stderr)
    path = pid_file(config)
    pid = pidfile.running_pid(path)
    if pid is None:
        # An unlocked file is left over from a daemon that died, and its pid may now be another process's.
        state = "is left over from a daemon that stopped" if path.exists() else "is missing"
        print(f"error: no running daemon: {path} {state}; start it with guardrail run", file=sys.stderr)
        return EXIT_FAILURE
    # The daemon reloads the rules folder of the config it started with, which
    # may differ from this config's: the file was edited, or another config
    # names the same database. Those are the rules to check.
    running = store_admin.daemon_rules(config.database_path, busy_timeout=config.busy_timeout)
    if running is not None and running[0] != config.rules_dir.resolve():
        print(
            f"note: the running daemon reads its rules from {running[0]}, not {config.rules_dir}; checking those."
            f" Restart it to read {config.rules_dir}",
            file=sys.stderr,
        )
        rules = load_rules(running[0], running[1], fix="restart the daemon with the config that names the rules folder")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"error: no process {pid} (from {path}); the daemon is not running", file=sys.stderr)
        return EXIT_FAILURE
    print(f"rules {rules.digest[:12]} are valid; sent SIGHUP to guardrail (pid {pid})")
    # The daemon writes its pid file when it starts, so a config file changed later contains settings it has not read.
    try:
        changed = arguments.config.stat().st_mtime > path.stat().st_mtime
    except OSError:
        changed = False
    if changed:
        print(
            f"note: {arguments.config} changed after the daemon started; a reload reads only the rules and the"
            " TLS certificate, so restart the daemon to apply the other settings",
            file=sys.stderr,
        )
    return EXIT_OK


def inspect(arguments: argparse.Namespace) -> int:
    config, rules = _load(arguments)
    store_admin.record_inspection(
        config.database_path, rules.digest, datetime.now(timezone.utc), arguments.by, arguments.note,
        busy_timeout=config.busy_timeout,
    )
    print(f"recorded: rules {rules.digest[:12]} inspected by {arguments.by}")
    return EXIT_OK


def test(arguments: argparse.Namespace) -> int:
    config, rules = _load(arguments)
    if not arguments.directory.is_dir():
        state = "is not a folder" if arguments.directory.exists() else "does not exist"
        print(f"error: test case folder {arguments.directory} {state}; name a folder of *.eml cases", file=sys.stderr)
        return EXIT_USAGE
    cases = sorted(arguments.directory.glob("*.eml"))
    if not cases:
        print(f"error: no *.eml test cases in {arguments.directory}", file=sys.stderr)
        return EXIT_USAGE
    site = Site.from_config(config)
    failed = invalid = 0
    with Evaluator({"rules": rules}, site) as evaluator:
        for case in cases:
            result = run_case(case, evaluator, "rules")
            if result.is_invalid:
                invalid += 1
                print(f"INVALID {result.name}")
            elif result.problems:
                failed += 1
                print(f"FAIL {result.name}")
            else:
                print(f"ok   {result.name}")
            for problem in result.problems:
                print(f"     {problem}")
    print(f"{len(cases) - failed - invalid} passed, {failed} failed" + (f", {invalid} invalid" if invalid else ""))
    # An invalid case is an error in the test files, like an invalid config, so it outranks a failure.
    if invalid:
        return EXIT_USAGE
    return EXIT_FAILURE if failed else EXIT_OK


def _note_if_missing(database: Path) -> None:
    """Print a note on stderr when `database` does not exist, so that empty figures from a mistyped path are not taken for real ones."""
    if not database.exists():
        print(f"note: {database} does not exist yet (`guardrail run` creates it); the figures below are empty", file=sys.stderr)


def replay(arguments: argparse.Namespace) -> int:
    config, current = _load(arguments)
    proposed = load_rules(arguments.rules, config.path.resolve().parent, fix="give --rules the folder of the proposed rule files")
    site = Site.from_config(config)
    _note_if_missing(config.database_path)
    stored = store_admin.last_messages(config.database_path, arguments.last, busy_timeout=config.busy_timeout)
    messages = [message for message in stored if not message.emptied]
    if len(messages) < len(stored):
        print(
            f"note: {len(stored) - len(messages)} of the {len(stored)} newest messages are older than"
            " [database] keep_bodies and have no bytes left to route; they are left out",
            file=sys.stderr,
        )
    changed = 0
    with Evaluator({"current": current, "proposed": proposed}, site) as evaluator:
        for message in messages:
            differences = _replay_differences(evaluator, message)
            if not differences:
                continue
            changed += 1
            shown_id = terminal_safe(message.message_id) or "(no Message-ID)"
            print(f"{message.received_at.isoformat()} {shown_id} from {terminal_safe(message.mail_from) or '<>'}")
            for difference in differences:
                print(f"    {difference}")
    print(f"{changed} of {len(messages)} messages would change")
    return EXIT_OK


def _replay_differences(evaluator: Evaluator, message: store_admin.StoredMessage) -> list[str]:
    """Return how the proposed rules decide `message` differently from the current ones, one line per difference."""
    decisions = {}
    for name in ("current", "proposed"):
        try:
            decisions[name] = evaluator.evaluate(name, message.raw, message.rcpt_tos, message.mail_from, message.received_at)
        except RoutingStalled as stalled:
            decisions[name] = stalled
    before, after = decisions["current"], decisions["proposed"]
    if isinstance(before, RoutingStalled) or isinstance(after, RoutingStalled):
        return [f"{name} rules: {decision}" for name, decision in decisions.items() if isinstance(decision, RoutingStalled)]
    return [
        f"{key}: {getattr(before, key)!r} -> {getattr(after, key)!r}"
        for key in ("route", "team", "acknowledgement")
        if getattr(before, key) != getattr(after, key)
    ]


def report(arguments: argparse.Namespace) -> int:
    config = load_config(arguments.config, require_secrets=False)
    since = parse_duration(arguments.since)
    if since is None or not since:
        print(f"error: --since {arguments.since!r} is not a duration above zero, such as 7d or 12h", file=sys.stderr)
        return EXIT_USAGE
    if since > MAX_DURATION:
        print(f"error: --since {arguments.since!r} is too long; give at most {MAX_DURATION_TEXT}", file=sys.stderr)
        return EXIT_USAGE
    _note_if_missing(config.database_path)
    rows = store_admin.shadow_disagreements(config.database_path, datetime.now(timezone.utc) - since, busy_timeout=config.busy_timeout)
    for row in rows:
        print(
            f"{row['received_at']} {terminal_safe(row['message_id']) or '(no Message-ID)'}: live {row['live_route']} -> {row['live_team']},"
            f" shadow {row['shadow_route']} -> {row['shadow_team']}"
        )
    print(f"{len(rows)} message(s) where a shadow route would have won")
    return EXIT_OK


def status(arguments: argparse.Namespace) -> int:
    config = load_config(arguments.config, require_secrets=False)
    _note_if_missing(config.database_path)
    figures = store_admin.status_rows(config.database_path, datetime.now(timezone.utc), busy_timeout=config.busy_timeout)
    print("open conversations by team (overdue):")
    if not figures["open_by_team"]:
        print("  none")
    for team, count, overdue in figures["open_by_team"]:
        print(f"  {team:20} {count:6} ({overdue or 0} overdue)")
    # Sections without rows print no heading.
    if figures["no_reply_by_team"]:
        print("no reply needed (machine and loop mail) by team:")
    for team, count in figures["no_reply_by_team"]:
        print(f"  {team:20} {count:6}")
    if figures["overdue"]:
        print("overdue:")
    for reference, team, deadline, level, subject in figures["overdue"]:
        print(f"  {reference} {team:12} due {_shown_instant(deadline)} escalation level {level}: {terminal_safe(subject[:60])}")
    if figures["next_deadlines"]:
        print("next deadlines:")
    for reference, team, deadline, subject in figures["next_deadlines"]:
        print(f"  {reference} {team:12} due {_shown_instant(deadline)}: {terminal_safe(subject[:60])}")
    if figures["routes"]:
        print("routes (received, answered, median first response):")
    durations: dict[str, list[float]] = {}
    for route_name, opened, answered in figures["response_times"]:
        durations.setdefault(route_name, []).append((answered - opened).total_seconds())
    for route_name, received, answered in figures["routes"]:
        median = statistics.median(durations[route_name]) if durations.get(route_name) else None
        shown = f"{median / 3600:.1f}h" if median is not None else "-"
        print(f"  {route_name:20} {received:6} {answered or 0:6} {shown:>8}")
    pending, oldest = figures["outbox_pending"]
    if pending:
        print(f"outbox: {pending} pending, the oldest queued {_shown_instant(oldest)}")
    if figures["outbox_failed"]:
        failed = ", ".join(f"{kind} {count}" for kind, count in figures["outbox_failed"])
        print(f"outbox rows that failed in the last {store_admin.ALARMS_SHOWN_FOR.days} days: {failed}")
    if figures["alarms"]:
        print(f"alarms in the last {store_admin.ALARMS_SHOWN_FOR.days} days (newest first):")
    for at, subject, detail in figures["alarms"]:
        print(f"  {_shown_instant(at)} {terminal_safe(subject)}: {terminal_safe(detail)}")
    return EXIT_OK


def oncall(arguments: argparse.Namespace) -> int:
    config, rules = _load(arguments)
    instant = arguments.at or datetime.now(timezone.utc)
    if not rules.rotations:
        print(f"no rotations in {config.rules_dir}")
        return EXIT_OK
    print(f"on call at {instant.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}:")
    for name in sorted(rules.rotations):
        print("\n".join(_on_call_lines(rules.rotations[name], instant)))
    return EXIT_OK


def _on_call_lines(rotation: Rotation, instant: datetime) -> list[str]:
    """Return the lines of `guardrail oncall` about one rotation: who is on call at `instant`, who comes next and when."""
    override = active_override(rotation, instant)
    covering = f", by override until {shown_time(override.ends, rotation.zone)}" if override else ""
    lines = [
        f"rotation {rotation.name} ({rotation.zone.key}):",
        f"  now:  {on_call(rotation, instant).formatted()}{covering}",
    ]
    handoff = next_handoff(rotation, instant)
    if handoff is None:
        lines.append("  next: nobody else comes on call")
    else:
        when, person = handoff
        lines.append(f"  next: {person.formatted()} from {shown_time(when, rotation.zone)}")
    return lines


def _shown_instant(stored: str) -> str:
    """Return a stored UTC instant to the second, as `2026-12-07T12:00:00Z`."""
    return parse_instant(stored).strftime("%Y-%m-%dT%H:%M:%SZ")


def queue(arguments: argparse.Namespace) -> int:
    config = load_config(arguments.config, require_secrets=False)
    _note_if_missing(config.database_path)
    state = "failed" if arguments.failed else "pending"
    rows = store_admin.queued_rows(config.database_path, state, arguments.limit, busy_timeout=config.busy_timeout)
    if arguments.format == "json":
        print(json.dumps({"state": state, "rows": [row.to_record() for row in rows]}, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no {state} outbox rows")
    for row in rows:
        print(_queued_line(row))
    return EXIT_OK


def _queued_line(row: store_admin.QueuedRow) -> str:
    """Return one outbox row as `queue` and `retry` print it, with text from elsewhere made safe for a terminal."""
    if row.state == "pending":
        when = f"due {_shown_time(row.next_attempt_at)}"
    else:
        when = f"{'failed' if row.state == 'failed' else 'done'} {_shown_time(row.done_at)}"
    line = (
        f"{row.id:>8} {row.purpose:14} {row.reference or '-':12} {when}, queued {_shown_time(row.created_at)},"
        f" {row.attempts} attempts, to {terminal_safe(row.to)}"
    )
    return f"{line}\n         {terminal_safe(row.last_error[:300])}" if row.last_error else line


def _shown_time(instant: datetime | None) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ") if instant else "-"


def retry(arguments: argparse.Namespace) -> int:
    if not (arguments.ids or arguments.failed_deliveries or arguments.pending):
        print("error: no rows named: give outbox row IDs, --failed-deliveries or --pending", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(arguments.config, require_secrets=False)
    if not config.database_path.exists():
        print(f"error: {config.database_path} does not exist, so it has no outbox rows", file=sys.stderr)
        return EXIT_USAGE
    store_admin.verify(config.database_path, busy_timeout=config.busy_timeout)
    done = store_admin.requeue(
        config.database_path, datetime.now(timezone.utc), arguments.by, ids=tuple(arguments.ids),
        failed_deliveries=arguments.failed_deliveries, pending=arguments.pending, busy_timeout=config.busy_timeout,
    )
    for row_id in done.unknown:
        print(f"error: outbox row {row_id} not found in {config.database_path}; no row was changed", file=sys.stderr)
    for row, reason in done.skipped:
        print(f"not sent again: {_queued_line(row)}\n         because {reason}")
    for row in done.sent_again:
        print(f"due now: {_queued_line(row)}")
    if len(done.sent_again) == 1:
        print("1 row is due now; a running daemon sends it within a minute")
    elif done.sent_again:
        print(f"{len(done.sent_again)} rows are due now; a running daemon sends them within a minute")
    elif not (done.skipped or done.unknown):
        print("nothing to send again")
    if done.unknown:
        return EXIT_USAGE
    return EXIT_FAILURE if done.skipped else EXIT_OK
