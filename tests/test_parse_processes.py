"""Parse processes: messages prepared in a child process, with the daemon as the fallback."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import os
import signal
import smtplib
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import (
    DATA,
    ROUTES,
    TEAMS,
    crlf,
    maildir_messages,
    message,
    send,
    wait_until,
    write_config,
)
from structlog.testing import capture_logs

from guardrail.config import load_config
from guardrail.daemon import Daemon, load_ruleset
from guardrail.errors import TemporaryDeliveryError
from guardrail.offload import ParseProcesses, ParseStalled, ParseTimeout
from guardrail.plan import Submission
from guardrail.prepare import (
    BareLineEnding,
    Envelope,
    Site,
    TooManyHops,
    prepare_message,
    prepare_unrouted,
)

CHILD = {"parse_processes": 1}


def parsed(daemon: Daemon, where: str) -> float:
    return daemon.metrics.registry.get_sample_value("guardrail_messages_parsed_total", {"where": where}) or 0.0


async def ready_daemon(tmp_path: Path, start_daemon, rules: str = TEAMS + ROUTES) -> Daemon:
    daemon = await start_daemon(write_config(tmp_path, rules=rules, smtp=CHILD))
    assert daemon.parsers is not None
    await wait_until(lambda: daemon.parsers.ready == 1, timeout=20, what="the parse process to be ready")
    return daemon


def stored(database: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT m.message_id, m.team, c.reference FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " ORDER BY m.id"
        ).fetchall()


async def test_child_prepares_and_renders_ack(tmp_path: Path, start_daemon) -> None:
    daemon = await ready_daemon(tmp_path, start_daemon)
    await send(daemon.port, "alice@example.com", ["billing@example.org"], message(message_id="<p1@example.com>"))

    assert parsed(daemon, "parse process") == 1
    assert parsed(daemon, "daemon") == 0
    [(message_id, team, reference)] = stored(daemon.config.database_path)
    assert (message_id, team) == ("<p1@example.com>", "billing")
    await wait_until(lambda: len(maildir_messages(tmp_path / "var" / "outbound")) == 1, what="the acknowledgement")
    [ack] = maildir_messages(tmp_path / "var" / "outbound")
    # The child rendered the acknowledgement for the reference it proposed,
    # and the commit gave the conversation that reference.
    assert f"[{reference}]".encode() in ack
    assert f"X-Guardrail-Conversation: {reference}".encode() in ack

    # The dedupe key made in the child matches a retransmission.
    reply = await send(daemon.port, "alice@example.com", ["billing@example.org"], message(message_id="<p1@example.com>"))
    assert reply == {}
    assert len(stored(daemon.config.database_path)) == 1


async def test_killed_child_is_replaced(tmp_path: Path, start_daemon) -> None:
    daemon = await ready_daemon(tmp_path, start_daemon)
    [pid] = daemon.parsers.pids
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: daemon.parsers.ready == 0, what="the daemon to notice the dead child")

    # The message waits for the new child instead of being parsed in the daemon.
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<k1@example.com>"))
    assert daemon.parsers.pids != [pid]
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<k2@example.com>"))

    assert parsed(daemon, "parse process") == 2
    assert parsed(daemon, "daemon") == 0
    assert [row[:2] for row in stored(daemon.config.database_path)] == [
        ("<k1@example.com>", "support"), ("<k2@example.com>", "support"),
    ]


async def test_reload_reaches_child_first(tmp_path: Path, start_daemon) -> None:
    daemon = await ready_daemon(tmp_path, start_daemon)
    rules_file = tmp_path / "rules" / "rules.toml"
    rules_file.write_text(rules_file.read_text().replace('subject.contains = "invoice"', 'subject.contains = "printer"'))
    assert daemon.reload()

    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<r1@example.com>"))
    assert parsed(daemon, "parse process") == 1
    assert [row[:2] for row in stored(daemon.config.database_path)] == [("<r1@example.com>", "billing")]


CATASTROPHIC = TEAMS + """
[[route]]
name = "slow"
team = "billing"
any = [{ subject.regex = '^(a+)+$' }]
""" + ROUTES


async def test_stalled_child_gives_451_then_default(tmp_path: Path, start_daemon) -> None:
    daemon = await ready_daemon(tmp_path, start_daemon, CATASTROPHIC)
    daemon.parsers.timeout = 1.0
    database = daemon.config.database_path
    [pid] = daemon.parsers.pids
    slow = message(subject="a" * 40 + "!", message_id="<slow@example.com>")

    async def send_slow() -> int:
        with pytest.raises(smtplib.SMTPDataError) as raised:
            await send(daemon.port, "alice@example.com", ["support@example.org"], slow)
        return raised.value.smtp_code

    with capture_logs() as events:
        stalled = asyncio.ensure_future(send_slow())
        await asyncio.sleep(0.2)
        # A message queued behind the stalled one goes to the next child.
        await send(daemon.port, "bob@example.com", ["support@example.org"], message(message_id="<behind@example.com>"))
        assert await stalled == 451
    assert daemon.parsers.pids != [pid]
    [refused] = [event for event in events if event["event"] == "message_not_accepted"]
    assert refused["reason"] == "routing stalled"

    # The sender's retry stalls the new child too. Retrying would never end,
    # so the default route's team gets it without routing, escalated at
    # once, and without an acknowledgement. The daemon never evaluates the
    # rules for it, so it keeps serving other sessions.
    with capture_logs() as events:
        assert await send(daemon.port, "alice@example.com", ["support@example.org"], slow) == {}
    await send(daemon.port, "carol@example.com", ["support@example.org"], message(message_id="<after@example.com>"))

    assert parsed(daemon, "daemon") == 0
    assert parsed(daemon, "without routing") == 1
    errors = [event["event"] for event in events if event["log_level"] == "error"]
    assert errors[:2] == ["parse_timed_out", "routing_gave_up"]
    warnings = [event["event"] for event in events if event["log_level"] == "warning"]
    assert "conversation_escalated_at_once" in warnings
    assert "team_unstaffed" not in warnings
    assert [row[:2] for row in stored(database)] == [
        ("<behind@example.com>", "support"), ("<slow@example.com>", "support"), ("<after@example.com>", "support"),
    ]
    with sqlite3.connect(database) as connection:
        [(route, reasons)] = connection.execute("SELECT route, route_reasons FROM messages WHERE message_id = '<slow@example.com>'")
        [(escalation_reason,)] = connection.execute("SELECT escalation_reason FROM conversations WHERE id = 2")
        [(decision, signal)] = connection.execute("SELECT decision, signal FROM acknowledgements WHERE message_row = 2")
    assert route == "default"
    assert "routing did not finish (a parse process made no progress for 1 s on this message)" in reasons
    assert escalation_reason.startswith("routing did not finish")
    assert (decision, signal) == ("suppressed", "routing did not finish")

    def escalated() -> bool:
        with sqlite3.connect(database) as connection:
            targets = [row[0] for row in connection.execute("SELECT target FROM outbox WHERE conversation_id = 2 AND kind = 'mail'")]
        return any("duty-manager@example.org" in target for target in targets)

    await wait_until(escalated, what="the escalation to the fallback human")
    # The team is staffed and the sender got no acknowledgement: the mail must not say otherwise.
    with sqlite3.connect(database) as connection:
        [(payload,)] = connection.execute("SELECT payload FROM outbox WHERE conversation_id = 2 AND kind = 'mail'")
    mail = email.message_from_bytes(payload)
    text = mail.get_payload(decode=True).decode()
    assert mail["Subject"].startswith("[")
    assert "Routing did not finish: team support" in mail["Subject"]
    assert "The sender was not acknowledged." in text
    assert "unstaffed" not in text
    assert "was acknowledged" not in text


@pytest.mark.parametrize(
    ("mail_from", "rcpt", "raw", "expected"),
    [
        # (route, team, is_staff, unstaffed reason set) or the rejection's type
        ("alice@example.com", "billing@example.org", message(subject="Invoice 12"), ("default", "support", False, True)),
        ("sam@example.org", "support@example.org", message(sender="Sam Ortiz <sam@example.org>"), ("default", "support", True, True)),
        ("alice@example.com", "postmaster@example.org", message(), ("postmaster", "postmaster", False, False)),
        ("alice@example.com", "support@example.org", b"Subject: x\n\nbare line feeds\n", BareLineEnding),
    ],
)
def test_prepare_unrouted_table(tmp_path: Path, mail_from: str, rcpt: str, raw: bytes, expected: object) -> None:
    # No rule is evaluated: a subject that the billing route would take still goes to the default route.
    config = load_config(write_config(tmp_path))
    envelope = Envelope(mail_from, (rcpt,), "[127.0.0.1]:40000", "client.example")
    now = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    result = prepare_unrouted(envelope, raw, load_ruleset(config), Site.from_config(config), now, "routing did not finish (test)")

    if isinstance(expected, type):
        assert isinstance(result, expected)
        return
    assert isinstance(result, Submission)
    assert (result.route, result.team, result.is_staff, bool(result.unstaffed)) == expected


async def test_zero_processes_parse_in_daemon(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"parse_processes": 0}))
    assert daemon.parsers is None
    await send(daemon.port, "alice@example.com", ["support@example.org"], message())
    assert parsed(daemon, "daemon") == 1


def sample_messages() -> list[tuple[str, bytes]]:
    files = sorted(path for path in DATA.rglob("*.eml"))
    built = [
        ("many hops", message(extra_headers="Received: from a by b; Tue, 04 Nov 2025 10:00:00 +0100\r\n" * 40)),
        ("french", message(subject="Facture manquante", body="Bonjour,\r\nma facture est introuvable.\r\n")),
    ]
    return [(path.name, crlf(path.read_bytes())) for path in files] + built


async def test_child_decides_as_daemon(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    rules, site = load_ruleset(config), Site.from_config(config)
    now = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    envelope = Envelope("alice@example.com", ("support@example.org",), "[127.0.0.1]:40000", "client.example")
    parsers = ParseProcesses(1, site)
    parsers.start(rules)
    try:
        await wait_until(lambda: parsers.ready == 1, timeout=20, what="the parse process to be ready")
        samples = sample_messages()
        assert len(samples) >= 10
        for name, raw in samples:
            remote = await parsers.prepare(envelope, raw, now)
            local = prepare_message(envelope, raw, rules, site, now)
            assert remote is not None, name
            if isinstance(local, TooManyHops):
                assert remote == local, name
                continue
            assert isinstance(remote, Submission), name
            assert remote.raw == raw and remote.dedupe_key == local.dedupe_key, name
            assert remote.summary.to_record() == local.summary.to_record(), name
            ignored = {"raw", "summary", "proposed_reference", "rendered_ack"}
            for field in dataclasses.fields(Submission):
                if field.name not in ignored:
                    assert getattr(remote, field.name) == getattr(local, field.name), (name, field.name)
            assert (remote.rendered_ack is None) == (local.ack is None), name
    finally:
        await parsers.close()
    assert parsers.pids == []


async def test_close_stops_children(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    parsers = ParseProcesses(2, Site.from_config(config))
    parsers.start(load_ruleset(config))
    await wait_until(lambda: parsers.ready == 2, timeout=20, what="two parse processes")
    pids = parsers.pids
    await parsers.close()
    await asyncio.sleep(0)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def dead(pid: int) -> bool:
    """Return True once process `pid` has exited: a zombie waiting to be reaped, or gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # Reading fails with ESRCH when the process goes between the open and the read.
        return True
    return "\nState:\tZ" in status


async def test_message_waits_for_replacement_child(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    parsers = ParseProcesses(1, Site.from_config(config))
    parsers.start(load_ruleset(config))
    envelope = Envelope("alice@example.com", ("support@example.org",), "[127.0.0.1]:40000", "client.example")
    raw = crlf(message(message_id="<died@example.com>"))
    now = datetime.now(UTC)
    try:
        await wait_until(lambda: parsers.ready == 1, timeout=20, what="the parse process")
        [pid] = parsers.pids
        os.kill(pid, signal.SIGKILL)
        # Blocking calls, so that the event loop runs nothing meanwhile.
        for _ in range(500):
            if dead(pid):
                break
            time.sleep(0.01)
        assert dead(pid)
        # The event loop has not yet read the end of the dead child's
        # output. The first message finds its stdin broken; the second
        # must not be sent to the same child again.
        first = asyncio.ensure_future(parsers.prepare(envelope, raw, now))
        await asyncio.sleep(0)
        second = await parsers.prepare(envelope, raw, now)
        assert isinstance(second, Submission)
        assert isinstance(await first, Submission)
        assert parsers.pids != [pid]
    finally:
        await parsers.close()


FAKE_CHILD = """
import os, sys
from guardrail.offload_child import read_frame, write_frame

requests, replies = sys.stdin.buffer, sys.stdout.buffer
while (frame := read_frame(requests)) is not None:
    if frame[0] == "rules":
        write_frame(replies, ("ready",))
    elif frame[0] == "prepare":
        if {behaviour!r} == "error" or ({behaviour!r} == "crash on mark" and b"CRASH" not in frame[3]):
            write_frame(replies, (frame[1], "RuntimeError('cannot parse')"))
        else:
            os._exit(3)
"""


async def start_fake(tmp_path: Path, behaviour: str) -> ParseProcesses:
    script = tmp_path / f"fake_{behaviour}.py"
    script.write_text(FAKE_CHILD.format(behaviour=behaviour))
    config = load_config(write_config(tmp_path))
    parsers = ParseProcesses(1, Site.from_config(config), command=[sys.executable, str(script)])
    parsers.start(load_ruleset(config))
    await wait_until(lambda: parsers.ready == 1, timeout=20, what="the fake child to be ready")
    return parsers


ENVELOPE = Envelope("alice@example.com", ("support@example.org",), "[127.0.0.1]:40000", "client.example")


async def test_child_error_hands_message_back(tmp_path: Path) -> None:
    parsers = await start_fake(tmp_path, "error")
    try:
        with capture_logs() as events:
            result = await parsers.prepare(ENVELOPE, message(), datetime(2026, 3, 2, 9, 30, tzinfo=UTC))
    finally:
        await parsers.close()
    # None means the daemon prepares the message itself, which raises the
    # same error again unless the error came from the child alone.
    assert result is None
    [failed] = [event for event in events if event["event"] == "parse_process_failed"]
    assert failed["error"] == "RuntimeError('cannot parse')"


async def test_message_killing_children_gets_451(tmp_path: Path) -> None:
    parsers = await start_fake(tmp_path, "exit")
    try:
        with pytest.raises(ParseStalled, match="2 parse processes died while working on this message"):
            await parsers.prepare(ENVELOPE, message(), datetime(2026, 3, 2, 9, 30, tzinfo=UTC))
    finally:
        await parsers.close()


async def test_message_behind_a_crash_is_not_stalled(tmp_path: Path) -> None:
    # A message that waited behind one that killed its child did nothing
    # wrong, so it must never go down the path of messages that stall.
    parsers = await start_fake(tmp_path, "crash on mark")
    now = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    try:
        crashing = asyncio.ensure_future(parsers.prepare(ENVELOPE, message(body="CRASH\r\n"), now))
        await asyncio.sleep(0)
        innocent = asyncio.ensure_future(parsers.prepare(ENVELOPE, message(message_id="<innocent@x>"), now))
        results = await asyncio.gather(crashing, innocent, return_exceptions=True)
    finally:
        await parsers.close()

    assert isinstance(results[0], ParseStalled)
    # Sent again after the restart, it got a reply from the child, or it waited behind the crash once more.
    assert results[1] is None or type(results[1]) is ParseTimeout


def maildir_files(daemon: Daemon, where: str) -> float:
    return daemon.metrics.registry.get_sample_value("guardrail_maildir_files_written_total", {"where": where}) or 0.0


async def ready_maildir_process(tmp_path: Path, start_daemon) -> Daemon:
    daemon = await ready_daemon(tmp_path, start_daemon)
    assert daemon.maildir_process is not None
    await wait_until(lambda: daemon.maildir_process.ready == 1, timeout=20, what="the maildir process to be ready")
    return daemon


def delivered(tmp_path: Path) -> tuple[list[bytes], list[bytes]]:
    """Return the team's messages and the acknowledgements, as files in their maildirs."""
    return maildir_messages(tmp_path / "var" / "maildir" / "support"), maildir_messages(tmp_path / "var" / "outbound")


async def test_maildir_process_writes_deliveries(tmp_path: Path, start_daemon) -> None:
    daemon = await ready_maildir_process(tmp_path, start_daemon)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<w1@example.com>"))
    await wait_until(lambda: delivered(tmp_path) != ([], []) and all(delivered(tmp_path)), what="both deliveries")

    [team_copy], [ack] = delivered(tmp_path)
    assert b"Message-ID: <w1@example.com>" in team_copy
    assert b"In-Reply-To: <w1@example.com>" in ack
    # The files appear before the daemon has read the child's reply.
    await wait_until(lambda: maildir_files(daemon, "maildir process") == 2, what="the child's reply")
    assert maildir_files(daemon, "daemon") == 0


async def test_killed_maildir_process_loses_nothing(tmp_path: Path, start_daemon) -> None:
    daemon = await ready_maildir_process(tmp_path, start_daemon)
    [pid] = daemon.maildir_process.pids
    os.kill(pid, signal.SIGKILL)
    for number in range(5):
        # One sender each, so that the per-sender limit leaves every acknowledgement.
        sender = f"customer{number}@example.com"
        await send(daemon.port, sender, ["support@example.org"], message(sender=sender, message_id=f"<x{number}@example.com>"))

    def all_delivered() -> bool:
        team, acks = delivered(tmp_path)
        return len(team) == 5 and len(acks) == 5

    await wait_until(all_delivered, timeout=20, what="five messages and five acknowledgements")
    team, _ = delivered(tmp_path)
    assert sorted(line for copy in team for line in copy.splitlines() if line.startswith(b"Message-ID:")) == [
        f"Message-ID: <x{number}@example.com>".encode() for number in range(5)
    ]

    def outbox_states() -> list[tuple[str, int]]:
        with sqlite3.connect(daemon.config.database_path) as connection:
            return connection.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()

    # The files appear before their rows are marked done.
    await wait_until(lambda: outbox_states() == [("done", 10)], what="every outbox row done")


async def test_maildir_process_reports_each_file(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    processes = ParseProcesses(1, Site.from_config(config), role="maildir")
    # Before a child is ready, the caller writes the files itself.
    assert await processes.write_maildirs([(tmp_path / "box", "1.G1.host", b"one")]) is None
    processes.start(load_ruleset(config))
    try:
        await wait_until(lambda: processes.ready == 1, timeout=20, what="the maildir process to be ready")
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where a maildir should be\n")
        files = [(blocked, "1.G1.host", b"one"), (tmp_path / "box", "1.G2.host", b"two"), (tmp_path / "box", "1.G2.host", b"two")]
        results = await processes.write_maildirs(files)
    finally:
        await processes.close()

    assert results is not None
    assert isinstance(results[0], TemporaryDeliveryError)
    assert str(blocked) in str(results[0])
    assert results[1:] == [True, False]
    assert maildir_messages(tmp_path / "box") == [b"two"]


GARBLING_CHILD = """
import sys
from pathlib import Path
from guardrail.offload_child import main, read_frame, write_frame

marker = Path({marker!r})
if marker.exists():
    main()  # a restarted child works as the real one does
    sys.exit()
marker.touch()
requests, replies = sys.stdin.buffer, sys.stdout.buffer
while (frame := read_frame(requests)) is not None:
    if frame[0] == "rules":
        write_frame(replies, ("ready",))
    elif frame[0] == "prepare":
        replies.write(b"\\x00\\x00\\x00\\x05hello")  # a length, then five bytes that are not a pickle
        replies.flush()
"""


async def test_child_sending_garbage_is_replaced(tmp_path: Path) -> None:
    script = tmp_path / "garbling_child.py"
    script.write_text(GARBLING_CHILD.format(marker=str(tmp_path / "garbled-once")))
    config = load_config(write_config(tmp_path))
    parsers = ParseProcesses(1, Site.from_config(config), command=[sys.executable, str(script)], ready_timeout=10)
    parsers.start(load_ruleset(config))
    try:
        await wait_until(lambda: parsers.ready == 1, timeout=20, what="the garbling child to be ready")
        [pid] = parsers.pids
        with capture_logs() as events:
            result = await parsers.prepare(ENVELOPE, message(), datetime(2026, 3, 2, 9, 30, tzinfo=UTC))
    finally:
        await parsers.close()

    # The message went to the child started in place of the one that garbled its reply.
    assert isinstance(result, Submission)
    assert result.team == "support"
    [unreadable] = [event for event in events if event["event"] == "parse_reply_unreadable"]
    assert (unreadable["pid"], unreadable["log_level"]) == (pid, "error")
    assert [event["pid"] for event in events if event["event"] == "parse_process_exited"] == [pid]


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_GETPIPE_SZ"), reason="pipe sizes are a Linux feature")
async def test_child_pipes_hold_a_large_message(tmp_path: Path, start_daemon) -> None:
    import fcntl

    from guardrail.offload_child import PIPE_SIZE

    daemon = await ready_daemon(tmp_path, start_daemon)
    [child] = daemon.parsers._children
    for stream in (child.process.stdin, child.process.stdout):
        pipe = stream._transport.get_extra_info("pipe")
        assert fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_SIZE


def test_widen_pipe_leaves_a_file_alone(tmp_path: Path) -> None:
    from guardrail.offload_child import widen_pipe

    with open(tmp_path / "file", "wb") as file:
        assert not widen_pipe(file.fileno())
