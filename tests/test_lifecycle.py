"""Daemon lifecycle: cancellation while woken, a failed start, and one bad write in a batch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import free_port, kill_if_running, message, wait_for_port, write_config

from guardrail.clock import SystemClock
from guardrail.plan import Submission
from guardrail.store import Store, StoreSettings


async def test_sleep_cancelled_while_woken_stays_cancelled() -> None:
    clock = SystemClock()
    for _ in range(50):
        wake = asyncio.Event()
        sleeper = asyncio.create_task(clock.sleep_until(clock.now() + timedelta(days=1), wake))
        await asyncio.sleep(0)
        # The wake-up and the cancellation land in the same loop turn.
        wake.set()
        sleeper.cancel()
        done, _ = await asyncio.wait({sleeper}, timeout=5)
        assert sleeper in done
        assert sleeper.cancelled()


def test_busy_port_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, smtp={"port": port})
        result = subprocess.run(
            [sys.executable, "-m", "guardrail", "run", "--config", str(config)],
            capture_output=True, timeout=30, env={**os.environ},
        )
    assert result.returncode == 1
    assert b"cannot start the daemon" in result.stderr
    assert b"address already in use" in result.stderr.lower()


@pytest.mark.parametrize("listener", ["smtp", "http"])
def test_busy_port_logs_one_stop(tmp_path: Path, listener: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, smtp={"port": port if listener == "smtp" else 0}, sections={listener: {"port": port}})
        result = subprocess.run(
            [sys.executable, "-m", "guardrail", "run", "--config", str(config)],
            capture_output=True, text=True, timeout=30, env={**os.environ},
        )

    assert result.returncode == 1
    # [log] format = "json": one event per line.
    events = [json.loads(line)["event"] for line in result.stderr.splitlines() if line.startswith("{")]
    assert events.count("daemon_stopped") == 1
    assert "daemon_started" not in events
    expected = (
        f"error: cannot start the daemon: {listener}.listen and {listener}.port: cannot listen on 127.0.0.1:{port}:"
        " address already in use; stop the program that uses it or set another port"
    )
    assert expected in result.stderr.splitlines()


def submission(raw: bytes, helo: str) -> Submission:
    from guardrail.message import summarize

    return Submission(
        raw=raw, mail_from="alice@example.com", rcpt_tos=("support@example.org",), peer="[127.0.0.1]:1",
        helo=helo, received_at=datetime.now(timezone.utc), summary=summarize(raw), route="default",
        team="support", destination=None, route_reasons=("default route",), team_members=frozenset(),
    )


async def test_bad_row_fails_alone_in_a_batch(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "guardrail.db", StoreSettings())
    try:
        good = [submission(message(message_id=f"<g{index}@x>"), "client.example") for index in range(5)]
        # A lone surrogate cannot be encoded into SQLite text.
        bad = submission(message(message_id="<bad@x>"), "m\udcfcller")
        results = await asyncio.gather(*(store.accept(item) for item in [*good[:2], bad, *good[2:]]), return_exceptions=True)
        rows = await store.fetch_all("SELECT message_id FROM messages ORDER BY id")
    finally:
        await store.close()

    assert [type(result).__name__ for result in results] == ["Outcome", "Outcome", "StorageError", "Outcome", "Outcome", "Outcome"]
    assert sorted(row[0] for row in rows) == sorted(f"<g{index}@x>" for index in range(5))


def test_sigterm_during_burst_exits_promptly(tmp_path: Path) -> None:
    import smtplib
    import time

    port = free_port()
    config = write_config(tmp_path, smtp={"port": port})
    for attempt in range(10):
        process = subprocess.Popen(
            [sys.executable, "-m", "guardrail", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, process)
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
                for index in range(3):
                    client.sendmail("alice@example.com", ["support@example.org"], message(message_id=f"<t{attempt}-{index}@x>"))
            # Deliveries finishing and SIGTERM arrive together.
            time.sleep(attempt * 0.002)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            kill_if_running(process)
