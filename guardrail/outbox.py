"""Pure decisions about outbox rows that operators list and send again.

An outbox row is one piece of mail or one webhook that the daemon owes
someone: the message for a team (`deliver`), an acknowledgement, an
escalation, an alarm (`mail`), or an escalation webhook (`webhook`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from .clock import parse_instant

# The key of a row's target that records when an operator queued it again.
# Its give-up window (`[delivery] give_up_after`) starts then, not when the
# row was first queued.
REQUEUED_AT = "requeued_at"


def purpose(kind: str, target: dict[str, Any]) -> str:
    """Name what an outbox row carries: the message to the team, an acknowledgement, an escalation."""
    if kind == "deliver":
        # A copy for another team that the message was addressed to, beside the owner's (see team_copies).
        return "team copy" if target.get("copy_for") else "forward"
    if kind == "webhook":
        return "escalation webhook"
    return str(target.get("purpose") or "mail")


def shown_target(kind: str, target: dict[str, Any]) -> str:
    """Describe where a row goes, without what a webhook URL may hide in its path or query."""
    if kind == "webhook":
        parts = urlsplit(str(target.get("url", "")))
        return f"{parts.scheme}://{parts.hostname or ''}" if parts.scheme else "webhook"
    addresses = ", ".join(target.get("addresses", ()))
    if target.get("kind") == "maildir":
        where = f"maildir {target.get('maildir', '')}"
    else:
        where = f"smtp {addresses}" if kind == "deliver" else addresses
    team = target.get("team")
    return f"team {team}: {where}" if team else where


def retry_window_start(created_at: datetime, target: dict[str, Any]) -> datetime:
    """Return when a row's give-up window started: when an operator last queued it again, else when it was queued."""
    requeued = target.get(REQUEUED_AT)
    return parse_instant(requeued) if isinstance(requeued, str) else created_at


@dataclass(frozen=True)
class RetryCandidate:
    """The facts about an outbox row that decide whether it may be sent again."""

    kind: str
    purpose: str
    state: str  # "pending", "done" or "failed"
    has_bytes: bool  # False once retention emptied the message or the mail
    conversation_state: str = ""  # "" for a row without a conversation


def retry_refusal(row: RetryCandidate) -> str | None:
    """Return why `row` cannot be sent again, or None when it can.

    A pending row is made due now; a failed row is queued again. A failed
    webhook is not retried, since its escalation mail went out in its place.
    An escalation whose conversation is no longer open would tell people
    about something already handled.
    """
    if row.state == "done":
        return "it was already sent or withdrawn"
    if row.state == "failed" and row.kind == "webhook":
        return "a failed webhook is not sent again: its escalation mail went out instead"
    if row.purpose == "escalation" and row.conversation_state not in ("", "open"):
        return f"its conversation is {row.conversation_state.replace('_', ' ')} now"
    if not row.has_bytes:
        return "retention emptied its bytes ([database] keep_bodies)"
    return None
