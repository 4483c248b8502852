"""Wiring and lifecycle: open the store, start the outbox worker and the SMTP server.

Shutdown on SIGTERM or SIGINT stops listening, lets transactions whose DATA
has started finish (up to a grace period), sends 421 to idle clients, stops the
worker and closes the database. SIGHUP reloads the rules.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shlex
import signal
import sqlite3
import ssl
import sys
from collections.abc import Awaitable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TypeVar

import structlog

from . import pidfile
from .clock import Clock, SystemClock
from .config import Config, tls_context
from .deadlines import reopened_clock
from .delivery import DeliveryWorker, Transport, write_in_thread
from .errors import ConfigErrors, StorageError
from .escalation import LevelTarget, Sender, current_level, next_escalation
from .http import HttpListener, build_app, serve_http
from .intake import REPLY_SHUTTING_DOWN, ConnectionTracker, GuardrailSMTP, IntakeHandler
from .maildir import unwritable_part
from .metrics import Metrics
from .offload import ParseProcesses
from .prepare import Site
from .retention import Retention
from .rules import RuleSet, load_rules
from .sla import EscalationScheduler, RejectionWatch, ZombieWatch
from .store import AttemptResult, Outcome, Store, StoreSettings
from .store_batch import DAEMON_RULES, ReschedulePlanner

log = structlog.get_logger("guardrail.daemon")

_Listener = TypeVar("_Listener")

SHUTDOWN_GRACE = timedelta(seconds=30)
# Seconds the maildir process may hold files without replying before it is
# killed and the daemon writes them itself. A batch is 32 files with an fsync each.
MAILDIR_TIMEOUT = 60.0


def _command_path() -> str:
    """Return how this guardrail was started, so pasted commands work without the virtualenv on PATH."""
    started_as = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if started_as is not None and started_as.name == "guardrail" and started_as.exists():
        return str(started_as.resolve())
    return "guardrail"


def answer_command(config_path: Path) -> str:
    """Return the shell command, less the reference, that marks a conversation answered.

    Escalation mail shows it for pasting into a shell, so each word is quoted:
    a config path with a space must not split into two arguments.
    """
    return shlex.join([_command_path(), "answer", "--config", str(config_path.resolve())])


async def _bound(keys: str, listen: str, port: int, binding: Awaitable[_Listener]) -> _Listener:
    """Await `binding`; re-raise an OSError as one that names the config `keys` and the address."""
    try:
        return await binding
    except OSError as error:
        reason = os.strerror(error.errno).lower() if error.errno else str(error)
        fix = "; stop the program that uses it or set another port" if error.errno == errno.EADDRINUSE else ""
        raise OSError(f"{keys}: cannot listen on {listen}:{port}: {reason}{fix}") from error


def load_ruleset(config: Config) -> RuleSet:
    """Load the rules folder named by `config`; raise ConfigErrors on any problem."""
    return load_rules(config.rules_dir, config.path.resolve().parent)


class Daemon:
    """One guardrail process: SMTP intake, the store and the outbox worker."""

    def __init__(self, config: Config, rules: RuleSet, *, clock: Clock | None = None, transport: Transport | None = None) -> None:
        self.config = config
        self.rules = rules
        self.clock = clock or SystemClock()
        self._transport = transport
        self.store: Store | None = None
        self.worker: DeliveryWorker | None = None
        self.scheduler: EscalationScheduler | None = None
        self.handler: IntakeHandler | None = None
        self.zombies: ZombieWatch | None = None
        self.rejections: RejectionWatch | None = None
        self.retention: Retention | None = None
        self.parsers: ParseProcesses | None = None
        self.maildir_process: ParseProcesses | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # The task that sets escalation times again after a rule reload, while it runs.
        self.rescheduling: asyncio.Task[None] | None = None
        self._moves: set[asyncio.Task[None]] = set()  # single-conversation reschedules still running
        self._server: asyncio.Server | None = None
        self._http: HttpListener | None = None
        self._tracker = ConnectionTracker(config.smtp.max_connections, config.smtp.max_connections_per_client)
        self._tls: ssl.SSLContext | None = None  # offered with STARTTLS; replaced on reload
        self.metrics = Metrics()
        self.metrics.set_rules(rules.digest)
        self._stopping = asyncio.Event()

    @property
    def port(self) -> int:
        """Return the TCP port the SMTP server listens on (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]

    @property
    def http_port(self) -> int:
        """Return the TCP port the HTTP listener listens on (useful with port 0)."""
        assert self._http is not None
        return self._http.port

    async def start(self) -> None:
        """Open the store, start the outbox worker, then start listening.

        On any failure, stops what did start and re-raises.
        """
        try:
            await self._start()
        except BaseException:
            # Close what did start (the store's thread keeps the process alive).
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        settings = StoreSettings(
            reference_prefix=config.reference_prefix,
            duplicate_window=config.duplicate_window,
            hostname=config.smtp.hostname,
            ack_limit=config.acknowledgements.max_per_sender,
            ack_window=config.acknowledgements.window,
        )
        self.store = await Store.open(config.database_path, settings, busy_timeout=config.busy_timeout)
        self.store.observe_commits(self.metrics.observe_commit)
        await self.store.record_fact(DAEMON_RULES, json.dumps({
            "directory": str(config.rules_dir.resolve()), "base": str(config.path.resolve().parent),
        }))
        self.store.follow_rules(self.rules.digest, partial(reopened_clock, self.rules))
        worker = self.worker = DeliveryWorker(
            self.store, config, self.clock, self._transport, metrics=self.metrics, write_files=self._write_files
        )
        sender = Sender(
            hostname=config.smtp.hostname,
            from_address=config.delivery.return_path,
            answer_command=answer_command(config.path),
        )
        scheduler = self.scheduler = EscalationScheduler(
            self.store, self.clock, lambda: self.rules, sender, worker.wake.set, metrics=self.metrics
        )
        self._tasks = [
            asyncio.create_task(worker.run(), name="guardrail-outbox"),
            asyncio.create_task(scheduler.run(), name="guardrail-escalations"),
        ]
        # The stored escalation times follow the rules loaded when each was
        # set, and the rule files may have changed while the daemon was down.
        # Set them again, as a reload does, unless they follow these rules.
        self._start_rescheduling(self.rules, unless_current=True)
        if config.zombie is not None:
            self.zombies = ZombieWatch(
                self.store, self.clock, lambda: self.rules, sender, config.zombie, worker.wake.set, metrics=self.metrics
            )
            self._tasks.append(asyncio.create_task(self.zombies.run(), name="guardrail-zombie-routes"))
        rejections = self.rejections = RejectionWatch(
            self.store, self.clock, lambda: self.rules, sender, worker.wake.set, metrics=self.metrics
        )
        self._tasks.append(asyncio.create_task(rejections.run(), name="guardrail-rejected-addresses"))
        if config.keep_bodies is not None:
            self.retention = Retention(self.store, self.clock, config.keep_bodies)
            self._tasks.append(asyncio.create_task(self.retention.run(), name="guardrail-retention"))

        def committed(outcome: Outcome) -> None:
            worker.wake.set()
            scheduler.due_at(outcome.next_escalation_at)
            if outcome.moved_from and outcome.conversation_id is not None:
                # The conversation's stored level and next escalation follow
                # its former team's chain, so set them again under its new team.
                self._reschedule_moved(outcome.conversation_id)

        def recorded(result: AttemptResult) -> None:
            # A permanent failure to reach the team escalates the conversation at once.
            if result.state == "failed" and result.kind == "deliver" and result.conversation_id is not None:
                scheduler.due_at(result.at)
            # A failed delivery sent again that arrived may resume its conversation's chain.
            if result.requeued and result.state == "done" and result.conversation_id is not None:
                scheduler.due_at(result.at)
            if result.rejected and result.kind == "deliver":
                rejections.rejected((address, result.team) for address, _ in result.rejected)

        worker.on_recorded = recorded

        if config.smtp.parse_processes:
            self.parsers = ParseProcesses(config.smtp.parse_processes, Site.from_config(config))
            self.parsers.start(self.rules)
            # Its fsyncs wait on the disk, so it is not one of the parse processes, where they would delay messages.
            self.maildir_process = ParseProcesses(1, Site.from_config(config), timeout=MAILDIR_TIMEOUT, role="maildir")
            self.maildir_process.start(self.rules)
        handler = self.handler = IntakeHandler(
            config, self.store, self.clock, lambda: self.rules, on_committed=committed, metrics=self.metrics,
            parsers=self.parsers,
        )
        loop = asyncio.get_running_loop()
        self._tls = tls_context(config.smtp)
        self._server = await _bound(
            "smtp.listen and smtp.port", config.smtp.listen, config.smtp.port, loop.create_server(
            lambda: GuardrailSMTP(
                handler,
                tracker=self._tracker,
                data_timeout=config.smtp.data_timeout.total_seconds(),
                hostname=config.smtp.hostname,
                ident="ESMTP guardrail",
                data_size_limit=config.smtp.max_message_size,
                enable_SMTPUTF8=True,
                # Read per connection, so a reload's certificate serves the next client.
                tls_context=self._tls,
                timeout=config.smtp.timeout.total_seconds(),
                loop=loop,
            ),
            host=config.smtp.listen,
            port=config.smtp.port,
        ))
        if config.http.enabled:
            self._http = await _bound(
                "http.listen and http.port", config.http.listen, config.http.port,
                serve_http(build_app(self), config.http.listen, config.http.port),
            )
            if config.http.token is None:
                log.warning("http_token_missing", detail="every HTTP endpoint but /healthz returns 401; set [http] token_env")
        log.info(
            "daemon_started", listen=config.smtp.listen, port=self.port, database=str(config.database_path),
            rules=self.rules.digest[:12], routes=len(self.rules.routes), teams=len(self.rules.teams),
        )
        self._log_unwritable_maildirs(self.rules)

    def _log_unwritable_maildirs(self, rules: RuleSet) -> None:
        """Log an error for each maildir that this user may not write: deliveries to it would only be retried."""
        folders = [
            (f"team {team.name}", Path(team.destination.maildir)) for team in rules.teams.values()
            if team.destination is not None and team.destination.kind == "maildir"
        ]
        if self.config.smarthost is None:
            folders.append(("outbound.maildir", self.config.outbound_maildir))
        for owner, folder in folders:
            part = unwritable_part(folder)
            if part is not None:
                log.error(
                    "maildir_not_writable", destination=owner, folder=str(folder), cannot_write=str(part),
                    detail="every delivery to it fails and is retried until [delivery] give_up_after;"
                    " give the daemon's user write access to it, or name another folder",
                )

    def is_idle(self) -> bool:
        """Return True when no delivery attempt is running (for tests and shutdown)."""
        return self.worker is None or not self.worker.in_flight

    async def _write_files(self, files: list[tuple[Path, str, bytes]]) -> list[bool | Exception]:
        """Write maildir files in the maildir process, or in a thread of the daemon while that process is not ready."""
        if self.maildir_process is not None:
            results = await self.maildir_process.write_maildirs(files)
            if results is not None:
                self.metrics.maildir_files.labels("maildir process").inc(len(files))
                return results
        self.metrics.maildir_files.labels("daemon").inc(len(files))
        return await write_in_thread(files)

    @property
    def clock_loops(self) -> int:
        """Return how many loops sleep on the clock: the outbox, the escalations and, when on, the zombie-route watch and retention."""
        return 2 + (self.zombies is not None) + (self.retention is not None)

    def reload(self) -> bool:
        """Load the TLS certificate and the rules again; keep the old ones on any error.

        Return whether the rules were reloaded.
        """
        self._reload_tls()
        try:
            rules = load_ruleset(self.config)
        except ConfigErrors as errors:
            for error in errors.errors:
                log.error("rules_reload_failed", error=str(error), kept=self.rules.digest[:12])
            self.metrics.reloads.labels("failed").inc()
            return False
        except Exception as error:
            # The signal handler is a task boundary, so an error that the loaders
            # do not turn into ConfigErrors still keeps the old rules and is counted.
            log.exception("rules_reload_failed", error=f"unexpected {type(error).__name__}: {error}", kept=self.rules.digest[:12])
            self.metrics.reloads.labels("failed").inc()
            return False
        if self.store is not None:
            self.store.follow_rules(rules.digest, partial(reopened_clock, rules))
        self.rules = rules
        if self.parsers is not None:
            self.parsers.set_rules(rules)
        self._start_rescheduling(rules)
        self.metrics.reloads.labels("succeeded").inc()
        self.metrics.set_rules(rules.digest)
        log.info("rules_reloaded", rules=rules.digest[:12], routes=len(rules.routes), teams=len(rules.teams))
        self._log_unwritable_maildirs(rules)
        return True

    def _start_rescheduling(self, rules: RuleSet, *, unless_current: bool = False) -> None:
        """Set again, in the background, when open conversations are next escalated under `rules`.

        The stored time of a conversation's next level was computed from the
        rules it opened under. Without this, a level moved earlier would fire
        at its old time, and a level added to a chain that had ended would
        never fire. A reschedule still running for older rules is cancelled.
        With `unless_current`, nothing changes when the last complete
        reschedule followed rules with the same digest.
        """
        if self.store is None:
            return
        if self.rescheduling is not None:
            self.rescheduling.cancel()
        task = self._reschedule(rules, unless_current=unless_current)
        self.rescheduling = asyncio.get_running_loop().create_task(task, name="guardrail-reschedule")

    def _reschedule_moved(self, conversation_id: int) -> None:
        """Set again, in the background, when a conversation that changed team is next escalated under the rules now loaded."""
        task = asyncio.get_running_loop().create_task(
            self._reschedule_one(self.rules, conversation_id), name="guardrail-reschedule-moved"
        )
        # Kept until done, so that the task is not collected while it runs.
        self._moves.add(task)
        task.add_done_callback(self._moves.discard)

    async def _reschedule_one(self, rules: RuleSet, conversation_id: int) -> None:
        assert self.store is not None
        try:
            due = await self.store.reschedule_conversation(_schedule_planner(rules), conversation_id)
        except (StorageError, sqlite3.Error) as error:
            log.error("escalations_not_rescheduled", error=str(error), conversation_id=conversation_id,
                      detail="the conversation keeps the escalation time of its former team until the next reload or start")
            return
        if self.scheduler is not None:
            self.scheduler.due_at(due)

    async def _reschedule(self, rules: RuleSet, *, unless_current: bool = False) -> None:
        assert self.store is not None
        planner = _schedule_planner(rules)
        try:
            if unless_current and await self.store.schedule_rules() == rules.digest:
                return
            changed, earliest = await self.store.reschedule_escalations(planner, digest=rules.digest)
        except (StorageError, sqlite3.Error) as error:
            log.error("escalations_not_rescheduled", error=str(error),
                      detail="the stored escalation times stay until the next reload or start")
            return
        if changed:
            log.info("escalations_rescheduled", conversations=changed, rules=rules.digest[:12])
        if self.scheduler is not None:
            self.scheduler.due_at(earliest)

    def _reload_tls(self) -> None:
        """Read the certificate and key files again, so a renewed certificate needs no restart."""
        smtp = self.config.smtp
        if smtp.tls_certificate is None:
            return
        try:
            self._tls = tls_context(smtp)
        except (OSError, ssl.SSLError) as error:
            log.error("tls_reload_failed", error=repr(error), certificate=str(smtp.tls_certificate),
                      detail="STARTTLS keeps the certificate loaded before")
            return
        log.info("tls_reloaded", certificate=str(smtp.tls_certificate))

    async def stop(self) -> None:
        """Stop accepting, let DATA in flight finish, stop the worker, close the store."""
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._server is not None:
            self._server.close()
            self._tracker.closing = True
            try:
                await asyncio.wait_for(self._tracker.idle.wait(), SHUTDOWN_GRACE.total_seconds())
            except TimeoutError:
                log.error("shutdown_grace_expired", transactions=self._tracker.busy)
            for connection in list(self._tracker.connections):
                if connection.transport is not None:
                    connection.transport.write(REPLY_SHUTTING_DOWN.encode() + b"\r\n")
                    connection.transport.close()
            await self._server.wait_closed()
            self._server = None
        if self.parsers is not None:
            await self.parsers.close()
            self.parsers = None
        if self.rescheduling is not None:
            self._tasks.append(self.rescheduling)
            self.rescheduling = None
        self._tasks.extend(self._moves)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.maildir_process is not None:
            # After the outbox worker, which may have been waiting for it.
            await self.maildir_process.close()
            self.maildir_process = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        log.info("daemon_stopped")

    async def serve(self, pid_file: Path | None = None) -> None:
        """Run until SIGTERM or SIGINT, reloading the rules on SIGHUP and keeping `pid_file` locked.

        Raises PidFileBusy, before starting anything, when another daemon has locked `pid_file`.
        """
        claimed = None
        if pid_file is not None:
            pid_file.parent.mkdir(parents=True, exist_ok=True)
            claimed = pidfile.claim(pid_file)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            if claimed is not None:
                pidfile.publish(claimed)
            try:
                await self._stopping.wait()
                log.info("shutdown_requested")
            finally:
                await self.stop()
        finally:
            if pid_file is not None and claimed is not None:
                pidfile.release(pid_file, claimed)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)


def _schedule_planner(rules: RuleSet) -> ReschedulePlanner:
    """Return the planner that sets a conversation's level and next escalation time under `rules`."""

    def planner(team_name: str, deadline: datetime, level: int, fired: list[LevelTarget] | None) -> tuple[int, datetime | None]:
        team = rules.teams.get(team_name)
        # Levels that fired are found in the new chain by their recipients.
        level = current_level(team, rules, level, fired)
        return level, next_escalation(team, rules, deadline, level)

    return planner
