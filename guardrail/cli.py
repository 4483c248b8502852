"""The `guardrail` command: run the daemon, check a configuration, explain a route.

Exit codes: 0 success, 1 runtime failure, 2 invalid usage, configuration or rules.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .config import Config, load_config
from .errors import ConfigErrors
from .message import summarize
from .routing import Facts, match_route
from .rules import RuleSet, unstaffed_reason

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardrail", description="SMTP relay in front of a shared inbox.")
    parser.add_argument("--version", action="version", version=f"guardrail {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground")
    check = commands.add_parser("check", help="validate the config and rules, print every problem, exit 0 or 2")
    route = commands.add_parser("route", help="show which route a message file matches, and why; sends nothing")
    route.add_argument("message", type=Path, metavar="FILE.eml", help="the message to route")
    route.add_argument("--rcpt", action="append", default=[], metavar="ADDRESS",
                       help="envelope recipient to assume (repeatable; default: the first inbox in the config)")
    answer = commands.add_parser("answer", help="mark a conversation answered by hand, which stops its escalations")
    answer.add_argument("reference", metavar="REF", help="the conversation reference, such as GR-7K3M9Q")
    answer.add_argument("--by", default=os.environ.get("USER", "operator"), metavar="NAME",
                        help="who answered, recorded on the conversation (default: $USER)")
    for sub in (run, check, route, answer):
        sub.add_argument("--config", type=Path, required=True, metavar="PATH", help="path of the TOML config file")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    handlers = {"run": _run, "check": _check, "route": _route, "answer": _answer}
    try:
        return handlers[arguments.command](arguments)
    except ConfigErrors as errors:
        for error in errors.errors:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _load(arguments: argparse.Namespace) -> tuple[Config, object]:
    from .daemon import load_ruleset

    config = load_config(arguments.config)
    return config, load_ruleset(config)


def _run(arguments: argparse.Namespace) -> int:
    from .daemon import Daemon
    from .logs import configure_logging

    config, rules = _load(arguments)
    configure_logging(config.log_format, config.log_level)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(Daemon(config, rules).serve())  # type: ignore[arg-type]
    except OSError as error:
        print(f"error: cannot listen on {config.smtp.listen}:{config.smtp.port}: {error.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _check(arguments: argparse.Namespace) -> int:
    errors = []
    try:
        config = load_config(arguments.config)
    except ConfigErrors as problems:
        errors.extend(problems.errors)
        config = None
    if config is not None:
        from .daemon import load_ruleset

        try:
            rules = load_ruleset(config)
        except ConfigErrors as problems:
            errors.extend(problems.errors)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) found", file=sys.stderr)
        return EXIT_USAGE
    unstaffed = unstaffed_teams(rules, datetime.now(timezone.utc))
    for team, reason in unstaffed:
        print(f"error: team {team!r} is unstaffed: {reason}", file=sys.stderr)
    if unstaffed:
        print(f"{len(unstaffed)} problem(s) found", file=sys.stderr)
        return EXIT_USAGE
    print(f"ok: {arguments.config}: {len(rules.teams)} teams, {len(rules.routes)} routes, rules {rules.digest[:12]}")
    return EXIT_OK


def unstaffed_teams(rules: RuleSet, now: datetime) -> list[tuple[str, str]]:
    """Return (team, reason) for every team that nobody staffs at `now`."""
    found = []
    for team in rules.teams.values():
        reason = unstaffed_reason(team, now, rules.unstaffed_horizon)
        if reason:
            found.append((team.name, reason))
    return found


def _answer(arguments: argparse.Namespace) -> int:
    from .store import Store

    config = load_config(arguments.config)
    reference = arguments.reference.strip().upper()

    async def mark() -> str:
        store = await Store.open(config.database_path, busy_timeout=config.busy_timeout)
        try:
            return await store.mark_answered(reference, f"manual:{arguments.by}", datetime.now(timezone.utc))
        finally:
            await store.close()

    before = asyncio.run(mark())
    if not before:
        print(f"error: conversation {reference} not found in {config.database_path}", file=sys.stderr)
        return EXIT_USAGE
    if before != "open":
        print(f"{reference} was already {before}; nothing changed")
        return EXIT_OK
    print(f"{reference} marked answered by {arguments.by}; its escalations stop")
    return EXIT_OK


def _route(arguments: argparse.Namespace) -> int:
    config, rules = _load(arguments)
    try:
        raw = arguments.message.read_bytes()
    except OSError as error:
        print(f"error: cannot read {arguments.message}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    rcpt_tos = tuple(address.lower() for address in arguments.rcpt) or tuple(sorted(config.smtp.inboxes))[:1]
    summary = summarize(raw)
    match = match_route(rules, Facts(rcpt_tos, summary))  # type: ignore[arg-type]
    destination = match.team.destination.describe() if match.team.destination else "none (team has no destination)"
    print(f"route:       {match.route.name}")
    print(f"team:        {match.team.name}")
    print(f"destination: {destination}")
    print(f"recipients:  {', '.join(rcpt_tos)}")
    for reason in match.reasons:
        print(f"because:     {reason}")
    return EXIT_OK
