"""Shared fixtures: config files in tmp_path, a running daemon, a loopback SMTP sink."""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from guardrail.clock import Clock
from guardrail.config import load_config
from guardrail.daemon import Daemon, load_ruleset

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]

# Rules every test set shares: the shipped acknowledgement templates and a
# fallback human, so that each team's conversations end with a person.
SHARED_RULES = (ROOT / "rules" / "30-acknowledgements.toml").read_text() + """
[escalation]
fallback = { name = "Dana Duty", address = "duty-manager@example.org" }
"""

TEAMS = """
[[team]]
name = "support"
destination = { maildir = "var/maildir/support" }
members = [{ name = "Sam Ortiz", address = "sam@example.org" }]

[[team]]
name = "billing"
destination = { maildir = "var/maildir/billing" }
members = [{ name = "Bea Keller", address = "bea@example.org" }]
"""

ROUTES = """
[[route]]
name = "billing"
team = "billing"
any = [{ rcpt.is = "billing@example.org" }, { subject.contains = "invoice" }]

[[route]]
name = "default"
team = "support"
default = true
"""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(
    folder: Path,
    *,
    rules: str = TEAMS + ROUTES,
    smtp: dict[str, Any] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a config and one rules file under `folder`; return the config path."""
    smtp_settings = {
        "listen": "127.0.0.1",
        "port": 0,
        "hostname": "mx.test.example",
        "inboxes": ["support@example.org", "billing@example.org"],
        "timeout": "30s",
    }
    smtp_settings.update(smtp or {})
    all_sections: dict[str, dict[str, Any]] = {
        "smtp": smtp_settings,
        "postmaster": {"owner": "ops@example.org"},
        "log": {"format": "json"},
        # Port 0: test runs in parallel must not compete for the default 8025.
        "http": {"port": 0},
    }
    for name, values in (sections or {}).items():
        all_sections.setdefault(name, {}).update(values)
    lines = []
    for name, values in all_sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    rules_folder(folder, rules)
    path = folder / "guardrail.toml"
    path.write_text("\n".join(lines))
    return path


def rules_folder(folder: Path, rules: str, *, shared: bool = True) -> Path:
    """Write `rules` as rules/rules.toml under `folder`, with the shared rules beside it."""
    directory = folder / "rules"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.toml").write_text(rules)
    if shared:
        (directory / "00-shared.toml").write_text(SHARED_RULES)
    return directory


def chain_rules(escalation: str, team_lines: str = "") -> str:
    """Return rules for one 24x7 team with a first response of 1h, the `escalation` chain given as TOML, and `team_lines`."""
    return f"""
[[calendar]]
name = "always"
timezone = "UTC"
hours = "24x7"

[[team]]
name = "facilities"
destination = {{ maildir = "var/maildir/facilities" }}
members = [{{ name = "Carol Tech", address = "carol@example.org" }}]
calendar = "always"
first_response = "1h"
escalation = {escalation}
{team_lines}
[[route]]
name = "default"
team = "facilities"
default = true
"""



# A support team whose mail goes to the smarthost instead of a maildir.
SMTP_RULES = """
[[team]]
name = "support"
destination = { smtp = ["team@example.net"] }
members = [{ name = "Sam Ortiz", address = "sam@example.org" }]

[[route]]
name = "default"
team = "support"
default = true
"""


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str] = field(default_factory=list)


@dataclass
class SinkHandler:
    messages: list[Received] = field(default_factory=list)
    reply: str | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.reply is not None:
            return self.reply
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, list(envelope.mail_options))
        )
        self.arrived.set()
        return "250 2.0.0 Ok"


@dataclass
class RecipientSinkHandler(SinkHandler):
    """A sink that answers RCPT TO with the reply set for the address in `rcpt_replies`, or accepts it."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)  # every RCPT TO address, in order

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]) -> str:
        self.asked.append(address)
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"


@dataclass
class Sink:
    """A loopback SMTP server that collects what it receives."""

    handler: SinkHandler
    server: asyncio.Server

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def to(self, address: str) -> list[Received]:
        """Return the messages received for `address`."""
        return [message for message in self.handler.messages if address in message.rcpt_tos]


async def start_sink(port: int = 0, handler: SinkHandler | None = None) -> Sink:
    handler = handler or SinkHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test.example", enable_SMTPUTF8=True, loop=loop),
        "127.0.0.1",
        port,
    )
    return Sink(handler, server)


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    started = await start_sink()
    yield started
    started.server.close()
    await started.server.wait_closed()


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_daemon() -> AsyncIterator[DaemonFactory]:
    """Return a function that starts a daemon on a config path; all are stopped at teardown."""
    running: list[Daemon] = []

    async def start(config_path: Path, clock: Clock | None = None) -> Daemon:
        config = load_config(config_path)
        daemon = Daemon(config, load_ruleset(config), clock=clock)
        await daemon.start()
        running.append(daemon)
        return daemon

    yield start
    for daemon in running:
        if daemon.store is not None:
            await daemon.stop()


def send_sync(port: int, mail_from: str, rcpt_tos: list[str], data: bytes) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        return client.sendmail(mail_from, rcpt_tos, data)


async def send(port: int, mail_from: str, rcpt_tos: list[str], data: bytes) -> dict[str, Any]:
    """Send one message with smtplib in a worker thread."""
    return await asyncio.to_thread(send_sync, port, mail_from, rcpt_tos, data)


def converse_sync(port: int, data: bytes, *, expect_close: bool = True, timeout: float = 10) -> list[str]:
    """Send raw client bytes after the greeting and return every reply line, greeting first."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        received = b""
        while b"\r\n" not in received:
            received += connection.recv(4096)
        connection.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = connection.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            received += chunk
    return [line for line in received.decode("utf-8", "replace").split("\r\n") if line]


async def converse(port: int, data: bytes, *, timeout: float = 10) -> list[str]:
    return await asyncio.to_thread(converse_sync, port, data, timeout=timeout)


async def wait_until(predicate: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` every 20 ms until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def maildir_messages(folder: Path) -> list[bytes]:
    """Return the contents of every message in a maildir's new/ folder, by name, with CRLF line endings as SMTP carried them.

    A maildir file ends its lines with LF and contains no CR, which this checks.
    """
    new = folder / "new"
    if not new.is_dir():
        return []
    contents = []
    for path in sorted(new.iterdir()):
        content = path.read_bytes()
        assert b"\r" not in content, f"{path} contains a CR"
        contents.append(content.replace(b"\n", b"\r\n"))
    return contents


def message(
    *,
    subject: str = "Printer on floor 3 jams",
    sender: str = "Alice Example <alice@example.com>",
    to: str = "support@example.org",
    message_id: str = "<m1@example.com>",
    extra_headers: str = "",
    body: str = "Hello,\r\nthe printer jams.\r\n",
) -> bytes:
    """Build a small CRLF message."""
    headers = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Tue, 04 Nov 2025 10:00:00 +0100\r\nMessage-ID: {message_id}\r\n{extra_headers}"
    )
    return (headers + "\r\n" + body).encode("utf-8")


async def settle(daemon: Daemon, clock: Any, *, timeout: float = 10.0) -> None:
    """Wait until the daemon's loops have handled everything due at the clock's current time."""
    # All loops must sleep at the current time. A loop that is not asleep
    # may be between a wake-up and its next query.
    loops = daemon.clock_loops
    await wait_until(lambda: clock.is_settled(loops) and daemon.is_idle(), timeout=timeout, what="the daemon to settle")
    # A finished delivery can wake the loops once more; check again after it.
    await asyncio.sleep(0)
    await wait_until(lambda: clock.is_settled(loops) and daemon.is_idle(), timeout=timeout, what="the daemon to settle")


def crlf(data: bytes) -> bytes:
    """Return `data` with every line ending (CRLF, LF or CR) made CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def case_file(*parts: str) -> bytes:
    """Return a test data message with CRLF line endings."""
    return crlf(DATA.joinpath(*parts).read_bytes())


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def example_copy(folder: Path) -> Path:
    """Copy the example config and rules into `folder`, so a command reads a database of its own."""
    shutil.copy(ROOT / "config.example.toml", folder / "config.toml")
    shutil.copytree(ROOT / "rules", folder / "rules")
    return folder / "config.toml"


def kill_if_running(process: subprocess.Popen[Any]) -> None:
    """Kill `process` if it still runs and close its stderr pipe, in the finally block of a test that started it."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=5)
    if process.stderr:
        process.stderr.close()


def wait_for_port(port: int, process: subprocess.Popen[bytes], *, timeout: float = 15.0) -> None:
    """Wait until a daemon subprocess accepts connections on `port`; fail if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else "daemon exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"daemon did not listen on port {port} within {timeout:g} s")
