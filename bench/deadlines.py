"""Deadlines at scale: a restart with 100,000 open conversations, then an idle minute.

The benchmark builds a database in a temporary folder. guardrail's own store
creates the schema. Then the standard library's sqlite3 bulk-inserts, in one
transaction, open conversations whose first escalation falls due over the
next 30 days. Each gets the rows a real message leaves behind: the message
with a 1 KB body, its Message-IDs, two finished outbox rows, the
acknowledgement and events. The file is dropped from the page cache, as
after a reboot. guardrail then starts as a separate process with the
repository's rules and its production defaults. SMTP and the HTTP listener
take free ports on 127.0.0.1. The benchmark reports:

- the time from process start to the first SMTP greeting (a restart: the
  database already exists) and to the first accepted message;
- the daemon's CPU time over an idle window (default 60 s), read from
  /proc/PID/stat, and its context switches, which a polling loop would raise;
- its memory (VmRSS, VmHWM) at the end;
- that nothing escalated while nothing was due. With --due N, N of the
  conversations are already past their deadline at start, and the benchmark
  reports how long until all of them are escalated, whether they went oldest
  first, and how long SMTP greetings took meanwhile.

A control run on an empty database, started the same way, gives the start-up
time and memory that do not depend on the data.

Run from the repository root, in a virtualenv with guardrail installed:

    python bench/deadlines.py [--conversations 100000] [--seconds 60] [--due 0] [--warm] [--no-http] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import smtplib
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from importlib.metadata import version
from pathlib import Path

from _revision import source_revision

from guardrail.clock import format_instant
from guardrail.store import Store

REPO = Path(__file__).resolve().parent.parent

STARTUP_TIMEOUT = 60.0  # seconds the daemon gets to greet its first client
PROBE_INTERVAL = 0.005  # seconds between connection attempts while it starts
REPLY_TIMEOUT = 30.0  # seconds one SMTP exchange may take
DUE_TIMEOUT = 60.0  # seconds the due conversations get to be escalated
STOP_TIMEOUT = 40.0  # guardrail lets DATA in flight finish for up to 30 s on SIGTERM
BODY_SIZE = 1024  # bytes of body text in each stored message
EARLIEST_DEADLINE = timedelta(hours=1)  # no deadline falls inside the measurement
DEADLINE_SPREAD = timedelta(days=30)
DUE_SPREAD = timedelta(minutes=30)  # due conversations missed their deadline within this
IDLE_GREETINGS = 20  # greetings timed after the idle window, for comparison
INSERT_CHUNK = 5000  # conversations generated and inserted per executemany round

# The repository's rules: (team, route, envelope recipient, share in tenths).
# frontdesk has no chain of its own, so it escalates to the [escalation] fallback.
TEAMS = (
    ("support", "support-inbox", "support@example.com", 6),
    ("billing", "billing-inbox", "billing@example.com", 3),
    ("frontdesk", "default", "hello@example.com", 1),
)
MEMBERS = {
    "support": ["lea.martin@example.com", "sam.ortiz@example.com"],
    "billing": ["bea.keller@example.com", "omar.haddad@example.com"],
    "frontdesk": ["dana.duty@example.com"],
}
SUBJECTS = {
    "support": ("Cannot log in after the update", "Password reset link expired", "The export button does nothing",
                "Question about my account settings"),
    "billing": ("Invoice for last month", "Refund request", "Change of billing address"),
    "frontdesk": ("Order has not arrived", "Partnership enquiry"),
}
WORDS = (
    "account", "order", "shipping", "password", "login", "screen", "error", "question", "please", "thanks",
    "yesterday", "customer", "number", "update", "settings", "browser", "version", "help", "again", "team",
)
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # the references' Crockford base32

CONFIG = """\
[smtp]
listen = "127.0.0.1"
port = {port}
hostname = "mx.bench"
inboxes = ["support@example.com", "billing@example.com", "hello@example.com"]

[postmaster]
owner = "ops@example.org"

[database]
path = "{database}"

[outbound]
maildir = "var/outbound"

[rules]
directory = "rules"

[log]
format = "json"
level = "warning"

# The daemon's health and metrics listener runs as in production, on a free port.
[http]
enabled = {http}
port = 0
token = "{token}"
"""


# -- the database ---------------------------------------------------------------


@dataclass
class Built:
    """The built database: its size, and the order its due conversations must be escalated in."""

    conversations: int
    due_order: list[int]
    seconds: float
    size: int = 0


def create_schema(path: Path) -> None:
    """Create the schema exactly as the daemon does, by opening its store once."""

    async def open_and_close() -> None:
        store = await Store.open(path)
        await store.close()

    asyncio.run(open_and_close())


def build_database(path: Path, folder: Path, count: int, due: int, now: datetime, seed: int) -> Built:
    """Fill a fresh database with `count` open conversations, `due` of them already past their deadline."""
    started = time.perf_counter()
    create_schema(path)
    rng = random.Random(seed)
    due_ids = set(rng.sample(range(1, count + 1), due)) if due else set()
    bodies = _bodies(rng)
    destinations = {
        team: json.dumps({"kind": "maildir", "maildir": str(folder / "var" / "maildir" / team), "addresses": []})
        for team, _, _, _ in TEAMS
    }
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # This is setup, so one transaction without fsync is enough.
        db.execute("PRAGMA synchronous = OFF")
        db.execute("BEGIN")
        for first in range(1, count + 1, INSERT_CHUNK):
            last = min(first + INSERT_CHUNK - 1, count)
            rows = _Rows(bodies, destinations)
            for row_id in range(first, last + 1):
                rows.add(row_id, now, rng, row_id in due_ids)
            rows.insert(db)
        db.execute("COMMIT")
        # A restart after a clean shutdown finds the WAL checkpointed.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        due_order = [row[0] for row in db.execute(
            "SELECT id FROM conversations WHERE next_escalation_at <= ? ORDER BY next_escalation_at, id",
            (format_instant(now),),
        )]
    finally:
        db.close()
    return Built(count, due_order, time.perf_counter() - started, path.stat().st_size)


def evict_from_page_cache(path: Path) -> None:
    """Write `path` to disk and drop its pages from the page cache, as after a reboot."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def _reference(row_id: int) -> str:
    # An odd multiplier is a bijection modulo 32**6: distinct ids give distinct references.
    code = (row_id * 0x2545F49) % 32**6
    return "GR-" + "".join(_ALPHABET[(code >> shift) & 31] for shift in range(25, -1, -5))


def _bodies(rng: random.Random, count: int = 64) -> list[str]:
    """Return `count` plain-text bodies of BODY_SIZE bytes, ten words a line."""
    bodies = []
    for _ in range(count):
        lines, size = [], 0
        while size < BODY_SIZE:
            line = " ".join(rng.choice(WORDS) for _ in range(10))
            lines.append(line)
            size += len(line) + 2
        bodies.append("\r\n".join(lines) + "\r\n")
    return bodies


def _raw_message(customer: str, rcpt: str, subject: str, message_id: str, date: str, body: str) -> bytes:
    head = (
        f"From: Casey Customer <{customer}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\nDate: {date}\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    return (head + body).encode()


@dataclass
class _Rows:
    """The rows of one chunk of conversations, in SCHEMA's column order."""

    bodies: list[str]
    destinations: dict[str, str]  # team name to its destination record, as JSON
    tables: dict[str, list[tuple[object, ...]]] = field(default_factory=lambda: {name: [] for name in _INSERTS})

    def add(self, row_id: int, now: datetime, rng: random.Random, is_due: bool) -> None:
        team, route, rcpt = _team_for(row_id)
        opened = now - timedelta(seconds=rng.uniform(0, 2 * 86400))
        if is_due:
            deadline = now - timedelta(seconds=rng.uniform(1, DUE_SPREAD.total_seconds()))
        else:
            deadline = now + EARLIEST_DEADLINE + timedelta(seconds=rng.uniform(0, DEADLINE_SPREAD.total_seconds()))
        at, due_at = format_instant(opened), format_instant(deadline)
        reference, customer = _reference(row_id), f"customer{row_id}@mail{row_id % 997}.example"
        subject = f"{SUBJECTS[team][row_id % len(SUBJECTS[team])]} (order {row_id:06d})"
        message_id = f"<{row_id}.{rng.getrandbits(48):012x}@mail{row_id % 997}.example>"
        date = format_datetime(opened)
        raw = _raw_message(customer, rcpt, subject, message_id, date, rng.choice(self.bodies))
        summary = {
            "message_id": message_id, "from_address": customer, "from_name": "Casey Customer", "reply_to": [],
            "to": [rcpt], "cc": [], "subject": subject, "in_reply_to": [], "references": [], "date": date,
        }

        self.tables["conversations"].append((
            row_id, reference, route, team, self.destinations[team], "open", at, at, subject, customer,
            json.dumps(sorted([customer, *MEMBERS[team]])), due_at, 0, "", due_at,
        ))
        self.tables["messages"].append((
            row_id, row_id, at, f"[192.0.2.{row_id % 250 + 1}]:{40000 + row_id % 20000}", f"mail{row_id % 997}.example",
            customer, json.dumps([rcpt]), message_id, hashlib.sha256(raw).hexdigest(), len(raw), json.dumps(summary),
            route, team, json.dumps([f"rcpt is {rcpt!r}"]), "new", raw,
        ))
        self._add_aftermath(row_id, team, route, reference, customer, subject, at, due_at, message_id, raw)

    def _add_aftermath(
        self, row_id: int, team: str, route: str, reference: str, customer: str, subject: str, at: str, due_at: str,
        message_id: str, raw: bytes,
    ) -> None:
        """Add what intake and the outbox worker wrote after the message: ids, outbox, acknowledgement, events."""
        ack_id = f"<ack.{reference}@mx.bench>"
        ack = f"Subject: [{reference}] We received your message: {subject}\r\n\r\n".encode() + raw[-600:]
        done = at[:17] + "59.999999Z"  # delivered within the minute it arrived
        self.tables["message_ids"] += [(message_id, row_id), (ack_id, row_id)]
        self.tables["outbox"] += [
            (2 * row_id - 1, "deliver", row_id, row_id, self.destinations[team], None, "done", 1, at, at, done),
            (2 * row_id, "mail", row_id, row_id,
             json.dumps({"kind": "smtp", "addresses": [customer], "sender": "", "purpose": "acknowledgement"}),
             ack, "done", 1, at, at, done),
        ]
        self.tables["acknowledgements"].append((row_id, row_id, at, customer, "sent", "", "en", "template", ack_id))
        self.tables["events"] += [
            (row_id, row_id, at, "received", json.dumps({"route": route, "team": team, "disposition": "new"})),
            (row_id, None, at, "deadline_set", json.dumps({"deadline": due_at})),
            (row_id, row_id, done, "delivered", json.dumps({"outbox_id": 2 * row_id - 1, "kind": "deliver", "attempts": 1})),
        ]

    def insert(self, db: sqlite3.Connection) -> None:
        for name, sql in _INSERTS.items():
            db.executemany(sql, self.tables[name])


def _team_for(row_id: int) -> tuple[str, str, str]:
    slot = row_id % 10
    for team, route, rcpt, share in TEAMS:
        if slot < share:
            return team, route, rcpt
        slot -= share
    raise AssertionError("the shares in TEAMS add up to ten")


_INSERTS = {
    "conversations": (
        "INSERT INTO conversations (id, reference, route, team, destination, state, opened_at, updated_at,"
        " subject, customer, participants, deadline, escalation_level, escalation_reason, next_escalation_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    ),
    "messages": (
        "INSERT INTO messages (id, conversation_id, received_at, peer, helo, mail_from, rcpt_tos, message_id,"
        " dedupe_key, size, summary, route, team, route_reasons, disposition, raw)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    ),
    "message_ids": "INSERT INTO message_ids (message_id, conversation_id) VALUES (?,?)",
    "outbox": (
        "INSERT INTO outbox (id, kind, conversation_id, message_row, target, payload, state, attempts,"
        " created_at, next_attempt_at, done_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
    ),
    "acknowledgements": (
        "INSERT INTO acknowledgements (message_row, conversation_id, at, recipient, decision, signal, language,"
        " variant, message_id) VALUES (?,?,?,?,?,?,?,?,?)"
    ),
    "events": "INSERT INTO events (conversation_id, message_row, at, kind, detail) VALUES (?,?,?,?,?)",
}


# -- the daemon process ---------------------------------------------------------


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    port: int
    started: float  # time.monotonic() just before the process was created
    log_path: Path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(folder: Path, database: Path, port: int, http: bool) -> Path:
    """Write a config and a copy of the repository's rules into `folder`; return the config path."""
    shutil.copytree(REPO / "rules", folder / "rules", dirs_exist_ok=True)
    path = folder / "guardrail.toml"
    # A throwaway token, so that the listener starts without warning about a missing one.
    path.write_text(CONFIG.format(port=port, database=database, http=str(http).lower(), token=secrets.token_urlsafe(24)))
    return path


def start_daemon(folder: Path, database: Path, name: str, http: bool) -> Running:
    """Start `python -m guardrail run` on a free port, logging into `folder`."""
    port = free_port()
    config = write_config(folder, database, port, http)
    log_path = folder / f"{name}.log"
    with open(log_path, "wb") as log_file:
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "guardrail", "run", "--config", str(config)],
            cwd=folder, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    return Running(process, port, started, log_path)


def greet(port: int) -> float:
    """Connect, read the 220 greeting and quit; return the seconds the greeting took."""
    begun = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT) as connection:
        greeting = connection.makefile("rb").readline()
        took = time.monotonic() - begun
        connection.sendall(b"QUIT\r\n")
    if not greeting.startswith(b"220"):
        raise SystemExit(f"error: guardrail greeted with {greeting[:200]!r}, expected 220")
    return took


def wait_for_greeting(daemon: Running) -> float:
    """Connect until the daemon's 220 greeting arrives; return seconds since its start."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise SystemExit(f"error: guardrail exited with {daemon.process.returncode} while starting; see {daemon.log_path}")
        try:
            greet(daemon.port)
        except ConnectionRefusedError:
            time.sleep(PROBE_INTERVAL)
            continue
        return time.monotonic() - daemon.started
    raise SystemExit(f"error: guardrail did not greet within {STARTUP_TIMEOUT:g} s; see {daemon.log_path}")


def send_one(daemon: Running) -> tuple[float, float]:
    """Send one message to support@; return (seconds for the transaction, seconds since start at its 250)."""
    now = datetime.now(timezone.utc)
    message = (
        f"From: Pat Probe <pat.probe@customer.example>\r\nTo: <support@example.com>\r\n"
        f"Subject: The printer on floor 3 jams\r\nDate: {format_datetime(now)}\r\n"
        f"Message-ID: <probe.{os.getpid()}.{time.time_ns()}@customer.example>\r\n\r\nHello, it jams again.\r\n"
    ).encode()
    begun = time.monotonic()
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="probe.customer.example", timeout=REPLY_TIMEOUT) as client:
        refused = client.sendmail("pat.probe@customer.example", ["support@example.com"], message)
    ended = time.monotonic()
    if refused:
        raise SystemExit(f"error: guardrail rejected recipients {refused!r}; see the daemon log")
    return ended - begun, ended - daemon.started


def stop_daemon(daemon: Running) -> float:
    """SIGTERM the daemon, SIGKILL it after STOP_TIMEOUT; return seconds it took to exit."""
    if daemon.process.poll() is not None:
        return 0.0
    begun = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        daemon.process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait(timeout=STOP_TIMEOUT)
        print(f"warning: guardrail ignored SIGTERM for {STOP_TIMEOUT:g} s and was killed")
    return time.monotonic() - begun


# -- /proc readings -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU time of process `pid`, in seconds, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # proc(5): fields after the command name, which may hold spaces, start at field 3.
    fields = text[text.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def run_seconds(pid: int) -> float:
    """Return the time every thread of `pid` has spent on a CPU, from schedstat (nanosecond resolution)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:
            continue  # the thread ended while we listed them
    return total / 1e9


def status(pid: int) -> dict[str, str]:
    """Return /proc/PID/status as a dict of field name to text."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def kibibytes(text: str) -> int:
    return int(text.split()[0])


def switches(pid: int) -> int:
    """Return the context switches of every thread of `pid` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = status(int(task.name))
        except FileNotFoundError:
            continue  # the thread ended while we listed them
        total += int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])
    return total


# -- checks against the database ------------------------------------------------


def count(database: Path, sql: str, parameters: tuple[object, ...] = ()) -> int:
    """Run a counting query on a read-only connection, beside the daemon's."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=REPLY_TIMEOUT)
    try:
        return int(db.execute(sql, parameters).fetchone()[0])
    finally:
        db.close()


ESCALATION_MAILS = "SELECT COUNT(*) FROM outbox WHERE kind = 'mail' AND json_extract(target, '$.purpose') = 'escalation'"
ESCALATED = "SELECT COUNT(*) FROM conversations WHERE escalation_level > 0"
PENDING = "SELECT COUNT(*) FROM outbox WHERE state = 'pending'"


def wait_for_escalations(database: Path, daemon: Running, expected: int) -> tuple[float | None, list[float]]:
    """Poll until `expected` conversations are escalated, timing an SMTP greeting between polls.

    Return the seconds from start until all were escalated (None on timeout)
    and each greeting's duration. The scheduler and intake share one event
    loop, so a slow greeting shows the loop was busy escalating.
    """
    greetings: list[float] = []
    deadline = time.monotonic() + DUE_TIMEOUT
    while time.monotonic() < deadline:
        if count(database, ESCALATED) >= expected:
            return time.monotonic() - daemon.started, greetings
        greetings.append(greet(daemon.port))
        time.sleep(0.02)
    return None, greetings


def wait_for_outbox(database: Path, daemon: Running) -> float | None:
    """Poll until no outbox row is pending; return seconds since start, or None on timeout."""
    deadline = time.monotonic() + DUE_TIMEOUT
    while time.monotonic() < deadline:
        if count(database, PENDING) == 0:
            return time.monotonic() - daemon.started
        time.sleep(0.05)
    return None


def escalation_order(database: Path) -> list[int]:
    """Return the escalated conversations in the order their escalated events were written."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=REPLY_TIMEOUT)
    try:
        return [row[0] for row in db.execute("SELECT conversation_id FROM events WHERE kind = 'escalated' ORDER BY id")]
    finally:
        db.close()


# -- the runs -------------------------------------------------------------------


@dataclass
class Figures:
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, what: str, value: str, unit: str = "") -> None:
        self.rows.append((what, value, unit))
        print(f"  {what}: {value} {unit}".rstrip(), flush=True)

    def table(self) -> str:
        width = max(len(what) for what, _, _ in self.rows)
        value_width = max(len(value) for _, value, _ in self.rows)
        return "\n".join(f"{what:<{width}}  {value:>{value_width}}  {unit}".rstrip() for what, value, unit in self.rows)


def control_run(folder: Path, figures: Figures, http: bool) -> None:
    """Start on an empty database: the start-up cost that does not depend on the data."""
    folder.mkdir()
    database = folder / "guardrail.db"
    create_schema(database)
    daemon = start_daemon(folder, database, "control", http)
    try:
        figures.add("empty database: start to SMTP greeting", f"{wait_for_greeting(daemon):.2f}", "s")
        _, since_start = send_one(daemon)
        figures.add("empty database: start to first 250", f"{since_start:.2f}", "s")
        figures.add("empty database: VmRSS after one message", f"{kibibytes(status(daemon.process.pid)['VmRSS']) / 1024:.1f}", "MiB")
    finally:
        stop_daemon(daemon)


def loaded_run(arguments: argparse.Namespace, folder: Path, figures: Figures) -> None:
    """Build the database, restart guardrail on it, and measure."""
    folder.mkdir()
    database = folder / "guardrail.db"
    now = datetime.now(timezone.utc)
    built = build_database(database, folder, arguments.conversations, arguments.due, now, arguments.seed)
    figures.add("open conversations", f"{built.conversations:,}")
    figures.add("of which due at start", f"{len(built.due_order):,}")
    figures.add("database size", f"{built.size / 2**20:.0f}", "MiB")
    figures.add("database build", f"{built.seconds:.1f}", "s")
    if not arguments.warm:
        evict_from_page_cache(database)
    figures.add("HTTP listener", "off" if arguments.no_http else "on")
    figures.add("database file at restart", "in page cache" if arguments.warm else "evicted from page cache")
    daemon = start_daemon(folder, database, "daemon", not arguments.no_http)
    try:
        _measure(arguments, daemon, database, built, figures)
    finally:
        figures.add("SIGTERM to exit", f"{stop_daemon(daemon):.2f}", "s")
    log_lines = [line for line in daemon.log_path.read_text(errors="replace").splitlines() if line.strip()]
    figures.add("lines logged at warning or above", str(len(log_lines)))
    for line in log_lines[-3:]:
        print(f"    {line[:300]}")


def _measure(arguments: argparse.Namespace, daemon: Running, database: Path, built: Built, figures: Figures) -> None:
    pid = daemon.process.pid
    figures.add("restart to SMTP greeting", f"{wait_for_greeting(daemon):.2f}", "s")
    transaction, since_start = send_one(daemon)
    figures.add("restart to first 250", f"{since_start:.2f}", "s")
    figures.add("first SMTP transaction", f"{transaction * 1000:.0f}", "ms")
    if built.due_order:
        _measure_due(database, daemon, built, figures)
    # The idle window starts once the outbox is empty, or it would measure deliveries.
    delivered_at = wait_for_outbox(database, daemon)
    if delivered_at is None:
        figures.add("start to outbox empty", f"not within {DUE_TIMEOUT:g} s of waiting")
    else:
        figures.add("start to outbox empty", f"{delivered_at:.2f}", "s")

    before = cpu_seconds(pid), run_seconds(pid), switches(pid), time.monotonic()
    time.sleep(arguments.seconds)
    after = cpu_seconds(pid), run_seconds(pid), switches(pid), time.monotonic()
    used, ran, switched, elapsed = (end - start for end, start in zip(after, before))
    figures.add("idle window", f"{elapsed:.1f}", "s")
    figures.add("idle CPU time (utime+stime)", f"{used:.2f}", f"s, in ticks of {1 / os.sysconf('SC_CLK_TCK'):g} s")
    figures.add("idle CPU (utime+stime)", f"{100 * used / elapsed:.2f}", "% of one core")
    figures.add("idle on-CPU time (schedstat)", f"{ran * 1000:.1f}", "ms")
    figures.add("context switches while idle", f"{switched / elapsed:.2f}", "per s")
    idle_greetings = [greet(daemon.port) for _ in range(IDLE_GREETINGS)]
    figures.add(f"SMTP greeting after the idle window, median of {IDLE_GREETINGS}",
                f"{statistics.median(idle_greetings) * 1000:.1f}", "ms")
    fields = status(pid)
    figures.add("VmRSS at end", f"{kibibytes(fields['VmRSS']) / 1024:.1f}", "MiB")
    figures.add("VmHWM (peak RSS)", f"{kibibytes(fields['VmHWM']) / 1024:.1f}", "MiB")
    figures.add("threads", fields["Threads"])

    mails = count(database, ESCALATION_MAILS)
    figures.add("escalation mails queued", f"{mails} (expected {len(built.due_order)})")
    figures.add("conversations escalated", f"{count(database, ESCALATED)} (expected {len(built.due_order)})")
    figures.add("outbox rows still pending", str(count(database, PENDING)))


def _measure_due(database: Path, daemon: Running, built: Built, figures: Figures) -> None:
    escalated_at, greetings = wait_for_escalations(database, daemon, len(built.due_order))
    if greetings:
        figures.add("SMTP greetings while escalating", str(len(greetings)))
        figures.add("their median / longest wait", f"{statistics.median(greetings) * 1000:.0f} / {max(greetings) * 1000:.0f}", "ms")
    if escalated_at is None:
        figures.add("start to all due escalated", f"not within {DUE_TIMEOUT:g} s")
        return
    figures.add("start to all due escalated", f"{escalated_at:.2f}", "s")
    order = escalation_order(database)
    figures.add("due escalated oldest first", "yes" if order == built.due_order else "no")


# -- the report -----------------------------------------------------------------


def _loop_name() -> str:
    try:
        return f"uvloop {version('uvloop')}"
    except Exception:  # noqa: BLE001 - any lookup failure means the daemon runs on asyncio
        return "asyncio (no uvloop)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Restart guardrail on many open conversations and measure it idle.")
    parser.add_argument("--conversations", type=int, default=100_000, help="open conversations with future deadlines (default 100000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window in which CPU time is measured (default 60)")
    parser.add_argument("--due", type=int, default=0,
                        help="conversations past their deadline at start, among the others (default 0)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the generated rows (default 1)")
    parser.add_argument("--warm", action="store_true",
                        help="restart with the database file still in the page cache (default: evict it first)")
    parser.add_argument("--no-http", action="store_true",
                        help="turn the daemon's HTTP listener off (default: on, on a free port, as in production)")
    parser.add_argument("--no-control", action="store_true", help="skip the control run on an empty database")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (database, config, logs)")
    return parser


def main() -> None:
    parser = build_parser()
    arguments = parser.parse_args()
    if arguments.conversations <= 0 or not 0 <= arguments.due <= arguments.conversations or arguments.seconds <= 0:
        parser.error("invalid arguments: use --conversations > 0, 0 <= --due <= --conversations and --seconds > 0")
    print(f"python {platform.python_version()} ({platform.python_implementation()}), SQLite {sqlite3.sqlite_version},"
          f" event loop {_loop_name()}, CPUs {os.cpu_count()}")
    print(f"{platform.platform()}; guardrail from {REPO} at {source_revision()}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="guardrail-deadlines-"))
    figures = Figures()
    # Both starts then find guardrail's modules compiled and cached alike.
    subprocess.run([sys.executable, "-c", "import guardrail.cli, guardrail.daemon"], check=True, timeout=STARTUP_TIMEOUT)
    try:
        if not arguments.no_control:
            control_run(folder / "control", figures, not arguments.no_http)
        loaded_run(arguments, folder / "loaded", figures)
    finally:
        if arguments.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print(figures.table())


if __name__ == "__main__":
    main()
