"""The escalation scheduler: one loop for every open conversation.

There is no timer per conversation. The loop asks the store for the earliest
`next_escalation_at`, sleeps until then (or until woken because a nearer one
was added), and escalates everything due, oldest first, in one transaction
that also records each conversation's new level. A restart therefore fires
what fell due while the daemon was down exactly once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

import structlog

from .clock import Clock, parse_instant
from .config import ZombieSettings
from .errors import StorageError
from .escalation import DueConversation, EscalationPlan, Sender, plan_escalation
from .metrics import Metrics
from .rejections import (
    ALARM_PERIOD,
    AddressAlarm,
    RejectedFigures,
    find_rejected_addresses,
)
from .rules import RuleSet
from .store import Store
from .zombies import RouteFigures, ZombieAlarm, find_zombie_routes

log = structlog.get_logger("guardrail.sla")

# How long the loop sleeps when nothing is scheduled; new work wakes it sooner.
IDLE_SLEEP = timedelta(days=1)
# How long the loop waits before it tries again after a read or a commit
# failed, such as while another program has the database's write lock.
STORAGE_RETRY = timedelta(seconds=30)


class _MailingLoop:
    """Base of the loops that read the store under the current rules and queue mail: the shared parts."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        rules: Callable[[], RuleSet],
        sender: Sender,
        on_queued: Callable[[], None],
        metrics: Metrics | None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self._clock = clock
        self._rules = rules
        self._sender = sender
        self._on_queued = on_queued
        self.wake = asyncio.Event()


class EscalationScheduler(_MailingLoop):
    """Fires escalations when they fall due."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        rules: Callable[[], RuleSet],
        sender: Sender,
        on_queued: Callable[[], None] = lambda: None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(store, clock, rules, sender, on_queued, metrics)
        self.alive = False
        self._sleeping_until: datetime | None = None

    def due_at(self, when: datetime | None) -> None:
        """Wake the loop when a conversation falls due for escalation at `when`, before the loop's next check."""
        if when is not None and (self._sleeping_until is None or when < self._sleeping_until):
            self.wake.set()

    async def run(self) -> None:
        """Escalate due conversations until cancelled."""
        self.alive = True
        try:
            while True:
                self.wake.clear()
                self._sleeping_until = None
                now = self._clock.now()
                try:
                    next_at = await self._store.next_escalation_due()
                    if next_at is not None and next_at <= now and await self.fire_due():
                        continue
                except (StorageError, sqlite3.Error) as error:
                    # Nothing was committed, so the due conversations stay due
                    # and the next pass fires them.
                    next_at = now + STORAGE_RETRY
                    log.error("escalations_postponed", error=repr(error.__cause__ or error),
                              retry_in_seconds=STORAGE_RETRY.total_seconds())
                if next_at is None or next_at <= now:
                    next_at = now + IDLE_SLEEP
                self._sleeping_until = next_at
                await self._clock.sleep_until(next_at, self.wake)
        finally:
            self.alive = False

    async def fire_due(self) -> int:
        """Escalate one batch of due conversations; return how many were handled."""
        now = self._clock.now()
        rules = self._rules()
        planned: list[tuple[DueConversation, EscalationPlan]] = []

        def planner(conversation: DueConversation) -> EscalationPlan:
            plan = plan_escalation(conversation, rules, now, self._sender)
            planned.append((conversation, plan))
            return plan

        count = await self._store.fire_escalations(now, planner)
        for conversation, plan in planned:
            for event in plan.events:
                fields = {key: value for key, value in event.items() if key != "kind"}
                outcome = "failed" if event["kind"] == "escalation_failed" else "queued"
                self._metrics.escalations.labels(str(event.get("level", "unstaffed")), outcome).inc()
                if event.get("level") == 1:
                    self._metrics.deadlines_missed.inc()
                level = log.error if event["kind"] == "escalation_failed" else log.info
                level(str(event["kind"]), conversation=conversation.reference, conversation_id=conversation.id,
                      team=conversation.team, route=conversation.route, **fields)
        if planned:
            self._on_queued()
        return count


class ZombieWatch(_MailingLoop):
    """Checks every `check_every` for routes whose mail goes unanswered."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        rules: Callable[[], RuleSet],
        sender: Sender,
        settings: ZombieSettings,
        on_queued: Callable[[], None] = lambda: None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(store, clock, rules, sender, on_queued, metrics)
        self._settings = settings

    async def run(self) -> None:
        """Check now, then every `check_every`, until cancelled."""
        while True:
            self.wake.clear()
            try:
                await self.check()
            except (StorageError, sqlite3.Error) as error:
                # The routes stay unalarmed, so the next check raises their alarms.
                log.error("zombie_check_failed", error=repr(error.__cause__ or error),
                          retry_in_seconds=self._settings.check_every.total_seconds())
            await self._clock.sleep_until(self._clock.now() + self._settings.check_every, self.wake)

    async def check(self) -> list[ZombieAlarm]:
        """Raise the alarms due now; return them."""
        now = self._clock.now()
        rules = self._rules()

        def planner(figures: list[RouteFigures], alarmed: set[str]) -> list[ZombieAlarm]:
            return find_zombie_routes(figures, rules, self._settings, now, self._sender, alarmed)

        routes = [route.name for route in rules.routes]
        alarms = await self._store.raise_zombie_alarms(now, self._settings.conversations, self._settings.period, routes, planner)
        for alarm in alarms:
            log.warning("zombie_route_alarm", route=alarm.route, to=alarm.owner.address, figures=alarm.figures)
            self._metrics.alarms.labels("route").inc()
        if alarms:
            self._on_queued()
        return alarms


class RejectionWatch(_MailingLoop):
    """Loop that raises the rejected-address alarms after each delivery in which an address was rejected for good.

    It checks once at start, for rejections recorded before a restart, and
    then after `rejected` names addresses. A check that fails runs again at
    the next rejection, which a broken address soon causes. A check reads a
    period of rejections on the writer thread. A broken address of a busy
    team is rejected in every delivery, so no check runs while each address
    and team named since the last check has had its alarm within the period.
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        rules: Callable[[], RuleSet],
        sender: Sender,
        on_queued: Callable[[], None] = lambda: None,
        *,
        period: timedelta = ALARM_PERIOD,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(store, clock, rules, sender, on_queued, metrics)
        self._period = period
        # Addresses rejected since the last check, each with its team, and when each last had an alarm.
        self._pending: set[tuple[str, str]] = set()
        self._alarmed_at: dict[tuple[str, str], datetime] = {}

    def rejected(self, addresses: Iterable[tuple[str, str]]) -> None:
        """Note the (address, team) pairs that a delivery just recorded a rejection for, and wake the check."""
        self._pending.update(addresses)
        self.wake.set()

    async def run(self) -> None:
        """Check now, then each time `wake` is set, until cancelled."""
        first = True
        while True:
            self.wake.clear()
            if first or not self._pending_alarmed():
                try:
                    await self.check()
                except (StorageError, sqlite3.Error) as error:
                    log.error("rejection_check_failed", error=repr(error.__cause__ or error), detail="checked again at the next rejection")
            else:
                self._pending.clear()
            first = False
            await self.wake.wait()

    def _pending_alarmed(self) -> bool:
        """Return True when addresses are pending and each had its alarm within the period, so a check would raise none."""
        cutoff = self._clock.now() - self._period
        return bool(self._pending) and all(
            key in self._alarmed_at and self._alarmed_at[key] > cutoff for key in self._pending
        )

    async def check(self) -> list[AddressAlarm]:
        """Raise the alarms due now; return them."""
        now = self._clock.now()
        rules = self._rules()
        pending = set(self._pending)
        alarmed_before: dict[tuple[str, str], str] = {}
        checked: set[tuple[str, str]] = set()

        def planner(figures: list[RejectedFigures], alarmed: dict[tuple[str, str], str]) -> list[AddressAlarm]:
            alarmed_before.update(alarmed)
            checked.update((figure.address, figure.team) for figure in figures)
            return find_rejected_addresses(figures, rules, now, self._sender, set(alarmed))

        alarms = await self._store.raise_rejection_alarms(now, self._period, planner)
        self._pending -= pending
        for key, at in alarmed_before.items():
            self._alarmed_at[key] = parse_instant(at)
        for alarm in alarms:
            self._alarmed_at[alarm.address, alarm.team] = now
            log.warning("rejected_address_alarm", address=alarm.address, team=alarm.team, to=alarm.owner.address, detail=alarm.detail)
            self._metrics.alarms.labels("address").inc()
        # An address without an owner to mail is logged once a period, and
        # checked no sooner, as if it had its alarm.
        for key in sorted(checked - {(alarm.address, alarm.team) for alarm in alarms} - set(alarmed_before)):
            if key not in self._alarmed_at or self._alarmed_at[key] <= now - self._period:
                self._alarmed_at[key] = now
                log.error("rejected_address_unowned", address=key[0], team=key[1],
                          detail="no route owner, escalation contact or fallback human to tell")
        if alarms:
            self._on_queued()
        return alarms
