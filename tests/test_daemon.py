"""End-to-end: a message sent over SMTP is committed, routed and delivered."""

from __future__ import annotations

from pathlib import Path

from conftest import maildir_messages, message, send, wait_until, write_config


async def test_message_lands_in_team_maildir(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    refused = await send(daemon.port, "alice@example.com", ["support@example.org"], message())

    assert refused == {}
    maildir = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: maildir_messages(maildir), what="delivery to the support maildir")
    (delivered,) = maildir_messages(maildir)
    assert delivered.endswith(message())
    assert b"X-Guardrail-Route: default\r\n" in delivered
    assert b"X-Guardrail-Loop: mx.test.example\r\n" in delivered


async def test_rcpt_rule_routes_to_billing(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    await send(daemon.port, "alice@example.com", ["billing@example.org"], message(subject="Question"))

    maildir = tmp_path / "var" / "maildir" / "billing"
    await wait_until(lambda: maildir_messages(maildir), what="delivery to the billing maildir")
    assert b"X-Guardrail-Route: billing\r\n" in maildir_messages(maildir)[0]
