"""Retention: empties the stored bytes of old messages and outbox rows, when `[database] keep_bodies` is set.

Only the message bytes and the rendered mail go. The rows stay with their
sizes, summaries, routes and events, which `status`, the timeline and the
figures of abandoned routes read. SQLite reuses the freed pages for
new rows, so the database file stops growing once traffic is steady; it
does not shrink by itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta

import structlog

from .clock import Clock
from .errors import StorageError
from .store import Store
from .store_batch import Emptied

log = structlog.get_logger("guardrail.retention")

# How often the daemon looks for bytes past their keeping time, and how
# soon it looks again when one look left some behind (a first run on a
# large database).
RETENTION_EVERY = timedelta(hours=1)
RETENTION_CATCH_UP = timedelta(minutes=1)


class Retention:
    """Empties bytes older than `keep` now, then every RETENTION_EVERY."""

    def __init__(self, store: Store, clock: Clock, keep: timedelta) -> None:
        self._store = store
        self._clock = clock
        self._keep = keep
        self.wake = asyncio.Event()

    async def run(self) -> None:
        """Empty what is due now, then every RETENTION_EVERY, until cancelled."""
        while True:
            self.wake.clear()
            try:
                emptied = await self.check()
            except (StorageError, sqlite3.Error) as error:
                log.error("old_bytes_not_emptied", error=repr(error.__cause__ or error),
                          retry_in_seconds=RETENTION_CATCH_UP.total_seconds())
                emptied = Emptied(0, 0, True)
            pause = RETENTION_CATCH_UP if emptied.more else RETENTION_EVERY
            await self._clock.sleep_until(self._clock.now() + pause, self.wake)

    async def check(self) -> Emptied:
        """Empty the bytes of rows created longer than `keep` ago; return the totals."""
        emptied = await self._store.empty_old_bytes(self._clock.now() - self._keep)
        if emptied.messages or emptied.outbox:
            log.info("old_bytes_emptied", messages=emptied.messages, outbox=emptied.outbox, more=emptied.more)
        return emptied
