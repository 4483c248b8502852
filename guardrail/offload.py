"""Parse processes: run `prepare_message` beside the event loop, on other CPUs.

Parsing, routing and the acknowledgement decision are pure functions of the
message, the rules and the time, and they are most of intake's CPU time. The
event loop is one thread, so on a machine with spare CPUs the daemon hands
that work to child processes (`python -m guardrail.offload_child`) and keeps
the SMTP sessions, the commit and the workers to itself.

Nothing depends on a child being there. Intake prepares a message itself,
with the same function and the same result, whenever no child can take it:
before a child has its rules, after one died, or when the rules cannot be
sent. A dead child is started again after a delay that doubles each time. A child that takes longer than `timeout` on one message
is killed and the message gets a temporary failure, so a pathological message
cannot stall the daemon.

Frames on the pipes are a 4-byte big-endian length and a pickle. The daemon
sends ("site", Site), ("rules", RuleSet) and ("prepare", id, Envelope, raw,
now); the child answers ("ready",) after each rule set and (id, result) for
each message, where result is a detached Submission, a TooManyHops or the
text of an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import sys
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from .offload_child import FRAME_HEADER
from .plan import Submission
from .prepare import Envelope, Site, TooManyHops
from .rules import RuleSet

log = structlog.get_logger("guardrail.offload")

FIRST_RESTART_DELAY = 1.0  # seconds before a dead child is started again; doubles up to the maximum
MAX_RESTART_DELAY = 60.0
STOP_TIMEOUT = 5.0  # seconds a child gets to exit after its stdin closes


class ParseTimeout(Exception):
    """A parse process took too long on one message; the message gets a temporary failure."""


def _frame(value: object) -> bytes:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(body)) + body


@dataclass(eq=False)
class _Child:
    process: asyncio.subprocess.Process
    ready: bool = False
    pending: dict[int, asyncio.Future[object]] = field(default_factory=dict)

    def send(self, frame: bytes) -> bool:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing():
            return False
        stdin.write(frame)
        return True

    def fail_pending(self) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_result(None)
        self.pending.clear()


class ParseProcesses:
    """A fixed number of parse processes, each restarted when it dies."""

    def __init__(self, count: int, site: Site, *, timeout: float = 30.0, command: list[str] | None = None) -> None:
        self.count = count
        self.timeout = timeout
        self._site_frame = _frame(("site", site))
        self._rules_frame: bytes | None = None
        self._command = command or [sys.executable, "-m", "guardrail.offload_child"]
        self._children: list[_Child] = []
        self._slots: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._closing = False

    @property
    def pids(self) -> list[int]:
        """Return the process ids of the running children."""
        return [child.process.pid for child in self._children]

    @property
    def ready(self) -> int:
        """Return how many children can take work now."""
        return 0 if self._rules_frame is None else sum(child.ready for child in self._children)

    def start(self, rules: RuleSet) -> None:
        """Start the children in the background; intake prepares messages itself until one is ready."""
        self.set_rules(rules)
        self._slots = [asyncio.create_task(self._run_slot(slot), name=f"guardrail-parse-{slot}") for slot in range(self.count)]

    def set_rules(self, rules: RuleSet) -> None:
        """Send `rules` to every child; messages sent after this call are prepared with them."""
        try:
            self._rules_frame = _frame(("rules", rules))
        except Exception as error:  # noqa: BLE001 - intake can always prepare in-process
            self._rules_frame = None
            log.warning("parse_processes_paused", reason=f"the rules cannot be sent to a child process: {error!r}")
            return
        for child in self._children:
            # Frames are read in order, so no later request sees the old rules.
            child.send(self._rules_frame)

    async def prepare(self, envelope: Envelope, raw: bytes, now: datetime) -> Submission | TooManyHops | None:
        """Return what a child prepared for this message, or None when intake must prepare it itself.

        Raises ParseTimeout when the child took longer than `timeout`.
        """
        if self._rules_frame is None:
            return None
        candidates = [child for child in self._children if child.ready]
        if not candidates:
            return None
        child = min(candidates, key=lambda candidate: len(candidate.pending))
        request_id = next(self._ids)
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        child.pending[request_id] = future
        try:
            if not child.send(_frame(("prepare", request_id, envelope, raw, now))):
                return None
            try:
                result = await asyncio.wait_for(asyncio.shield(future), self.timeout)
            except TimeoutError:
                log.error("parse_timed_out", pid=child.process.pid, seconds=self.timeout)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                raise ParseTimeout(f"a parse process took more than {self.timeout:g} s") from None
        finally:
            child.pending.pop(request_id, None)
        if isinstance(result, str):
            log.warning("parse_process_failed", error=result, detail="preparing the message in the daemon instead")
            return None
        if isinstance(result, Submission):
            return result.attached(raw)
        return result if isinstance(result, TooManyHops) else None

    async def close(self) -> None:
        """Stop every child: close its stdin, wait for it to exit, kill it if it does not."""
        self._closing = True
        for child in self._children:
            if child.process.stdin is not None:
                child.process.stdin.close()
        for child in list(self._children):
            try:
                await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        self._slots = []

    async def _run_slot(self, slot: int) -> None:
        delay = FIRST_RESTART_DELAY
        while not self._closing:
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )
            except OSError as error:
                log.error("parse_process_not_started", slot=slot, error=repr(error), retry_in=delay)
            else:
                child = _Child(process)
                child.send(self._site_frame)
                if self._rules_frame is not None:
                    child.send(self._rules_frame)
                self._children.append(child)
                try:
                    if await self._read_replies(child):
                        delay = FIRST_RESTART_DELAY
                finally:
                    self._children.remove(child)
                    child.fail_pending()
                    if process.returncode is None and self._closing:
                        await process.wait()
                if self._closing:
                    return
                returncode = await process.wait()
                log.error("parse_process_exited", slot=slot, pid=process.pid, returncode=returncode, restart_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)

    async def _read_replies(self, child: _Child) -> bool:
        """Resolve the child's requests until its stdout ends; return True if it was ever ready."""
        stdout = child.process.stdout
        assert stdout is not None
        was_ready = False
        while True:
            try:
                (size,) = FRAME_HEADER.unpack(await stdout.readexactly(FRAME_HEADER.size))
                frame = pickle.loads(await stdout.readexactly(size))
            except (asyncio.IncompleteReadError, ConnectionError):
                return was_ready
            if frame == ("ready",):
                child.ready = was_ready = True
                continue
            request_id, result = frame
            future = child.pending.get(request_id)
            if future is not None and not future.done():
                future.set_result(result)
