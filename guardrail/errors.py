"""Exceptions raised by guardrail.

    GuardrailError
    ├── ConfigError              one invalid setting in a config or rule file
    ├── ConfigErrors             every ConfigError found while loading, at once
    ├── StorageError             the database could not be read or written
    │   └── DatabaseFileError    the database file is not SQLite, is damaged or is not guardrail's
    │       └── DatabaseLockedError  another process held the database's lock past the busy timeout
    └── DeliveryError            a destination did not take a message
        ├── TemporaryDeliveryError   retry later (4xx, refused, timed out)
        │   └── PartialDeliveryError some recipients accepted, others rejected
        └── PermanentDeliveryError   never retry (5xx, bad destination)

Retries depend on the exception type, never on its text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class GuardrailError(Exception):
    """Base class of every error guardrail raises on purpose."""


@dataclass
class ConfigError(GuardrailError):
    """One invalid setting: the file, the key, the value and what is expected."""

    path: Path | str
    key: str
    problem: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        if self.key:
            return f"{where}: {self.key}: {self.problem}"
        return f"{where}: {self.problem}"


class ConfigErrors(GuardrailError):
    """Every problem found while loading configuration or rules."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(error) for error in errors))
        self.errors = errors


class StorageError(GuardrailError):
    """The database could not be read or written."""


class DatabaseFileError(StorageError):
    """The database file is not an SQLite database, is damaged, or lacks guardrail's tables."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path = path
        self.problem = problem


class DatabaseLockedError(DatabaseFileError):
    """The database stayed locked by another process for longer than the busy timeout."""


class DeliveryError(GuardrailError):
    """A destination did not take a message."""


class TemporaryDeliveryError(DeliveryError):
    """A delivery attempt failed in a way that may succeed later."""


class PartialDeliveryError(TemporaryDeliveryError):
    """The smarthost rejected some recipients, and accepted or deferred the others.

    `deferred` are the recipients rejected with a 4xx reply, which are tried
    again. `rejected` are those rejected with a 5xx reply, which are not.
    `accepted` are those the smarthost took the message for. `replies`
    maps each recipient it did not take to its reply.
    """

    def __init__(
        self, message: str, deferred: tuple[str, ...], rejected: tuple[str, ...], accepted: tuple[str, ...] = (),
        replies: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.deferred = deferred
        self.rejected = rejected
        self.accepted = accepted
        self.replies = replies or {}


class PermanentDeliveryError(DeliveryError):
    """A delivery attempt failed in a way that retrying cannot fix."""
