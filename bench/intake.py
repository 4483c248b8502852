"""Intake throughput: guardrail against a bare aiosmtpd sink, same load generator, same run.

Each server runs in its own process on 127.0.0.1: the stock-asyncio sink
(bench/_sink.py), the same sink on uvloop, and guardrail. Guardrail gets a
temporary config and a copy of the repository's example rules, and its outbox
worker delivers to maildirs as in production. For each message size and
concurrency C, C workers each keep one SMTP connection and send MAIL, RCPT
and DATA in a loop. After a warm-up, the 250 replies to DATA that arrive
during the measuring window are counted.

Run from the repository root, in a virtualenv with guardrail installed:

    python bench/intake.py [--seconds 10] [--sizes 4096,65536] [--concurrency 1,10,50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import format_datetime
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from _revision import source_revision

REPO = Path(__file__).resolve().parent.parent
SINK_SCRIPT = Path(__file__).resolve().parent / "_sink.py"

RECIPIENT = "support@example.com"
LINE_LENGTH = 76  # RFC 2045 section 6.7: encoded lines are at most 76 characters
STARTUP_TIMEOUT = 20.0  # seconds a server gets to accept its first connection
REPLY_TIMEOUT = 30.0  # seconds one SMTP transaction may take before it counts as an error
STOP_TIMEOUT = 40.0  # guardrail lets DATA in flight finish for up to 30 s on SIGTERM
MAX_ERROR_SAMPLES = 5
MAX_RECONNECTS = 20  # per worker and cell

WORDS = (
    "account", "order", "shipping", "password", "login", "screen", "error", "question", "please", "thanks",
    "yesterday", "customer", "number", "update", "settings", "browser", "version", "help", "again", "team",
    "the", "a", "my", "we", "it", "is", "not", "when", "after", "with", "from", "to", "and", "but", "for",
)

GUARDRAIL_CONFIG = """\
[smtp]
listen = "127.0.0.1"
port = {port}
hostname = "mx.bench"
inboxes = ["support@example.com", "billing@example.com"]
max_message_size = "16MiB"
max_connections = 200

[postmaster]
owner = "ops@example.org"

[database]
path = "guardrail.db"

[outbound]
maildir = "outbound"

[rules]
directory = "rules"

[log]
format = "json"
level = "warning"

# The benchmark sends no HTTP requests, and the default fixed port could be
# taken by another guardrail on the same machine.
[http]
enabled = false
"""

# -- messages -------------------------------------------------------------------


class MessageFactory:
    """Builds messages of about `size` bytes, each with a unique Message-ID."""

    def __init__(self, size: int, cell_id: str) -> None:
        self._cell_id = cell_id
        self._date = format_datetime(datetime.now(timezone.utc))
        # Headers of a typical message: two-digit worker, five-digit sequence.
        header_size = len(self._headers(10, 10_000, 0))
        self._body = _padding_body(max(size - header_size, LINE_LENGTH + 2))

    def _headers(self, worker: int, sequence: int, order: int) -> bytes:
        return (
            f"Received: from laptop.example.net (laptop.example.net [192.0.2.10])\r\n"
            f"\tby smtp.example.net with ESMTPSA id w{worker}s{sequence}; {self._date}\r\n"
            f"From: Casey Customer <{self._sender(worker, sequence)}>\r\n"
            f"To: Support <{RECIPIENT}>\r\n"
            f"Subject: Question about my account settings (order {order:06d})\r\n"
            f"Date: {self._date}\r\n"
            f"Message-ID: <{self._cell_id}.{worker}.{sequence}@laptop.example.net>\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 7bit\r\n"
            f"User-Agent: bench-loadgen/1.0\r\n"
            f"\r\n"
        ).encode()

    def build(self, worker: int, sequence: int) -> tuple[str, bytes]:
        """Return the sender and one message ending with CRLF.

        No line starts with a dot, so the message needs no dot-stuffing.
        """
        message = self._headers(worker, sequence, (worker * 7919 + sequence) % 1_000_000) + self._body
        return self._sender(worker, sequence), message

    def _sender(self, worker: int, sequence: int) -> str:
        # A shared inbox hears from many customers: one sender per message means
        # guardrail acknowledges each one instead of rate-limiting a single sender.
        return f"casey.{self._cell_id}.{worker}.{sequence}@example.net"


def _padding_body(size: int) -> bytes:
    """Return whole 76-character lines of words, CRLF-terminated, at most `size` bytes (one line at least)."""
    generator = random.Random(size)
    lines = []
    for _ in range(max(1, size // (LINE_LENGTH + 2))):
        line = ""
        while len(line) < LINE_LENGTH:
            line += generator.choice(WORDS) + " "
        lines.append(line[:LINE_LENGTH].encode() + b"\r\n")
    return b"".join(lines)


# -- load generator ---------------------------------------------------------------


@dataclass
class Tally:
    """Counters shared by the workers of one cell."""

    measuring: bool = False
    stopping: bool = False
    accepted_in_window: int = 0
    accepted_total: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text)


class SmtpError(Exception):
    """A reply other than the one expected at this step of the transaction."""


class RawClient:
    """SMTP over plain asyncio streams: one command, one reply, no extras."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._port)
        await self._expect(220)
        self._writer.write(b"EHLO loadgen.bench\r\n")
        await self._expect(250)

    async def send(self, sender: str, message: bytes) -> None:
        assert self._writer is not None
        self._writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        await self._expect(250)
        self._writer.write(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
        await self._expect(250)
        self._writer.write(b"DATA\r\n")
        await self._expect(354)
        # One write: the message and the end-of-data line leave in as few segments as possible.
        self._writer.write(message + b".\r\n")
        await self._expect(250)

    async def reset(self) -> None:
        assert self._writer is not None
        self._writer.write(b"RSET\r\n")
        await self._expect(250)

    async def close(self) -> None:
        if self._writer is None:
            return
        with contextlib.suppress(Exception):
            self._writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self._expect(221), 5)
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 5)
        self._writer = None

    async def _expect(self, code: int) -> None:
        assert self._reader is not None
        # A multi-line reply has a dash after the code on every line but the last.
        for _ in range(100):
            line = await self._reader.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            if line[3:4] != b"-":
                break
        if int(line[:3]) != code:
            raise SmtpError(line.decode("utf-8", "replace").strip())


class AiosmtplibClient:
    """The same transaction through aiosmtplib, to compare the generator's own cost."""

    def __init__(self, port: int) -> None:
        import aiosmtplib

        self._library = aiosmtplib
        self._client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, local_hostname="loadgen.bench", start_tls=False, timeout=REPLY_TIMEOUT,
        )

    async def connect(self) -> None:
        try:
            await self._client.connect()
            await self._client.ehlo()
        except self._library.SMTPException as error:
            raise ConnectionError(f"aiosmtplib: {error}") from error

    async def send(self, sender: str, message: bytes) -> None:
        try:
            await self._client.sendmail(sender, [RECIPIENT], message)
        except self._library.SMTPResponseException as error:
            raise SmtpError(f"{error.code} {error.message}") from error
        except self._library.SMTPRecipientsRefused as error:
            raise SmtpError(str(error)) from error
        except self._library.SMTPException as error:
            raise ConnectionError(f"aiosmtplib: {error}") from error

    async def reset(self) -> None:
        try:
            await self._client.rset()
        except self._library.SMTPException as error:
            raise ConnectionError(f"aiosmtplib: {error}") from error

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.quit(), 5)
        self._client.close()


CLIENTS: dict[str, Callable[[int], RawClient | AiosmtplibClient]] = {"raw": RawClient, "aiosmtplib": AiosmtplibClient}


async def _worker(number: int, port: int, client_kind: str, messages: MessageFactory, tally: Tally) -> None:
    sequence = 0
    reconnects = 0
    while not tally.stopping and reconnects <= MAX_RECONNECTS:
        client = CLIENTS[client_kind](port)
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                await client.connect()
            while not tally.stopping:
                sequence += 1
                sender, message = messages.build(number, sequence)
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(REPLY_TIMEOUT):
                        await client.send(sender, message)
                except SmtpError as error:
                    tally.error(str(error))
                    async with asyncio.timeout(REPLY_TIMEOUT):
                        await client.reset()
                    continue
                tally.accepted_total += 1
                if tally.measuring:
                    tally.accepted_in_window += 1
                    tally.latencies.append(time.perf_counter() - started)
        except (OSError, TimeoutError, SmtpError, ValueError) as error:
            tally.error(f"connection failed: {error!r}")
            reconnects += 1
            await asyncio.sleep(0.1)
        finally:
            await client.close()


@dataclass(frozen=True)
class CellResult:
    rate: float
    tally: Tally
    generator_cpu: float  # share of one core used by this process during the window
    server_cpu: float  # share of one core used by the server process and its children during the window
    other_cpu: float  # share of one core used by everything else on the machine during the window


async def run_cell(
    port: int, server_pid: int, size: int, concurrency: int, seconds: float, warmup: float, client_kind: str, cell_id: str,
) -> CellResult:
    """Load the server on `port` with `concurrency` workers and count the 250 replies after the warm-up."""
    messages = MessageFactory(size, cell_id)
    tally = Tally()
    workers = [asyncio.create_task(_worker(n, port, client_kind, messages, tally)) for n in range(concurrency)]
    await asyncio.sleep(warmup)

    tally.measuring = True
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    server_start, machine_start = _process_cpu(server_pid), _machine_cpu()
    await asyncio.sleep(seconds)
    tally.measuring = False
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    server, machine = _process_cpu(server_pid) - server_start, _machine_cpu() - machine_start

    tally.stopping = True
    _, pending = await asyncio.wait(workers, timeout=REPLY_TIMEOUT + 10)
    for task in pending:
        task.cancel()
    for outcome in await asyncio.gather(*workers, return_exceptions=True):
        if isinstance(outcome, Exception):
            tally.error(f"worker failed: {outcome!r}")
    other = max(0.0, machine - cpu - server)
    return CellResult(tally.accepted_in_window / wall, tally, cpu / wall, server / wall, other / wall)


def _process_cpu(pid: int) -> float:
    """Return the user plus system CPU seconds used so far by process `pid` and its children, all threads included."""
    total = 0.0
    for member in _process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
        except FileNotFoundError:
            continue  # The process exited between the listing and the read.
        # Fields 14 and 15 of proc(5), counted after the parenthesised command name.
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _process_tree(pid: int) -> list[int]:
    """Return `pid` and its living descendants (guardrail's parse processes), from /proc."""
    found, index = [pid], 0
    while index < len(found):
        for task in Path(f"/proc/{found[index]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                found += [int(child) for child in task.read_text().split()]
        index += 1
    return found


def _machine_cpu() -> float:
    """Return the CPU seconds all processes have used so far, from the first line of /proc/stat."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()
    # user, nice, system, idle, iowait, irq, softirq, steal: everything but idle and iowait is busy.
    busy = sum(int(value) for index, value in enumerate(fields[1:9]) if index not in (3, 4))
    return busy / os.sysconf("SC_CLK_TCK")


# -- servers ------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    database: Path | None = None
    folder: Path | None = None  # where guardrail's maildirs are
    accepted_total: int = 0
    max_backlog: int = 0  # outbox rows pending at the end of a measuring window, largest over all cells


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_sink(loop_name: str, folder: Path) -> Server:
    port = _free_port()
    log_path = folder / f"sink-{loop_name}.log"
    command = [sys.executable, str(SINK_SCRIPT), "--port", str(port), "--loop", loop_name]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    name = "sink" if loop_name == "asyncio" else f"sink-{loop_name}"
    return Server(name, process, port, log_path)


def start_guardrail(folder: Path, rules: Path, profile: Path | None) -> Server:
    port = _free_port()
    # Relative maildir paths in the rules resolve against the config's folder,
    # so every team's mail lands inside the temporary folder.
    shutil.copytree(rules, folder / "rules")
    config = folder / "guardrail.toml"
    config.write_text(GUARDRAIL_CONFIG.format(port=port))
    log_path = folder / "guardrail.log"
    profiler = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else [sys.executable]
    command = [*profiler, "-m", "guardrail", "run", "--config", str(config)]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log_path, "wb") as log:
        # The working tree comes first on sys.path, so the checkout is measured
        # even when an older guardrail is installed.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=environment)
    return Server("guardrail", process, port, log_path, folder / "guardrail.db", folder)


async def wait_until_accepting(server: Server) -> None:
    """Wait until `server` sends its 220 greeting.

    Raises RuntimeError if the server exits or does not greet within STARTUP_TIMEOUT.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {server.process.returncode}:\n{_tail(server.log_path)}")
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                greeting = await reader.readline()
                writer.write(b"QUIT\r\n")
                await reader.readline()
                writer.close()
            if greeting.startswith(b"220"):
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name} did not accept connections within {STARTUP_TIMEOUT:.0f} s:\n{_tail(server.log_path)}")


def stop(server: Server) -> None:
    """Send SIGTERM to the server's PID and wait for it to exit, then SIGKILL it if it is still running."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def outbox_pending(database: Path) -> int:
    """Return how many outbox rows are still pending, read through a separate SQLite connection."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
        return db.execute("SELECT COUNT(*) FROM outbox WHERE state = 'pending'").fetchone()[0]


def stored_counts(database: Path) -> tuple[int, dict[str, int]]:
    """Return the number of stored messages and the outbox row count by state."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
        messages = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        states = dict(db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
    return messages, states


async def wait_for_drain(database: Path, timeout: float) -> tuple[int, float]:
    """Poll the outbox until nothing is pending or `timeout` passes, and return the pending count and the time waited."""
    started = time.monotonic()
    while True:
        pending = await asyncio.to_thread(outbox_pending, database)
        waited = time.monotonic() - started
        if pending == 0 or waited >= timeout:
            return pending, waited
        await asyncio.sleep(0.2)


# -- report ---------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def _print_detail(server: Server, size: int, concurrency: int, result: CellResult, backlog: str) -> None:
    tally = result.tally
    print(
        f"  {server.name:<12} {_size_label(size):>7} c={concurrency:<3} {result.rate:8.1f} msg/s"
        f"  p50 {_percentile(tally.latencies, 0.5) * 1000:6.1f} ms  p99 {_percentile(tally.latencies, 0.99) * 1000:6.1f} ms"
        f"  CPU server {result.server_cpu:4.0%} generator {result.generator_cpu:4.0%} other {result.other_cpu:4.0%}"
        f"  server CPU per message {_cpu_per_message(result.server_cpu, result.rate)}"
        f"  errors {tally.errors}{backlog}",
        flush=True,
    )
    for sample in tally.error_samples:
        print(f"      error: {sample}")


def _cpu_per_message(share: float, rate: float) -> str:
    """Return the CPU time a server spent per accepted message, from its share of one core and its rate."""
    return f"{share / rate * 1e6:5.0f} us" if rate else "    - us"


def _print_table(cells: dict[tuple[int, int, str], list[CellResult]], sizes: list[int], concurrencies: list[int]) -> None:
    """Print the median rate of each cell, the ratio guardrail/sink, and the busiest other load seen."""
    print()
    print(f"{'size':>7} {'conc':>5} {'sink msg/s':>11} {'sink-uvloop msg/s':>18} {'guardrail msg/s':>16} {'guardrail/sink':>15}"
          f" {'other CPU':>10}")
    for size in sizes:
        for concurrency in concurrencies:
            rates = {name: _median_rate(cells.get((size, concurrency, name), [])) for name in ("sink", "sink-uvloop", "guardrail")}
            ratio = rates["guardrail"] / rates["sink"] if rates["sink"] else float("nan")
            others = [result.other_cpu for (s, c, _), results in cells.items() if (s, c) == (size, concurrency) for result in results]
            print(
                f"{_size_label(size):>7} {concurrency:>5} {rates['sink']:>11.1f} {rates['sink-uvloop']:>18.1f}"
                f" {rates['guardrail']:>16.1f} {ratio:>14.2f}x {max(others, default=0):>10.0%}"
            )
    print("other CPU: the most CPU that processes outside this benchmark used during any window of the row, as a share of one core.")


def _median_rate(results: list[CellResult]) -> float:
    if not results:
        return float("nan")
    return statistics.median(result.rate for result in results)


# -- main -------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare guardrail's intake throughput with a bare aiosmtpd sink on 127.0.0.1.")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring window per cell, in seconds (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up before each window, in seconds (default 1)")
    parser.add_argument("--sizes", type=_int_list, default=[4096, 65536], help="message sizes in bytes (default 4096,65536)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 10, 50], help="connections per cell (default 1,10,50)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each cell this many times and report the median (default 1)")
    parser.add_argument("--servers", default="sink,sink-uvloop,guardrail",
                        help="comma-separated servers to measure (default sink,sink-uvloop,guardrail)")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="raw",
                        help="load generator's SMTP client (default raw: asyncio streams, cheaper than aiosmtplib)")
    parser.add_argument("--drain-timeout", type=float, default=15.0,
                        help="seconds to wait after each guardrail cell for the outbox to empty (default 15)")
    parser.add_argument("--rules", type=Path, default=REPO / "rules", metavar="DIR",
                        help="rules folder guardrail routes with (default: the repository's example rules)")
    parser.add_argument("--cprofile", type=Path, metavar="FILE", help="run guardrail under cProfile and write its stats to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (database, maildir, logs)")
    return parser


async def run(arguments: argparse.Namespace, folder: Path) -> None:
    names = [name.strip() for name in arguments.servers.split(",") if name.strip()]
    unknown = set(names) - {"sink", "sink-uvloop", "guardrail"}
    if unknown:
        raise SystemExit(f"error: unknown server(s) {', '.join(sorted(unknown))}; use sink, sink-uvloop, guardrail")
    starters = {
        "sink": lambda: start_sink("asyncio", folder),
        "sink-uvloop": lambda: start_sink("uvloop", folder),
        "guardrail": lambda: start_guardrail(folder, arguments.rules, arguments.cprofile),
    }
    servers: list[Server] = []
    try:
        for name in names:
            servers.append(starters[name]())
        for server in servers:
            await wait_until_accepting(server)
        await _measure(arguments, servers)
    finally:
        for server in servers:
            stop(server)
    _print_delivery(servers)


async def _measure(arguments: argparse.Namespace, servers: list[Server]) -> None:
    run_id = f"{int(time.time())}{os.getpid()}"
    cell_number = 0
    cells: dict[tuple[int, int, str], list[CellResult]] = {}
    print(f"per cell: {arguments.warmup:g} s warm-up, {arguments.seconds:g} s measured, {arguments.repeat} time(s);"
          f" client {arguments.client}", flush=True)
    for size in arguments.sizes:
        for concurrency in arguments.concurrency:
            # Servers take turns within a cell, so a change in background load
            # touches all of them rather than one.
            for _ in range(arguments.repeat):
                for server in servers:
                    # Message-IDs and senders are unique across cells too, so no
                    # message is a duplicate of, or a reply to, an earlier one.
                    cell_number += 1
                    result = await run_cell(
                        server.port, server.process.pid, size, concurrency, arguments.seconds, arguments.warmup,
                        arguments.client, f"{run_id}c{cell_number}",
                    )
                    server.accepted_total += result.tally.accepted_total
                    cells.setdefault((size, concurrency, server.name), []).append(result)
                    backlog = await _drain(server, arguments.drain_timeout)
                    _print_detail(server, size, concurrency, result, backlog)
    _print_table(cells, arguments.sizes, arguments.concurrency)


async def _drain(server: Server, timeout: float) -> str:
    """Wait for guardrail's outbox to empty, and return the text to print about the backlog."""
    if server.database is None:
        return ""
    # A backlog left behind would steal CPU from the next cell, whichever
    # server that cell measures.
    at_end = await asyncio.to_thread(outbox_pending, server.database)
    server.max_backlog = max(server.max_backlog, at_end)
    left, waited = await wait_for_drain(server.database, timeout)
    note = "; their delivery shares the CPU with the next cells (see other CPU)" if left else ""
    return f"  outbox pending at end {at_end}, {left} after {waited:.1f} s{note}"


def _print_delivery(servers: list[Server]) -> None:
    for server in servers:
        if server.database is None or server.folder is None:
            continue
        messages, states = stored_counts(server.database)
        files = sum(len(os.listdir(new)) for new in server.folder.rglob("new") if new.is_dir())
        during = "yes" if server.max_backlog == 0 else f"no (largest outbox backlog at the end of a window: {server.max_backlog})"
        after = "yes" if states.get("pending", 0) == 0 and states.get("failed", 0) == 0 else "no"
        print(f"\n{server.name} delivery kept up during the load: {during}")
        print(
            f"{server.name} outbox empty after the run: {after} (generator got {server.accepted_total} x 250, "
            f"messages stored {messages}, outbox rows by state {states}, files in maildirs {files})"
        )
        warnings = [line for line in server.log_path.read_text(errors="replace").splitlines() if line.strip()]
        if warnings:
            print(f"{server.name} logged {len(warnings)} line(s) at warning or above; last: {warnings[-1][:300]}")


def main() -> None:
    parser = build_parser()
    arguments = parser.parse_args()
    if arguments.seconds <= 0 or arguments.warmup < 0 or arguments.repeat < 1 or arguments.drain_timeout < 0:
        parser.error("--seconds and --repeat must be positive; --warmup and --drain-timeout must not be negative")
    if not arguments.rules.is_dir():
        parser.error(f"--rules {arguments.rules} is not a folder; pass the folder of *.toml rule files")
    print(f"python {platform.python_version()} ({platform.python_implementation()}), aiosmtpd {version('aiosmtpd')}, "
          f"aiosmtplib {version('aiosmtplib')}, uvloop {version('uvloop')}, CPUs {os.cpu_count()}")
    print(f"{platform.platform()}; guardrail from {REPO} at {source_revision()}")
    folder = Path(tempfile.mkdtemp(prefix="guardrail-bench-"))
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(run(arguments, folder))
        else:
            # The generator runs on uvloop so that its own overhead stays low;
            # it is the same for every server measured.
            uvloop.run(run(arguments, folder))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        if arguments.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    if arguments.cprofile:
        print(f"cProfile stats of guardrail written to {arguments.cprofile}")


if __name__ == "__main__":
    main()
