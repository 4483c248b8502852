"""Log output: console lines carry no terminal control sequences that a client chose, and library lines have one event name."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

# aiosmtpd logs an unknown command with the client's text in the message.
# The script runs in a child process, because configure_logging replaces
# the root handler and structlog's configuration for the whole process.
SCRIPT = """
import logging
import sys
import structlog
from guardrail.logs import configure_logging
configure_logging(sys.argv[1])
logging.getLogger("mail.log").warning("%s unrecognised: %s", ("127.0.0.1", 40000), "FOO\\x1b]0;owned\\x07\\x1b[2J")
structlog.get_logger().warning("recipient_rejected", recipient="a\\u202eb@example.org")
"""


def test_console_escapes_client_controls() -> None:
    finished = subprocess.run(
        [sys.executable, "-c", SCRIPT, "console"], capture_output=True, text=True, timeout=60, cwd=ROOT,
    )

    assert finished.returncode == 0
    assert "\x1b]0;owned" not in finished.stderr
    assert "\x1b[2J" not in finished.stderr
    assert "\u202e" not in finished.stderr
    # The renderer quotes the detail with repr, so each escape shows its backslash doubled.
    assert "unrecognised: FOO\\\\x1b]0;owned\\\\x07\\\\x1b[2J" in finished.stderr
    assert "a\\u202eb@example.org" in finished.stderr


def test_library_log_event_name() -> None:
    finished = subprocess.run(
        [sys.executable, "-c", SCRIPT, "json"], capture_output=True, text=True, timeout=60, cwd=ROOT,
    )

    assert finished.returncode == 0
    library, ours = (json.loads(line) for line in finished.stderr.splitlines())
    assert library["event"] == "library_log"
    assert library["logger"] == "mail.log"
    assert library["detail"] == "('127.0.0.1', 40000) unrecognised: FOO\x1b]0;owned\x07\x1b[2J"
    assert library["level"] == "warning"
    assert ours["event"] == "recipient_rejected"
    assert "detail" not in ours
