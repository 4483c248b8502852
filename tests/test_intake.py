"""SMTP protocol behaviour of the intake server, driven over 127.0.0.1.

Every test starts the real daemon on port 0 and speaks SMTP to it: raw bytes
where the exact reply sequence matters, smtplib otherwise. Stored state is
read from the daemon's SQLite file with a second connection.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import sqlite3
import struct
import time
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import structlog
from conftest import (
    ROUTES,
    TEAMS,
    converse,
    maildir_messages,
    message,
    send,
    wait_until,
    write_config,
)

from guardrail.daemon import Daemon
from guardrail.intake import (
    ERROR_REPLY_LIMIT,
    JUNK_COMMAND_LIMIT,
    _scan_data,
    _signal_label,
)
from guardrail.prepare import has_bare_line_ending
from guardrail.replies import with_enhanced_code

SMUGGLING = Path(__file__).parent / "data" / "smuggling"
OVERSIZE = Path(__file__).parent / "data" / "oversize"

SUPPORT = "support@example.org"
EHLO = b"EHLO client.test.example\r\n"

# The support team forwards through the smarthost instead of a maildir.
SMTP_TEAMS = """
[[team]]
name = "support"
destination = { smtp = ["team@example.net"] }
members = [{ name = "Sam Ortiz", address = "sam@example.org" }]

[[team]]
name = "billing"
destination = { maildir = "var/maildir/billing" }
members = [{ name = "Bea Keller", address = "bea@example.org" }]
"""

# A body condition makes intake parse every body, not only the headers.
BODY_ROUTES = """
[[route]]
name = "wire-fraud"
team = "billing"
any = [{ body.contains = "wire transfer now" }]

[[route]]
name = "default"
team = "support"
default = true
"""

ENHANCED_REPLY = re.compile(r"^(\d)\d\d (\d)\.\d{1,3}\.\d{1,3} ")


class Client:
    """A raw SMTP client over asyncio streams that reads whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        host, port = writer.get_extra_info("sockname")[:2]
        self.peer = f"[{host}]:{port}"

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        return cls(reader, writer)

    async def reply(self, timeout: float = 5) -> list[str]:
        """Read one reply with every line of a multi-line one. Raise EOFError if the server closed."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise EOFError(f"connection closed after {lines!r}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return lines

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: bytes) -> list[str]:
        await self.send(line if line.endswith(b"\r\n") else line + b"\r\n")
        return await self.reply()

    async def replies_until_closed(self, timeout: float = 5) -> list[list[str]]:
        """Read replies until the server closes the connection or `timeout` passes."""
        replies = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                replies.append(await self.reply(timeout=deadline - time.monotonic()))
            except (EOFError, TimeoutError, ConnectionError):
                break
        return replies

    async def is_silent(self, wait: float = 0.3) -> bool:
        """Return True if the server sends nothing within `wait` seconds."""
        try:
            await asyncio.wait_for(self.reader.read(1), wait)
        except TimeoutError:
            return True
        return False

    async def is_closed_by_server(self, timeout: float) -> bool:
        """Return True once the server closes the connection, or False if it is still open after `timeout`."""
        try:
            await asyncio.wait_for(self.reader.read(), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (ConnectionError, TimeoutError):
            pass


def codes(replies: Iterable[list[str]]) -> list[str]:
    return [reply[-1][:3] for reply in replies]


def dot_stuff(content: bytes) -> bytes:
    """Return `content` as it travels after DATA: dot-stuffed and ending in CRLF.CRLF."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


async def open_transaction(port: int, *, mail_from: str = "alice@example.com", rcpt_tos: Iterable[str] = (SUPPORT,),
                           mail_options: str = "") -> Client:
    """Connect and run EHLO, MAIL, RCPT and DATA. Raise AssertionError if the server rejects any of them."""
    client = await Client.connect(port)
    greeting = await client.reply()
    assert greeting[0].startswith("220 "), greeting
    assert (await client.command(EHLO))[-1].startswith("250 "), "EHLO refused"
    mail = await client.command(f"MAIL FROM:<{mail_from}>{mail_options}".encode())
    assert mail[-1].startswith("250 "), mail
    for address in rcpt_tos:
        rcpt = await client.command(f"RCPT TO:<{address}>".encode())
        assert rcpt[-1].startswith("250 "), rcpt
    data = await client.command(b"DATA")
    assert data[-1].startswith("354 "), data
    return client


async def transaction(port: int, content: bytes, **envelope: Any) -> str:
    """Send one message over a raw connection and return the reply line to the final dot."""
    client = await open_transaction(port, **envelope)
    try:
        await client.send(dot_stuff(content))
        reply = await client.reply()
        await client.command(b"QUIT")
    finally:
        await client.close()
    return reply[-1]


def query(daemon: Daemon, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(daemon.config.database_path)) as db:
        return db.execute(sql, parameters).fetchall()


def count_rows(daemon: Daemon, table: str) -> int:
    return query(daemon, f"SELECT COUNT(*) FROM {table}")[0][0]


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels) or 0.0


def stored_raws(daemon: Daemon) -> list[bytes]:
    return [bytes(row[0]) for row in query(daemon, "SELECT raw FROM messages ORDER BY id")]


def header_names(block: bytes) -> list[str]:
    """Return the field names of a header block, skipping folded continuation lines."""
    lines = [line for line in block.split(b"\r\n") if line]
    return [line.split(b":", 1)[0].decode() for line in lines if not line[:1].isspace()]


def send_with_options(port: int, mail_from: str, rcpt_tos: list[str], data: bytes, options: list[str]) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        return client.sendmail(mail_from, rcpt_tos, data, mail_options=options)


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# -- SMTP smuggling ------------------------------------------------------------


@pytest.mark.parametrize("processes", [0, 1], ids=["in daemon", "in parse process"])
@pytest.mark.parametrize("name", ["client-smuggle.bin", "client-smuggle-lf-lf.bin"])
async def test_smuggled_message_gets_one_550(tmp_path: Path, start_daemon, name: str, processes: int) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"parse_processes": processes}))
    if processes:
        await wait_until(lambda: daemon.parsers.ready == 1, timeout=20, what="the parse process to be ready")
    client = await Client.connect(daemon.port)
    with structlog.testing.capture_logs() as events:
        greeting = await client.reply()
        await client.send((SMUGGLING / name).read_bytes())
        replies = [greeting, *await client.replies_until_closed()]
    await client.close()

    assert codes(replies) == ["220", "250", "250", "250", "354", "550", "221"]
    assert len(replies[1]) > 1, "EHLO reply should be multi-line"
    assert replies[5] == ["550 5.5.2 Bare LF or bare CR in message; lines must end with CRLF"]
    assert count_rows(daemon, "messages") == 0
    assert count_rows(daemon, "conversations") == 0
    assert count_rows(daemon, "outbox") == 0
    assert maildir_messages(tmp_path / "var" / "maildir" / "support") == []
    warnings = [event for event in events if event["log_level"] == "warning"]
    assert [event["event"] for event in warnings] == ["bare_lf_rejected"]
    assert warnings[0]["peer"] == client.peer
    assert "bare LF" in warnings[0]["reason"]
    where = "parse process" if processes else "daemon"
    assert metric(daemon, "guardrail_messages_parsed_total", where=where) == 1
    assert metric(daemon, "guardrail_messages_rejected_total", reason="bare line ending") == 1


async def test_dot_stuffed_lines_survive_relay(tmp_path: Path, start_daemon, sink) -> None:
    config = write_config(
        tmp_path,
        rules=SMTP_TEAMS + ROUTES,
        sections={"smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False}},
    )
    daemon = await start_daemon(config)

    lines = await converse(daemon.port, (SMUGGLING / "client-control-dotstuffed.bin").read_bytes())

    assert lines[-2].startswith("250 2.0.0 Ok: queued as ")
    assert lines[-1].startswith("221 ")
    assert count_rows(daemon, "conversations") == 1
    # The sink also receives the acknowledgement sent to alice, so pick the team's copy.
    await wait_until(
        lambda: [item for item in sink.messages if item.rcpt_tos == ["team@example.net"]],
        what="delivery to the smarthost sink",
    )
    (delivered,) = [item for item in sink.messages if item.rcpt_tos == ["team@example.net"]]
    body = delivered.content.split(b"\r\n\r\n", 1)[1]
    assert body.split(b"\r\n") == [b"My file looks like this:", b".profile", b"..", b".", b"end", b""]
    assert delivered.content.count(b"\n") == delivered.content.count(b"\r\n")
    assert delivered.content.count(b"\r") == delivered.content.count(b"\r\n")


# -- Command line endings -------------------------------------------------------

BARE_LF_REPLY = "500 5.5.2 Bare LF in command; lines must end with CRLF"


async def replies_to_lines(port: int, lines: list[bytes]) -> list[list[str]]:
    """Send each of `lines` as it is, one at a time, and return the reply to each, greeting first."""
    client = await Client.connect(port)
    try:
        replies = [await client.reply()]
        for line in lines:
            await client.send(line)
            replies.append(await client.reply())
    finally:
        await client.close()
    return replies


@pytest.mark.parametrize(
    "lines",
    [
        [b"EHLO x\n", b"NOOP\r\n"],
        [EHLO, b"MAIL FROM:<a@b>\n", b"NOOP\r\n"],
        [EHLO, b"MAIL FROM:<alice@example.com>\r\n", b"RCPT TO:<support@example.org>\n", b"NOOP\r\n"],
        [EHLO, b"NOOP\n", b"NOOP\r\n"],
        [EHLO, b"QUIT\n", b"NOOP\r\n"],
    ],
    ids=["EHLO", "MAIL", "RCPT", "NOOP", "QUIT"],
)
async def test_bare_lf_command_gets_500(tmp_path: Path, start_daemon, sink, lines: list[bytes]) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    with structlog.testing.capture_logs() as events:
        ours = await replies_to_lines(daemon.port, lines)
    stock = await replies_to_lines(sink.port, lines[:-1])

    # The session goes on: the CRLF command after the rejected one gets its usual reply.
    assert ours[-2:] == [[BARE_LF_REPLY], ["250 2.0.0 OK"]]
    assert codes(ours[1:-2]) == codes(stock[1:-1])
    # Stock aiosmtpd 1.4.6 runs the command.
    assert stock[-1][-1][:1] == "2"
    warnings = [event for event in events if event["event"] == "bare_lf_rejected"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert metric(daemon, "guardrail_messages_rejected_total", reason="bare line ending") == 1


async def test_mixed_pipeline_runs_crlf_commands(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    client = await Client.connect(daemon.port)
    await client.reply()

    await client.send(
        EHLO + b"MAIL FROM:<a@b>\nMAIL FROM:<alice@example.com>\r\n"
        + f"RCPT TO:<{SUPPORT}>\r\n".encode() + b"RSET\nDATA\r\n"
    )
    group = [await client.reply() for _ in range(6)]
    await client.send(dot_stuff(message()) + b"QUIT\r\n")
    last = await client.replies_until_closed()
    await client.close()

    assert codes(group) == ["250", "500", "250", "250", "500", "354"]
    assert group[1] == group[4] == [BARE_LF_REPLY]
    assert codes(last) == ["250", "221"]
    assert query(daemon, "SELECT mail_from FROM messages") == [("alice@example.com",)]


async def test_crlf_pipeline_replies_match_stock(tmp_path: Path, start_daemon, sink) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    pipeline = EHLO + f"MAIL FROM:<alice@example.com>\r\nRCPT TO:<{SUPPORT}>\r\nNOOP\r\nRSET\r\nQUIT\r\n".encode()

    ours = await converse(daemon.port, pipeline)
    stock = await converse(sink.port, pipeline)

    final_lines = [[line[:3] for line in lines if line[3:4] != "-"] for lines in (ours, stock)]
    assert final_lines[0] == final_lines[1] == ["220", "250", "250", "250", "250", "250", "221"]


# -- Oversize messages -----------------------------------------------------------


async def test_oversize_message_gets_one_552(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"max_message_size": 1024}))
    wire = (OVERSIZE / "client-oversize-then-small.bin").read_bytes()
    # Everything up to the first final dot, then the dot and the second message.
    split = wire.index(b"\r\n.\r\n") + 2
    client = await Client.connect(daemon.port)
    greeting = await client.reply()

    head_end = wire.index(b"DATA\r\n") + len(b"DATA\r\n")
    await client.send(wire[:head_end])
    opening = [await client.reply() for _ in range(4)]
    for start in range(head_end, split, 500):
        await client.send(wire[start:min(start + 500, split)])
        assert await client.is_silent(0.1), "server replied while the body was streaming"
    await client.send(wire[split:])
    closing_replies = await client.replies_until_closed()
    await client.close()

    assert greeting[0].startswith("220 ")
    assert "250-SIZE 1024" in opening[0]
    assert codes(opening[1:]) == ["250", "250", "354"]
    assert codes(closing_replies) == ["552", "250", "250", "354", "250", "221"]
    assert closing_replies[0] == ["552 5.3.4 Message size exceeds fixed maximum message size"]
    assert query(daemon, "SELECT message_id FROM messages") == [("<oversize-2@example.com>",)]
    assert all(b"oversize-1" not in raw for raw in stored_raws(daemon))
    assert query(daemon, "SELECT message_id FROM message_ids WHERE message_id = ?", ("<oversize-1@example.com>",)) == []
    assert count_rows(daemon, "conversations") == 1


def send_after_helo(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.helo()
        client.sendmail("alice@example.com", ["support@example.org"], data)


async def test_received_header_names_protocol(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    await asyncio.to_thread(send_after_helo, daemon.port, message(message_id="<helo@example.com>"))
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(message_id="<ehlo@example.com>"))

    support = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: len(maildir_messages(support)) == 2, what="both deliveries")
    by_id = {b"<helo@example.com>" in data: data for data in maildir_messages(support)}
    assert b"(guardrail) with SMTP id " in by_id[True]
    assert b"(guardrail) with ESMTP id " in by_id[False]


async def test_rejected_greeting_leaves_the_session_as_it_was(tmp_path: Path, start_daemon) -> None:
    """RFC 5321 section 4.1.4: after refusing HELO or EHLO, the server stays in the state it was in.

    A refused EHLO after HELO does not make the session ESMTP, and a refused
    HELO after EHLO neither ends the transaction under way nor the session's
    ESMTP parameters.
    """
    daemon = await start_daemon(write_config(tmp_path))
    data = message(message_id="<refused-ehlo@example.com>").replace(b"\r\n.", b"\r\n..")

    lines = await converse(
        daemon.port,
        b"HELO client.test.example\r\nEHLO bad\x01name\r\nMAIL FROM:<alice@example.com>\r\n"
        b"RCPT TO:<support@example.org>\r\nDATA\r\n" + data + b".\r\nQUIT\r\n",
    )
    assert lines[2] == "501 5.5.2 Invalid host name in EHLO"
    assert lines[-2].startswith("250 2.0.0 Ok: queued as ")

    lines = await converse(
        daemon.port,
        EHLO + b"MAIL FROM:<alice@example.com>\r\nHELO bad\x01name\r\nRCPT TO:<support@example.org>\r\n"
        b"RSET\r\nMAIL FROM:<alice@example.com> SIZE=100\r\nQUIT\r\n",
    )
    replies = [line for line in lines if not line.startswith("250-")]
    assert replies[1:] == [
        "250 HELP",
        "250 2.1.0 Ok",
        "501 5.5.2 Invalid host name in EHLO",
        "250 2.1.5 Ok",
        "250 2.0.0 OK",
        "250 2.1.0 Ok",
        "221 2.0.0 Bye",
    ]

    support = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: len(maildir_messages(support)) == 1, what="the delivery")
    assert b"(guardrail) with SMTP id " in maildir_messages(support)[0]


def dotted_message(size: int) -> bytes:
    """Return a message of exactly `size` bytes with 100 lines that are a lone dot, which the client doubles."""
    head = f"From: alice@example.com\r\nSubject: dots\r\nMessage-ID: <dots-{size}@example.com>\r\n\r\n".encode()
    dots = b".\r\n" * 100
    return head + dots + b"x" * (size - len(head) - len(dots) - 2) + b"\r\n"


def data_reply(port: int, data: bytes) -> tuple[int, bytes]:
    """Send `data` without a SIZE declaration, so only DATA can reject it; return the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.ehlo()
        client.mail("alice@example.com")
        client.rcpt("support@example.org")
        try:
            return client.data(data)
        except smtplib.SMTPDataError as error:
            return error.smtp_code, error.smtp_error


async def test_size_limit_excludes_stuffed_dots(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"max_message_size": 1024}))

    # On the wire the first message is 1,124 bytes, 100 of them dots the client added.
    accepted = await asyncio.to_thread(data_reply, daemon.port, dotted_message(1024))
    rejected = await asyncio.to_thread(data_reply, daemon.port, dotted_message(1025))

    assert accepted[0] == 250
    assert rejected == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    assert query(daemon, "SELECT message_id, size FROM messages") == [("<dots-1024@example.com>", 1024)]


async def test_declared_size_over_limit_gets_552(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"max_message_size": 1024}))

    lines = await converse(daemon.port, EHLO + b"MAIL FROM:<bob@example.com> SIZE=5000\r\nQUIT\r\n")

    assert lines[-2].startswith("552 5.3.4 ")
    assert lines[-1].startswith("221 ")


# -- Recipients -------------------------------------------------------------------


@pytest.mark.parametrize("address", ["nobody@example.org", "support@other.example", "support@example.org.evil.example"])
async def test_unknown_recipient_gets_550(tmp_path: Path, start_daemon, address: str) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    lines = await converse(daemon.port, EHLO + f"MAIL FROM:<alice@example.com>\r\nRCPT TO:<{address}>\r\nQUIT\r\n".encode())

    assert lines[-2].startswith("550 5.7.1 ")
    assert lines[-3].startswith("250 ")


async def test_extra_recipients_get_452(tmp_path: Path, start_daemon) -> None:
    inboxes = ["support@example.org", "billing@example.org", "sales@example.org", "help@example.org"]
    daemon = await start_daemon(write_config(tmp_path, smtp={"max_recipients": 3, "inboxes": inboxes}))
    client = await Client.connect(daemon.port)
    await client.reply()
    await client.command(EHLO)
    await client.command(b"MAIL FROM:<alice@example.com>")

    accepted = [await client.command(f"RCPT TO:<{address}>".encode()) for address in inboxes[:3]]
    extra = await client.command(b"RCPT TO:<help@example.org>")
    await client.command(b"DATA")
    await client.send(dot_stuff(message()))
    final = await client.reply()
    await client.close()

    assert codes(accepted) == ["250", "250", "250"]
    assert extra == ["452 4.5.3 Too many recipients"]
    assert final[-1].startswith("250 ")
    assert query(daemon, "SELECT rcpt_tos FROM messages") == [('["support@example.org", "billing@example.org", "sales@example.org"]',)]


async def test_recipient_limit_counts_accepted_once(tmp_path: Path, start_daemon) -> None:
    inboxes = ["support@example.org", "billing@example.org", "sales@example.org"]
    daemon = await start_daemon(write_config(tmp_path, smtp={"max_recipients": 2, "inboxes": inboxes}))
    client = await Client.connect(daemon.port)
    await client.reply()
    await client.command(EHLO)
    await client.command(b"MAIL FROM:<alice@example.com>")

    replies = {
        "first": await client.command(b"RCPT TO:<support@example.org>"),
        "same again": await client.command(b"RCPT TO:<support@example.org>"),
        "same in capitals": await client.command(b"RCPT TO:<SUPPORT@Example.ORG>"),
        "second": await client.command(b"RCPT TO:<billing@example.org>"),
        "not ours at the limit": await client.command(b"RCPT TO:<nobody@example.net>"),
        "third": await client.command(b"RCPT TO:<sales@example.org>"),
        "second again at the limit": await client.command(b"RCPT TO:<Billing@example.org>"),
    }
    await client.command(b"DATA")
    await client.send(dot_stuff(message()))
    final = await client.reply()
    await client.command(b"QUIT")
    await client.close()

    assert replies["first"] == ["250 2.1.5 Ok"]
    assert replies["same again"] == ["250 2.1.5 Ok"]
    assert replies["same in capitals"] == ["250 2.1.5 Ok"]
    assert replies["second"] == ["250 2.1.5 Ok"]
    assert replies["not ours at the limit"][-1].startswith("550 5.7.1 ")
    assert replies["third"] == ["452 4.5.3 Too many recipients"]
    assert replies["second again at the limit"] == ["250 2.1.5 Ok"]
    assert final[-1].startswith("250 2.0.0 ")
    assert query(daemon, "SELECT rcpt_tos FROM messages") == [('["support@example.org", "billing@example.org"]',)]
    # The billing route matches billing@ among the recipients, and support@,
    # which the default route takes, gets its team a copy. Each team gets one.
    billing = tmp_path / "var" / "maildir" / "billing"
    support = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: maildir_messages(billing) and maildir_messages(support), what="delivery to both maildirs")
    assert query(daemon, "SELECT COUNT(*) FROM outbox WHERE kind = 'deliver'") == [(2,)]
    assert len(maildir_messages(billing)) == 1
    assert len(maildir_messages(support)) == 1


@pytest.mark.parametrize("recipient", ["postmaster@example.org", "Postmaster@EXAMPLE.org", "postmaster", "postmaster@MX.test.example"])
async def test_postmaster_mail_reaches_owner(tmp_path: Path, start_daemon, recipient: str) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    # A bare "postmaster" without a domain must be accepted (RFC 5321 section
    # 4.5.1), and so must postmaster at our host name, where reports go.
    reply = await transaction(daemon.port, message(to="postmaster@example.org"), rcpt_tos=[recipient])

    assert reply.startswith("250 2.0.0 ")
    assert query(daemon, "SELECT disposition, team FROM messages") == [("postmaster", "postmaster")]
    outbound = tmp_path / "var" / "outbound"
    await wait_until(lambda: maildir_messages(outbound), what="delivery to the outbound maildir")
    (delivered,) = maildir_messages(outbound)
    assert b"X-Guardrail-Envelope-To: ops@example.org\r\n" in delivered
    assert delivered.endswith(message(to="postmaster@example.org"))
    # Postmaster mail opens no conversation, so the copy has no conversation header.
    prepended = delivered[: len(delivered) - len(message(to="postmaster@example.org"))]
    assert header_names(prepended) == ["Return-Path", "X-Guardrail-Envelope-To", "Received", "X-Guardrail-Route", "X-Guardrail-Loop"]
    assert b"X-Guardrail-Route: postmaster\r\n" in prepended
    assert re.findall(rb"\tfor <([^>]*)>;", prepended) == [recipient.lower().encode()]


async def test_postmaster_beside_inbox_gets_copy(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    content = message(message_id="<both@example.com>")

    reply = await transaction(daemon.port, content, rcpt_tos=["support@example.org", "postmaster@example.org"])

    # The inbox's copy is routed as if postmaster were not there.
    assert re.fullmatch(r"250 2\.0\.0 Ok: queued as GR-\w+", reply), reply
    assert query(daemon, "SELECT disposition, team FROM messages") == [("new", "support")]
    assert count_rows(daemon, "conversations") == 1
    await wait_until(lambda: len(maildir_messages(tmp_path / "var" / "maildir" / "support")) == 1, what="the team copy")
    (team_copy,) = maildir_messages(tmp_path / "var" / "maildir" / "support")
    assert team_copy.endswith(content)
    # The outbound maildir gets the acknowledgement and the postmaster owner's copy.
    outbound = tmp_path / "var" / "outbound"
    await wait_until(lambda: len(maildir_messages(outbound)) == 2, what="the acknowledgement and the postmaster copy")
    copies = [mail for mail in maildir_messages(outbound) if b"X-Guardrail-Envelope-To: ops@example.org\r\n" in mail]
    assert len(copies) == 1
    assert copies[0].endswith(content)
    assert query(daemon, "SELECT COUNT(*) FROM outbox WHERE kind = 'deliver' AND conversation_id IS NULL") == [(1,)]
    # The copy is of the stored message, so it names the inbox's conversation and route.
    (reference,) = query(daemon, "SELECT reference FROM conversations")[0]
    prepended = copies[0][: len(copies[0]) - len(content)]
    assert f"X-Guardrail-Conversation: {reference}\r\n".encode() in prepended
    assert b"X-Guardrail-Route: default\r\n" in prepended


@pytest.mark.parametrize(
    ("recipient", "named"),
    [("postmaster@example.org", "postmaster@example.org"), ("Postmaster@EXAMPLE.org", "postmaster@example.org"), ("postmaster", "postmaster")],
)
async def test_postmaster_copy_received_for_postmaster(tmp_path: Path, start_daemon, recipient: str, named: str) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    await transaction(daemon.port, message(message_id="<both@example.com>"), rcpt_tos=["support@example.org", recipient])

    # The Received "for" clause names the RCPT TO path the copy was received for (RFC 5321 section 4.4).
    outbound = tmp_path / "var" / "outbound"
    await wait_until(lambda: len(maildir_messages(outbound)) == 2, what="the acknowledgement and the postmaster copy")
    (copy,) = [mail for mail in maildir_messages(outbound) if b"X-Guardrail-Envelope-To: ops@example.org\r\n" in mail]
    assert re.findall(rb"\tfor <([^>]*)>;", copy) == [named.encode()]
    await wait_until(lambda: maildir_messages(tmp_path / "var" / "maildir" / "support"), what="the team copy")
    (team_copy,) = maildir_messages(tmp_path / "var" / "maildir" / "support")
    assert re.findall(rb"\tfor <([^>]*)>;", team_copy) == [b"support@example.org"]


async def test_null_sender_message_is_stored(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    reply = await transaction(daemon.port, message(sender="MAILER-DAEMON@example.com"), mail_from="")

    assert reply.startswith("250 2.0.0 ")
    assert query(daemon, "SELECT mail_from FROM messages") == [("",)]


async def test_nul_in_addresses_gets_501(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    lines = await converse(
        daemon.port,
        EHLO
        + b"MAIL FROM:<ali\x00ce@example.com>\r\n"
        + b"MAIL FROM:<alice@example.com>\r\n"
        + b"RCPT TO:<supp\x00ort@example.org>\r\n"
        + b"QUIT\r\n",
    )

    replies = [line for line in lines if not line.startswith(("220", "250-", "250 HELP"))]
    assert replies[0] == "501 5.1.7 Invalid sender address"
    assert replies[1].startswith("250 2.1.0 ")
    assert replies[2] == "501 5.1.3 Invalid recipient address"
    assert replies[3].startswith("221 ")


async def test_vrfy_reveals_nothing(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    lines = await converse(
        daemon.port, EHLO + b"VRFY support@example.org\r\nVRFY nobody@example.org\r\nVRFY support\r\nQUIT\r\n"
    )

    inbox, stranger, bare_name = lines[-4:-1]
    assert inbox.startswith("252 2.")
    assert stranger == inbox
    assert bare_name == inbox


async def test_expn_is_not_available(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    lines = await converse(daemon.port, EHLO + b"EXPN support\r\nQUIT\r\n")

    assert lines[-2] == "502 5.5.1 EXPN is not available"


# Command lines with NUL, control or non-UTF-8 bytes, or with paths the email
# package's parser fails on, each sent after EHLO and MAIL, with its reply.
HOSTILE_COMMANDS = {
    "vrfy nul bytes": (b"VRFY @\x00\x00>", "252 2.5.2 Cannot verify the user; send mail and delivery will be attempted"),
    "vrfy invalid utf-8": (b"VRFY @,\xff", "252 2.5.2 Cannot verify the user; send mail and delivery will be attempted"),
    "vrfy open bracket": (b"VRFY <", "252 2.5.2 Cannot verify the user; send mail and delivery will be attempted"),
    "vrfy no argument": (b"VRFY", "501 5.5.4 Syntax: VRFY <address>"),
    "expn invalid utf-8": (b"EXPN staff\x00\xff", "502 5.5.1 EXPN is not available"),
    "expn no argument": (b"EXPN", "502 5.5.1 EXPN is not available"),
    "unknown command": (b"FROB\x01\x1b[2J", "500 5.5.2 Command not recognized"),
    "rcpt open bracket": (b"RCPT TO:<", "553 5.1.3 Malformed recipient address"),
    "rcpt lone quote": (b'RCPT TO:"', "553 5.1.3 Malformed recipient address"),
    "rcpt open domain literal": (b"RCPT TO:support@[ x", "553 5.1.3 Malformed recipient address"),
    "rcpt unfinished domain literal": (b"RCPT TO:support@[ \x00", "553 5.1.3 Malformed recipient address"),
    "rcpt invalid parameter": (b"RCPT TO:<support@example.org> \xff=1", "501 5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]"),
    "noop invalid utf-8": (b"NOOP \xff\x00", "250 2.0.0 OK"),
    "rset argument": (b"RSET \xff", "501 5.5.4 Syntax: RSET"),
    "auth invalid utf-8": (b"AUTH PLAIN \xff",
                           "502 5.5.1 AUTH is not available; this server accepts mail only for its own inboxes"),
    "ehlo bare cr": (b"EHLO client\rX-Injected: yes", "501 5.5.2 Invalid host name in EHLO"),
    "helo control character": (b"HELO client\x01.example", "501 5.5.2 Invalid host name in EHLO"),
}


@pytest.mark.parametrize(("command", "expected"), HOSTILE_COMMANDS.values(), ids=HOSTILE_COMMANDS.keys())
async def test_hostile_argument_gets_fixed_reply(tmp_path: Path, start_daemon, command: bytes, expected: str) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    client = await Client.connect(daemon.port)
    await client.reply()
    await client.command(EHLO)
    await client.command(b"MAIL FROM:<alice@example.com>")

    with structlog.testing.capture_logs() as events:
        reply = await client.command(command)
        after = await client.command(b"NOOP")
    await client.close()

    assert reply == [expected]
    assert after == ["250 2.0.0 OK"], "the session should go on"
    assert [event for event in events if event["log_level"] == "error"] == []


@pytest.mark.parametrize(
    ("message_id", "shown"),
    [
        (b"<order-1@example.com>", "<order-1@example.com>"),
        (b"<a\x01\x1b[31m@example.com>", "an earlier message"),
        (b"<a\xff@example.com>", "an earlier message"),
        (b"<" + b"x" * 500 + b"@example.com>", "an earlier message"),
    ],
    ids=["printable", "control characters", "8-bit", "too long for a reply line"],
)
async def test_duplicate_reply_repeats_safe_message_id(tmp_path: Path, start_daemon, message_id: bytes, shown: str) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    content = message().replace(b"Message-ID: <m1@example.com>", b"Message-ID: " + message_id)

    first = await transaction(daemon.port, content)
    again = await transaction(daemon.port, content)

    assert first.startswith("250 2.0.0 Ok: queued as ")
    assert again == f"250 2.0.0 Ok: already queued (duplicate of {shown})"


async def test_help_replies_214_with_commands(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    client = await Client.connect(daemon.port)
    await client.reply()

    before_ehlo = await client.command(b"HELP")
    await client.command(EHLO)
    replies = {
        topic: await client.command(b"HELP " + topic if topic else b"HELP")
        for topic in (b"", b"mail", b"DATA", b"EXPN", b"AUTH", b"STARTTLS", b"FROB\x01\xff")
    }
    await client.command(b"QUIT")
    await client.close()

    # Without a certificate STARTTLS is not offered, and AUTH and EXPN never are.
    listed = "DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"
    assert before_ehlo == [f"214 2.0.0 Supported commands: {listed}"]
    assert replies[b""] == [f"214 2.0.0 Supported commands: {listed}"]
    assert replies[b"mail"] == ["214 2.0.0 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"]
    assert replies[b"DATA"] == ["214 2.0.0 Syntax: DATA"]
    unknown = [f"504 5.5.4 No help for that command; supported commands: {listed}"]
    assert replies[b"EXPN"] == unknown
    assert replies[b"AUTH"] == unknown
    assert replies[b"STARTTLS"] == unknown
    assert replies[b"FROB\x01\xff"] == unknown


# -- Mail loops ---------------------------------------------------------------------


def received_headers(count: int) -> str:
    return "".join(
        f"Received: from hop{index}.example.net by hop{index + 1}.example.net; Tue, 04 Nov 2025 10:00:00 +0100\r\n"
        for index in range(count)
    )


async def test_too_many_hops_gets_554(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    reply = await transaction(daemon.port, received_headers(31).encode() + message())

    assert reply == "554 5.4.6 Too many Received headers; mail loop suspected"
    assert count_rows(daemon, "messages") == 0
    assert count_rows(daemon, "outbox") == 0


@pytest.mark.parametrize(("hops", "expected"), [(5, "250 2.0.0 "), (6, "554 5.4.6 ")])
async def test_hop_limit_is_configurable(tmp_path: Path, start_daemon, hops: int, expected: str) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"max_received_headers": 5}))

    reply = await transaction(daemon.port, received_headers(hops).encode() + message())

    assert reply.startswith(expected)


async def test_own_loop_marker_is_stored_not_forwarded(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    looped = message(message_id="<looped@example.com>", extra_headers="X-Guardrail-Loop: mx.test.example\r\n")

    loop_reply = await transaction(daemon.port, looped)
    # A later ordinary message proves the worker runs, so an empty maildir means "not forwarded".
    await send(daemon.port, "alice@example.com", [SUPPORT], message(message_id="<ordinary@example.com>"))
    maildir = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: maildir_messages(maildir), what="delivery of the ordinary message")

    assert loop_reply.startswith("250 2.0.0 ")
    assert query(daemon, "SELECT disposition FROM messages WHERE message_id = '<looped@example.com>'") == [("loop",)]
    assert query(daemon, "SELECT o.id FROM outbox o JOIN messages m ON m.id = o.message_row"
                         " WHERE m.message_id = '<looped@example.com>'") == []
    (delivered,) = maildir_messages(maildir)
    assert b"<ordinary@example.com>" in delivered


async def test_foreign_loop_marker_is_forwarded(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    content = message(extra_headers="X-Guardrail-Loop: mx.other.example\r\n")

    reply = await transaction(daemon.port, content)
    maildir = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: maildir_messages(maildir), what="delivery to the support maildir")

    assert reply.startswith("250 2.0.0 ")
    assert query(daemon, "SELECT disposition FROM messages") == [("new",)]
    (delivered,) = maildir_messages(maildir)
    assert delivered.endswith(content)


# -- Robust parsing -----------------------------------------------------------------

ODD_MESSAGES = {
    "malformed_mime": (
        b"From: Alice Example <alice@example.com>\r\nTo: support@example.org\r\nSubject: broken parts\r\n"
        b"Message-ID: <mime@example.com>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="never-closed\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        b"--never-closed\r\nContent-Type: text/plain; charset=\r\n\r\n%%% not base64 ===\r\n"
        b"--other-boundary--\r\n",
        [],
    ),
    "raw_utf8_headers_smtputf8": (
        "From: Jürgen Groß <juergen@example.com>\r\nTo: support@example.org\r\n"
        "Subject: Drucker läuft nicht – ärgerlich\r\nMessage-ID: <utf8@example.com>\r\n\r\n"
        "Grüße aus Köln\r\n".encode(),
        ["SMTPUTF8"],
    ),
    "raw_utf8_headers_8bitmime": (
        "From: Zoë Example <zoe@example.com>\r\nTo: support@example.org\r\n"
        "Subject: naïve café question\r\nMessage-ID: <8bit@example.com>\r\n\r\n"
        "Ça ne marche pas.\r\n".encode(),
        ["BODY=8BITMIME"],
    ),
    "unknown_charset": (
        b"From: Alice Example <alice@example.com>\r\nTo: support@example.org\r\n"
        b"Subject: =?x-klingon?Q?qapla=27_batlh?=\r\nMessage-ID: <charset@example.com>\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: text/plain; charset="x-klingon"\r\n'
        b"Content-Transfer-Encoding: 8bit\r\n\r\n\xf1\xa3 \xfe\xff bytes in no known charset\r\n",
        ["BODY=8BITMIME"],
    ),
    "missing_from": (
        b"To: support@example.org\r\nSubject: who sent this\r\nMessage-ID: <nofrom@example.com>\r\n\r\nNo sender here.\r\n",
        [],
    ),
    "long_body_line": (
        b"From: Alice Example <alice@example.com>\r\nTo: support@example.org\r\nSubject: long line\r\n"
        b"Message-ID: <long@example.com>\r\n\r\n" + b"0123456789abcdef" * 256 + b"\r\nshort line\r\n",
        [],
    ),
}


@pytest.mark.parametrize(("content", "options"), ODD_MESSAGES.values(), ids=ODD_MESSAGES.keys())
async def test_odd_message_delivered_unchanged(tmp_path: Path, start_daemon, content: bytes, options: list[str]) -> None:
    daemon = await start_daemon(write_config(tmp_path, rules=TEAMS + BODY_ROUTES))

    refused = await asyncio.to_thread(send_with_options, daemon.port, "alice@example.com", [SUPPORT], content, options)
    maildir = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: maildir_messages(maildir), what="delivery to the support maildir")

    assert refused == {}
    assert stored_raws(daemon) == [content]
    (delivered,) = maildir_messages(maildir)
    assert delivered.endswith(content)
    prepended = delivered[: len(delivered) - len(content)]
    assert header_names(prepended) == [
        "Return-Path", "Received", "X-Guardrail-Conversation", "X-Guardrail-Route", "X-Guardrail-Loop",
    ]



@pytest.mark.parametrize("header", ["Subject", "From"])
async def test_many_encoded_words_accepted(tmp_path: Path, start_daemon, header: str) -> None:
    # Header values are decoded up to HEADER_DECODE_LIMIT characters, so
    # 200,000 encoded words (2.6 MB) cost a parse process no more than the
    # first 64 KiB of them.
    daemon = await start_daemon(write_config(tmp_path))
    words = " ".join(["=?utf-8?q?a?="] * 200_000)
    if header == "Subject":
        headers = f"From: alice@example.com\r\nSubject: {words}\r\n"
    else:
        headers = f"From: {words} <alice@example.com>\r\nSubject: Printer\r\n"
    content = (headers + "Message-ID: <words@example.com>\r\n\r\nHello\r\n").encode()

    refused = await send(daemon.port, "alice@example.com", [SUPPORT], content)

    assert refused == {}
    [(subject,)] = query(daemon, "SELECT subject FROM conversations")
    if header == "Subject":
        # One "a" for each encoded word in the first 64 KiB of the value.
        assert subject.startswith("a" * 4000)
        assert len(subject) < 5000
    else:
        assert subject == "Printer"


# -- Internal failures ----------------------------------------------------------------


async def test_locked_database_gets_451(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, sections={"database": {"busy_timeout": "200ms"}}))
    blocker = sqlite3.connect(daemon.config.database_path, isolation_level=None, timeout=5)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        client = await open_transaction(daemon.port)
        await client.send(dot_stuff(message()))
        failed = await client.reply(timeout=10)
        await client.command(b"QUIT")
        await client.close()
    finally:
        blocker.rollback()
        blocker.close()
    # Once the lock is gone the same message goes through.
    retried = await transaction(daemon.port, message())

    assert failed == ["451 4.3.0 Temporary local problem, try again later"]
    for leaked in ("Error", "locked", "database", "sqlite", "Storage", "Operational"):
        assert leaked not in failed[0]
    assert not failed[0].startswith("500")
    assert retried.startswith("250 2.0.0 ")
    assert count_rows(daemon, "messages") == 1


# -- Enhanced status codes ---------------------------------------------------------------


async def test_replies_carry_enhanced_codes(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    client = await Client.connect(daemon.port)
    await client.reply()

    ehlo = await client.command(EHLO)
    replies = {
        "RCPT before MAIL": await client.command(b"RCPT TO:<support@example.org>"),
        "DATA before MAIL": await client.command(b"DATA"),
        "unknown command": await client.command(b"FROBNICATE"),
        "MAIL": await client.command(b"MAIL FROM:<alice@example.com>"),
        "second MAIL": await client.command(b"MAIL FROM:<alice@example.com>"),
        "RCPT": await client.command(b"RCPT TO:<support@example.org>"),
    }
    assert (await client.command(b"DATA"))[-1].startswith("354 ")
    await client.send(dot_stuff(message()))
    replies["end of DATA"] = await client.reply()
    replies["RSET"] = await client.command(b"RSET")
    replies["NOOP"] = await client.command(b"NOOP")
    replies["QUIT"] = await client.command(b"QUIT")
    await client.close()

    assert "250-ENHANCEDSTATUSCODES" in ehlo
    assert "250-SIZE 26214400" in ehlo
    assert "250-8BITMIME" in ehlo
    assert replies["RCPT before MAIL"][-1].startswith("503 5.5.1 ")
    assert replies["DATA before MAIL"][-1].startswith("503 5.5.1 ")
    assert replies["second MAIL"][-1].startswith("503 5.5.1 ")
    for command, reply in replies.items():
        match = ENHANCED_REPLY.match(reply[-1])
        assert match, f"{command}: {reply[-1]!r} has no enhanced status code"
        assert match.group(1) == match.group(2), f"{command}: {reply[-1]!r} has a mismatched class"


async def test_pipelined_groups_reply_in_order(tmp_path: Path, start_daemon) -> None:
    # With PIPELINING offered (RFC 2920), a client sends MAIL, RCPT and DATA
    # in one write, and the message content with the next transaction's group.
    daemon = await start_daemon(write_config(tmp_path))
    client = await Client.connect(daemon.port)
    await client.reply()
    ehlo = await client.command(EHLO)

    await client.send(f"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@elsewhere.example>\r\nRCPT TO:<{SUPPORT}>\r\nDATA\r\n".encode())
    first = [await client.reply() for _ in range(4)]
    next_group = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<billing@example.org>\r\nDATA\r\n"
    await client.send(dot_stuff(message(message_id="<first@example.com>")) + next_group)
    second = [await client.reply() for _ in range(4)]
    await client.send(dot_stuff(message(message_id="<second@example.com>")) + b"QUIT\r\n")
    last = await client.replies_until_closed()
    await client.close()

    assert "250-PIPELINING" in ehlo
    assert codes(first) == ["250", "550", "250", "354"]
    assert codes(second) == ["250", "250", "250", "354"]
    assert codes(last) == ["250", "221"]
    stored = [row[0] for row in query(daemon, "SELECT message_id FROM messages ORDER BY id")]
    assert stored == ["<first@example.com>", "<second@example.com>"]


async def replies_after_ehlo(port: int, commands: list[bytes]) -> list[list[str]]:
    """Send EHLO, then each of `commands`; return the reply to each command."""
    client = await Client.connect(port)
    await client.reply()
    await client.command(EHLO)
    replies = [await client.command(command) for command in commands]
    await client.command(b"QUIT")
    await client.close()
    return replies


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        ([b"DATA"], "503 5.5.1 Error: need MAIL command"),
        ([b"RCPT TO:<support@example.org>", b"DATA"], "503 5.5.1 Error: need MAIL command"),
        ([b"MAIL FROM:<alice@example.com>", b"DATA"], "503 5.5.1 Error: need RCPT command"),
        ([b"MAIL FROM:<alice@example.com>", b"RCPT TO:<nobody@example.org>", b"DATA"], "554 5.5.1 No valid recipients"),
        ([b"MAIL FROM:<alice@example.com>", b"RCPT TO:<support@>", b"RCPT TO:<>", b"DATA"], "554 5.5.1 No valid recipients"),
        ([b"RCPT TO:<nobody@example.org>", b"MAIL FROM:<alice@example.com>", b"DATA"], "503 5.5.1 Error: need RCPT command"),
        ([b"MAIL FROM:<alice@example.com>", b"RCPT TO:<nobody@example.org>", b"RSET", b"MAIL FROM:<alice@example.com>", b"DATA"],
         "503 5.5.1 Error: need RCPT command"),
        ([b"MAIL FROM:<>", b"DATA"], "503 5.5.1 Error: need RCPT command"),
    ],
    ids=["nothing before", "rcpt without mail before", "mail before", "mail and a refused rcpt before",
         "mail and malformed rcpts before", "refused rcpt before mail", "refused rcpt before rset", "null sender before"],
)
async def test_early_data_names_missing_step(tmp_path: Path, start_daemon, commands: list[bytes], expected: str) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    replies = await replies_after_ehlo(daemon.port, commands)

    assert replies[-1] == [expected]


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        ([b"MAIL FROM:<<alice@example.com>>"], "553 5.1.7 Malformed sender address"),
        ([b"MAIL FROM:<alice@>"], "553 5.1.7 Malformed sender address"),
        ([b"MAIL FROM:,"], "553 5.1.7 Malformed sender address"),
        ([b"MAIL FROM:<alice@example.com>", b"RCPT TO:<<support@example.org>>"], "553 5.1.3 Malformed recipient address"),
        ([b"MAIL FROM:<alice@example.com>", b"RCPT TO:<support@>"], "553 5.1.3 Malformed recipient address"),
        ([b"MAIL FROM:<alice@example.com>", b"RCPT TO:,"], "553 5.1.3 Malformed recipient address"),
        ([b"MAIL FROM:<alice@example.com"], "553 5.1.7 Malformed sender address"),
        ([b"MAIL FROM:<alice@example.com>", b"RCPT TO:<support@example.org"], "553 5.1.3 Malformed recipient address"),
        ([b'MAIL FROM:<"alice>"@example.com'], "553 5.1.7 Malformed sender address"),
        ([b'MAIL FROM:<"a>b"@example.com>', b'RCPT TO:<"sup>port"@example.org'], "553 5.1.3 Malformed recipient address"),
        ([b"MAIL FROM:<alice@example.com>", b"RCPT TO:<support@[192.0.2.1>]"], "553 5.1.3 Malformed recipient address"),
    ],
    ids=["sender in double brackets", "sender without domain", "sender a comma",
         "recipient in double brackets", "recipient without domain", "recipient a comma",
         "sender without closing bracket", "recipient without closing bracket",
         "sender with > only in quotes", "recipient with > only in quotes", "recipient with > only in literal"],
)
async def test_malformed_address_code_per_command(tmp_path: Path, start_daemon, commands: list[bytes], expected: str) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    replies = await replies_after_ehlo(daemon.port, commands)

    assert replies[-1] == [expected]
    assert all(reply[-1].startswith("250 ") for reply in replies[:-1])


@pytest.mark.parametrize(
    ("status", "command", "expected"),
    [
        ("250 OK", "MAIL", "250 2.1.0 OK"),
        ("250 OK", "RCPT", "250 2.1.5 OK"),
        ("250 OK", "", "250 2.0.0 OK"),
        ("553 5.1.3 Error: malformed address", "MAIL", "553 5.1.7 Malformed sender address"),
        ("553 5.1.3 Error: malformed address", "RCPT", "553 5.1.3 Malformed recipient address"),
        ("553 Mailbox name not allowed", "MAIL", "553 5.1.7 Mailbox name not allowed"),
        ("553 Mailbox name not allowed", "RCPT", "553 5.1.3 Mailbox name not allowed"),
        ("553 Mailbox name not allowed", "", "553 5.1.0 Mailbox name not allowed"),
        ("221 Bye", "", "221 2.0.0 Bye"),
        ("451 Local error", "", "451 4.3.0 Local error"),
        ("454 TLS not available", "", "454 4.7.0 TLS not available"),
        ("500 Error: bad syntax", "", "500 5.5.2 Error: bad syntax"),
        ("501 Syntax: MAIL FROM: <address>", "MAIL", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        ("502 EXPN not implemented", "", "502 5.5.1 EXPN not implemented"),
        ("503 Error: need MAIL command", "RCPT", "503 5.5.1 Error: need MAIL command"),
        ("504 Unrecognized authentication type", "", "504 5.5.4 Unrecognized authentication type"),
        ("530 Must issue a STARTTLS command first", "MAIL", "530 5.7.0 Must issue a STARTTLS command first"),
        ("552 Error: message size exceeds fixed maximum message size", "MAIL",
         "552 5.3.4 Error: message size exceeds fixed maximum message size"),
        ("554 Command refused due to lack of security", "MAIL", "554 5.7.0 Command refused due to lack of security"),
        ("555 MAIL FROM parameters not recognized or not implemented", "MAIL",
         "555 5.5.4 MAIL FROM parameters not recognized or not implemented"),
        # Replies that carry a code already, and lines that are no status reply, are left alone.
        ("501 5.1.7 Invalid sender address", "MAIL", "501 5.1.7 Invalid sender address"),
        ("250 HELP", "", "250 HELP"),
        ("250 mx.test.example", "", "250 mx.test.example"),
        ("250-SIZE 1000", "", "250-SIZE 1000"),
    ],
)
def test_enhanced_code_table(status: str, command: str, expected: str) -> None:
    assert with_enhanced_code(status, "mx.test.example", command) == expected


# -- Resource limits ----------------------------------------------------------------------


async def two_open_third_rejected(port: int) -> tuple[tuple[Client, Client], list[list[str]], list[list[str]]]:
    """Open two connections and read their greetings, then a third until the server closes it.

    Return the two open clients, their greetings and the replies the third got.
    """
    first = await Client.connect(port)
    second = await Client.connect(port)
    greetings = [await first.reply(), await second.reply()]
    third = await Client.connect(port)
    rejected = await third.replies_until_closed()
    await third.close()
    return (first, second), greetings, rejected


async def test_third_connection_gets_421(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"max_connections": 2}))
    (first, second), greetings, rejected = await two_open_third_rejected(daemon.port)
    results = []
    for index, client in enumerate((first, second)):
        await client.command(EHLO)
        await client.command(b"MAIL FROM:<alice@example.com>")
        await client.command(b"RCPT TO:<support@example.org>")
        await client.command(b"DATA")
        await client.send(dot_stuff(message(message_id=f"<conn{index}@example.com>")))
        results.append(await client.reply())
        await client.command(b"QUIT")
        await client.close()

    assert codes(greetings) == ["220", "220"]
    assert rejected == [["421 4.7.0 Too many connections, try again later"]]
    assert codes(results) == ["250", "250"]
    assert count_rows(daemon, "messages") == 2


async def test_connections_per_client_limited(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"max_connections": 10, "max_connections_per_client": 2}))
    (first, second), greetings, rejected = await two_open_third_rejected(daemon.port)
    # A closed connection frees its client's place.
    await first.command(b"QUIT")
    await first.close()
    await wait_until(lambda: len(daemon._tracker.connections) == 1, what="the server to see the close")
    fourth = await Client.connect(daemon.port)
    greetings.append(await fourth.reply())
    for client in (second, fourth):
        await client.close()

    assert codes(greetings) == ["220", "220", "220"]
    assert rejected == [["421 4.7.0 Too many connections from your address, try again later"]]


async def test_idle_connection_is_closed(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"timeout": "1s"}))
    client = await Client.connect(daemon.port)
    await client.reply()
    started = time.monotonic()

    replies = await client.replies_until_closed(timeout=3)
    elapsed = time.monotonic() - started
    closed = await client.is_closed_by_server(timeout=1)
    await client.close()

    assert closed, "server kept an idle connection open for 3 s with a 1 s timeout"
    # A 421 reply comes before the close, so the client learns why the connection ended.
    assert replies == [["421 4.4.2 No input for too long, closing the connection"]]
    assert elapsed >= 0.5


def pipeline_without_reading(port: int, *, half_close: bool) -> socket.socket:
    """Read the greeting, send EHLO commands whose replies overflow every socket buffer, and return the connection unread."""
    connection = socket.socket()
    # A small receive buffer on a socket that never reads makes the replies back up into the server.
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.settimeout(2)
    connection.connect(("127.0.0.1", port))
    greeting = b""
    while not greeting.endswith(b"\r\n"):
        greeting += connection.recv(4096)
    try:
        # Each EHLO reply is about 100 bytes, so 100,000 of them exceed the
        # server's send buffer, which Linux grows to 4 MiB by default.
        connection.sendall(b"EHLO client.test.example\r\n" * 100_000)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
    except (TimeoutError, ConnectionError):
        pass  # The server stopped reading, and the commands it read already fill the buffers.
    return connection


@pytest.mark.parametrize("half_close", [False, True], ids=["open", "half-closed"])
async def test_unread_replies_free_the_slot(tmp_path: Path, start_daemon, half_close: bool) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"timeout": "1s", "max_connections": 1}))

    connection = await asyncio.to_thread(pipeline_without_reading, daemon.port, half_close=half_close)
    try:
        # The greeting was read, so the server counted the connection before this.
        await wait_until(lambda: not daemon._tracker.connections, timeout=5, what="the idle timeout to free the slot")
        client = await Client.connect(daemon.port)
        greeting = await client.reply()
        await client.close()
    finally:
        connection.close()

    assert greeting[0].startswith("220 ")


async def test_slow_data_gets_421(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path, smtp={"data_timeout": "1s"}))
    client = await open_transaction(daemon.port)
    await client.send(b"Subject: slow\r\n\r\n")

    async def dribble() -> None:
        # One byte every 100 ms resets the idle timer but never ends the message.
        for _ in range(40):
            try:
                await client.send(b"x")
            except ConnectionError:
                return
            await asyncio.sleep(0.1)

    dribbler = asyncio.create_task(dribble())
    started = time.monotonic()
    with structlog.testing.capture_logs() as events:
        try:
            replies = await client.replies_until_closed(timeout=3)
        finally:
            dribbler.cancel()
            await asyncio.gather(dribbler, return_exceptions=True)
        elapsed = time.monotonic() - started
        await client.close()
        await wait_until(lambda: not daemon._tracker.connections, what="the server to drop the connection")

    assert replies == [["421 4.4.2 Timed out waiting for message data"]]
    assert elapsed < 3
    assert count_rows(daemon, "messages") == 0
    # The server closed the connection itself, so only the timeout is logged.
    logged = [event["event"] for event in events]
    assert "data_timed_out" in logged
    assert "connection_lost" not in logged


# -- The chunked DATA reader against stock aiosmtpd ------------------------------------------

_LONG_BODY = b"".join(
    (b".." if index % 50 == 0 else b"") + b"line %05d " % index + b"y" * 64 + b"\r\n" for index in range(4000)
)
_HEADERS = b"From: alice@example.com\r\nTo: support@example.org\r\nSubject: reader check\r\n\r\n"


def _lines_up_to(size: int) -> bytes:
    """Return `size` bytes of short lines whose last byte is a CR that the next write completes."""
    content = bytearray(_HEADERS)
    while len(content) < size - 200:
        content += b"w" * 78 + b"\r\n"
    content += b"v" * (size - 1 - len(content)) + b"\r"
    return bytes(content)


# The reader takes chunks of up to 256 KiB, and stock aiosmtpd 1.4.6 rejects lines over 1001 bytes.
_AT_256_KIB = _lines_up_to(256 * 1024)

# Each case is the client's bytes after "DATA\r\n", already dot-stuffed, split
# into the TCP writes that carry them.
DATA_CASES: dict[str, list[bytes]] = {
    "empty_body": [b".\r\n"],
    "body_is_one_dot": [b"..\r\n.\r\n"],
    "first_line_starts_with_dot": [b"..profile\r\nnext\r\n.\r\n"],
    "lines_starting_with_dots": [_HEADERS + b"..a\r\n...\r\n..\r\n. .\r\nplain\r\n.\r\n"],
    "last_line_empty": [_HEADERS + b"last words\r\n\r\n.\r\n"],
    "300_kib_body": [_HEADERS + _LONG_BODY + b".\r\n"],
    "crlf_split_between_writes": [_HEADERS + b"one\r", b"\ntwo\r\n", b"..three\r", b"\n.\r\n"],
    "end_split_after_cr": [_HEADERS + b"body\r", b"\n.\r\n"],
    "end_split_after_dot": [_HEADERS + b"body\r\n.", b"\r\n"],
    "end_split_after_dot_cr": [_HEADERS + b"body\r\n.\r", b"\n"],
    "end_split_in_every_byte": [_HEADERS + b"body", b"\r", b"\n", b".", b"\r", b"\n"],
    "stuffed_dot_split": [_HEADERS + b"body\r\n.", b".\r\nafter\r\n.\r\n"],
    "crlf_across_256_kib": [_AT_256_KIB, b"\nend\r\n.\r\n"],
}


async def send_data_in_writes(port: int, writes: list[bytes]) -> str:
    """Send one message whose DATA arrives in `writes`, with a pause after each, and return the final reply."""
    client = await open_transaction(port)
    try:
        for chunk in writes:
            await client.send(chunk)
            await asyncio.sleep(0.05)
        reply = await client.reply()
        await client.command(b"QUIT")
    finally:
        await client.close()
    return reply[-1]


@pytest.mark.parametrize("writes", DATA_CASES.values(), ids=DATA_CASES.keys())
async def test_data_reader_matches_stock_aiosmtpd(tmp_path: Path, start_daemon, sink, writes: list[bytes]) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    ours = await send_data_in_writes(daemon.port, writes)
    stock = await send_data_in_writes(sink.port, writes)

    assert ours.startswith("250 2.0.0 ")
    assert stock.startswith("250 ")
    (received,) = sink.messages
    assert stored_raws(daemon) == [received.content]


async def test_pipelined_quit_after_final_dot(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    client = await open_transaction(daemon.port)

    await client.send(dot_stuff(message()) + b"QUIT\r\n")
    replies = await client.replies_until_closed()
    await client.close()

    assert codes(replies) == ["250", "221"]
    assert count_rows(daemon, "messages") == 1


# -- Connections lost during DATA ---------------------------------------------------------------


def start_data(connection: socket.socket) -> BinaryIO:
    """Run EHLO, MAIL, RCPT and DATA on a blocking socket up to the 354 reply. Return the reader of its replies."""
    lines = connection.makefile("rb")
    assert lines.readline().startswith(b"220 ")
    connection.sendall(EHLO)
    while not (line := lines.readline()).startswith(b"250 "):
        assert line.startswith(b"250-"), line
    for command in (b"MAIL FROM:<alice@example.com>\r\n", f"RCPT TO:<{SUPPORT}>\r\n".encode(), b"DATA\r\n"):
        connection.sendall(command)
        reply = lines.readline()
        assert reply[:1] in (b"2", b"3"), reply
    assert reply.startswith(b"354 "), reply
    return lines


def send_partial_data(port: int, partial: bytes, *, reset: bool) -> str:
    """Run a transaction up to DATA over a blocking socket, send `partial`, then close or reset.

    Return the client's own address as the server logs it in `peer`.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        lines = start_data(connection)
        connection.sendall(partial)
        host, port_number = connection.getsockname()[:2]
        if reset:
            # A zero linger time makes close() send RST instead of FIN.
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        lines.close()
    return f"[{host}]:{port_number}"


@pytest.mark.parametrize(
    ("reset", "reason"),
    [(False, "closed by client"), (True, "connection error")],
    ids=["FIN", "RST"],
)
async def test_connection_lost_mid_data_is_logged(tmp_path: Path, start_daemon, reset: bool, reason: str) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    partial = message(body="the first lines\r\n")[:-2]

    with structlog.testing.capture_logs() as events:
        peer = await asyncio.to_thread(send_partial_data, daemon.port, partial, reset=reset)
        await wait_until(lambda: [event for event in events if event["event"] == "connection_lost"],
                         what="a connection_lost event")
        # The complete message that follows shows the server serves the next client.
        await send(daemon.port, "alice@example.com", [SUPPORT], message(message_id="<after-drop@example.com>"))

    lost = [event for event in events if event["event"] == "connection_lost"]
    assert len(lost) == 1
    assert lost[0]["log_level"] == "warning"
    assert lost[0]["peer"] == peer
    assert lost[0]["state"] == "DATA"
    assert lost[0]["bytes_received"] == len(partial)
    assert lost[0]["reason"] == reason
    if reset:
        assert "ConnectionResetError" in lost[0]["error"]
    else:
        assert lost[0]["error"] is None
    assert [row[0] for row in query(daemon, "SELECT message_id FROM messages")] == ["<after-drop@example.com>"]


def send_and_leave(port: int, content: bytes) -> None:
    """Send a whole transaction, the final dot and QUIT at once, then half-close without reading the replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        lines = start_data(connection)
        connection.sendall(dot_stuff(content) + b"QUIT\r\n")
        connection.shutdown(socket.SHUT_WR)
        lines.close()


async def test_client_gone_after_dot_delivered(tmp_path: Path, start_daemon) -> None:
    # The end of input cancels aiosmtpd's session while the commit is under
    # way. The message is committed all the same, so it must be logged and
    # the outbox worker woken, not left for its next rescan a minute later.
    daemon = await start_daemon(write_config(tmp_path))

    with structlog.testing.capture_logs() as events:
        await asyncio.to_thread(send_and_leave, daemon.port, message(message_id="<left@example.com>"))
        await wait_until(lambda: maildir_messages(tmp_path / "var" / "maildir" / "support"), timeout=10,
                         what="the team's copy")

    assert [event["event"] for event in events].count("message_accepted") == 1
    assert [row[0] for row in query(daemon, "SELECT message_id FROM messages")] == ["<left@example.com>"]


async def test_close_after_dot_not_logged(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    client = await open_transaction(daemon.port)

    with structlog.testing.capture_logs() as events:
        await client.send(dot_stuff(message()))
        reply = await client.reply()
        # No QUIT: the client closes as soon as it has the reply.
        await client.close()
        await wait_until(lambda: not daemon._tracker.connections, what="the server to see the close")

    assert reply[-1].startswith("250 2.0.0 ")
    assert "connection_lost" not in [event["event"] for event in events]
    assert count_rows(daemon, "messages") == 1


def send_and_reset(port: int, content: bytes) -> None:
    """Send a whole transaction with its final dot, then reset the connection without reading the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        lines = start_data(connection)
        connection.sendall(dot_stuff(content))
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        lines.close()


async def test_reset_after_dot_keeps_message(tmp_path: Path, start_daemon) -> None:
    # The reset arrives while a parse process routes the message, and
    # aiosmtpd cancels the session. The message must be stored all the same,
    # and the sender's retry, which got no reply, must be a duplicate.
    daemon = await start_daemon(write_config(tmp_path))
    assert daemon.parsers is not None
    await wait_until(lambda: daemon.parsers.ready >= 1, timeout=20, what="a parse process to be ready")
    content = message(message_id="<reset@example.com>")

    with structlog.testing.capture_logs() as events:
        await asyncio.to_thread(send_and_reset, daemon.port, content)
        await wait_until(lambda: [event for event in events if event["event"] == "reply_not_sent"], what="reply_not_sent")
        await send(daemon.port, "alice@example.com", [SUPPORT], content)

    names = [event["event"] for event in events]
    assert names.count("message_accepted") == 1
    assert names.count("message_duplicate") == 1
    assert stored_raws(daemon) == [content]


# -- Graceful stop ----------------------------------------------------------------------------


async def test_stop_lets_data_in_flight_finish(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    port = daemon.port
    content = message(body="first half\r\nsecond half\r\n")
    split = content.index(b"second half")
    client = await open_transaction(port)
    await client.send(content[:split])

    stopping = asyncio.create_task(daemon.stop())
    await wait_until(lambda: connection_refused(port), what="the listener to close")
    still_waiting = not stopping.done()
    await client.send(dot_stuff(content)[split:])
    reply = await client.reply()
    after = await client.replies_until_closed()
    await asyncio.wait_for(stopping, 10)
    await client.close()

    assert still_waiting, "stop() returned while DATA was still in flight"
    assert reply[-1].startswith("250 2.0.0 ")
    assert after == [["421 4.3.2 Service shutting down, try again later"]]
    assert stored_raws(daemon) == [content]
    assert await connection_refused(port)


async def _exchange(port: int, commands: list[bytes]) -> list[bytes]:
    """Send each command and return each reply (multi-line replies joined), greeting first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        lines = b""
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            lines += line
            if line[3:4] != b"-":
                return lines

    replies = [await reply()]
    for command in commands:
        writer.write(command)
        await writer.drain()
        replies.append(await reply())
    writer.close()
    return replies


async def test_invalid_utf8_is_rejected_per_command(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    replies = await _exchange(daemon.port, [
        b"EHLO m\xfcller.example\r\n",
        b"HELO m\xfcller.example\r\n",
        b"EHLO client.example\r\n",
        b"MAIL FROM:<j\xfcrgen@example.com>\r\n",
        "MAIL FROM:<jürgen@example.com>\r\n".encode(),
        b"MAIL FROM:<alice@example.com>\r\n",
        b"RCPT TO:<s\xfcpport@example.org>\r\n",
    ])
    assert replies[1].startswith(b"501 5.5.2 ")
    assert replies[2].startswith(b"501 5.5.2 ")
    assert replies[3].startswith(b"250-")
    assert replies[4].startswith(b"501 5.1.7 ")
    assert replies[5].startswith(b"553 5.6.7 ")
    assert replies[6].startswith(b"250 2.1.0 ")
    assert replies[7].startswith(b"501 5.1.3 ")


async def test_utf8_sender_with_smtputf8_is_acknowledged(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    replies = await _exchange(daemon.port, [
        b"EHLO client.example\r\n",
        "MAIL FROM:<jürgen@müller.example> SMTPUTF8\r\n".encode(),
        b"RCPT TO:<support@example.org>\r\n",
        b"DATA\r\n",
        "From: Jürgen <jürgen@müller.example>\r\nSubject: Grüße\r\n\r\nHallo\r\n.\r\n".encode(),
    ])
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as GR-")
    await wait_until(lambda: maildir_messages(tmp_path / "var" / "outbound"), what="the acknowledgement")
    (ack,) = maildir_messages(tmp_path / "var" / "outbound")
    assert "To: jürgen@müller.example\r\n".encode() in ack


async def test_utf8_recipient_needs_smtputf8(tmp_path: Path, start_daemon) -> None:
    # An inbox domain accepts every local part, a non-ASCII one included, but
    # only in a transaction whose MAIL carried SMTPUTF8 (RFC 6531).
    daemon = await start_daemon(write_config(tmp_path, smtp={"inboxes": [], "inbox_domains": ["example.org"]}))
    replies = await _exchange(daemon.port, [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<alice@example.com>\r\n",
        "RCPT TO:<jürgen@example.org>\r\n".encode(),
        b"RCPT TO:<support@example.org>\r\n",
        b"RSET\r\n",
        b"MAIL FROM:<alice@example.com> SMTPUTF8\r\n",
        "RCPT TO:<jürgen@example.org>\r\n".encode(),
    ])
    assert replies[3].startswith(b"553 5.6.7 ")
    assert replies[4].startswith(b"250 2.1.5 ")
    assert replies[7].startswith(b"250 2.1.5 ")


def scan_in_pieces(wire: bytes, sizes: list[int]) -> tuple[int, bool]:
    """Feed `wire` to _scan_data in pieces of `sizes` (the rest at once), as reads deliver it."""
    buffer, scanned, stuffed, offset = bytearray(b"\r\n"), 0, False, 0
    for size in [*sizes, len(wire)]:
        buffer += wire[offset:offset + size]
        offset += size
        end, scanned, seen = _scan_data(buffer, scanned)
        stuffed = stuffed or seen
        if end >= 0:
            return end, stuffed
    return -1, stuffed


@pytest.mark.parametrize(
    ("wire", "stuffed"),
    [
        (b"Subject: x\r\n\r\nplain\r\n.\r\n", False),
        (b"..profile\r\n...\r\n..\r\nend\r\n.\r\nQUIT\r\n", True),
        (b".\r\n", False),
        (b"a\r\n.\r\n.\r\n", False),
        (b"x\r\n..\r\n.\r\n", True),
        # No end yet: whether the last dot is stuffing is not known.
        (b"no end yet\r\n.", False),
        (b"..no end yet\r\n.\r", True),
    ],
)
def test_end_of_data_found_in_any_pieces(wire: bytes, stuffed: bool) -> None:
    end = (b"\r\n" + wire).find(b"\r\n.\r\n")
    for split in range(len(wire) + 1):
        assert scan_in_pieces(wire, [split]) == (end, stuffed), split
    assert scan_in_pieces(wire, [1] * len(wire)) == (end, stuffed)


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"", False),
        (b"Subject: x\r\n\r\nbody\r\n", False),
        (b"no line ending at all", False),
        (b"\r\n\r\n\r\n", False),
        (b"Subject: x\n\nbody\n", True),
        (b"one\r\ntwo\n", True),
        (b"one\rtwo\r\n", True),
        (b"ends with CR\r", True),
        (b"\nstarts with LF", True),
        (b"reversed\n\r", True),
        (b"doubled CR\r\r\n", True),
        (b"doubled LF\r\n\n", True),
        (b"dot line\r\n.\n.\r\n", True),
    ],
)
def test_bare_line_endings_found(data: bytes, bare: bool) -> None:
    assert has_bare_line_ending(data) is bare
    assert has_bare_line_ending(data * 3) is bare


def is_closed(client: smtplib.SMTP) -> bool:
    """Return True when the server has closed the session: the next command finds no connection."""
    try:
        client.noop()
    except smtplib.SMTPServerDisconnected:
        return True
    return False


def noop_session(port: int, content: bytes) -> tuple[list[int], list[int], tuple[int, bytes], bool]:
    """Send NOOPs up to the limit, a message, other junk commands up to the limit again and one NOOP more. Return the reply codes."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        before = [client.noop()[0] for _ in range(JUNK_COMMAND_LIMIT)]
        client.sendmail("alice@example.com", [SUPPORT], content)
        junk = (("RSET", ""), ("VRFY", "alice"), ("HELP", ""), ("EXPN", "staff")) * 4
        junk += (("RSET", ""), ("VRFY", "alice"), ("HELP", "")) * ((JUNK_COMMAND_LIMIT - len(junk)) // 3)
        after = [client.docmd(command, argument)[0] for command, argument in junk]
        after += [client.noop()[0] for _ in range(JUNK_COMMAND_LIMIT - len(after))]
        last = client.noop()
        closed = is_closed(client)
    return before, after, last, closed


def error_session(port: int, content: bytes) -> tuple[list[int], list[int], list[tuple[int, bytes]], bool]:
    """Draw 5xx replies up to one below the limit, send a message, then draw them up to the limit. Return the reply codes."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example")
        client.mail("alice@example.com")
        before = [client.rcpt(f"nobody{number}@example.org")[0] for number in range(ERROR_REPLY_LIMIT - 1)]
        client.rcpt(SUPPORT)
        client.data(content)
        client.mail("alice@example.com")
        after = [client.rcpt(f"nobody{number}@example.org")[0] for number in range(ERROR_REPLY_LIMIT - 2)]
        after.append(client.docmd("RCPT TO:<>")[0])
        last = client.rcpt("nobody@example.org")
        # The 421 that followed the last 550 is read as the reply to the next command.
        goodbye = client.noop()
        closed = is_closed(client)
    return before, after, [last, goodbye], closed


async def test_error_replies_limited(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    before, after, last, closed = await asyncio.to_thread(error_session, daemon.port, message())

    # The accepted message started the count again.
    assert before == [550] * (ERROR_REPLY_LIMIT - 1)
    assert count_rows(daemon, "messages") == 1
    assert after == [550] * (ERROR_REPLY_LIMIT - 2) + [501]
    assert last[0][0] == 550
    assert last[1] == (421, b"4.7.0 Too many errors, closing the connection")
    assert closed


async def test_commands_after_error_limit_not_run(tmp_path: Path, start_daemon) -> None:
    # Parsing in the daemon: a parse process would be a point where the close cancels the session.
    daemon = await start_daemon(write_config(tmp_path, smtp={"parse_processes": 0}))
    rejected = b"RCPT TO:<nobody@example.org>\r\n" * ERROR_REPLY_LIMIT
    pipelined = f"RCPT TO:<{SUPPORT}>\r\nDATA\r\n".encode() + dot_stuff(message(subject="After the limit", message_id="<after@example.com>"))

    with structlog.testing.capture_logs() as events:
        lines = await converse(daemon.port, EHLO + b"MAIL FROM:<alice@example.com>\r\n" + rejected + pipelined)
        await wait_until(lambda: not daemon._tracker.connections, what="the server to close the connection")
        # Commits run in order, so once this message is stored, one queued by the first session is too.
        await send(daemon.port, "alice@example.com", [SUPPORT], message(subject="Later", message_id="<later@example.com>"))

    assert lines[-1] == "421 4.7.0 Too many errors, closing the connection"
    assert count_rows(daemon, "messages") == 1
    assert len([event for event in events if event["event"] == "recipient_rejected"]) == ERROR_REPLY_LIMIT


async def test_null_recipient_is_a_syntax_error(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    lines = await converse(daemon.port, EHLO + b"MAIL FROM:<>\r\nRCPT TO:<>\r\nQUIT\r\n")

    assert lines[-2] == "501 5.1.3 Invalid recipient address"


async def test_junk_commands_limited(tmp_path: Path, start_daemon) -> None:
    # Each command restarts the idle timeout, so a client sending NOOPs would keep its slot forever.
    daemon = await start_daemon(write_config(tmp_path))

    before, after, last, closed = await asyncio.to_thread(noop_session, daemon.port, message())

    assert set(before) == {250}
    assert len(after) == JUNK_COMMAND_LIMIT
    assert set(after) == {214, 250, 252, 502}
    assert last == (421, b"4.7.0 Too many commands without mail, closing the connection")
    assert closed
    assert count_rows(daemon, "messages") == 1


async def test_fifth_unknown_command_closes_the_connection(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    with structlog.testing.capture_logs() as events:
        lines = await converse(daemon.port, EHLO + b"FOO1\r\nFOO2\r\nFOO3\r\nFOO4\r\nFOO5\r\nNOOP\r\n")

    replies = [line for line in lines if not line.startswith(("220", "250"))]
    # A server that closes the connection on its own replies 421 first (RFC 5321 section 3.8).
    assert replies == ["500 5.5.2 Command not recognized"] * 4 + ["421 4.7.0 Too many unknown commands, closing the connection"]
    # The NOOP after it got no reply: the connection was closed.
    assert lines[-1] == replies[-1]
    closed = [event for event in events if event["event"] == "connection_closed"]
    assert len(closed) == 1
    assert closed[0]["reason"] == "too many unknown commands"


@pytest.mark.parametrize(
    ("signal", "label"),
    [
        ("Auto-Submitted: auto-replied (vacation)", "Auto-Submitted"),
        ("From noreply+orders@shop.example looks automated", "From ADDRESS looks automated"),
        ("auto-reply subject 'Automatic reply: Printer'", "auto-reply subject '...'"),
        # repr quotes a subject with an apostrophe in double quotes.
        ("auto-reply subject " + repr("Message d'absence: Marie"), "auto-reply subject '...'"),
        ("auto-reply subject " + repr("Out of office: I'm away \"till\" Monday"), "auto-reply subject '...'"),
    ],
)
def test_signal_label_drops_subject(signal: str, label: str) -> None:
    assert _signal_label(signal) == label


# -- A client that closes its side after sending ------------------------------------------


def half_closed_conversation(port: int, data: bytes, timeout: float = 10) -> list[str]:
    """Read the greeting, send `data`, shut down the sending side at once, as `nc -N` does, and return every reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        received = b""
        while b"\r\n" not in received:
            received += connection.recv(4096)
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    return [line for line in received.decode("utf-8", "replace").split("\r\n") if line]


TRANSACTION = b"EHLO client.test.example\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<support@example.org>\r\nDATA\r\n"


@pytest.mark.parametrize("quit_command", [b"QUIT\r\n", b""], ids=["with QUIT", "without QUIT"])
async def test_half_closed_client_message_stored(tmp_path: Path, start_daemon, quit_command: bytes) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    replies = await asyncio.to_thread(half_closed_conversation, daemon.port, TRANSACTION + dot_stuff(message()) + quit_command)

    codes = [line[:4] for line in replies if line[3:4] == " "]
    assert codes == ["220 ", "250 ", "250 ", "250 ", "354 ", "250 ", *(["221 "] if quit_command else [])]
    assert count_rows(daemon, "messages") == 1
    await wait_until(lambda: maildir_messages(tmp_path / "var" / "maildir" / "support"), what="the delivered copy")


async def test_half_closed_in_data_stores_nothing(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    with structlog.testing.capture_logs() as logs:
        replies = await asyncio.to_thread(half_closed_conversation, daemon.port, TRANSACTION + b"Subject: cut\r\n\r\nno final dot\r\n")

    assert replies[-1].startswith("354 ")
    assert count_rows(daemon, "messages") == 0
    [lost] = [entry for entry in logs if entry["event"] == "connection_lost"]
    assert lost["reason"] == "closed by client"
    assert lost["state"] == "DATA"
    # The data arrived with the commands, before DATA was read.
    assert lost["bytes_received"] == len(b"Subject: cut\r\n\r\nno final dot\r\n")
