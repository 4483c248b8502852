"""The write transaction: a list of items written and committed together on a sqlite3 connection.

The store's writer thread owns one Committer. Row ids are read at the start
of every transaction rather than kept in memory, because another program
that writes the same database may have added rows since the last commit.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from .clock import format_instant
from .deadlines import ClockPlanner
from .errors import StorageError
from .escalation import DueConversation, EscalationPlan
from .plan import Submission
from .store_batch import (
    AttemptResult,
    BatchWriter,
    ManualAnswer,
    ReschedulePlanner,
    StoreSettings,
)

log = structlog.get_logger("guardrail.store")

# At most this many due conversations are escalated in one transaction.
# Planning builds mail inside the write transaction, so batches stay small to
# keep intake's commits short during a backlog.
ESCALATION_BATCH = 20

# Bytes the WAL file is cut back to after a checkpoint (PRAGMA journal_size_limit).
WAL_SIZE_LIMIT = 16 * 1024**2

_MAX_IDS = (
    "SELECT (SELECT COALESCE(MAX(id), 0) FROM messages), (SELECT COALESCE(MAX(id), 0) FROM conversations),"
    " (SELECT COALESCE(MAX(id), 0) FROM outbox)"
)


@dataclass(frozen=True)
class EscalationRun:
    """A request to escalate every conversation due at `now`."""

    now: datetime
    planner: Callable[[DueConversation], EscalationPlan]


@dataclass(frozen=True)
class ZombieRun:
    """A request to raise alarms for abandoned routes at `now`."""

    now: datetime
    recent: int
    period: timedelta
    routes: list[str]
    planner: Callable[..., list[Any]]


@dataclass(frozen=True)
class RetentionRun:
    """A request to empty the bytes of up to `limit` messages and outbox rows created before `cutoff`."""

    cutoff: datetime
    limit: int


@dataclass(frozen=True)
class RescheduleRun:
    """A request to set again when up to `limit` open conversations after row `after` are next escalated.

    `planner(team, deadline, level)` returns that time under the rules now
    loaded, or None when the conversation's chain has ended.
    """

    planner: ReschedulePlanner
    after: int
    limit: int
    digest: str = ""  # the rules' digest, recorded when the last conversation is done if the store still follows them
    only: int | None = None  # visit this conversation alone, instead of those after `after`


@dataclass(frozen=True)
class RejectionRun:
    """A request to raise alarms for addresses that rejected mail within `period` before `now`."""

    now: datetime
    period: timedelta
    planner: Callable[..., list[Any]]


WriteItem = Submission | AttemptResult | ManualAnswer | EscalationRun | ZombieRun | RejectionRun | RetentionRun | RescheduleRun


class Committer:
    """Writes lists of items, each list in one transaction; used from one thread at a time."""

    def __init__(self, database: Path, settings: StoreSettings, *, busy_timeout: timedelta = timedelta(seconds=5)) -> None:
        self.settings = settings
        self.db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout.total_seconds() * 1000)}")
            # synchronous is a setting of the connection, not of the file.
            self.db.execute("PRAGMA synchronous = FULL")
            # The first write after a full checkpoint cuts the WAL file back to
            # this size. Otherwise the file would keep the size of the largest
            # transaction, such as one that held a message of max_message_size.
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        except BaseException:
            self.db.close()
            raise
        # The digest of the rules in force, set from the event loop, and the
        # digest in force at the last committed transaction, which removed a
        # stored schedule digest of any other rules.
        self.rules_digest = ""
        self._agreed_digest = ""
        # The clock that a customer's message starts again in an answered conversation, under the rules in force.
        self.reopened_clock: ClockPlanner | None = None

    def close(self) -> None:
        self.db.close()

    def commit_or_split(self, items: list[WriteItem]) -> list[tuple[Any, Exception | None]]:
        """Commit `items` together, or one by one after a failure; return one (result, error) pair per item, in order.

        Committed one by one, a bad item fails alone and the others are kept.
        """
        try:
            return [(result, None) for result in self.commit(items)]
        except Exception as error:  # noqa: BLE001 - every caller must hear of it
            if len(items) > 1:
                log.warning("commit_retried_one_by_one", error=repr(error), batch_size=len(items))
                return [pair for item in items for pair in self.commit_or_split([item])]
            log.error("commit_failed", error=repr(error))
            failure = StorageError("the database write failed")
            # Kept for callers that name the cause, such as the CLI; SMTP clients never see it.
            failure.__cause__ = error
            return [(None, failure)]

    def commit(self, items: list[WriteItem]) -> list[Any]:
        """Write `items` in one transaction; return one result per item.

        A Submission's result is its Outcome, an EscalationRun's the number
        of escalations fired, a ZombieRun's or a RejectionRun's the alarms raised, a
        RetentionRun's what it Emptied, a RescheduleRun's what it
        Rescheduled; other items give None.
        """
        submissions = [item for item in items if isinstance(item, Submission)]
        attempts = [item for item in items if isinstance(item, AttemptResult)]
        answers = [item for item in items if isinstance(item, ManualAnswer)]
        runs = [item for item in items if isinstance(item, EscalationRun)]
        zombie_runs = [item for item in items if isinstance(item, ZombieRun)]
        rejection_runs = [item for item in items if isinstance(item, RejectionRun)]
        retention_runs = [item for item in items if isinstance(item, RetentionRun)]
        reschedule_runs = [item for item in items if isinstance(item, RescheduleRun)]
        db = self.db
        digest = self.rules_digest
        db.execute("BEGIN IMMEDIATE")
        try:
            messages, conversations, outbox = db.execute(_MAX_IDS).fetchone()
            writer = BatchWriter(
                db, self.settings, {"messages": messages, "conversations": conversations, "outbox": outbox},
                reopened_clock=self.reopened_clock,
            )
            if digest != self._agreed_digest:
                # This transaction may schedule conversations under other rules
                # than those of the last complete reschedule, so a start must
                # not skip the next one.
                writer.forget_other_schedule_rules(digest)
            outcomes = iter(writer.add_submissions(submissions))
            writer.add_attempts(attempts)
            writer.add_manual_answers(answers)
            fired = iter([writer.add_escalations(run.now, run.planner, ESCALATION_BATCH) for run in runs])
            alarms = iter([
                writer.add_zombie_alarms(run.now, run.recent, run.period, run.routes, run.planner)
                for run in zombie_runs
            ])
            address_alarms = iter([writer.add_rejection_alarms(run.now, run.period, run.planner) for run in rejection_runs])
            writer.flush()
            # After the flush, so that rows delivered in this batch count as delivered.
            emptied = iter([writer.empty_old_bytes(format_instant(run.cutoff), run.limit) for run in retention_runs])
            # A pass for rules that a reload has replaced records no digest.
            rescheduled = iter([
                writer.reschedule(run.planner, run.after, run.limit, run.digest if run.digest == digest else "", only=run.only)
                for run in reschedule_runs
            ])
            db.execute("COMMIT")
        except BaseException:
            # The original error matters more than one from the rollback.
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            raise
        self._agreed_digest = digest
        results: list[Any] = []
        for item in items:
            if isinstance(item, Submission):
                results.append(next(outcomes))
            elif isinstance(item, EscalationRun):
                results.append(next(fired))
            elif isinstance(item, ZombieRun):
                results.append(next(alarms))
            elif isinstance(item, RejectionRun):
                results.append(next(address_alarms))
            elif isinstance(item, RetentionRun):
                results.append(next(emptied))
            elif isinstance(item, RescheduleRun):
                results.append(next(rescheduled))
            else:
                results.append(None)
        return results

