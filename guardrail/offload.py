"""Parse processes: run `prepare_received` beside the event loop, on other CPUs.

Parsing, routing and the acknowledgement decision are pure functions of the
message, the rules and the time, and they are most of intake's CPU time. The
event loop is one thread, so on a machine with spare CPUs the daemon hands
that work to child processes (`python -m guardrail.offload_child`) and keeps
the SMTP sessions, the commit and the workers to itself.

The daemon prepares a message itself only before the first child is ready,
while the rules cannot be sent to the children, and after a child raised an
error on that message. Otherwise a message waits for a child, because a
message prepared in the event loop could stall every session (a route regex
with catastrophic backtracking, for instance), while a stalled child delays
only the messages sent to it. A child with pending requests that sends no
reply for `timeout` seconds is killed. The message it was processing gets a
temporary failure, and its other pending messages go to another child. A
dead child is started again after a delay that doubles each time.

The same children can write maildir files for the outbox worker
(`write_maildirs`). The daemon keeps one child for that alone, so that its
fsyncs delay no message, and so that the many system calls of a maildir
delivery run outside the daemon, where each would otherwise hand the
interpreter lock to another thread and back.

Frames on the pipes are a 4-byte big-endian length and a pickle. The daemon
sends ("site", Site), ("rules", RuleSet), ("prepare", id, Envelope, raw,
now) and ("maildirs", id, files). The child replies ("ready",) after each
rule set, (id, result) for each message, where result is what
`prepare_received` returned (a Submission is detached) or the text of an
exception, and (id, results) for each list of files, as `write_maildirs`
returns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import structlog

from .offload_child import FRAME_HEADER, encode_frame
from .plan import Submission
from .prepare import BareLineEnding, Envelope, Site, TooManyHops
from .rules import RuleSet

log = structlog.get_logger("guardrail.offload")

FIRST_RESTART_DELAY = 1.0  # seconds before a dead child is started again; doubles up to the maximum
MAX_RESTART_DELAY = 60.0
STOP_TIMEOUT = 5.0  # seconds a child gets to exit after its stdin closes
ATTEMPTS = 2  # children a message is sent to before it gets a temporary failure

# Results of a request whose child failed before replying. Compared by identity.
_STALLED = object()  # the child was killed while processing this message
_LOST = object()  # the child died before it reached this message
_CRASHED = object()  # the child died on its own while this message was the oldest it held


class ParseTimeout(Exception):
    """No parse process could prepare the message in time; the message gets a temporary failure."""


class ParseStalled(ParseTimeout):
    """The message itself stalled or killed the parse processes that worked on it."""


@dataclass(eq=False)
class _Child:
    process: asyncio.subprocess.Process
    ready: bool = False
    # Requests in the order they were sent, which is the order the child processes them.
    pending: dict[int, asyncio.Future[object]] = field(default_factory=dict)
    last_progress: float = 0.0  # loop time of the last reply, or of the first request sent to an idle child
    killed: bool = False
    watchdog: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        """Return True while the child can take requests: ready, not killed, and its stdin open."""
        stdin = self.process.stdin
        return self.ready and not self.killed and stdin is not None and not stdin.is_closing()

    def send(self, frame: bytes) -> bool:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing() or self.killed:
            # A child that died is noticed here before its stdout ends.
            self.ready = False
            return False
        stdin.write(frame)
        return True

    def fail_pending(self) -> None:
        """Resolve every request without a reply: _CRASHED for the one the child worked on, _LOST for the rest.

        A child reads its requests in order, so one that died on its own was
        working on the oldest. One that was killed as stalled has resolved
        that request as _STALLED already.
        """
        waiting = [future for future in self.pending.values() if not future.done()]
        for index, future in enumerate(waiting):
            future.set_result(_CRASHED if index == 0 and not self.killed else _LOST)
        self.pending.clear()


class ParseProcesses:
    """A fixed number of child processes that prepare messages or write maildir files, each restarted when it dies."""

    def __init__(
        self,
        count: int,
        site: Site,
        *,
        timeout: float = 10.0,
        ready_timeout: float = 30.0,
        command: list[str] | None = None,
        role: str = "parse",
    ) -> None:
        self.count = count
        self.role = role  # named in log lines: "parse", or "maildir" for the child that writes maildirs
        self.timeout = timeout  # seconds a child with pending requests may go without a reply
        self.ready_timeout = ready_timeout  # seconds a message waits for a child to be ready
        self._site_frame = encode_frame(("site", site))
        self._rules_frame: bytes | None = None
        self._command = command or [sys.executable, "-m", "guardrail.offload_child"]
        self._children: list[_Child] = []
        self._slots: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._closing = False
        self._ever_ready = False
        self._became_ready = asyncio.Event()

    @property
    def pids(self) -> list[int]:
        """Return the process ids of the running children."""
        return [child.process.pid for child in self._children]

    @property
    def ready(self) -> int:
        """Return how many children can take work now."""
        return 0 if self._rules_frame is None else sum(child.usable for child in self._children)

    def start(self, rules: RuleSet) -> None:
        """Start the children in the background; intake prepares messages itself until one is ready."""
        self.set_rules(rules)
        self._slots = [asyncio.create_task(self._run_slot(slot), name=f"guardrail-parse-{slot}") for slot in range(self.count)]

    def set_rules(self, rules: RuleSet) -> None:
        """Send `rules` to every child; messages sent after this call are prepared with them."""
        try:
            self._rules_frame = encode_frame(("rules", rules))
        except Exception as error:  # noqa: BLE001 - intake can always prepare in-process
            self._rules_frame = None
            log.warning("parse_processes_paused", reason=f"the rules cannot be sent to a child process: {error!r}")
            return
        for child in self._children:
            # The child reads frames in order, so every later request uses the new rules.
            child.send(self._rules_frame)

    async def prepare(
        self, envelope: Envelope, raw: bytes, now: datetime
    ) -> Submission | TooManyHops | BareLineEnding | None:
        """Return what a child prepared for this message, or None when intake must prepare it itself.

        Raises ParseStalled, a ParseTimeout, when the child working on this
        message stalled, or when every child it was sent to died while working
        on it. Raises a plain ParseTimeout when no child became ready within
        `ready_timeout`, or when children died while it waited behind others.
        """
        if self._rules_frame is None or not self._ever_ready:
            return None
        crashed = 0
        for _ in range(ATTEMPTS):
            child = await self._ready_child()
            request_id = next(self._ids)
            result = await self._ask(child, request_id, ("prepare", request_id, envelope, raw, now))
            if result is _STALLED:
                raise ParseStalled(f"a parse process made no progress for {self.timeout:g} s on this message")
            if result is _CRASHED:
                crashed += 1
                continue
            if result is _LOST:
                continue
            if isinstance(result, str):
                log.warning("parse_process_failed", error=result, detail="preparing the message in the daemon instead")
                return None
            if isinstance(result, Submission):
                return result.attached(raw)
            if isinstance(result, (TooManyHops, BareLineEnding)):
                return result
        if crashed == ATTEMPTS:
            raise ParseStalled(f"{ATTEMPTS} parse processes died while working on this message")
        # Children died while this message waited behind others: nothing shows that it caused it.
        raise ParseTimeout(f"{ATTEMPTS} parse processes died while this message waited")

    def _least_busy_child(self) -> _Child | None:
        """Return the usable child with the fewest pending requests, or None when no child is usable."""
        candidates = [child for child in self._children if child.usable]
        return min(candidates, key=lambda candidate: len(candidate.pending)) if candidates else None

    async def _ready_child(self) -> _Child:
        """Return the ready child with the fewest pending requests; wait up to `ready_timeout` for one."""
        deadline = time.monotonic() + self.ready_timeout
        while True:
            child = self._least_busy_child()
            if child is not None:
                return child
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                raise ParseTimeout(f"no parse process was ready within {self.ready_timeout:g} s")
            self._became_ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._became_ready.wait(), remaining)

    async def write_maildirs(self, files: list[tuple[Path, str, bytes]]) -> list[bool | Exception] | None:
        """Return what a child's `write_maildirs(files)` returned, or None when the caller must write them itself.

        None comes when no child is ready, or when the child died or stalled
        before it replied. The child may have written some of the files by
        then. Writing them again is safe: a file already in new/ with the
        same content is left as it is and reported as there already.
        """
        child = self._least_busy_child() if self._rules_frame is not None else None
        if child is None:
            return None
        request_id = next(self._ids)
        result = await self._ask(child, request_id, ("maildirs", request_id, files))
        if isinstance(result, str):
            log.warning("maildir_process_failed", error=result, detail="writing the files in the daemon instead")
        if not isinstance(result, list):
            return None
        return result

    async def _ask(self, child: _Child, request_id: int, request: tuple[object, ...]) -> object:
        """Send `request` to `child` and return its reply, _STALLED, _CRASHED or _LOST."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        if not child.pending:
            child.last_progress = loop.time()
        child.pending[request_id] = future
        try:
            if not child.send(encode_frame(request)):
                return _LOST
            if child.watchdog is None:
                child.watchdog = loop.call_at(child.last_progress + self.timeout, self._watch, child)
            # The reply is awaited directly, because a timeout wrapper adds
            # event-loop turns to every message. The watchdog bounds the wait.
            return await future
        finally:
            child.pending.pop(request_id, None)

    def _watch(self, child: _Child) -> None:
        """Kill `child` if it has pending requests and sent no reply for `timeout`; otherwise check again later."""
        child.watchdog = None
        if not child.pending or child.killed:
            return
        loop = asyncio.get_running_loop()
        # Waiting behind other messages is fine while the child keeps replying.
        if loop.time() - child.last_progress < self.timeout:
            child.watchdog = loop.call_at(child.last_progress + self.timeout, self._watch, child)
            return
        self._kill_stalled(child)

    def _kill_stalled(self, child: _Child) -> None:
        """Kill a stalled child; the message it was processing gets _STALLED."""
        if child.killed:
            return
        child.killed = True
        oldest = next(iter(child.pending.values()), None)
        if oldest is not None and not oldest.done():
            oldest.set_result(_STALLED)
        log.error("parse_timed_out", role=self.role, pid=child.process.pid, seconds=self.timeout, waiting=len(child.pending) - 1)
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()

    async def close(self) -> None:
        """Stop every child: close its stdin, wait for it to exit, kill it if it does not."""
        self._closing = True
        self._became_ready.set()
        for child in self._children:
            if child.process.stdin is not None:
                child.process.stdin.close()
        for child in list(self._children):
            await _reap(child.process)
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
                log.error("parse_process_not_started", role=self.role, slot=slot, error=repr(error), retry_in=delay)
            else:
                child = _Child(process)
                self._children.append(child)
                try:
                    if self._closing:
                        return  # close() began while the child started, so the finally block stops it
                    child.send(self._site_frame)
                    if self._rules_frame is not None:
                        child.send(self._rules_frame)
                    if await self._read_replies(child):
                        delay = FIRST_RESTART_DELAY
                finally:
                    self._children.remove(child)
                    if child.watchdog is not None:
                        child.watchdog.cancel()
                    child.fail_pending()
                    if process.stdin is not None:
                        process.stdin.close()
                    await _reap(process)
                if self._closing:
                    return
                log.error("parse_process_exited", role=self.role, slot=slot, pid=process.pid, returncode=process.returncode, restart_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)

    async def _read_replies(self, child: _Child) -> bool:
        """Resolve the child's requests until its stdout ends; return True if it was ever ready.

        Runs inside the slot's task, so cancelling the slot stops it.
        """
        stdout = child.process.stdout
        assert stdout is not None
        was_ready = False
        while True:
            try:
                (size,) = FRAME_HEADER.unpack(await stdout.readexactly(FRAME_HEADER.size))
                body = await stdout.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return was_ready
            frame = _decode_reply(body)
            if frame is None:
                # Nothing after an unreadable frame can be trusted to line up
                # with a request, so the child is treated as one that died.
                log.error("parse_reply_unreadable", role=self.role, pid=child.process.pid, size=size)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                return was_ready
            child.last_progress = asyncio.get_running_loop().time()
            if frame == ("ready",):
                child.ready = was_ready = self._ever_ready = True
                self._became_ready.set()
                continue
            request_id, result = frame
            future = child.pending.get(request_id)
            if future is not None and not future.done():
                future.set_result(result)


def _decode_reply(body: bytes) -> tuple[object, ...] | None:
    """Return a child's reply frame: ("ready",) or (request id, result); None when `body` is neither."""
    try:
        frame = pickle.loads(body)
    except Exception:  # noqa: BLE001 - unpickling bytes that are not a pickle raises many types
        return None
    if not isinstance(frame, tuple):
        return None
    if frame == ("ready",) or (len(frame) == 2 and type(frame[0]) is int):
        return frame
    return None


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Wait for `process` to exit after its stdin closed; kill it after STOP_TIMEOUT."""
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
