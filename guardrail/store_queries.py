"""Read-only SQL for the HTTP API and the metrics gauges.

Every query goes through `Store.fetch_all`, on the daemon's one connection.
NOTE: a read that runs while the group committer has a transaction open also
reads that transaction's rows before they are committed.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .clock import parse_instant
from .outbox import purpose
from .store import Store
from .store_batch import alarms_query

# open: waits for the team's reply; no_reply_needed: opened by machine mail or a loop message.
CONVERSATION_STATES = ("open", "answered", "no_reply_needed")

_CONVERSATION_COLUMNS = (
    "id, reference, state, team, route, subject, customer, opened_at, deadline, answered_at, answered_by,"
    " escalation_level, escalation_reason, delivery_failed"
)


# Event detail keys whose values are instants stored in format_instant's text.
_INSTANT_DETAILS = ("deadline",)


@dataclass(frozen=True)
class OutboxDepth:
    """How much outbox work is waiting."""

    pending: int
    oldest_created_at: datetime | None


def _instant(text: str | None) -> str | None:
    """Return a stored instant as ISO 8601 text with its UTC offset, as webhook bodies show it."""
    return parse_instant(text).isoformat() if text else None


def _conversation(row: Any) -> dict[str, Any]:
    return {
        "reference": row[1],
        "state": row[2],
        "team": row[3],
        "route": row[4],
        "subject": row[5],
        "customer": row[6],
        "opened_at": _instant(row[7]),
        "deadline": _instant(row[8]),
        "answered_at": _instant(row[9]),
        "answered_by": row[10],
        "escalation_level": row[11],
        "escalation_reason": row[12],
        "delivery_failed": bool(row[13]),
    }


async def list_alarms(store: Store, *, limit: int) -> list[dict[str, Any]]:
    """Return up to `limit` alarms, newest first: abandoned routes and rejected addresses together."""
    sql = alarms_query()
    assert sql is not None, "the daemon's database has every alarm table"
    # Every stored time is after "", so all alarms count.
    rows = await store.fetch_all(sql, ("", limit))
    return [{"at": _instant(at), "kind": kind, "about": about, "detail": detail} for at, kind, about, detail in rows]


async def list_conversations(store: Store, *, state: str | None, team: str | None, limit: int) -> list[dict[str, Any]]:
    """Return up to `limit` conversations, newest first, filtered by state and team when given."""
    conditions, parameters = [], []
    if state is not None:
        conditions.append("state = ?")
        parameters.append(state)
    if team is not None:
        conditions.append("team = ?")
        parameters.append(team)
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = await store.fetch_all(
        f"SELECT {_CONVERSATION_COLUMNS} FROM conversations{where} ORDER BY opened_at DESC, id DESC LIMIT ?",
        (*parameters, limit),
    )
    return [_conversation(row) for row in rows]


async def find_conversation(store: Store, reference: str) -> dict[str, Any] | None:
    """Return one conversation with its timeline, or None if `reference` is unknown."""
    rows = await store.fetch_all(f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE reference = ?", (reference,))
    if not rows:
        return None
    conversation = _conversation(rows[0])
    conversation["timeline"] = await _timeline(store, rows[0][0])
    return conversation


async def _timeline(store: Store, conversation_id: int) -> list[dict[str, Any]]:
    """Return the conversation's events in the order they were written, with facts from other tables added.

    An acknowledgement event is replaced by its row in `acknowledgements`,
    which also contains the recipient, the suppression signal and the template
    variant; outbox events name what was delivered.
    """
    events = await store.fetch_all(
        "SELECT at, kind, detail, message_row FROM events WHERE conversation_id = ? ORDER BY id", (conversation_id,)
    )
    acknowledgements = {
        row[0]: row
        for row in await store.fetch_all(
            "SELECT message_row, at, recipient, decision, signal, language, variant, message_id"
            " FROM acknowledgements WHERE conversation_id = ?",
            (conversation_id,),
        )
    }
    messages = {
        row[0]: row
        for row in await store.fetch_all(
            "SELECT id, message_id, mail_from, route_reasons FROM messages WHERE conversation_id = ?", (conversation_id,)
        )
    }
    purposes = {
        row[0]: purpose(row[1], json.loads(row[2]))
        for row in await store.fetch_all("SELECT id, kind, target FROM outbox WHERE conversation_id = ?", (conversation_id,))
    }

    timeline = []
    for at, kind, detail_text, message_row in events:
        detail = json.loads(detail_text)
        for key in _INSTANT_DETAILS:
            if isinstance(detail.get(key), str):
                detail[key] = _instant(detail[key])
        if kind in ("ack_queued", "ack_suppressed") and message_row in acknowledgements:
            timeline.append(_acknowledgement(acknowledgements[message_row]))
            continue
        if kind == "received" and message_row in messages:
            _, message_id, mail_from, route_reasons = messages[message_row]
            detail.update(message_id=message_id, mail_from=mail_from, route_reasons=json.loads(route_reasons))
        if "outbox_id" in detail and detail["outbox_id"] in purposes:
            detail["purpose"] = purposes[detail["outbox_id"]]
        timeline.append({"at": _instant(at), "kind": kind, "detail": detail})
    return timeline


def _acknowledgement(row: Any) -> dict[str, Any]:
    _, at, recipient, decision, signal, language, variant, message_id = row
    detail: dict[str, Any] = {"decision": decision, "to": recipient}
    if decision == "sent":
        detail.update(language=language, variant=variant, message_id=message_id)
    else:
        detail["signal"] = signal
    return {"at": _instant(at), "kind": "acknowledgement", "detail": detail}


async def open_conversations_of(store: Store, address: str, *, include_participants: bool, limit: int) -> list[dict[str, Any]]:
    """Return the open conversations `address` started or takes part in, by how long they have waited, longest first.

    Each waits since its SLA clock last started: when it opened, or when a
    later message started its clock again.

    The address is compared without regard to case. With `include_participants`
    False only the conversations it started count.
    """
    participant = (
        " OR EXISTS (SELECT 1 FROM json_each(participants) WHERE lower(json_each.value) = ?1)"
        if include_participants else ""
    )
    # A clock starts when a conversation opens, when a person writes to one
    # that needed no reply, and when a customer's message reopens it.
    rows = await store.fetch_all(
        f"SELECT {_CONVERSATION_COLUMNS}, COALESCE((SELECT MAX(e.at) FROM events e WHERE e.conversation_id = conversations.id"
        " AND e.kind IN ('deadline_set', 'reopened')), opened_at) AS waiting_since FROM conversations"
        f" WHERE state = 'open' AND (lower(customer) = ?1{participant}) ORDER BY waiting_since, id LIMIT ?2",
        (address.lower(), limit),
    )
    return [{**_conversation(row), "waiting_since": _instant(row[14])} for row in rows]


async def outbox_depth(store: Store) -> OutboxDepth:
    """Return how many outbox rows are pending and when the oldest was created."""
    rows = await store.fetch_all("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'")
    count, oldest = rows[0]
    return OutboxDepth(count, parse_instant(oldest) if oldest else None)


async def count_open_conversations(store: Store) -> int:
    rows = await store.fetch_all("SELECT COUNT(*) FROM conversations WHERE state = 'open'")
    return int(rows[0][0])


def check_writable(path: Path, timeout: timedelta) -> str:
    """Take the database's write lock and let it go at once; return "" or why it failed.

    A second, short-lived connection is used so that the probe never runs
    inside the group committer's transaction. Blocking: call it in a thread.
    """
    try:
        connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout.total_seconds(), isolation_level=None)
    except sqlite3.Error as error:
        return f"cannot open {path}: {error}"
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
    except sqlite3.Error as error:
        return f"cannot take the write lock on {path}: {error}"
    finally:
        connection.close()
    return ""

