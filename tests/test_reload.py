"""Routing by bare address, and reloads that keep the last good rule set."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, free_port, kill_if_running, send, wait_for_port, write_config
from structlog.testing import capture_logs

from guardrail.cli import main

GOOD_RULES = """
[[team]]
name = "vip-desk"
destination = { maildir = "var/maildir/vip-desk" }

[[team]]
name = "frontdesk"
destination = { maildir = "var/maildir/frontdesk" }

[[route]]
name = "vip"
team = "vip-desk"
any = [{ from.regex = 'ceo@example\\.com' }]

[[route]]
name = "default"
team = "frontdesk"
default = true
"""

BAD_ESCAPE = GOOD_RULES.replace("from.regex = 'ceo@example\\.com'", 'from.regex = "ceo@example\\.com"')
BAD_REGEX = GOOD_RULES.replace("from.regex = 'ceo@example\\.com'", "from.regex = '(ceo@example\\.com'")


def teams_by_message_id(database: Path) -> dict[str, str]:
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT message_id, team FROM messages"))


def case_message(name: str, message_id: str | None = None) -> bytes:
    raw = (DATA / "routing" / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if message_id:
        start = raw.index(b"Message-ID: ")
        end = raw.index(b"\r\n", start)
        raw = raw[:start] + f"Message-ID: {message_id}".encode() + raw[end:]
    return raw


async def test_display_name_and_suffix_cannot_steer_routes(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=GOOD_RULES))
    for name in ("m1-display-name-spoof.eml", "m2-domain-suffix.eml", "m3-real-vip-mixed-case.eml"):
        await send(daemon.port, "sender@example.net", ["support@example.org"], case_message(name))

    teams = teams_by_message_id(daemon.config.database_path)
    assert teams["<spoof-dn-1@example.net>"] == "frontdesk"
    assert teams["<spoof-suffix-1@example.net>"] == "frontdesk"
    assert teams["<real-ceo-1@example.com>"] == "vip-desk"


@pytest.mark.parametrize(
    ("bad_rules", "expected"),
    [
        (BAD_ESCAPE, ["rules.toml:13", "invalid TOML"]),
        (BAD_REGEX, ["route[0] (vip).any[0].from.regex", "invalid regular expression '(ceo@example\\\\.com'"]),
    ],
)
async def test_bad_reload_keeps_previous_rules(tmp_path: Path, start_daemon, bad_rules: str, expected: list[str]) -> None:
    config = write_config(tmp_path, rules=GOOD_RULES)
    daemon = await start_daemon(config)
    (tmp_path / "rules" / "rules.toml").write_text(bad_rules)

    with capture_logs() as events:
        assert daemon.reload() is False
    await send(daemon.port, "ceo@example.com", ["support@example.org"], case_message("m3-real-vip-mixed-case.eml", "<again@example.com>"))

    errors = [event for event in events if event["log_level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["event"] == "rules_reload_failed"
    for text in expected:
        assert text in errors[0]["error"]
    assert teams_by_message_id(daemon.config.database_path)["<again@example.com>"] == "vip-desk"


async def test_good_reload_changes_next_routing(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=GOOD_RULES))
    (tmp_path / "rules" / "rules.toml").write_text(GOOD_RULES.replace("ceo@example", "cfo@example"))

    assert daemon.reload() is True
    await send(daemon.port, "ceo@example.com", ["support@example.org"], case_message("m3-real-vip-mixed-case.eml"))

    assert teams_by_message_id(daemon.config.database_path)["<real-ceo-1@example.com>"] == "frontdesk"


def test_start_with_bad_rules_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, rules=BAD_REGEX)
    assert main(["run", "--config", str(config)]) == 2
    assert "invalid regular expression '(ceo@example\\\\.com'" in capsys.readouterr().err



async def test_sighup_reloads_and_sigterm_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, rules=GOOD_RULES, smtp={"port": port})
    process = subprocess.Popen(
        [sys.executable, "-m", "guardrail", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_port(port, process)
        (tmp_path / "rules" / "rules.toml").write_text(GOOD_RULES.replace("ceo@example", "cfo@example"))
        process.send_signal(signal.SIGHUP)
        database = tmp_path / "var" / "guardrail.db"

        # The reload is asynchronous; resend with fresh ids until the new rules answer.
        for attempt in range(50):
            message_id = f"<hup-{attempt}@example.com>"
            await send(port, "ceo@example.com", ["support@example.org"], case_message("m3-real-vip-mixed-case.eml", message_id))
            if teams_by_message_id(database)[message_id] == "frontdesk":
                break
            time.sleep(0.05)
        else:
            raise AssertionError("SIGHUP did not load the new rules")

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        kill_if_running(process)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (lambda path: path.write_bytes(GOOD_RULES.replace("vip", "vïp").encode("latin-1")), "not UTF-8 (byte 0xef at offset"),
        (lambda path: path.write_bytes(GOOD_RULES.encode("utf-16")), "not UTF-8 (it starts with a UTF-16"),
        (lambda path: (path.unlink(), os.mkfifo(path)), "is a named pipe (FIFO), not a regular file"),
    ],
    ids=["latin-1", "utf-16", "fifo"],
)
async def test_unreadable_rule_file_fails_reload(tmp_path: Path, start_daemon, write, problem: str) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=GOOD_RULES))
    old_digest = daemon.rules.digest
    write(tmp_path / "rules" / "rules.toml")

    with capture_logs() as events:
        assert daemon.reload() is False

    (event,) = [event for event in events if event["log_level"] == "error"]
    assert event["event"] == "rules_reload_failed"
    assert problem in event["error"]
    assert daemon.rules.digest == old_digest
    registry = daemon.metrics.registry
    assert registry.get_sample_value("guardrail_rule_reloads_total", {"result": "failed"}) == 1
    assert registry.get_sample_value("guardrail_rule_reloads_total", {"result": "succeeded"}) in (None, 0)


async def test_reload_skips_hidden_rule_files(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=GOOD_RULES))
    old_digest = daemon.rules.digest
    rules = tmp_path / "rules"
    # The lock file Emacs writes while rules.toml has unsaved changes.
    (rules / ".#rules.toml").symlink_to("editor@host.4242:1796459000")
    (rules / ".rules.toml").write_text("this is not TOML [")

    assert daemon.reload() is True

    assert daemon.rules.digest == old_digest
    # Exit 2 means errors. Exit 1 means warnings only, such as rules never inspected.
    assert main(["check", "--config", str(tmp_path / "guardrail.toml")]) != 2


async def test_unexpected_reload_error_is_counted(tmp_path: Path, start_daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=GOOD_RULES))
    old_digest = daemon.rules.digest

    def broken_loader(config):
        raise RuntimeError("loader bug")

    monkeypatch.setattr("guardrail.daemon.load_ruleset", broken_loader)
    with capture_logs() as events:
        assert daemon.reload() is False

    (event,) = [event for event in events if event["log_level"] == "error"]
    assert event["event"] == "rules_reload_failed"
    assert event["error"] == "unexpected RuntimeError: loader bug"
    assert daemon.rules.digest == old_digest
    assert daemon.metrics.registry.get_sample_value("guardrail_rule_reloads_total", {"result": "failed"}) == 1
