"""Time sources: the system clock for the daemon, a manual clock for tests.

Every component that needs the time takes a clock, so tests move time forward
instead of sleeping.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Return the current time as an aware UTC datetime."""

    async def sleep_until(self, deadline: datetime, wake: asyncio.Event) -> None:
        """Wait until `deadline` passes or `wake` is set, whichever comes first."""


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    async def sleep_until(self, deadline: datetime, wake: asyncio.Event) -> None:
        delay = (deadline - self.now()).total_seconds()
        if delay <= 0:
            return
        # asyncio.wait, unlike wait_for on Python 3.11, never swallows a
        # cancellation that arrives together with the wake-up.
        woken = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({woken}, timeout=delay)
        finally:
            woken.cancel()


class ManualClock:
    """A clock that moves only when `advance` or `set` is called.

    `settle` lets a test wait until every loop sleeping on this clock has
    seen the latest time and gone back to sleep.
    """

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError(f"ManualClock needs an aware datetime, got {start!r}")
        self._now = start.astimezone(timezone.utc)
        self._moved = asyncio.Event()
        self._generation = 0
        self._sleepers: dict[int, tuple[int, asyncio.Event]] = {}

    def now(self) -> datetime:
        return self._now

    async def advance(self, duration: timedelta) -> None:
        await self.set(self._now + duration)

    async def set(self, when: datetime) -> None:
        self._now = when.astimezone(timezone.utc)
        self._generation += 1
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()
        # Let the sleepers run before the caller goes on.
        await asyncio.sleep(0)

    async def sleep_until(self, deadline: datetime, wake: asyncio.Event) -> None:
        key = id(wake)
        try:
            while self._now < deadline and not wake.is_set():
                self._sleepers[key] = (self._generation, wake)
                moved = asyncio.ensure_future(self._moved.wait())
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait({moved, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    moved.cancel()
                    woken.cancel()
        finally:
            self._sleepers.pop(key, None)

    def is_settled(self, sleepers: int) -> bool:
        """Return True when `sleepers` loops sleep at the current time with nothing to wake them."""
        current = [wake for generation, wake in self._sleepers.values() if generation == self._generation]
        return len(current) >= sleepers and not any(wake.is_set() for wake in current)


def format_instant(when: datetime) -> str:
    """Format an aware datetime as the fixed-width UTC text stored in SQLite.

    The fixed width keeps lexical order equal to time order, so SQL compares
    instants as strings.
    """
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_instant(text: str) -> datetime:
    """Parse text written by `format_instant`."""
    # fromisoformat reads this format, trailing Z included, about fifty times faster than strptime.
    return datetime.fromisoformat(text)
