"""The `guardrail` command line: arguments in, a command run, an exit code out.

Exit codes: 0 success, 1 a runtime failure (or, for check and test, warnings
or failed cases), 2 invalid usage, configuration or rules, or a database file
that is not SQLite, is damaged, lacks guardrail's tables or stays locked by
another process.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from . import __version__, commands
from .conversations import MAX_NAME_LENGTH, is_storable_name
from .errors import ConfigError, ConfigErrors, DatabaseFileError
from .harness import EvaluatorUnavailable
from .store_admin import MAX_INTEGER


def _positive_integer(text: str) -> int:
    """Parse a count (--last, --limit) or an outbox row id. SQLite reads a negative LIMIT as no limit, so values below 1 are rejected."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_INTEGER:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}; expected a whole number from 1 to {MAX_INTEGER}"
        )
    return count


def _utf8_text(text: str) -> str:
    """Parse an argument that is looked up or recorded in the database, which stores UTF-8 text.

    Python keeps argument bytes that are not UTF-8 as surrogates, which SQLite cannot encode.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        escaped = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise argparse.ArgumentTypeError(f"invalid value '{escaped}'; must be UTF-8 text") from None
    return text


def _non_blank(text: str) -> str:
    """Parse a name or note that is recorded in the database, where an empty one would be useless."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; must not be empty or only spaces")
    return _utf8_text(text)


def _name(text: str) -> str:
    """Parse a person's name that is recorded in the database and printed in `guardrail status` and the API."""
    name = _non_blank(text)
    if not is_storable_name(name):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}; must be at most {MAX_NAME_LENGTH} characters without control characters"
        )
    return name


def _instant(text: str) -> datetime:
    """Parse an ISO 8601 instant, which must carry its UTC offset (Z or +01:00) so that it names one moment."""
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        instant = None
    if instant is None or instant.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}; expected an ISO 8601 date-time with a UTC offset, such as 2026-12-07T09:00:00Z or 2026-12-07T10:00:00+01:00"
        )
    return instant


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardrail", description="SMTP relay in front of a shared inbox.")
    parser.add_argument("--version", action="version", version=f"guardrail {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="run the daemon in the foreground")
    check = sub.add_parser("check", help="validate config and rules; exit 0 clean, 1 warnings, 2 errors")
    check.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    route = sub.add_parser("route", help="show which route a message file matches, and why; sends nothing")
    route.add_argument("message", type=Path, metavar="FILE.eml", help="the message to route")
    route.add_argument("--rcpt", action="append", default=[], metavar="ADDRESS",
                       help="envelope recipient to assume (repeatable; default: the first inbox in the config)")
    route.add_argument("--mail-from", metavar="ADDRESS",
                       help="envelope sender to assume (default: the message's From address; '<>' for the null sender)")
    answer = sub.add_parser("answer", help="mark a conversation answered by hand, which stops its escalations")
    answer.add_argument("reference", type=_utf8_text, metavar="REF", help="the conversation reference, such as GR-7K3M9Q")
    answer.add_argument("--by", type=_name, default=os.environ.get("USER") or "operator", metavar="NAME",
                        help="who answered, recorded on the conversation (default: $USER, or operator when it is unset or empty)")
    sub.add_parser("reload", help="validate the config and rules, then tell the running daemon to load the rules (SIGHUP)")
    inspect = sub.add_parser("inspect", help="record that NAME reviewed the rules as they are now")
    inspect.add_argument("--by", type=_name, required=True, metavar="NAME", help="who reviewed the rules")
    inspect.add_argument("--note", type=_non_blank, required=True, metavar="TEXT", help="what the review found")
    test = sub.add_parser("test", help="run rule test cases (FILE.eml with FILE.toml expectations) from DIR")
    test.add_argument("directory", type=Path, metavar="DIR", help="folder of test cases")
    replay = sub.add_parser("replay", help="list stored messages whose route, team or acknowledgement would change")
    replay.add_argument("--rules", type=Path, required=True, metavar="NEW_DIR", help="the proposed rules folder")
    replay.add_argument("--last", type=_positive_integer, default=100, metavar="N", help="how many of the newest messages (default: 100)")
    report = sub.add_parser("report", help="reports from stored data")
    report.add_argument("kind", choices=("shadow",), help="shadow: where a shadow route disagreed with the live decision")
    report.add_argument("--since", default="7d", metavar="DURATION", help="how far back to look (default: 7d)")
    oncall = sub.add_parser("oncall", help="show who is on call in each rotation, and who comes on call next and when")
    oncall.add_argument("--at", type=_instant, metavar="ISO-INSTANT",
                        help="the instant to look at, with its UTC offset, such as 2026-12-07T09:00:00Z (default: now)")
    sub.add_parser("status", help="open conversations by team, overdue ones, next deadlines, per-route figures")
    queue = sub.add_parser("queue", help="list outbox rows waiting to be sent, or those that failed")
    queue.add_argument("--failed", action="store_true", help="list failed rows, newest first, instead of pending ones")
    queue.add_argument("--limit", type=_positive_integer, default=100, metavar="N", help="how many rows at most (default: 100)")
    queue.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    retry = sub.add_parser("retry", help="queue failed outbox rows again, or make pending ones due now")
    retry.add_argument("ids", type=_positive_integer, nargs="*", metavar="ID", help="outbox rows, as `guardrail queue` numbers them")
    retry.add_argument("--failed-deliveries", action="store_true",
                       help="every failed delivery to a team whose message is still stored")
    retry.add_argument("--pending", action="store_true", help="every pending row, due now instead of at its next attempt")
    retry.add_argument("--by", type=_name, default=os.environ.get("USER") or "operator", metavar="NAME",
                       help="who asked, recorded on the conversation (default: $USER, or operator when it is unset or empty)")

    for name, command in sub.choices.items():
        command.add_argument("--config", type=Path, required=True, metavar="PATH", help="path of the TOML config file")
    return parser


# 128 plus the number of SIGPIPE, the status a shell shows for a process that signal ended.
EXIT_BROKEN_PIPE = 128 + 13


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    handler = getattr(commands, arguments.command)
    try:
        status = handler(arguments)
        # Flushed here, so that a reader that has gone away is caught below
        # rather than reported by the interpreter at exit.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader closed the pipe early, as `head` does. Any output still
        # buffered goes nowhere, and the exit status is the shell's for SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except EvaluatorUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return commands.EXIT_FAILURE
    except ConfigErrors as problems:
        errors = problems.errors
    except DatabaseFileError as problem:
        # Every command finds its database through database.path in the config.
        errors = [ConfigError(arguments.config, "database.path", str(problem))]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return commands.EXIT_USAGE
