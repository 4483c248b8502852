"""Crash safety: a message accepted with 250 survives SIGKILL of the daemon and is delivered once.

The daemon runs as a real `python -m guardrail run` process, so SIGKILL ends
it with no chance to clean up, as the kernel's OOM killer would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import (
    free_port,
    maildir_messages,
    message,
    send,
    start_sink,
    wait_until,
    write_config,
)

REPOSITORY = Path(__file__).resolve().parents[1]

RULES = """
[[team]]
name = "support"
destination = {destination}
members = [{{ name = "Sam Ortiz", address = "sam@example.org" }}]

[[route]]
name = "default"
team = "support"
default = true
"""
SMTP_RULES = RULES.format(destination='{ smtp = ["team@example.net"] }')
MAILDIR_RULES = RULES.format(destination='{ maildir = "var/maildir/support" }')



def outbox_rows(database: Path) -> list[tuple[str, int]]:
    """Return (state, attempts) of every forwarding outbox row, read through a read-only connection."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    try:
        return connection.execute("SELECT state, attempts FROM outbox WHERE kind = 'deliver' ORDER BY id").fetchall()
    finally:
        connection.close()


@dataclass
class BlackHole:
    """A TCP server on loopback that accepts connections and never sends a byte."""

    server: asyncio.Server | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> BlackHole:
        self.server = await asyncio.start_server(self._swallow, "127.0.0.1", 0)
        return self

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.connected.set()
        await reader.read()

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()
        self.server = None


async def _wait_accepting(process: subprocess.Popen[bytes], port: int, timeout: float = 15.0) -> None:
    """Wait until the daemon on `port` sends its 220 greeting, and fail if it exits first or takes over `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"daemon exited with code {process.returncode} before accepting connections")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        try:
            greeting = await asyncio.wait_for(reader.readexactly(3), 2)
            writer.write(b"QUIT\r\n")
        finally:
            writer.close()
        if greeting == b"220":
            return
    raise AssertionError(f"daemon did not accept connections on port {port} within {timeout}s")


DaemonStarter = Callable[[Path, int], Awaitable[subprocess.Popen[bytes]]]


@pytest.fixture
async def start_process(tmp_path: Path) -> AsyncIterator[DaemonStarter]:
    """Return a function that runs the daemon as a subprocess. Every process it starts is ended at teardown."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}

    async def start(config: Path, port: int) -> subprocess.Popen[bytes]:
        log = tmp_path / f"daemon-{len(started) + 1}.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "guardrail", "run", "--config", str(config)],
                stdout=output, stderr=subprocess.STDOUT, cwd=tmp_path, env=environment,
            )
        started.append((process, log))
        await _wait_accepting(process, port)
        return process

    try:
        yield start
    finally:
        for process, log in started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            # pytest shows this only when the test fails.
            print(f"--- {log.name}, pid {process.pid}, exit code {process.returncode} ---")
            print(log.read_text(errors="replace"))


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(timeout=10)


async def test_sigkill_during_smtp_delivery_delivers_once(tmp_path: Path, start_process: DaemonStarter) -> None:
    hole = await BlackHole().start()
    smarthost_port = hole.port
    daemon_port = free_port()
    config = write_config(
        tmp_path, rules=SMTP_RULES, smtp={"port": daemon_port},
        sections={"smarthost": {"host": "127.0.0.1", "port": smarthost_port, "starttls": False, "timeout": "30s"}},
    )
    database = tmp_path / "var" / "guardrail.db"
    sink = None
    try:
        first = await start_process(config, daemon_port)
        refused = await send(daemon_port, "alice@example.com", ["support@example.org"], message())
        assert refused == {}
        # The smarthost connection proves the attempt started, and the black hole keeps it from finishing.
        await asyncio.wait_for(hole.connected.wait(), 10)
        _kill(first)
        assert first.returncode == -signal.SIGKILL
        assert outbox_rows(database) == [("pending", 0)]

        await hole.close()
        sink = await start_sink(port=smarthost_port)
        await start_process(config, daemon_port)
        await wait_until(lambda: sink.to("team@example.net"), timeout=15, what="delivery to the smarthost after restart")
        await wait_until(lambda: outbox_rows(database)[0][0] == "done", timeout=10, what="outbox row done")
        # A second copy, if the restarted daemon sent one, would arrive within this moment.
        await asyncio.sleep(0.5)

        assert len(sink.to("team@example.net")) == 1
        (received,) = sink.to("team@example.net")
        assert received.rcpt_tos == ["team@example.net"]
        assert received.content.endswith(message())
        assert received.content.count(b"Printer on floor 3 jams") == 1
        assert outbox_rows(database) == [("done", 1)]
    finally:
        await hole.close()
        if sink is not None:
            sink.server.close()
            await sink.server.wait_closed()


async def test_sigkill_after_250_leaves_one_maildir_copy(tmp_path: Path, start_process: DaemonStarter) -> None:
    daemon_port = free_port()
    config = write_config(tmp_path, rules=MAILDIR_RULES, smtp={"port": daemon_port})
    database = tmp_path / "var" / "guardrail.db"
    maildir = tmp_path / "var" / "maildir" / "support"

    first = await start_process(config, daemon_port)
    refused = await send(daemon_port, "alice@example.com", ["support@example.org"], message())
    assert refused == {}
    # Killed as soon as the 250 arrives, the daemon may be before, inside or after its maildir write.
    _kill(first)
    assert first.returncode == -signal.SIGKILL
    copies_before_restart = len(maildir_messages(maildir))
    state_before_restart = outbox_rows(database)

    await start_process(config, daemon_port)
    await wait_until(lambda: outbox_rows(database)[0][0] == "done", timeout=15, what="outbox row done")
    await wait_until(lambda: maildir_messages(maildir), timeout=5, what="a message in the maildir")
    await asyncio.sleep(0.3)

    copies = maildir_messages(maildir)
    assert len(copies) == 1
    assert copies[0].endswith(message())
    print(f"\nbefore restart: {copies_before_restart} maildir copies, outbox {state_before_restart}")
