"""Operator tools: rule test cases, replay, shadow routes, status, reload and the zombie-route alarm."""

from __future__ import annotations

import asyncio
import email
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TEAMS,
    example_copy,
    free_port,
    kill_if_running,
    maildir_messages,
    message,
    send,
    settle,
    wait_for_port,
    wait_until,
    write_config,
)
from structlog.testing import capture_logs

from guardrail.cli import main
from guardrail.clock import ManualClock
from guardrail.commands import pid_file
from guardrail.config import load_config
from guardrail.daemon import Daemon
from guardrail.store_batch import SCHEMA

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)



def test_shipped_rule_tests_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = example_copy(tmp_path)
    assert main(["test", "--config", str(config), str(ROOT / "rules" / "tests")]) == 0
    output = capsys.readouterr().out
    assert "0 failed" in output
    assert "FAIL" not in output


def test_failing_rule_test_names_case_and_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = example_copy(tmp_path)
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(ROOT / "rules" / "tests" / "outage-report.eml", cases / "outage.eml")
    (cases / "outage.toml").write_text(
        'rcpt = "support@example.com"\narrival = 2026-03-02T09:00:00Z\n'
        '[expect]\nroute = "support-inbox"\nacknowledgement = "suppressed"\ndeadline = 2026-03-02T13:00:00Z\n'
    )

    assert main(["test", "--config", str(config), str(cases)]) == 1
    output = capsys.readouterr().out
    assert "FAIL outage.eml" in output
    assert "route: expected 'support-inbox', got 'outage-reports'" in output
    assert "acknowledgement: expected 'suppressed', got 'sent'" in output
    assert "deadline: expected 2026-03-02T13:00:00Z, got 2026-03-02T10:00:00Z" in output
    assert "0 passed, 1 failed" in output


def test_rule_test_expectations_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = example_copy(tmp_path)
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(ROOT / "rules" / "tests" / "outage-report.eml", cases / "outage.eml")
    (cases / "outage.toml").write_bytes('# café\n[expect]\nroute = "outage-reports"\n'.encode("latin-1"))

    assert main(["test", "--config", str(config), str(cases)]) == 2
    output = capsys.readouterr().out
    assert "INVALID outage.eml" in output
    assert f"{cases / 'outage.toml'}:1: not UTF-8 (byte 0xe9 at offset 5); save the file as UTF-8" in output



def write_case(cases: Path, name: str, spec: str) -> None:
    cases.mkdir(exist_ok=True)
    shutil.copy(ROOT / "rules" / "tests" / "outage-report.eml", cases / f"{name}.eml")
    (cases / f"{name}.toml").write_text(spec)


@pytest.mark.parametrize(("spec", "problem"), [
    ("arrival = 2026-03-02\n", "arrival: invalid value 2026-03-02; expected a date and time with a time zone, such as 2026-03-02T10:00:00Z"),
    ('arrival = "2026-03-02T10:00:00Z"\n', "arrival: invalid value '2026-03-02T10:00:00Z'; expected a date and time with a time zone"),
    ("arrival = 10:00:00\n", "arrival: invalid value 10:00:00; expected a date and time with a time zone"),
    ("rcpt = 5\n", "rcpt: invalid value 5; expected an address or a list of addresses"),
    ('rcpt = ["support@example.com", 5]\n', "rcpt: invalid value ['support@example.com', 5]; expected an address or a list of addresses"),
    ("mail_from = true\n", "mail_from: invalid value true; expected an address, or \"\" or \"<>\" for the null sender"),
    ('expect = "outage-reports"\n', "expect: invalid value 'outage-reports'; expected a table such as [expect]"),
    ("arrival = 0001-01-01T00:00:00Z\n", "arrival: invalid value 0001-01-01T00:00:00+00:00; expected a time from 1970 to 9000"),
    ("arrival = 9999-12-31T23:00:00Z\n", "arrival: invalid value 9999-12-31T23:00:00+00:00; expected a time from 1970 to 9000"),
    (
        "arrival = 2026-03-02T09:00:00Z\n[expect]\ndeadline = 2026-03-02T10:00:00\n",
        "expect.deadline: invalid value 2026-03-02T10:00:00; expected a date and time with a time zone, such as 2026-03-02T13:00:00Z",
    ),
    ('[expect]\ndeadline = "tomorrow"\n', "expect.deadline: invalid value 'tomorrow'; expected a date and time with a time zone"),
    ("[expect]\ndeadline = 2026-03-02\n", "expect.deadline: invalid value 2026-03-02; expected a date and time with a time zone"),
    (
        '[expect]\nacknowledgement = "suppressed"\nsignal = 5\n',
        'expect.signal: invalid value 5; expected text that the suppressing signal contains, such as "Auto-Submitted"',
    ),
    ('sender = "alice@example.com"\n', "unknown keys ['sender']; a case has rcpt, mail_from, arrival, expect"),
    ('[expect]\nqueue = "support"\n', "unknown keys ['expect.queue']; expectations are route, team, acknowledgement, signal, deadline"),
])
def test_rule_test_reports_misshapen_case(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, problem: str) -> None:
    config = example_copy(tmp_path)
    cases = tmp_path / "cases"
    write_case(cases, "outage", spec)

    assert main(["test", "--config", str(config), str(cases)]) == 2
    output = capsys.readouterr().out
    assert "INVALID outage.eml" in output
    assert f"{cases / 'outage.toml'}: {problem}" in output
    assert "0 passed, 0 failed, 1 invalid" in output


@pytest.mark.parametrize(("spec", "problem"), [
    (
        'rcpt = "nobody@example.com"\n',
        "rcpt: nobody@example.com is not an inbox of this config; the daemon rejects it with 550,"
        " so use an address of [smtp] inboxes or inbox_domains",
    ),
    (
        'rcpt = ["support@example.com", "nobody@elsewhere.example"]\n',
        "rcpt: nobody@elsewhere.example is not an inbox of this config; the daemon rejects it with 550",
    ),
    (
        '[expect]\nroute = "no-such-route"\n',
        "expect.route: unknown route 'no-such-route'; known routes: billing-inbox, outage-reports, support-inbox, default, postmaster",
    ),
    ('[expect]\nteam = "sales"\n', "expect.team: unknown team 'sales'; known teams: billing, support, frontdesk, postmaster"),
    ('[expect]\nacknowledgement = "maybe"\n', "expect.acknowledgement: invalid value 'maybe'; expected 'sent' or 'suppressed'"),
    ('[expect]\nroute = ["outage-reports"]\n', "expect.route: unknown route ['outage-reports']; known routes: billing-inbox,"),
    # The daemon replies 501 to an empty recipient, so no message arrives that way.
    ('rcpt = ["support@example.com", ""]\n', 'rcpt: invalid value ""; the daemon rejects an empty recipient with 501'),
    ('rcpt = ["<>"]\n', 'rcpt: invalid value ""; the daemon rejects an empty recipient with 501'),
])
def test_rule_test_reports_impossible_case(tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, problem: str) -> None:
    config = example_copy(tmp_path)
    cases = tmp_path / "cases"
    write_case(cases, "impossible", spec)
    write_case(cases, "passing", '[expect]\nroute = "outage-reports"\n')

    assert main(["test", "--config", str(config), str(cases)]) == 2

    output = capsys.readouterr().out
    assert "INVALID impossible.eml" in output
    assert f"{cases / 'impossible.toml'}: {problem}" in output
    assert "ok   passing.eml" in output
    assert "1 passed, 0 failed, 1 invalid" in output


def make_directory(path: Path) -> None:
    path.mkdir()


def make_dangling_link(path: Path) -> None:
    path.symlink_to(path.parent / "deleted.eml")


@pytest.mark.timeout(30)  # reading a named pipe would block the command until a writer appears
@pytest.mark.parametrize(("make", "problem"), [
    (make_directory, "is a directory, not a regular file; expected a message file"),
    (os.mkfifo, "is a named pipe (FIFO), not a regular file; expected a message file"),
    (make_dangling_link, "file not found"),
])
def test_rule_test_reports_unreadable_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None], problem: str
) -> None:
    config = example_copy(tmp_path)
    cases = tmp_path / "cases"
    write_case(cases, "passing", '[expect]\nroute = "outage-reports"\n')
    make(cases / "odd.eml")
    (cases / "odd.toml").write_text('[expect]\nroute = "outage-reports"\n')

    assert main(["test", "--config", str(config), str(cases)]) == 2

    output = capsys.readouterr().out
    assert "INVALID odd.eml" in output
    assert f"{cases / 'odd.eml'}: {problem}" in output
    assert "ok   passing.eml" in output
    assert "1 passed, 0 failed, 1 invalid" in output


def test_report_rejects_overlong_since(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = example_copy(tmp_path)

    assert main(["report", "shadow", "--config", str(config), "--since", "99999999d"]) == 2
    assert "error: --since '99999999d' is too long; give at most \"36500d\" (100 years)" in capsys.readouterr().err


@pytest.mark.parametrize("since", ["0d", "0", "soon"])
def test_report_rejects_empty_since(tmp_path: Path, capsys: pytest.CaptureFixture[str], since: str) -> None:
    config = example_copy(tmp_path)

    assert main(["report", "shadow", "--config", str(config), "--since", since]) == 2
    assert f"error: --since {since!r} is not a duration above zero, such as 7d or 12h" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "state"), [("missing", "does not exist"), ("a-file.eml", "is not a folder")])
def test_rule_test_names_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, state: str) -> None:
    config = example_copy(tmp_path)
    (tmp_path / "a-file.eml").write_text("Subject: x\n\nx\n")

    assert main(["test", "--config", str(config), str(tmp_path / name)]) == 2
    assert capsys.readouterr().err == f"error: test case folder {tmp_path / name} {state}; name a folder of *.eml cases\n"


def test_rule_test_rejects_shadow_route_expectation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, rules=SHADOW_RULES)
    cases = tmp_path / "cases"
    write_case(cases, "refund", '[expect]\nroute = "refunds-trial"\n')

    assert main(["test", "--config", str(config), str(cases)]) == 2

    output = capsys.readouterr().out
    assert "expect.route: 'refunds-trial' is a shadow route, which is recorded but never decides the route" in output


def test_rule_test_needs_rcpt_without_inboxes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, smtp={"inboxes": [], "inbox_domains": ["example.org"]})
    cases = tmp_path / "cases"
    write_case(cases, "no-rcpt", '[expect]\nroute = "default"\n')

    assert main(["test", "--config", str(config), str(cases)]) == 2

    output = capsys.readouterr().out
    assert f"{cases / 'no-rcpt.toml'}: rcpt: missing; this config has no [smtp] inboxes to assume" in output


def test_route_needs_rcpt_without_inboxes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, smtp={"inboxes": [], "inbox_domains": ["example.org"]})
    eml = tmp_path / "plain.eml"
    eml.write_bytes(message())

    assert main(["route", "--config", str(config), str(eml)]) == 2
    error = capsys.readouterr().err
    assert "--rcpt ''" not in error
    assert f"error: --rcpt: missing; {config} has no [smtp] inboxes to assume" in error
    assert "give --rcpt an address at one of inbox_domains (example.org)" in error

    assert main(["route", "--config", str(config), str(eml), "--rcpt", "help@example.org"]) == 0
    assert "recipients:  help@example.org" in capsys.readouterr().out


def test_route_unknown_rcpt_names_domains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, smtp={"inbox_domains": ["example.net"]})
    eml = tmp_path / "plain.eml"
    eml.write_bytes(message())

    assert main(["route", "--config", str(config), str(eml), "--rcpt", "nobody@elsewhere.example"]) == 2
    error = capsys.readouterr().err
    assert "error: --rcpt 'nobody@elsewhere.example' is not an inbox in" in error
    assert "use an address of [smtp] inboxes or inbox_domains" in error


@pytest.mark.parametrize("rcpt", ["postmaster@example.com", "postmaster", "Support@Example.com", "<support@example.com>"])
def test_rule_test_accepts_recipients_the_daemon_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str], rcpt: str) -> None:
    config = example_copy(tmp_path)
    cases = tmp_path / "cases"
    route = "postmaster" if rcpt.startswith("postmaster") else "outage-reports"
    write_case(cases, "accepted", f'rcpt = "{rcpt}"\n[expect]\nroute = "{route}"\n')

    assert main(["test", "--config", str(config), str(cases)]) == 0

    assert "1 passed, 0 failed" in capsys.readouterr().out


SHADOW_RULES = TEAMS + """
[[route]]
name = "refunds-trial"
team = "billing"
mode = "shadow"
any = [{ subject.contains = "refund" }]

[[route]]
name = "default"
team = "support"
default = true
"""


async def test_shadow_route_is_recorded_never_acted_on(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, rules=SHADOW_RULES)
    daemon = await start_daemon(config)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Refund please", message_id="<r@x>"))
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Hello", message_id="<h@x>"))

    rows = await daemon.store.fetch_all("SELECT message_id, team, shadow FROM messages ORDER BY id")
    assert rows[0][:2] == ("<r@x>", "support")
    assert rows[0][2] == '[{"route": "refunds-trial", "team": "billing", "would_win": true}]'
    assert rows[1][2] == "[]"
    assert maildir_messages(tmp_path / "var" / "maildir" / "billing") == []
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["report", "shadow", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert "<r@x>: live default -> support, shadow refunds-trial -> billing" in output
    assert "1 message(s) where a shadow route would have won" in output


async def test_replay_lists_changed_decisions(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, rules=SHADOW_RULES)
    daemon = await start_daemon(config)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Refund please", message_id="<r@x>"))
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Hello", message_id="<h@x>"))
    proposed = tmp_path / "proposed"
    proposed.mkdir()
    for path in (tmp_path / "rules").iterdir():
        shutil.copy(path, proposed / path.name)
    (proposed / "rules.toml").write_text(SHADOW_RULES.replace('mode = "shadow"\n', ""))
    capsys.readouterr()

    status = await asyncio.to_thread(main, ["replay", "--config", str(config), "--rules", str(proposed), "--last", "10"])

    assert status == 0
    output = capsys.readouterr().out
    assert "<r@x> from alice@example.com" in output
    assert "route: 'default' -> 'refunds-trial'" in output
    assert "team: 'support' -> 'billing'" in output
    assert "<h@x>" not in output
    assert "1 of 2 messages would change" in output



# A subject regex that backtracks catastrophically on a run of "a" not followed by "b".
SLOW_ROUTE = """
[[route]]
name = "slow"
team = "billing"
any = [{ subject.regex = '^(a+)+b$' }]
"""
SLOW_SUBJECT = "a" * 40 + "c"


def test_rule_test_reports_stall(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("guardrail.harness.EVALUATION_LIMIT", 0.5)
    config = example_copy(tmp_path)
    routes = tmp_path / "rules" / "20-routes.toml"
    routes.write_text(SLOW_ROUTE + routes.read_text())
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "a-slow.eml").write_bytes(message(subject=SLOW_SUBJECT))
    (cases / "a-slow.toml").write_text('[expect]\nroute = "support-inbox"\n')
    for name in ("billing-by-recipient.eml", "billing-by-recipient.toml"):
        shutil.copy(ROOT / "rules" / "tests" / name, cases / name)
    started = time.monotonic()

    assert main(["test", "--config", str(config), str(cases)]) == 1

    assert time.monotonic() - started < 30
    output = capsys.readouterr().out
    assert "FAIL a-slow.eml" in output
    assert "routing did not finish within 0.5 s; a rule's regular expression may backtrack on this message" in output
    # The case after the stalled one runs in a new child and passes.
    assert "ok   billing-by-recipient.eml" in output
    assert "1 passed, 1 failed" in output


def test_rule_test_evaluator_start_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("guardrail.harness.STARTUP_LIMIT", 0.0)
    config = example_copy(tmp_path)

    assert main(["test", "--config", str(config), str(ROOT / "rules" / "tests")]) == 1

    captured = capsys.readouterr()
    assert "error: the process that evaluates the rules did not start within 0 s" in captured.err
    assert "Traceback" not in captured.err


async def test_replay_reports_stall(
    tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("guardrail.harness.EVALUATION_LIMIT", 0.5)
    config = write_config(tmp_path, rules=SHADOW_RULES)
    daemon = await start_daemon(config)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject=SLOW_SUBJECT, message_id="<s@x>"))
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Refund please", message_id="<r@x>"))
    proposed = tmp_path / "proposed"
    proposed.mkdir()
    for path in (tmp_path / "rules").iterdir():
        shutil.copy(path, proposed / path.name)
    (proposed / "rules.toml").write_text(SHADOW_RULES.replace('mode = "shadow"\n', "").replace(TEAMS, TEAMS + SLOW_ROUTE))
    capsys.readouterr()

    status = await asyncio.to_thread(main, ["replay", "--config", str(config), "--rules", str(proposed), "--last", "10"])

    assert status == 0
    output = capsys.readouterr().out
    assert "<s@x> from alice@example.com\n    proposed rules: routing did not finish within 0.5 s" in output
    assert "current rules:" not in output
    assert "route: 'default' -> 'refunds-trial'" in output
    assert "2 of 2 messages would change" in output


# Starts an Evaluator on a message that stalls it, prints the child's pid once
# the child is ready, and waits far longer than the test lets it live.
STALLING_PARENT = """
import multiprocessing, sys
from datetime import datetime, timezone
from guardrail.config import load_config
from guardrail.daemon import load_ruleset
from guardrail.harness import Evaluator
from guardrail.prepare import Site

config = load_config(sys.argv[1], require_secrets=False)
site = Site.from_config(config)
evaluator = Evaluator({"rules": load_ruleset(config)}, site, limit=600)
print(*[child.pid for child in multiprocessing.active_children()], flush=True)
raw = open(sys.argv[2], "rb").read()
evaluator.evaluate("rules", raw, (site.first_inbox,), "alice@example.com", datetime.now(timezone.utc))
"""


def cpu_seconds(pid: int) -> float:
    """Return the CPU time process `pid` has used, or -1 when it has exited (a zombie counts as exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return -1
    if fields[0] == "Z":
        return -1
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_evaluation_child_ends_with_parent(tmp_path: Path, signum: int) -> None:
    # SIGTERM and SIGKILL end the command without running its cleanup. The
    # child, busy on a message that backtracks for hours, must not outlive it.
    config = example_copy(tmp_path)
    routes = tmp_path / "rules" / "20-routes.toml"
    routes.write_text(SLOW_ROUTE + routes.read_text())
    eml = tmp_path / "slow.eml"
    eml.write_bytes(message(subject="a" * 60 + "c"))
    parent = subprocess.Popen(
        [sys.executable, "-c", STALLING_PARENT, str(config), str(eml)], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    children: list[int] = []
    try:
        assert parent.stdout is not None
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 1, "the evaluator did not start"
        (child,) = children
        # The child has started when it was ready; CPU time it uses from now on is the stalled message's.
        started = cpu_seconds(child)
        deadline = time.monotonic() + 30
        while cpu_seconds(child) < started + 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_seconds(child) >= started + 0.3, "the child never worked on the message"

        parent.send_signal(signum)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while cpu_seconds(child) >= 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_seconds(child) < 0, "the child still runs after its parent ended"
    finally:
        kill_if_running(parent)
        if parent.stdout:
            parent.stdout.close()
        for pid in children:
            if cpu_seconds(pid) >= 0:
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("count", ["0", "-5", "99999999999999999999"])
def test_replay_rejects_count_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], count: str) -> None:
    # SQLite reads a negative LIMIT as no limit, and the third count does not fit in its integers.
    config = example_copy(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--config", str(config), "--rules", str(tmp_path / "rules"), "--last", count])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument --last: invalid value {count!r}; expected a whole number from 1 to 9223372036854775807" in error


@pytest.mark.parametrize(("make", "what"), [
    (None, "does not exist"),
    (Path.touch, "is not a folder"),
    (Path.mkdir, "contains no *.toml rule files"),
], ids=["missing", "file", "empty"])
def test_replay_names_rules_option(tmp_path: Path, capsys: pytest.CaptureFixture[str], make, what: str) -> None:
    config = example_copy(tmp_path)
    proposed = tmp_path / "proposed"
    if make is not None:
        make(proposed)

    assert main(["replay", "--config", str(config), "--rules", str(proposed)]) == 2

    error = capsys.readouterr().err
    assert f"error: {proposed}: rules folder {what}; give --rules the folder of the proposed rule files" in error
    assert "rules.directory" not in error


def test_missing_rules_directory_names_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, sections={"rules": {"directory": "no-such-rules"}})

    assert main(["check", "--config", str(config)]) == 2

    expected = f"error: {tmp_path / 'no-such-rules'}: rules folder does not exist; set rules.directory in the config"
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("command", "option", "value"), [
    (["inspect", "--note", "read every route", "--by"], "--by", ""),
    (["inspect", "--note", "read every route", "--by"], "--by", "   "),
    (["inspect", "--by", "Ada", "--note"], "--note", ""),
    (["inspect", "--by", "Ada", "--note"], "--note", " \t"),
    (["answer", "GR-AAAAAA", "--by"], "--by", ""),
])
def test_blank_name_or_note_is_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], option: str, value: str,
) -> None:
    config = write_config(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        main([*command, value, "--config", str(config)])

    assert exit_info.value.code == 2
    assert f"argument {option}: invalid value {value!r}; must not be empty or only spaces" in capsys.readouterr().err
    assert not (tmp_path / "var" / "guardrail.db").exists()


@pytest.mark.parametrize(("command", "value"), [
    (["answer", "GR-AAAAAA", "--by"], "Carol\x1b]0;x\x07"),
    (["inspect", "--note", "read every route", "--by"], "Ada\nLovelace"),
    (["answer", "GR-AAAAAA", "--by"], "x" * 201),
])
def test_invalid_by_name_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], value: str,
) -> None:
    config = write_config(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        main([*command, value, "--config", str(config)])

    assert exit_info.value.code == 2
    assert "must be at most 200 characters without control characters" in capsys.readouterr().err
    assert not (tmp_path / "var" / "guardrail.db").exists()


async def test_status_shows_open_and_overdue(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    clock = ManualClock(datetime.now(timezone.utc) - timedelta(days=2))
    config = write_config(tmp_path)
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Old question", message_id="<o@x>"))
    await clock.set(datetime.now(timezone.utc))
    await send(daemon.port, "bob@example.com", ["support@example.org"], message(subject="New question", message_id="<n@x>"))
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["status", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert "support                   2 (1 overdue)" in output
    overdue_section = output.split("overdue:")[1].split("next deadlines:")[0]
    assert "Old question" in overdue_section
    # Deadlines are shown to the second.
    assert re.search(r" due \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ escalation level \d+: Old question", overdue_section)
    assert "New question" in output.split("next deadlines:")[1]


async def test_status_lists_machine_mail_apart(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    daemon = await start_daemon(config)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Question", message_id="<q@x>"))
    for index, header in enumerate(["Auto-Submitted: auto-replied", "List-Id: <news.example.net>", "Precedence: bulk"]):
        machine = message(subject=f"Machine {index}", message_id=f"<machine-{index}@x>", extra_headers=f"{header}\r\n")
        await send(daemon.port, "robot@example.net", ["support@example.org"], machine)
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["status", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert "support                   1 (0 overdue)" in output
    no_reply = output.split("no reply needed (machine and loop mail) by team:\n")[1]
    assert no_reply.startswith("  support                   3\n")
    assert "overdue:" not in output
    assert "next deadlines:\n" in output


async def test_status_escapes_subject_controls(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    # A sender controls the subject: ESC and BEL would retitle and clear the operator's terminal.
    config = write_config(tmp_path)
    daemon = await start_daemon(config)
    subject = "=?utf-8?q?Printer_=1B]0;owned=07=1B[2J_jams_=E2=80=AE?="
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject=subject, message_id="<t@x>"))
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["status", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert "\x1b" not in output
    assert "\x07" not in output
    assert "\u202e" not in output
    assert "Printer \\x1b]0;owned\\x07\\x1b[2J jams \\u202e" in output


async def test_read_commands_quote_database_path(tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str]) -> None:
    # "?" and "#" end the path of an SQLite URI, and an unquoted "%41" would be read as "A".
    database = tmp_path / "db ?#%41 copy" / "guardrail.db"
    config = write_config(tmp_path, rules=SHADOW_RULES, sections={"database": {"path": str(database)}})
    daemon = await start_daemon(config)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Refund please", message_id="<r@x>"))
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["status", "--config", str(config)]) == 0
    assert "support                   1 (0 overdue)" in capsys.readouterr().out

    assert await asyncio.to_thread(main, ["report", "shadow", "--config", str(config)]) == 0
    assert "1 message(s) where a shadow route would have won" in capsys.readouterr().out

    replay = ["replay", "--config", str(config), "--rules", str(tmp_path / "rules")]
    assert await asyncio.to_thread(main, replay) == 0
    assert "0 of 1 messages would change" in capsys.readouterr().out

    inspect = ["inspect", "--config", str(config), "--by", "Dana Duty", "--note", "reviewed"]
    assert await asyncio.to_thread(main, inspect) == 0
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["check", "--config", str(config)]) == 0
    assert "never inspected" not in capsys.readouterr().err

    assert sorted(path.name for path in tmp_path.iterdir()) == ["db ?#%41 copy", "guardrail.toml", "rules", "var"]

def _random_bytes(database: Path) -> None:
    database.write_bytes(bytes(range(256)) * 32)


def _junk_after_header(database: Path) -> None:
    database.write_bytes(b"SQLite format 3\x00" + b"\xff" * 8176)


def _truncated(database: Path) -> None:
    with closing(sqlite3.connect(database)) as connection:
        connection.executescript(SCHEMA)
    with database.open("r+b") as handle:
        handle.truncate(2 * 4096)


def _foreign(database: Path) -> None:
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")


DAMAGE = [
    # (how the file is written, what the error line contains after "error: CONFIG: database.path: ")
    (_random_bytes, "{database} is not an SQLite database; point database.path at the daemon's database"),
    (_junk_after_header, "{database} is not an SQLite database, or its header is damaged: file is not a database; restore it"),
    (_truncated, "{database} is damaged: database disk image is malformed; restore it from a backup"),
    (_foreign, "{database} contains another application's tables (notes), not guardrail's; set [database] path to guardrail's"),
]
DATABASE_COMMANDS = [
    ["status"],
    ["report", "shadow"],
    ["replay", "--rules", "rules"],
    ["inspect", "--by", "Dana Duty", "--note", "reviewed"],
    ["answer", "GR-7K3M9Q"],
    ["check"],
]


@pytest.mark.parametrize(("damage", "line"), DAMAGE, ids=["random-bytes", "junk-after-header", "truncated", "foreign"])
@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=lambda command: command[0])
def test_damaged_database_named_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, line: str, command: list[str],
) -> None:
    config = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    database.parent.mkdir()
    damage(database)
    before = database.read_bytes()
    arguments = [str(tmp_path / "rules") if argument == "rules" else argument for argument in command]

    assert main([*arguments, "--config", str(config)]) == 2
    error = capsys.readouterr().err
    lines = error.splitlines()
    assert lines[0].startswith(f"error: {config}: database.path: " + line.format(database=database))
    assert "Traceback" not in error
    assert len(lines) == (2 if command == ["check"] else 1)
    assert database.read_bytes() == before
    assert sorted(path.name for path in database.parent.iterdir()) == ["guardrail.db"]


@pytest.mark.parametrize("command", [*DATABASE_COMMANDS, ["run"]], ids=lambda command: command[0])
def test_unopenable_database_named_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str],
) -> None:
    # A read-only folder fails the same way. The tests run as root, who may write anywhere,
    # so a directory is put where SQLite would create its write-ahead log.
    config = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    database.parent.mkdir()
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(SCHEMA)
    database.with_name("guardrail.db-wal").mkdir()
    arguments = [str(tmp_path / "rules") if argument == "rules" else argument for argument in command]

    assert main([*arguments, "--config", str(config)]) == 2
    error = capsys.readouterr().err
    expected = (
        f"error: {config}: database.path: {database} cannot be opened: unable to open database file;"
        " check that this user may read and write it and its folder, where SQLite creates guardrail.db-wal"
        " and guardrail.db-shm"
    )
    assert error.splitlines()[0] == expected
    assert "Traceback" not in error


def test_run_uncreatable_database_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # As under systemd, where a relative path lands in the read-only /etc/guardrail. Even root may
    # not make a folder in /sys, so the test works as root too.
    database = Path("/sys/guardrail-test-missing/guardrail.db")
    config = write_config(tmp_path, sections={"database": {"path": str(database)}})

    assert main(["run", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(
        f"error: {config}: database.path: {database} cannot be created: its folder {database.parent} cannot be created: "
    )
    assert "set [database] path to a folder that user may write" in error
    assert "Traceback" not in error


def _in_unprivileged_process(action: Callable[[], str]) -> str:
    """Return what `action` returns, called in a child process as user 65534 (nobody) when the tests run as root.

    A child still running after 30 s, as a daemon that started after all would be, is killed, and "" is returned.
    """
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 0
        try:
            os.close(reader)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            os.write(writer, action().encode())
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            os.write(writer, f"child failed: {error!r}".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(writer)
    deadline = time.monotonic() + 30
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            break
        time.sleep(0.05)
    with os.fdopen(reader, "rb") as pipe:
        return pipe.read().decode()


@contextmanager
def _shared_folder() -> Iterator[Path]:
    """Yield a new folder that another user may enter, unlike pytest's tmp_path, and remove it afterwards."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="guardrail-perm-"))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(folder)


UNWRITABLE = [
    # (what is made read-only for others, the error text after "DATABASE cannot be written: ")
    ("folder", "no file can be created in its folder {folder}: Permission denied; SQLite creates guardrail.db-wal"),
    ("guardrail.db", "this user ({user}) may not write it (Permission denied), which belongs to {owner};"),
    ("guardrail.db-wal", "this user ({user}) may not write {folder}/guardrail.db-wal (Permission denied)"),
    ("guardrail.db.pid", "this user ({user}) may not write {folder}/guardrail.db.pid (Permission denied)"),
]


@pytest.mark.parametrize(("read_only", "expected"), UNWRITABLE, ids=[item[0] for item in UNWRITABLE])
def test_run_unwritable_database_files(read_only: str, expected: str) -> None:
    # Files that a run as root leaves behind. Without the check, a read-only database file lets the daemon
    # start and reply 451 to every message, and the other files stop it with exit 1 and a bare OSError.
    import io
    import pwd
    from contextlib import redirect_stderr

    from guardrail.store import SCHEMA_VERSION

    with _shared_folder() as shared:
        config = write_config(shared)
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        folder = shared / "var"
        folder.mkdir()
        database = folder / "guardrail.db"
        with closing(sqlite3.connect(database)) as connection:
            # As the daemon leaves it, so that opening it writes nothing.
            connection.execute("PRAGMA journal_mode = WAL")
            connection.executescript(SCHEMA)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # The child may not read the interpreter's files, so the config and rules are read here first,
        # before the files are written: closing the database removes an empty -wal file.
        with redirect_stderr(io.StringIO()):
            assert main(["check", "--config", str(config)]) == 1
        for name in ("guardrail.db", "guardrail.db-wal", "guardrail.db.pid"):
            (folder / name).touch()
        for path in folder.iterdir():  # The check may leave a -shm file too.
            path.chmod(0o444 if path.name == read_only else 0o666)
        folder.chmod(0o555 if read_only == "folder" else 0o777)

        def run() -> str:
            error = io.StringIO()
            with redirect_stderr(error):
                status = main(["run", "--config", str(config)])
            return f"{status}\n{error.getvalue()}"

        output = _in_unprivileged_process(run)
        user = pwd.getpwuid(65534 if os.geteuid() == 0 else os.geteuid()).pw_name
        owner = pwd.getpwuid(os.geteuid()).pw_name
        line = f"2\nerror: {config}: database.path: {database} cannot be written: "
        assert output.startswith(line + expected.format(folder=folder, user=user, owner=owner))
        assert "Traceback" not in output


def test_maildir_unwritable_part() -> None:
    from guardrail.maildir import unwritable_part

    with _shared_folder() as shared:
        closed = shared / "closed"
        closed.mkdir(mode=0o555)
        closed.chmod(0o555)
        open_ = shared / "open"
        (open_ / "ready" / "new").mkdir(parents=True)
        (open_ / "ready" / "tmp").mkdir()
        (open_ / "locked" / "new").mkdir(parents=True)
        for path in [open_, *open_.rglob("*")]:
            path.chmod(0o777)
        (open_ / "locked" / "new").chmod(0o555)
        folders = {
            "missing under a closed folder": closed / "maildir" / "support",
            "closed": closed,
            "new/ closed": open_ / "locked",
            "ready": open_ / "ready",
            "missing under an open folder": open_ / "later" / "support",
        }
        output = _in_unprivileged_process(lambda: repr({name: str(unwritable_part(folder)) for name, folder in folders.items()}))

    assert output == repr({
        "missing under a closed folder": str(closed),
        "closed": str(closed),
        "new/ closed": str(open_ / "locked" / "new"),
        "ready": "None",
        "missing under an open folder": "None",
    })


async def test_daemon_logs_a_maildir_it_may_not_write(tmp_path: Path, start_daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under systemd, a maildir path relative to the read-only /etc/guardrail fails every delivery
    # for give_up_after (5 days), so the start must log it.
    import guardrail.daemon

    support = tmp_path / "var" / "maildir" / "support"
    monkeypatch.setattr(guardrail.daemon, "unwritable_part", lambda folder: folder.parent if folder == support else None)
    with capture_logs() as events:
        daemon = await start_daemon(write_config(tmp_path))
        assert daemon.reload()
    errors = [event for event in events if event["event"] == "maildir_not_writable"]
    assert [(event["destination"], event["folder"], event["cannot_write"]) for event in errors] == [
        ("team support", str(support), str(support.parent)),
    ] * 2
    assert "retried until [delivery] give_up_after" in errors[0]["detail"]


def test_readonly_sqlite_error_names_the_file(tmp_path: Path) -> None:
    # SQLite raises SQLITE_READONLY_DIRECTORY when it cannot create the -shm file beside a database that
    # exists. Unmapped, `check` printed "cannot read ...: attempt to write a readonly database" and `run` a traceback.
    from guardrail.errors import DatabaseFileError
    from guardrail.store_admin import file_errors

    database = tmp_path / "guardrail.db"
    error = sqlite3.OperationalError("attempt to write a readonly database")
    error.sqlite_errorname = "SQLITE_READONLY_DIRECTORY"
    with pytest.raises(DatabaseFileError) as caught, file_errors(database):
        raise error
    assert str(caught.value).startswith(
        f"{database} cannot be written: attempt to write a readonly database (SQLITE_READONLY_DIRECTORY);"
        " check that this user may read and write it and its folder, where SQLite creates guardrail.db-wal"
    )


def _damaged_pages(database: Path) -> None:
    """Write a guardrail database with rows, then overwrite all but its first quarter, where the schema is."""
    with closing(sqlite3.connect(database)) as connection:
        connection.executescript(SCHEMA)
        for number in range(300):
            connection.execute(
                "INSERT INTO conversations (reference, route, team, state, opened_at, updated_at, subject, customer,"
                " participants) VALUES (?, 'default', 'support', 'open', ?, ?, 'Printer jams', 'a@example.com', '[]')",
                (f"GR-{number:06d}", "2025-11-04T09:00:00Z", "2025-11-04T09:00:00Z"),
            )
            connection.execute(
                "INSERT INTO messages (received_at, peer, helo, mail_from, rcpt_tos, message_id, dedupe_key, size, summary,"
                " route, team, route_reasons, disposition, raw) VALUES (?, '127.0.0.1', 'client', 'a@example.com',"
                " '[\"support@example.org\"]', ?, ?, 1000, '{}', 'default', 'support', '[]', 'delivered', ?)",
                ("2025-11-04T09:00:00Z", f"<{number}@x>", f"key-{number}", b"x" * 1000),
            )
        connection.commit()
    size = database.stat().st_size
    with database.open("r+b") as handle:
        handle.seek(size // 4)
        handle.write(b"\xff" * (size - size // 4))


READ_COMMANDS = [["status"], ["report", "shadow"], ["replay", "--rules", "rules"]]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda command: command[0])
def test_damaged_pages_found_while_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    config = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    database.parent.mkdir()
    _damaged_pages(database)
    arguments = [str(tmp_path / "rules") if argument == "rules" else argument for argument in command]

    assert main([*arguments, "--config", str(config)]) == 2
    expected = f"error: {config}: database.path: {database} is damaged: database disk image is malformed; restore it from a backup"
    assert capsys.readouterr().err.splitlines() == [expected]


def test_empty_database_file_reads_as_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    database.parent.mkdir()
    database.touch()

    assert main(["status", "--config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines() == ["open conversations by team (overdue):", "  none"]
    assert main(["report", "shadow", "--config", str(config)]) == 0
    assert "0 message(s) where a shadow route would have won" in capsys.readouterr().out
    assert database.read_bytes() == b""


def test_missing_database_noted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A mistyped database.path must not pass for a database with nothing in it.
    config = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    note = f"note: {database} does not exist yet (`guardrail run` creates it); the figures below are empty"

    for command in (["status"], ["report", "shadow"], ["replay", "--rules", str(tmp_path / "rules")]):
        assert main([*command, "--config", str(config)]) == 0
        assert note in capsys.readouterr().err, command
    assert not database.exists()


def _chat_application(database: Path) -> None:
    # Shares a table name with guardrail's schema, but lacks its conversations table.
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT)")
        connection.execute("CREATE TABLE users (name TEXT)")
        connection.execute("CREATE TABLE rooms (name TEXT)")
        connection.execute("CREATE TABLE invites (code TEXT)")
        connection.execute("CREATE TABLE settings (key TEXT)")


def _same_table_name(database: Path) -> None:
    # A table named as one of guardrail's, with columns guardrail never gives it.
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, at TEXT, what TEXT)")


@pytest.mark.parametrize(
    ("write", "shown"),
    [(_foreign, "notes"), (_chat_application, "invites, messages, rooms and 2 more"), (_same_table_name, "events")],
    ids=["notes", "chat", "same-name"],
)
def test_run_rejects_other_application_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write, shown: str,
) -> None:
    config = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    database.parent.mkdir()
    write(database)
    before = database.read_bytes()

    # In a child process, so that a daemon that starts after all is stopped by the timeout.
    run = subprocess.run(
        [sys.executable, "-m", "guardrail", "run", "--config", str(config)], capture_output=True, text=True, timeout=30,
    )

    assert run.returncode == 2
    expected = (
        f"error: {config}: database.path: {database} contains another application's tables ({shown}), not guardrail's;"
        " set [database] path to guardrail's database, or to a path where no file exists yet"
    )
    assert run.stderr.splitlines() == [expected]
    assert database.read_bytes() == before
    assert sorted(path.name for path in database.parent.iterdir()) == ["guardrail.db"]

    assert main(["check", "--config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == expected


def _table_less(database: Path) -> None:
    # An SQLite header without tables, as a daemon leaves that stops between setting WAL mode and creating its schema.
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA user_version = 1")


def _guardrail(database: Path) -> None:
    with closing(sqlite3.connect(database)) as connection:
        connection.executescript(SCHEMA)


@pytest.mark.parametrize("write", [None, Path.touch, _table_less, _guardrail], ids=["missing", "empty", "table-less", "guardrail"])
def test_run_accepts_new_or_guardrail_database(tmp_path: Path, write) -> None:
    config = write_config(tmp_path, smtp={"port": free_port()})
    database = tmp_path / "var" / "guardrail.db"
    database.parent.mkdir()
    if write is not None:
        write(database)

    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_pid(tmp_path / "var" / "guardrail.db.pid", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        kill_if_running(process)

    with closing(sqlite3.connect(database)) as connection:
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"messages", "conversations", "inspections"} <= tables


@contextmanager
def exclusive_lock(database: Path) -> Iterator[None]:
    """Hold an exclusive lock on `database` from another connection. In locking_mode EXCLUSIVE it blocks WAL readers too."""
    with closing(sqlite3.connect(database, isolation_level=None)) as connection:
        connection.execute("PRAGMA locking_mode = EXCLUSIVE")
        connection.execute("BEGIN EXCLUSIVE")
        yield


def short_wait_database(folder: Path) -> tuple[Path, Path]:
    """Write a config whose commands wait 200 ms for a lock, and an empty guardrail database in WAL mode; return both paths."""
    config = write_config(folder, sections={"database": {"busy_timeout": "200ms"}})
    database = folder / "var" / "guardrail.db"
    database.parent.mkdir()
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(SCHEMA)
    return config, database


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=lambda command: command[0])
def test_locked_database_named_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    config, database = short_wait_database(tmp_path)
    arguments = [str(tmp_path / "rules") if argument == "rules" else argument for argument in command]

    with exclusive_lock(database):
        started = time.monotonic()
        status = main([*arguments, "--config", str(config)])
        waited = time.monotonic() - started

    assert status == 2
    error = capsys.readouterr().err
    lines = error.splitlines()
    expected = (
        f"error: {config}: database.path: {database} is locked by another process;"
        " try again, or stop the process that holds the lock"
    )
    assert lines[0] == expected
    assert "Traceback" not in error
    assert len(lines) == (2 if command == ["check"] else 1)
    # [database] busy_timeout bounds the wait, with room for a slow machine.
    assert waited < 5


WRITE_COMMANDS = [["inspect", "--by", "Dana Duty", "--note", "reviewed"], ["answer", "GR-7K3M9Q"]]


@pytest.mark.parametrize("command", WRITE_COMMANDS, ids=lambda command: command[0])
def test_write_lock_named_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    config, database = short_wait_database(tmp_path)
    with closing(sqlite3.connect(database)) as connection:
        connection.execute(
            "INSERT INTO conversations (reference, route, team, state, opened_at, updated_at, subject, customer, participants)"
            " VALUES ('GR-7K3M9Q', 'default', 'support', 'open', ?, ?, 'Printer jams', 'a@example.com', '[]')",
            ("2025-11-04T09:00:00Z", "2025-11-04T09:00:00Z"),
        )
        connection.commit()

    # A write transaction in WAL mode lets the commands read, but not write.
    with closing(sqlite3.connect(database, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE conversations SET subject = subject")
        status = main([*command, "--config", str(config)])

    assert status == 2
    error = capsys.readouterr().err
    expected = (
        f"error: {config}: database.path: {database} is locked by another process;"
        " try again, or stop the process that holds the lock"
    )
    assert error.splitlines() == [expected]


async def test_read_commands_run_beside_writing_daemon(
    tmp_path: Path, start_daemon, capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(tmp_path, rules=SHADOW_RULES, sections={"database": {"busy_timeout": "200ms"}})
    clock = ManualClock(datetime.now(timezone.utc))
    daemon = await start_daemon(config, clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject="Refund please", message_id="<r@x>"))
    await settle(daemon, clock)
    capsys.readouterr()
    database = tmp_path / "var" / "guardrail.db"

    # A write transaction left open, as the daemon's writer has while it commits. WAL lets readers go on.
    with closing(sqlite3.connect(database, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE conversations SET subject = subject")
        status = await asyncio.to_thread(main, ["status", "--config", str(config)])
        status_output = capsys.readouterr()
        report = await asyncio.to_thread(main, ["report", "shadow", "--config", str(config)])
        report_output = capsys.readouterr()
        replay = await asyncio.to_thread(main, ["replay", "--config", str(config), "--rules", str(tmp_path / "rules")])
        replay_output = capsys.readouterr()
        writer.execute("ROLLBACK")

    assert status == 0
    assert "support                   1 (0 overdue)" in status_output.out
    assert report == 0
    assert "1 message(s) where a shadow route would have won" in report_output.out
    assert replay == 0
    assert "0 of 1 messages would change" in replay_output.out
    assert "locked" not in status_output.err + report_output.err + replay_output.err


ZOMBIE_RULES = """
[[team]]
name = "support"
destination = { maildir = "var/maildir/support" }
members = [{ name = "Sam Ortiz", address = "sam@example.org" }]
escalation = [{ after = "0m", name = "Sam Ortiz", address = "sam@example.org" }]

[[route]]
name = "default"
team = "support"
default = true
owner = { name = "Olga Owner", address = "olga@example.org" }
"""


def alarms(folder: Path) -> list[email.message.Message]:
    found = [email.message_from_bytes(data) for data in maildir_messages(folder / "var" / "outbound")]
    return [m for m in found if m["Subject"] and m["Subject"].startswith("Route default looks abandoned")]


async def zombie_daemon(tmp_path: Path, start_daemon, **zombie: object) -> tuple[Daemon, ManualClock]:
    """Start a daemon on ZOMBIE_RULES with these [zombie] settings, on a manual clock at Monday 08:00."""
    config = write_config(tmp_path, rules=ZOMBIE_RULES, sections={"zombie": {"check_every": "1h", **zombie}})
    clock = ManualClock(at("2025-11-03T08:00:00"))
    return await start_daemon(config, clock=clock), clock


async def advance_hours(daemon: Daemon, clock: ManualClock, hours: int) -> None:
    """Advance the clock by `hours`, one hour at a time, letting the daemon finish what falls due after each."""
    for _ in range(hours):
        await clock.advance(timedelta(hours=1))
        await settle(daemon, clock)


async def customers_write(daemon: Daemon, clock: ManualClock, count: int, tag: str) -> None:
    """Send `count` messages from different customers to support@, with Message-IDs <TAG0@x>, <TAG1@x> and on."""
    for number in range(count):
        await send(daemon.port, f"c{number}@example.com", ["support@example.org"], message(message_id=f"<{tag}{number}@x>"))
    await settle(daemon, clock)


async def test_zombie_route_alarms_once_per_period(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await zombie_daemon(
        tmp_path, start_daemon, conversations=3, min_answered_share=0.5, silent_business_hours="48h", period="1d",
    )
    await customers_write(daemon, clock, 3, "z")
    # The first alarm comes at the first check after the deadlines passed unanswered.
    await advance_hours(daemon, clock, 30)

    assert len(alarms(tmp_path)) == 2
    assert daemon.metrics.registry.get_sample_value("guardrail_alarms_total", {"kind": "route"}) == 2
    (first, second) = alarms(tmp_path)
    assert first["To"] == "Olga Owner <olga@example.org>"
    body = first.get_payload(decode=True).decode()
    assert "0 of the route's last 3 conversations were answered (0%, below 50%)" in body
    rows = await daemon.store.fetch_all("SELECT route, at FROM alarms ORDER BY id")
    assert [route for route, _ in rows] == ["default", "default"]
    assert rows[1][1] > rows[0][1]
    gap = datetime.fromisoformat(rows[1][1].replace("Z", "+00:00")) - datetime.fromisoformat(rows[0][1].replace("Z", "+00:00"))
    assert gap >= timedelta(days=1)


async def test_zombie_ignores_mail_within_deadline(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await zombie_daemon(
        tmp_path, start_daemon, conversations=3, min_answered_share=0.5, silent_business_hours="100h", period="1d",
    )
    await customers_write(daemon, clock, 5, "b")
    [(deadline,)] = await daemon.store.fetch_all("SELECT MAX(deadline) FROM conversations")
    due = datetime.fromisoformat(deadline.replace("Z", "+00:00"))

    # A burst of new mail is not neglect while its deadlines are ahead.
    while clock.now() + timedelta(hours=1) < due:
        await clock.advance(timedelta(hours=1))
        await settle(daemon, clock)
    assert alarms(tmp_path) == []

    await advance_hours(daemon, clock, 2)
    [alarm] = alarms(tmp_path)
    body = alarm.get_payload(decode=True).decode()
    assert "0 of the route's last 3 conversations were answered (0%, below 50%)" in body


async def test_zombie_alarm_stops_once_answered(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await zombie_daemon(tmp_path, start_daemon, conversations=2, min_answered_share=0.5, silent_business_hours="100h")
    for number in range(2):
        await send(daemon.port, f"c{number}@example.com", ["support@example.org"], message(message_id=f"<q{number}@x>"))
        reply = message(sender="Sam Ortiz <sam@example.org>", message_id=f"<a{number}@x>",
                        extra_headers=f"In-Reply-To: <q{number}@x>\r\n")
        await send(daemon.port, "sam@example.org", ["support@example.org"], reply)
    await advance_hours(daemon, clock, 5)
    assert alarms(tmp_path) == []




@pytest.mark.parametrize(
    ("quiet_hours", "messages", "waited_hours", "alarmed"),
    [
        # After an answer and three quiet days, new mail is not silence while the first message waits less than 24 hours...
        (72, 2, 2, False),
        (72, 2, 23, False),
        # ...but it is once it has waited them.
        (72, 2, 25, True),
        # One message is its escalation's business, not the route's: mail must keep arriving.
        (72, 1, 48, False),
        # The same without a quiet spell.
        (0, 2, 23, False),
        (0, 2, 25, True),
    ],
)
async def test_silence_counts_from_first_waiting(
    tmp_path: Path, start_daemon, quiet_hours: int, messages: int, waited_hours: int, alarmed: bool
) -> None:
    daemon, clock = await zombie_daemon(
        tmp_path, start_daemon, conversations=5, min_answered_share=0.5, silent_business_hours="24h", period="30d",
    )
    await send(daemon.port, "c0@example.com", ["support@example.org"], message(message_id="<q0@x>"))
    reply = message(sender="Sam Ortiz <sam@example.org>", message_id="<a0@x>", extra_headers="In-Reply-To: <q0@x>\r\n")
    await send(daemon.port, "sam@example.org", ["support@example.org"], reply)
    await advance_hours(daemon, clock, quiet_hours)
    # New messages an hour apart; with five conversations needed, the share alone never alarms here.
    for number in range(1, messages + 1):
        await send(daemon.port, f"c{number}@example.com", ["support@example.org"], message(message_id=f"<q{number}@x>"))
        await advance_hours(daemon, clock, 1)
    await advance_hours(daemon, clock, waited_hours - messages)

    found = alarms(tmp_path)
    assert len(found) == (1 if alarmed else 0)
    if alarmed:
        body = found[0].get_payload(decode=True).decode()
        assert "nothing was answered for 24 business hours" in body


async def test_zombie_and_retention_outlive_locked_database(tmp_path: Path, start_daemon) -> None:
    config = write_config(tmp_path, rules=ZOMBIE_RULES, sections={
        "zombie": {"check_every": "1h", "conversations": 3, "min_answered_share": 0.5, "silent_business_hours": "48h", "period": "1d"},
        "database": {"busy_timeout": "200ms", "keep_bodies": "180d"},
    })
    clock = ManualClock(at("2025-11-03T08:00:00"))
    daemon = await start_daemon(config, clock=clock)
    await customers_write(daemon, clock, 3, "z")
    assert daemon.zombies is not None
    assert daemon.retention is not None
    tasks = {task.get_name(): task for task in asyncio.all_tasks()}
    zombie_task = tasks["guardrail-zombie-routes"]
    retention_task = tasks["guardrail-retention"]

    # Both loops try to commit while another program has the write lock.
    blocker = sqlite3.connect(daemon.config.database_path, isolation_level=None, timeout=5)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with capture_logs() as events:
            await clock.advance(timedelta(hours=30))
            failures = ("zombie_check_failed", "old_bytes_not_emptied")
            await wait_until(
                lambda: zombie_task.done() or retention_task.done() or {event["event"] for event in events} >= set(failures),
                what="both loops to fail to commit",
            )
    finally:
        blocker.rollback()
        blocker.close()
    assert not zombie_task.done()
    assert not retention_task.done()
    assert alarms(tmp_path) == []

    # The next check, once the lock is gone, raises the alarm.
    await advance_hours(daemon, clock, 1)
    assert len(alarms(tmp_path)) == 1


def wait_for_pid(pid_path: Path, process: subprocess.Popen[bytes]) -> None:
    """Wait until the daemon has written its process id, which it does once it accepts connections."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None
        if pid_path.exists() and pid_path.read_text().strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"no process id in {pid_path} after 15 s")


def test_reload_ignores_stale_pid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        # A daemon killed with SIGKILL leaves its pid file; the pid may be reused by another process.
        pid_path = tmp_path / "var" / "guardrail.db.pid"
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(f"{bystander.pid}\n")

        assert main(["reload", "--config", str(config)]) == 1
        assert "is left over from a daemon that stopped" in capsys.readouterr().err
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=5)


def test_reload_rejects_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, smtp={"max_recipients": 0})

    assert main(["reload", "--config", str(config)]) == 2

    error = capsys.readouterr().err
    assert f"error: {config}: smtp.max_recipients: invalid value 0; expected an integer of at least 1" in error
    assert "SIGHUP" not in error


def test_reload_command_validates_then_signals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    config = write_config(tmp_path, smtp={"port": port})
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    pid_path = tmp_path / "var" / "guardrail.db.pid"
    try:
        wait_for_pid(pid_path, process)
        assert pid_path.read_text().strip() == str(process.pid)

        # A second daemon on the same database refuses to start.
        second = subprocess.run(
            [sys.executable, "-m", "guardrail", "run", "--config", str(config)], capture_output=True, text=True, timeout=30,
        )
        assert second.returncode == 1
        assert f"another guardrail (pid {process.pid}) runs on this database" in second.stderr

        (tmp_path / "rules" / "99-broken.toml").write_text("[[route\n")
        assert main(["reload", "--config", str(config)]) == 2
        assert "99-broken.toml:1: invalid TOML" in capsys.readouterr().err

        (tmp_path / "rules" / "99-broken.toml").unlink()
        assert main(["reload", "--config", str(config)]) == 0
        assert f"sent SIGHUP to guardrail (pid {process.pid})" in capsys.readouterr().out

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert not pid_path.exists()
    finally:
        kill_if_running(process)


def test_reload_notes_changed_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A reload reads only the rules and the TLS certificate, so an edited port takes effect only after
    # a restart, and the output must say so.
    port = free_port()
    config = write_config(tmp_path, smtp={"port": port})
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail", "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pid_path = tmp_path / "var" / "guardrail.db.pid"
    try:
        wait_for_pid(pid_path, process)
        started = pid_path.stat().st_mtime
        os.utime(config, (started - 10, started - 10))
        assert main(["reload", "--config", str(config)]) == 0
        assert "note:" not in capsys.readouterr().err

        config.write_text(config.read_text().replace(f"port = {port}", f"port = {free_port()}", 1))
        os.utime(config, (started + 10, started + 10))
        assert main(["reload", "--config", str(config)]) == 0
        output = capsys.readouterr()
        assert f"sent SIGHUP to guardrail (pid {process.pid})" in output.out
        assert output.err == (
            f"note: {config} changed after the daemon started; a reload reads only the rules and the TLS certificate,"
            " so restart the daemon to apply the other settings\n"
        )
    finally:
        kill_if_running(process)


def test_reload_checks_the_daemons_rules_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, smtp={"port": free_port()})
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail", "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pid_path = tmp_path / "var" / "guardrail.db.pid"
    try:
        wait_for_pid(pid_path, process)
        # The config now names another folder, which the daemon reads only after a restart.
        shutil.copytree(tmp_path / "rules", tmp_path / "rules2")
        config.write_text(config.read_text() + '\n[rules]\ndirectory = "rules2"\n')
        assert main(["reload", "--config", str(config)]) == 0
        output = capsys.readouterr()
        assert f"note: the running daemon reads its rules from {tmp_path / 'rules'}, not {tmp_path / 'rules2'}" in output.err
        assert f"sent SIGHUP to guardrail (pid {process.pid})" in output.out

        # A broken file in the daemon's folder fails the reload, though the config's folder is fine.
        (tmp_path / "rules" / "99-broken.toml").write_text("[[route\n")
        assert main(["reload", "--config", str(config)]) == 2
        assert "99-broken.toml:1: invalid TOML" in capsys.readouterr().err
    finally:
        kill_if_running(process)


@pytest.mark.parametrize(
    ("database", "expected"),
    [("a.db", "a.db.pid"), ("a.sqlite", "a.sqlite.pid"), ("a", "a.pid"), ("a.b.db", "a.b.db.pid")],
)
def test_pid_file_keeps_database_name(tmp_path: Path, database: str, expected: str) -> None:
    config = load_config(write_config(tmp_path, sections={"database": {"path": f"var/{database}"}}))

    assert pid_file(config) == tmp_path / "var" / expected


def test_daemons_on_sibling_databases_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two databases in one folder whose names differ only in their extension.
    ports = [free_port(), free_port()]
    configs = [
        write_config(
            tmp_path / folder, smtp={"port": port, "parse_processes": 0},
            sections={"database": {"path": str(tmp_path / "var" / database)}},
        )
        for folder, database, port in zip(["one", "two"], ["a.db", "a.sqlite"], ports)
    ]
    pid_paths = [pid_file(load_config(config)) for config in configs]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "guardrail", "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for config in configs
    ]
    try:
        for port, pid_path, process in zip(ports, pid_paths, processes):
            wait_for_port(port, process)
            wait_for_pid(pid_path, process)

        assert pid_paths[0] != pid_paths[1]
        for pid_path, process in zip(pid_paths, processes):
            assert process.poll() is None
            assert pid_path.read_text().strip() == str(process.pid)
        for config, process in zip(configs, processes):
            assert main(["reload", "--config", str(config)]) == 0
            assert f"sent SIGHUP to guardrail (pid {process.pid})" in capsys.readouterr().out

        for process in processes:
            process.send_signal(signal.SIGTERM)
        for pid_path, process in zip(pid_paths, processes):
            assert process.wait(timeout=15) == 0
            assert not pid_path.exists()
    finally:
        for process in processes:
            kill_if_running(process)


UNSET_SECRETS = {
    "http": {"token_env": "GUARDRAIL_TEST_UNSET_TOKEN"},
    "smarthost": {"host": "127.0.0.1", "password_env": "GUARDRAIL_TEST_UNSET_PASSWORD"},
}


@pytest.fixture
def secretless_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Return a config whose token and smarthost password name environment variables that are not set."""
    monkeypatch.delenv("GUARDRAIL_TEST_UNSET_TOKEN", raising=False)
    monkeypatch.delenv("GUARDRAIL_TEST_UNSET_PASSWORD", raising=False)
    config = write_config(tmp_path, sections=UNSET_SECRETS)
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "plain.eml").write_bytes(message())
    (cases / "plain.toml").write_text('[expect]\nroute = "default"\n')
    return config


@pytest.mark.parametrize(("command", "status"), [
    (["status"], 0),
    (["report", "shadow"], 0),
    (["route", "{folder}/cases/plain.eml"], 0),
    (["test", "{folder}/cases"], 0),
    (["replay", "--rules", "{folder}/rules"], 0),
    (["inspect", "--by", "Ada", "--note", "read every route"], 0),
    # Exit 2 because no conversation has this reference, not because of the variables.
    (["answer", "GR-AAAAAA"], 2),
])
def test_commands_run_without_daemon_secrets(
    secretless_config: Path, capsys: pytest.CaptureFixture[str], command: list[str], status: int,
) -> None:
    arguments = [part.format(folder=secretless_config.parent) for part in command]

    assert main([*arguments, "--config", str(secretless_config)]) == status

    output = capsys.readouterr()
    for variable in ("GUARDRAIL_TEST_UNSET_TOKEN", "GUARDRAIL_TEST_UNSET_PASSWORD"):
        assert variable not in output.out
        assert variable not in output.err


def test_check_warns_of_unset_secret_variables(secretless_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["inspect", "--by", "Ada", "--note", "read every route", "--config", str(secretless_config)])
    capsys.readouterr()

    assert main(["check", "--config", str(secretless_config)]) == 1

    lines = capsys.readouterr().err.splitlines()
    daemon = "the daemon will not start unless it is set in the daemon's environment"
    assert f"warning: {secretless_config}: http.token_env: environment variable 'GUARDRAIL_TEST_UNSET_TOKEN' is not set here; {daemon}" in lines
    assert (
        f"warning: {secretless_config}: smarthost.password_env: environment variable 'GUARDRAIL_TEST_UNSET_PASSWORD'"
        f" is not set here; {daemon}"
    ) in lines
    assert lines[-1] == "0 error(s), 2 warning(s)"


def test_reload_warns_of_unset_secret_variables(secretless_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No daemon runs, so the command exits 1 after validating.
    assert main(["reload", "--config", str(secretless_config)]) == 1

    err = capsys.readouterr().err
    assert "http.token_env: environment variable 'GUARDRAIL_TEST_UNSET_TOKEN' is not set here" in err
    assert "smarthost.password_env: environment variable 'GUARDRAIL_TEST_UNSET_PASSWORD' is not set here" in err
    assert "no running daemon" in err


def test_run_requires_secret_variables(secretless_config: Path) -> None:
    environment = {
        name: value for name, value in os.environ.items()
        if name not in ("GUARDRAIL_TEST_UNSET_TOKEN", "GUARDRAIL_TEST_UNSET_PASSWORD")
    }
    # In a child process, so that a daemon that starts after all is stopped by the timeout.
    run = subprocess.run(
        [sys.executable, "-m", "guardrail", "run", "--config", str(secretless_config)],
        capture_output=True, text=True, timeout=30, env=environment,
    )

    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert (
        f"error: {secretless_config}: http.token_env: environment variable 'GUARDRAIL_TEST_UNSET_TOKEN' is not set;"
        " export it or remove the key"
    ) in lines
    assert (
        f"error: {secretless_config}: smarthost.password_env: environment variable 'GUARDRAIL_TEST_UNSET_PASSWORD' is not set;"
        " export it or remove the key"
    ) in lines
    assert not (secretless_config.parent / "var" / "guardrail.db.pid").exists()


@pytest.mark.parametrize("value", ["", "short"])
def test_unusable_token_variable_only_warns_outside_run(
    secretless_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: str,
) -> None:
    monkeypatch.setenv("GUARDRAIL_TEST_UNSET_TOKEN", value)

    assert main(["status", "--config", str(secretless_config)]) == 0
    assert "GUARDRAIL_TEST_UNSET_TOKEN" not in capsys.readouterr().err
    assert main(["check", "--config", str(secretless_config)]) == 1
    assert (
        f"warning: {secretless_config}: http.token_env: environment variable 'GUARDRAIL_TEST_UNSET_TOKEN' holds no"
        " usable token here (at least 16 characters of letters, digits and -._~+/);"
    ) in capsys.readouterr().err

    run = subprocess.run(
        [sys.executable, "-m", "guardrail", "run", "--config", str(secretless_config)],
        capture_output=True, text=True, timeout=30, env={**os.environ, "GUARDRAIL_TEST_UNSET_TOKEN": value},
    )
    assert run.returncode == 2
    assert f"error: {secretless_config}: http.token_env: the token must be at least 16 characters" in run.stderr


@pytest.mark.parametrize(("arguments", "option"), [
    (["answer", b"GR-\xff"], "REF"),
    (["answer", "GR-AAAAAA", "--by", b"\xffric"], "--by"),
    (["inspect", "--by", b"\xe9ric", "--note", "read every route"], "--by"),
    (["inspect", "--by", "Ada", "--note", b"r\xe9vis\xe9"], "--note"),
])
def test_non_utf8_argument_is_usage_error(tmp_path: Path, arguments: list[str | bytes], option: str) -> None:
    # Bytes that are not UTF-8, as a terminal set to Latin-1 sends them.
    config = write_config(tmp_path)

    run = subprocess.run(
        [sys.executable, "-m", "guardrail", *arguments, "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )

    assert run.returncode == 2
    assert f"argument {option}: invalid value" in run.stderr
    assert "must be UTF-8 text" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("mail_from", ["", "<>", " <> "])
def test_rule_test_null_sender_spellings(tmp_path: Path, capsys: pytest.CaptureFixture[str], mail_from: str) -> None:
    # "<>" is how SMTP writes the null sender, which is never acknowledged.
    config = example_copy(tmp_path)
    cases = tmp_path / "cases"
    write_case(cases, "bounce", f'mail_from = "{mail_from}"\n[expect]\nacknowledgement = "suppressed"\n')

    assert main(["test", "--config", str(config), str(cases)]) == 0

    assert "1 passed, 0 failed" in capsys.readouterr().out
