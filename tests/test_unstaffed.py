"""A route to a destination nobody staffs: acknowledge the sender, escalate at once, once."""

from __future__ import annotations

import email
from datetime import datetime, timedelta, timezone
from email.message import Message
from pathlib import Path

import pytest
from conftest import case_file, maildir_messages, send, settle, write_config

from guardrail.cli import main
from guardrail.clock import ManualClock

RULES = r"""
[[calendar]]
name = "office"
timezone = "Europe/Paris"
hours = { mon = ["09:00-18:00"], tue = ["09:00-18:00"], wed = ["09:00-18:00"], thu = ["09:00-18:00"], fri = ["09:00-18:00"] }

[[team]]
name = "legal"
calendar = "office"
first_response = "4h"

[[team]]
name = "frontdesk"
destination = { maildir = "var/maildir/frontdesk" }
members = [{ name = "Fran Desk", address = "fran@example.org" }]
calendar = "office"
first_response = "4h"

[[route]]
name = "contracts"
team = "legal"
any = [{ subject.regex = '(?i)\bcontract\b' }]

[[route]]
name = "default"
team = "frontdesk"
default = true
"""


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def outbound(folder: Path) -> list[Message]:
    return [email.message_from_bytes(data) for data in maildir_messages(folder / "var" / "outbound")]


@pytest.mark.parametrize("arrival", ["2025-11-18T09:00:00", "2025-11-22T09:00:00"], ids=["weekday", "weekend"])
async def test_unstaffed_team_escalates_at_once(tmp_path: Path, start_daemon, arrival: str) -> None:
    clock = ManualClock(at(arrival))
    config = write_config(tmp_path, rules=RULES)
    daemon = await start_daemon(config, clock=clock)

    refused = await send(daemon.port, "ivan@example.com", ["support@example.org"], case_file("unstaffed", "message.eml"))
    await settle(daemon, clock)

    assert refused == {}
    acks = [m for m in outbound(tmp_path) if m["Auto-Submitted"] == "auto-replied"]
    assert [m["X-Guardrail-Envelope-To"] for m in acks] == ["ivan@example.com"]
    assert await daemon.store.fetch_all("SELECT COUNT(*) FROM outbox WHERE kind = 'deliver'") == [(0,)]
    escalations = [m for m in outbound(tmp_path) if m["X-Guardrail-Envelope-To"] == "duty-manager@example.org"]
    assert len(escalations) == 1
    body = escalations[0].get_payload(decode=True).decode()
    assert "Team 'legal' is unstaffed: the team has no destination" in body
    assert "ivan@example.com" in body
    assert "Contract renewal for 2026" in body
    assert "<contract-2026@example.com>" in body

    # Neither the SLA deadline, nor a reload, nor a restart sends it again.
    assert daemon.reload() is True
    await daemon.stop()
    daemon = await start_daemon(config, clock=clock)
    for _ in range(4):
        await clock.advance(timedelta(days=2))
        await settle(daemon, clock)
    escalations = [m for m in outbound(tmp_path) if m["X-Guardrail-Envelope-To"] == "duty-manager@example.org"]
    assert len(escalations) == 1


async def test_team_without_members_or_hours_is_unstaffed(tmp_path: Path, start_daemon) -> None:
    rules = RULES.replace('name = "legal"\n', 'name = "legal"\ndestination = { maildir = "var/maildir/legal" }\n')
    clock = ManualClock(at("2025-11-18T09:00:00"))
    daemon = await start_daemon(write_config(tmp_path, rules=rules), clock=clock)
    await send(daemon.port, "ivan@example.com", ["support@example.org"], case_file("unstaffed", "message.eml"))
    await settle(daemon, clock)
    reasons = await daemon.store.fetch_all("SELECT escalation_reason FROM conversations")
    assert reasons == [("the team has no members",)]


async def test_permanent_delivery_failure_escalates_once(tmp_path: Path, start_daemon, sink) -> None:
    sink.handler.reply = "550 5.1.1 no such mailbox"
    rules = RULES.replace('destination = { maildir = "var/maildir/frontdesk" }', 'destination = { smtp = ["desk@example.net"] }')
    config = write_config(
        tmp_path, rules=rules,
        sections={"smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False}},
    )
    clock = ManualClock(at("2025-11-18T09:00:00"))
    daemon = await start_daemon(config, clock=clock)
    message = b"From: Ivan <ivan@example.com>\r\nSubject: Hello\r\nMessage-ID: <hello@example.com>\r\n\r\nHi\r\n"
    await send(daemon.port, "ivan@example.com", ["support@example.org"], message)
    await settle(daemon, clock)
    for _ in range(3):
        await clock.advance(timedelta(hours=4))
        await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT delivery_failed, escalation_reason FROM conversations")
    assert rows[0][0] == 1
    assert rows[0][1].startswith("delivery to the destination failed permanently")
    escalations = await daemon.store.fetch_all(
        "SELECT payload FROM outbox WHERE kind = 'mail' AND target LIKE '%duty-manager@example.org%'"
    )
    assert len(escalations) == 1
    # The mail states what happened: the team never got the message.
    mail = bytes(escalations[0][0])
    assert b"Delivery failed: team frontdesk" in mail
    assert b"This message never reached team 'frontdesk'" in mail
    assert b"Unstaffed" not in mail


async def test_check_reports_unstaffed_teams(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, rules=RULES)
    assert main(["check", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    rules_file = tmp_path / "rules" / "rules.toml"
    assert f"warning: {rules_file}: team legal: unstaffed: the team has no destination" in error
