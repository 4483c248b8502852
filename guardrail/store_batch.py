"""The rows of one group-commit transaction, and the schema they go into.

`BatchWriter` reads what the batch's decisions need (duplicates, known
conversations, acknowledgement counts), calls the pure planners, and writes
every row with executemany. Nothing here commits: store.Store does.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from .acknowledgement import render_acknowledgement
from .clock import format_instant, parse_instant
from .conversations import KnownConversation, find_references, new_reference
from .deadlines import ClockPlanner, SlaClock
from .escalation import (
    DELIVERY_FAILED_REASON,
    PARTIAL_DELIVERY_FAILED_REASON,
    DueConversation,
    EscalationPlan,
    LevelTarget,
    delivery_failure_reason,
    encode_fallback,
    event_target,
)
from .plan import (
    RATE_LIMIT_SIGNAL,
    EarlierCopy,
    Plan,
    Submission,
    find_copy,
    is_reply_expected,
    opening_participants,
    plan_submission,
)
from .rejections import RejectedFigures
from .rules import Destination
from .team_copies import choose_team_copies, with_team_copies
from .zombies import RouteFigures

log = structlog.get_logger("guardrail.store")

# planner(team, deadline, level, fired) of a reschedule: the conversation's new
# level and its next escalation time, or None when its chain has ended. `fired`
# is None at level 0, else the recipients of each escalation sent, in order.
ReschedulePlanner = Callable[[str, datetime, int, "list[LevelTarget] | None"], tuple[int, "datetime | None"]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER,
    received_at TEXT NOT NULL,
    peer TEXT NOT NULL,
    helo TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,
    message_id TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    size INTEGER NOT NULL,
    summary TEXT NOT NULL,
    route TEXT NOT NULL,
    team TEXT NOT NULL,
    route_reasons TEXT NOT NULL,
    disposition TEXT NOT NULL,
    machine_signal TEXT NOT NULL DEFAULT '',
    shadow TEXT NOT NULL DEFAULT '[]',
    raw BLOB NOT NULL,
    protocol TEXT NOT NULL DEFAULT 'ESMTP'
);
CREATE INDEX IF NOT EXISTS messages_dedupe ON messages (dedupe_key, received_at);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages (conversation_id);

CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    reference TEXT NOT NULL UNIQUE,
    route TEXT NOT NULL,
    team TEXT NOT NULL,
    destination TEXT,
    state TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    subject TEXT NOT NULL,
    customer TEXT NOT NULL,
    participants TEXT NOT NULL,
    delivery_failed INTEGER NOT NULL DEFAULT 0,
    deadline TEXT,
    answered_at TEXT,
    answered_by TEXT,
    escalation_level INTEGER NOT NULL DEFAULT 0,
    escalation_reason TEXT NOT NULL DEFAULT '',
    next_escalation_at TEXT
);
CREATE INDEX IF NOT EXISTS conversations_due ON conversations (next_escalation_at)
    WHERE next_escalation_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS conversations_route_opened ON conversations (route, opened_at)
    WHERE deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS conversations_route_answered ON conversations (route, answered_at)
    WHERE deadline IS NOT NULL;

CREATE TABLE IF NOT EXISTS message_ids (
    message_id TEXT PRIMARY KEY,
    conversation_id INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    conversation_id INTEGER,
    message_row INTEGER,
    target TEXT NOT NULL,
    payload BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL,
    done_at TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at) WHERE state = 'pending';

CREATE TABLE IF NOT EXISTS acknowledgements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_row INTEGER NOT NULL,
    conversation_id INTEGER,
    at TEXT NOT NULL,
    recipient TEXT NOT NULL,
    decision TEXT NOT NULL,
    signal TEXT NOT NULL,
    language TEXT,
    variant TEXT,
    message_id TEXT
);
CREATE INDEX IF NOT EXISTS acknowledgements_recipient ON acknowledgements (recipient, at);

CREATE TABLE IF NOT EXISTS inspections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rules_hash TEXT NOT NULL,
    at TEXT NOT NULL,
    inspected_by TEXT NOT NULL,
    note TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alarms_route ON alarms (route, at);

-- Addresses of a destination that the smarthost rejected for good while it
-- took the message for others, one row per address and attempt, with the
-- team whose destination names the address.
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL,
    conversation_id INTEGER,
    at TEXT NOT NULL,
    reply TEXT NOT NULL,
    team TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS rejections_at ON rejections (at);

CREATE TABLE IF NOT EXISTS address_alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT NOT NULL,
    team TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS address_alarms_at ON address_alarms (at);

CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER,
    message_row INTEGER,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_conversation ON events (conversation_id);

-- Where emptying old bytes stopped, per table: the last row id visited.
CREATE TABLE IF NOT EXISTS retention (
    name TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
) WITHOUT ROWID;

-- Named values the daemon keeps across restarts, such as the digest of the
-- rules under which every open conversation's next escalation was last set.
CREATE TABLE IF NOT EXISTS facts (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""


# The fact that names the rules under which open conversations' escalations were last set.
SCHEDULE_RULES = "schedule_rules"
# The rules folder of the running daemon and the folder its maildir paths
# resolve against, as JSON, so that `guardrail reload` checks the rules that
# the daemon will load.
DAEMON_RULES = "daemon_rules"

# Stored messages that one Message-ID's copy check compares at most. Each
# inbox's copy of a message comes after the first arrival, so the first
# messages under an id contain the one a copy matches.
COPY_CANDIDATES = 8


@dataclass(frozen=True)
class StoreSettings:
    """Config values that the store's decisions read."""

    reference_prefix: str = "GR"
    duplicate_window: timedelta = timedelta(days=1)
    hostname: str = "localhost"
    ack_limit: int = 3
    ack_window: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class Outcome:
    """The result of storing one submitted message."""

    disposition: str
    message_row: int | None = None
    conversation_id: int | None = None
    reference: str = ""
    team: str = ""
    route: str = ""
    destination: Destination | None = None
    thread_reason: str = ""
    moved_from: str = ""  # the conversation's former team, when the message moved it to `team`
    move_reason: str = ""  # why it moved, as Plan.move_reason gives it
    ack_decision: str = ""
    ack_signal: str = ""
    ack_limit_reached: bool = False  # True only for the first suppression in a window
    ack_problem: str = ""  # why the plain template was used
    answered: bool = False
    reopened: bool = False  # a customer's message after the team's answer started the clock again
    thanked: bool = False  # a customer's thank-you after the team's answer left the conversation answered
    deadline: datetime | None = None
    escalation_reason: str = ""  # why the conversation escalates at once, such as an unstaffed team, or ""
    # When the conversation is first escalated, if the message opened it or started its clock.
    next_escalation_at: datetime | None = None
    copied_to: tuple[str, ...] = ()  # the other teams that get a copy of the message


@dataclass(frozen=True)
class Rescheduled:
    """The result of one rescheduling pass: conversations whose next escalation moved, where it stopped, and the earliest new time."""

    changed: int = 0
    last_id: int = 0
    more: bool = False
    earliest: datetime | None = None


@dataclass(frozen=True)
class Emptied:
    """The counts of rows one retention pass emptied, and whether rows older than its cutoff are left to visit."""

    messages: int = 0
    outbox: int = 0
    more: bool = False


@dataclass(frozen=True)
class AttemptResult:
    """The outcome of one outbox attempt, or a manual answer, to be recorded."""

    outbox_id: int
    conversation_id: int | None
    message_row: int | None
    at: datetime
    state: str  # "done", "pending" (retry later) or "failed"
    attempts: int
    next_attempt_at: datetime | None = None
    error: str = ""
    kind: str = "deliver"
    fallback: dict[str, Any] | None = None  # a mail to queue because this attempt failed
    # The recipients left for the next attempt, when the smarthost accepted the message for the others.
    recipients: tuple[str, ...] | None = None
    # The recipients that have the message, and those that will not get it. The latter are the ones rejected for
    # good, and once the row has failed, the ones left too. Both are stored with `recipients`, and a failed
    # delivery's escalation reason names them.
    delivered: tuple[str, ...] = ()
    undelivered: tuple[str, ...] = ()
    # The recipients this attempt's smarthost rejected for good while it took or deferred the others, each with its reply.
    rejected: tuple[tuple[str, str], ...] = ()
    # The team whose destination a delivery row goes to, when the destination is an SMTP one.
    team: str = ""
    requeued: bool = False  # an operator queued the row again after it failed for good


@dataclass(frozen=True)
class ManualAnswer:
    """A conversation marked answered from the command line or the HTTP API."""

    conversation_id: int
    answered_by: str
    at: datetime


@dataclass
class _ConversationChange:
    """The changes a message makes to its conversation, for the Outcome and for the events written after `received`."""

    conversation: KnownConversation | None
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    deadline: datetime | None = None
    escalation_reason: str = ""
    next_escalation_at: datetime | None = None  # the first escalation, when the message started the SLA clock


def _start_clock(clock: SlaClock, arrival: datetime, change: _ConversationChange) -> tuple[str | None, str, datetime | None]:
    """Fill `change` for an SLA clock that a message arriving at `arrival` starts.

    Return the deadline as stored (None for none), the unstaffed reason ("" for
    a staffed team) and when the conversation is first escalated (None for never).
    """
    deadline = format_instant(clock.deadline) if clock.deadline else None
    reason, first = "", None
    if clock.unstaffed:
        reason, first = clock.unstaffed, arrival
    elif deadline and clock.first_escalation_at:
        first = clock.first_escalation_at
    if deadline:
        change.events.append(("deadline_set", {"deadline": deadline}))
    change.deadline = clock.deadline
    change.escalation_reason = reason
    change.next_escalation_at = first
    return deadline, reason, first


class BatchWriter:
    """Collects the rows of one transaction and writes them with executemany."""

    def __init__(
        self, db: sqlite3.Connection, settings: StoreSettings, next_id: dict[str, int],
        *, reopened_clock: ClockPlanner | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.reopened_clock = reopened_clock
        self.next_id = dict(next_id)
        self.rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in _STATEMENTS}
        self._escalated: set[int] = set()
        # The teams that messages of this batch reach, by conversation id and Message-ID, for a copy later in it.
        self._reached: dict[tuple[int, str], set[str]] = {}

    def _allocate(self, table: str) -> int:
        self.next_id[table] += 1
        return self.next_id[table]

    def _event(self, conversation_id: int | None, message_row: int | None, at: str, kind: str, detail: dict[str, Any]) -> None:
        self.rows["events"].append((conversation_id, message_row, at, kind, json.dumps(detail, default=str)))

    def _outbox(self, kind: str, conversation_id: int | None, message_row: int | None, target: dict[str, Any], payload: bytes | None, at: str) -> int:
        outbox_id = self._allocate("outbox")
        self.rows["outbox"].append((outbox_id, kind, conversation_id, message_row, json.dumps(target), payload, "pending", 0, at, at))
        return outbox_id

    # -- messages -------------------------------------------------------------

    def add_submissions(self, submissions: list[Submission]) -> list[Outcome]:
        if not submissions:
            return []
        cutoff = format_instant(min(s.received_at for s in submissions) - self.settings.duplicate_window)
        seen_keys = self._existing_keys([s.dedupe_key for s in submissions], cutoff)
        by_message_id, by_reference = self._known_conversations(submissions)
        earlier = self._earlier_copies(submissions, cutoff)
        fresh_references = self._fresh_references(submissions)
        ack_history = self._ack_history(submissions)

        outcomes = []
        for submission, reference in zip(submissions, fresh_references):
            sent, warned = _ack_counts(ack_history, submission, self.settings.ack_window)
            message_id = submission.summary.message_id
            plan = plan_submission(
                submission,
                is_duplicate=submission.dedupe_key in seen_keys,
                reference_prefix=self.settings.reference_prefix,
                by_message_id=by_message_id,
                by_reference=by_reference,
                new_conversation=self._blank_conversation(submission, reference),
                acks_in_window=sent,
                ack_limit=self.settings.ack_limit,
                copy_of=find_copy(submission, earlier.get(message_id, [])) if message_id else None,
                reopened_clock=self.reopened_clock,
            )
            seen_keys.add(submission.dedupe_key)
            outcome = self._add_plan(submission, plan, by_message_id, by_reference, first_warning=not warned)
            if message_id and outcome.message_row is not None and plan.conversation is not None:
                # A copy later in the same batch finds this one.
                earlier.setdefault(message_id, []).append(
                    EarlierCopy(outcome.message_row, by_reference[outcome.reference], submission.raw)
                )
            if outcome.ack_decision and submission.ack is not None:
                ack_history.setdefault(submission.ack.to_address.lower(), []).append((submission.received_at, outcome.ack_decision, outcome.ack_signal))
            outcomes.append(outcome)
        return outcomes

    def _blank_conversation(self, submission: Submission, reference: str) -> KnownConversation:
        # The id is allocated only if the plan opens the conversation.
        return KnownConversation(
            id=self.next_id["conversations"] + 1,
            reference=reference,
            route=submission.route,
            team=submission.team,
            participants=opening_participants(submission),
            destination=submission.destination,
            subject=submission.summary.subject,
        )

    def _add_plan(
        self,
        submission: Submission,
        plan: Plan,
        by_message_id: dict[str, KnownConversation],
        by_reference: dict[str, KnownConversation],
        *,
        first_warning: bool,
    ) -> Outcome:
        if plan.disposition == "duplicate":
            return Outcome("duplicate")

        at = format_instant(submission.received_at)
        self._plan_team_copies(submission, plan)
        change = _ConversationChange(plan.conversation)
        if plan.conversation is not None and plan.opens_conversation:
            change = self._open_conversation(submission, plan.conversation, at)
        elif plan.conversation is not None:
            change = self._update_conversation(submission, plan, plan.conversation, at)
        conversation = change.conversation
        if conversation is not None:
            by_reference[conversation.reference] = conversation
            if plan.conversation is not None and conversation.state != plan.conversation.state:
                # A later message of the batch that threads by another of its ids must see the new state.
                for message_id, known in by_message_id.items():
                    if known.id == conversation.id:
                        by_message_id[message_id] = conversation

        row = self._allocate("messages")
        conversation_id = conversation.id if conversation else None
        self.rows["messages"].append((
            row, conversation_id, at, submission.peer, submission.helo, submission.mail_from,
            json.dumps(list(submission.rcpt_tos)), submission.summary.message_id, submission.dedupe_key,
            len(submission.raw), json.dumps(submission.summary.to_record()), plan.route, plan.team,
            json.dumps(list(submission.route_reasons)), plan.disposition, submission.machine_signal,
            json.dumps(list(submission.shadow)), submission.raw, submission.protocol,
        ))
        if conversation is not None and submission.summary.message_id:
            self.rows["message_ids"].append((submission.summary.message_id, conversation.id))
            by_message_id[submission.summary.message_id] = conversation

        detail = {"route": plan.route, "team": plan.team, "disposition": plan.disposition}
        if plan.thread_reason:
            detail["thread"] = plan.thread_reason
        if submission.machine_signal:
            detail["automatic"] = submission.machine_signal
        if submission.staff_unverified:
            detail["staff_unverified"] = submission.staff_unverified
        self._event(conversation_id, row, at, "received", detail)
        for kind, change_detail in change.events:
            self._event(conversation_id, None, at, kind, change_detail)
        self._queue_delivery(plan, conversation_id, row, at, submission.postmaster_recipient if submission.is_postmaster else "")
        if submission.postmaster_copy is not None and plan.disposition != "duplicate":
            # Outside the conversation: a failure to reach the postmaster owner
            # says nothing about whether the team got the message.
            target = _delivery_target(submission.postmaster_copy, submission.postmaster_recipient)
            self._outbox("deliver", None, row, target, None, at)
            self._event(conversation_id, row, at, "postmaster_copy", {"to": submission.postmaster_copy.describe()})
        self._queue_team_copies(plan, conversation_id, row, at, submission.summary.message_id)
        ack_problem = self._record_acknowledgement(submission, plan, conversation, row, at, by_message_id)
        return Outcome(
            plan.disposition, row, conversation_id, conversation.reference if conversation else "",
            plan.team, plan.route, plan.destination, plan.thread_reason, plan.moved_from,
            move_reason=plan.move_reason, ack_decision=plan.ack_decision, ack_signal=plan.ack_signal,
            ack_limit_reached=plan.ack_signal == RATE_LIMIT_SIGNAL and first_warning,
            ack_problem=ack_problem, answered=plan.answers, reopened=plan.reopens, thanked=plan.thanked,
            deadline=change.deadline, escalation_reason=change.escalation_reason,
            next_escalation_at=change.next_escalation_at, copied_to=tuple(copy.team for copy in plan.team_copies),
        )

    def _plan_team_copies(self, submission: Submission, plan: Plan) -> None:
        """Add to `plan` a copy for each other team that its message was addressed to."""
        if not submission.addressed_teams or plan.disposition not in ("new", "follow_up", "copy"):
            return
        copies = choose_team_copies(submission.addressed_teams, plan.team, owner_destination=plan.destination)
        if copies and plan.disposition == "copy" and plan.conversation is not None:
            # A forwarder's copy: the teams that an earlier arrival of the message reached have it.
            holding = self._teams_reached(plan.conversation.id, submission.summary.message_id)
            copies = choose_team_copies(copies, plan.team, holding, plan.destination)
        with_team_copies(plan, copies)

    def _queue_team_copies(self, plan: Plan, conversation_id: int | None, row: int, at: str, message_id: str) -> None:
        """Queue delivery of the plan's team copies, and note the teams the message reaches for a copy later in the batch."""
        if conversation_id is not None and message_id and plan.disposition in ("new", "follow_up", "copy"):
            reached = self._reached.setdefault((conversation_id, message_id), set())
            reached.add(plan.team)
            reached.update(copy.team for copy in plan.team_copies)
        for copy in plan.team_copies:
            assert copy.destination is not None
            target = _delivery_target(copy.destination, copy.recipient, copy.team)
            target.update(copy_for=copy.team, owner=plan.team)
            # Outside the conversation, as the postmaster owner's copy is, because
            # a failure to reach another team does not mean that the owner lacks the message.
            self._outbox("deliver", None, row, target, None, at)
            self._event(conversation_id, row, at, "team_copy", {
                "team": copy.team, "route": copy.route, "to": copy.destination.describe(), "recipient": copy.recipient,
            })

    def _teams_reached(self, conversation_id: int, message_id: str) -> frozenset[str]:
        """Return the teams that messages of the conversation under `message_id` were delivered to, as owner or as a copy."""
        sql = (
            "SELECT team FROM messages WHERE conversation_id = ?1 AND message_id = ?2"
            " UNION SELECT json_extract(e.detail, '$.team') FROM events e JOIN messages m ON m.id = e.message_row"
            " WHERE e.conversation_id = ?1 AND e.kind = 'team_copy' AND m.message_id = ?2"
        )
        with closing(self.db.execute(sql, (conversation_id, message_id))) as cursor:
            stored = {row[0] for row in cursor.fetchall()}
        return frozenset(stored | self._reached.get((conversation_id, message_id), set()))

    def _open_conversation(self, submission: Submission, conversation: KnownConversation, at: str) -> _ConversationChange:
        """Queue the new conversation's row, in state open when the message expects a reply, else no_reply_needed."""
        self._allocate("conversations")
        change = _ConversationChange(conversation)
        state = "no_reply_needed"
        deadline, reason, first = None, "", None
        if is_reply_expected(submission):
            state = "open"
            deadline, reason, first = _start_clock(submission.clock, submission.received_at, change)
        elif submission.is_loop:
            change.events.append(("no_deadline", {"reason": "our own mail came back"}))
        elif not submission.machine_signal:
            change.events.append(("no_deadline", {"reason": "written as the shared inbox"}))
        else:
            change.events.append(("no_deadline", {"reason": "automated message"}))
        self.rows["conversations"].append((
            conversation.id, conversation.reference, conversation.route, conversation.team,
            json.dumps(conversation.destination.to_record()) if conversation.destination else None,
            state, at, at, submission.summary.subject, submission.sender,
            json.dumps(sorted(conversation.participants)), deadline, reason, format_instant(first) if first else None,
        ))
        return change

    def _update_conversation(self, submission: Submission, plan: Plan, conversation: KnownConversation, at: str) -> _ConversationChange:
        participants = conversation.participants | plan.participants_added
        state = conversation.state
        if plan.answers:
            state = "answered"
        elif plan.clock is not None:
            state = "open"
        change = _ConversationChange(KnownConversation(
            conversation.id, conversation.reference, plan.route, plan.team, participants, plan.destination, state,
            conversation.subject,
        ))
        if plan.moved_from:
            destination = json.dumps(plan.destination.to_record()) if plan.destination else None
            self.rows["moves"].append((plan.route, plan.team, destination, at, conversation.id))
            change.events.append(("team_changed", {
                "from": plan.moved_from, "to": plan.team, "route": plan.route, "reason": plan.move_reason,
            }))
        if plan.participants_added:
            self.rows["participants"].append((json.dumps(sorted(participants)), at, conversation.id))
        if plan.reopens:
            change.events.append(("reopened", {"by": submission.sender}))
        if plan.thanked:
            change.events.append(("thanked", {"by": submission.sender}))
        if plan.clock is not None:
            deadline, reason, first = _start_clock(plan.clock, submission.received_at, change)
            next_at = format_instant(first) if first else None
            self.rows["clock_starts"].append((deadline, reason, next_at, at, conversation.id, conversation.state))
        if plan.answers:
            sender = submission.sender
            self.rows["answers"].append((at, sender, at, conversation.id))
            self._withdraw_escalations(conversation.id, at)
            change.events.append(("answered", {"by": sender}))
        return change

    def _queue_delivery(self, plan: Plan, conversation_id: int | None, row: int, at: str, received_for: str) -> None:
        """Queue delivery to the plan's destination. Its Received header names `received_for` when that is set."""
        if plan.disposition in ("loop", "copy"):
            # A copy's team has the message already, from its first arrival.
            return
        if plan.destination is None:
            self._event(conversation_id, row, at, "not_delivered", {"reason": "team has no destination"})
            return
        self._outbox("deliver", conversation_id, row, _delivery_target(plan.destination, received_for, plan.team), None, at)

    def _record_acknowledgement(
        self,
        submission: Submission,
        plan: Plan,
        conversation: KnownConversation | None,
        row: int,
        at: str,
        by_message_id: dict[str, KnownConversation],
    ) -> str:
        """Queue the acknowledgement if the plan sends one; return why the plain variant was used."""
        if not plan.ack_decision:
            return ""
        # Without an acknowledgement, the record names whom one would have gone to: the
        # person behind one of our lists, else the envelope sender.
        recipient = submission.ack.to_address.lower() if submission.ack else (submission.list_sender or submission.mail_from).lower()
        conversation_id = conversation.id if conversation else None
        if plan.ack_decision != "sent" or submission.ack is None or conversation is None:
            self.rows["acknowledgements"].append((row, conversation_id, at, recipient, "suppressed", plan.ack_signal, None, None, None))
            self._event(conversation_id, row, at, "ack_suppressed", {"signal": plan.ack_signal})
            return ""
        rendered = submission.rendered_ack
        if rendered is None or submission.proposed_reference != conversation.reference:
            rendered = render_acknowledgement(submission.ack, conversation.reference, self.settings.hostname, submission.received_at)
        variant = "plain" if rendered.used_plain else "template"
        target = {"kind": "smtp", "addresses": [submission.ack.to_address], "sender": "", "purpose": "acknowledgement"}
        self._outbox("mail", conversation.id, row, target, rendered.data, at)
        self.rows["message_ids"].append((rendered.message_id, conversation.id))
        by_message_id[rendered.message_id] = conversation
        self.rows["acknowledgements"].append((
            row, conversation.id, at, recipient, "sent", "", submission.ack.language, variant, rendered.message_id,
        ))
        self._event(conversation.id, row, at, "ack_queued", {"to": recipient, "language": submission.ack.language, "variant": variant})
        return rendered.problem

    # -- outbox attempts and manual answers -------------------------------------

    def add_manual_answers(self, answers: list[ManualAnswer]) -> None:
        for answer in answers:
            at = format_instant(answer.at)
            self.rows["answers"].append((at, answer.answered_by, at, answer.conversation_id))
            self._withdraw_escalations(answer.conversation_id, at)
            self._event(answer.conversation_id, None, at, "answered", {"by": answer.answered_by})

    def _withdraw_escalations(self, conversation_id: int, at: str) -> None:
        """Queue the end of the answered conversation's escalations that are still waiting to be sent."""
        self.rows["withdrawn_events"].append((at, conversation_id))
        self.rows["withdrawn_escalations"].append((at, conversation_id))

    def add_attempts(self, attempts: list[AttemptResult]) -> None:
        for result in attempts:
            at = format_instant(result.at)
            next_at = format_instant(result.next_attempt_at) if result.next_attempt_at else at
            done_at = at if result.state != "pending" else None
            self.rows["outbox_updates"].append((result.state, result.attempts, next_at, done_at, result.error or None, result.outbox_id))
            if result.recipients is not None:
                self.rows["outbox_recipients"].append((
                    json.dumps(list(result.recipients)), json.dumps(list(result.delivered)),
                    json.dumps(list(result.undelivered)), result.outbox_id,
                ))
            kind = {"done": "delivered", "pending": "delivery_deferred", "failed": "delivery_failed"}[result.state]
            detail: dict[str, Any] = {"outbox_id": result.outbox_id, "kind": result.kind, "attempts": result.attempts}
            if result.error:
                detail["error"] = result.error
            self._event(result.conversation_id, result.message_row, at, kind, detail)
            if result.kind == "deliver":
                self.rows["rejections"].extend(
                    (address, result.conversation_id, at, reply, result.team) for address, reply in result.rejected
                )
            if result.state == "failed" and result.fallback:
                self._outbox("mail", result.conversation_id, result.message_row, result.fallback["target"], result.fallback["payload"], at)
            if result.state == "failed" and result.kind == "deliver" and result.conversation_id is not None:
                reason = delivery_failure_reason(result.delivered, result.undelivered, result.error)
                self.rows["failed_conversations"].append((at, reason[:500], at, result.conversation_id))
            if result.state == "done" and result.kind == "deliver" and result.requeued and result.conversation_id is not None:
                self.rows["restored_conversations"].append(
                    (at, DELIVERY_FAILED_REASON, PARTIAL_DELIVERY_FAILED_REASON, result.conversation_id),
                )

    # -- escalations ----------------------------------------------------------

    def add_escalations(self, now: datetime, planner: Callable[[DueConversation], EscalationPlan], limit: int) -> int:
        """Escalate conversations due at `now`, oldest first; return how many fired."""
        sql = (
            "SELECT c.id, c.reference, c.team, c.route, c.subject, c.customer, c.opened_at, c.deadline,"
            " c.escalation_level, c.escalation_reason,"
            " (SELECT m.message_id FROM messages m WHERE m.conversation_id = c.id ORDER BY m.id LIMIT 1),"
            " (SELECT MAX(e.at) FROM events e WHERE e.conversation_id = c.id AND e.kind = 'reopened')"
            " FROM conversations c WHERE c.next_escalation_at IS NOT NULL AND c.next_escalation_at <= ?"
            " AND c.state = 'open' ORDER BY c.next_escalation_at, c.id LIMIT ?"
        )
        with closing(self.db.execute(sql, (format_instant(now), limit))) as cursor:
            due = [
                DueConversation(
                    row[0], row[1], row[2], row[3], row[4], row[5], parse_instant(row[6]),
                    parse_instant(row[7]) if row[7] else None, row[8], row[9], row[10] or "",
                    reopened_at=parse_instant(row[11]) if row[11] else None,
                )
                for row in cursor.fetchall()
            ]
        at = format_instant(now)
        # The query above does not see this transaction's unwritten rows. A
        # conversation answered in it gets no escalation, and one whose
        # delivery failed in it is escalated for that failure on the next pass.
        settled = {row[-1] for row in self.rows["answers"]} | {row[-1] for row in self.rows["failed_conversations"]}
        for conversation in due:
            # Two runs in one transaction must not escalate the same level twice.
            if conversation.id in self._escalated or conversation.id in settled:
                continue
            self._escalated.add(conversation.id)
            if conversation.level and not conversation.reason:
                # The planner matches the levels that fired to the current chain.
                conversation = replace(conversation, fired=tuple(self._fired_levels(conversation.id)))
            plan = planner(conversation)
            for mail in plan.mails:
                target = {"kind": "smtp", "addresses": list(mail.recipients), "purpose": "escalation"}
                if mail.fallback is not None:
                    target["fallback"] = encode_fallback(mail.fallback)
                self._outbox("mail", conversation.id, None, target, mail.data, at)
            for webhook in plan.webhooks:
                target = {
                    "kind": "webhook", "url": webhook.webhook.url, "format": webhook.webhook.format,
                    "secret_env": webhook.webhook.secret_env, "fallback": encode_fallback(webhook.fallback),
                }
                self._outbox("webhook", conversation.id, None, target, json.dumps(webhook.body).encode(), at)
            for event in plan.events:
                self._event(conversation.id, None, at, str(event["kind"]), {k: v for k, v in event.items() if k != "kind"})
            next_at = format_instant(plan.next_at) if plan.next_at else None
            self.rows["escalation_updates"].append((plan.level, next_at, at, conversation.id))
        return len(due)

    # -- zombie-route alarms ----------------------------------------------------

    def add_zombie_alarms(
        self, now: datetime, recent: int, period: timedelta, routes: list[str], planner: Callable[..., list[Any]]
    ) -> list[Any]:
        """Raise alarms for abandoned `routes`, skipping routes alarmed within `period`; return them.

        Every query goes through an index on (route, time), so the cost
        grows with the number of routes, not with the stored history.
        """
        counts = []
        times = {}
        due = format_instant(now)
        for route in routes:
            # Only conversations that were answered or are past their deadline
            # count, because a burst of new mail within its deadlines is not neglect.
            # A conversation counts as answered from its first response on,
            # also while a customer's later message has reopened it.
            sql = (
                "SELECT team, answered_at IS NOT NULL FROM conversations WHERE route = ? AND deadline IS NOT NULL"
                " AND (answered_at IS NOT NULL OR deadline <= ?) ORDER BY opened_at DESC LIMIT ?"
            )
            with closing(self.db.execute(sql, (route, due, recent))) as cursor:
                newest = cursor.fetchall()
            if not newest:
                continue
            counts.append((route, newest[0][0], len(newest), sum(1 for _, answered in newest if answered)))
            # The first message unanswered since the last answer (the first ever
            # when none was answered), from which the route's silence counts.
            sql = (
                "SELECT (SELECT MIN(opened_at) FROM conversations WHERE route = ?1 AND deadline IS NOT NULL"
                " AND answered_at IS NULL AND opened_at >="
                " COALESCE((SELECT MAX(answered_at) FROM conversations WHERE route = ?1 AND deadline IS NOT NULL), '')),"
                " (SELECT MAX(opened_at) FROM conversations WHERE route = ?1 AND deadline IS NOT NULL),"
                " (SELECT MAX(answered_at) FROM conversations WHERE route = ?1 AND deadline IS NOT NULL)"
            )
            with closing(self.db.execute(sql, (route,))) as cursor:
                times[route] = cursor.fetchone()
        with closing(self.db.execute("SELECT DISTINCT route FROM alarms WHERE at > ?", (format_instant(now - period),))) as cursor:
            alarmed = {row[0] for row in cursor.fetchall()}

        figures = []
        for route, team, total, answered in counts:
            waiting, last, last_answer = times[route]
            figures.append(RouteFigures(
                route, team, total, answered or 0, parse_instant(waiting) if waiting else None, parse_instant(last),
                parse_instant(last_answer) if last_answer else None,
            ))
        alarms = planner(figures, alarmed)
        at = due
        for alarm in alarms:
            self.rows["alarms"].append((alarm.route, at, alarm.figures))
            target = {"kind": "smtp", "addresses": [alarm.owner.address], "purpose": "alarm"}
            self._outbox("mail", None, None, target, alarm.data, at)
            self._event(None, None, at, "zombie_route_alarm", {"route": alarm.route, "to": alarm.owner.address, "figures": alarm.figures})
        return alarms

    # -- rejected-address alarms ------------------------------------------------

    def add_rejection_alarms(self, now: datetime, period: timedelta, planner: Callable[..., list[Any]]) -> list[Any]:
        """Raise alarms for addresses rejected within `period`, skipping those alarmed within it; return them.

        An address in the destinations of two teams counts once for each
        team. The planner gets the figures and, by address and team, the time
        of each alarm raised within the period.
        """
        since = format_instant(now - period)
        # Only the period's rejections count, so older ones go.
        self.db.execute("DELETE FROM rejections WHERE at <= ?", (since,))
        sql = "SELECT address, team, MAX(at) FROM address_alarms WHERE at > ? GROUP BY address, team"
        with closing(self.db.execute(sql, (since,))) as cursor:
            alarmed = {(address, team): at for address, team, at in cursor.fetchall()}
        # An alarm stored before alarms named a team covers the address for every team.
        every_team = {address for address, team in alarmed if team == "*"}
        # A rejection stored before rows named their team takes its conversation's.
        sql = (
            "SELECT r.address, COALESCE(NULLIF(r.team, ''), c.team, '') AS owner_team, COUNT(*), MIN(r.at), MAX(r.at), MAX(r.id)"
            " FROM rejections r LEFT JOIN conversations c ON c.id = r.conversation_id"
            " WHERE r.at > ? GROUP BY r.address, owner_team ORDER BY r.address, owner_team"
        )
        with closing(self.db.execute(sql, (since,))) as cursor:
            counts = [row for row in cursor.fetchall() if (row[0], row[1]) not in alarmed and row[0] not in every_team]
        figures = []
        for address, team, count, first, last, newest in counts:
            sql = (
                "SELECT r.reply, COALESCE(c.route, '') FROM rejections r"
                " LEFT JOIN conversations c ON c.id = r.conversation_id WHERE r.id = ?"
            )
            with closing(self.db.execute(sql, (newest,))) as cursor:
                reply, route = cursor.fetchone()
            figures.append(RejectedFigures(address, team, route, count, parse_instant(first), parse_instant(last), reply))
        alarms = planner(figures, alarmed)
        at = format_instant(now)
        for alarm in alarms:
            self.rows["address_alarms"].append((alarm.address, at, alarm.detail, alarm.team))
            target = {"kind": "smtp", "addresses": [alarm.owner.address], "purpose": "alarm"}
            self._outbox("mail", None, None, target, alarm.data, at)
            detail = {"address": alarm.address, "team": alarm.team, "to": alarm.owner.address, "detail": alarm.detail}
            self._event(None, None, at, "rejected_address_alarm", detail)
        return alarms

    # -- retention ------------------------------------------------------------

    def empty_old_bytes(self, cutoff: str, limit: int) -> Emptied:
        """Empty the raw bytes of messages, and the payloads of outbox rows, created before `cutoff`.

        Each table is visited in id order from where the last pass stopped,
        up to `limit` rows. A visit stops at the first row from `cutoff` on
        and at the first row still waiting for delivery (a message whose
        outbox rows are pending, or a pending outbox row), so no row is left
        behind: a pending row waits at most delivery.give_up_after. A message
        keeps its row, size, summary and events; only its bytes go.
        """
        pending = {row for (row,) in self.db.execute(
            "SELECT message_row FROM outbox WHERE state = 'pending' AND message_row IS NOT NULL"
        )}
        messages, more_messages = self._visit(
            "messages", "SELECT id, received_at, length(raw) > 0, 0 FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            cutoff, limit, pending,
        )
        outbox, more_outbox = self._visit(
            "outbox",
            "SELECT id, created_at, payload IS NOT NULL OR json_extract(target, '$.fallback') IS NOT NULL,"
            " state = 'pending' FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            cutoff, limit, set(),
        )
        self.db.executemany("UPDATE messages SET raw = x'' WHERE id = ?", [(row,) for row in messages])
        # A webhook or escalation mail row keeps, inside its target, the mail to send if it fails.
        self.db.executemany(
            "UPDATE outbox SET payload = NULL, target = json_remove(target, '$.fallback') WHERE id = ?",
            [(row,) for row in outbox],
        )
        return Emptied(len(messages), len(outbox), more_messages or more_outbox)

    def reschedule(
        self, planner: ReschedulePlanner, after: int, limit: int, digest: str = "", *, only: int | None = None
    ) -> Rescheduled:
        """Set again, by `planner`, the level and next escalation time of up to `limit` open conversations with an id above `after`.

        Only conversations on the SLA clock are visited: open, with a
        deadline, and not escalated at once for a reason such as an
        unstaffed team, whose escalation does not follow the chain. The
        planner gets, for a conversation past level 0, the recipients of
        each of its escalations, in order. The last pass records `digest`, the
        rules the planner follows, as SCHEDULE_RULES. With `only`, the pass
        visits that conversation alone and records no digest.
        """
        selection, parameters = ("id = ?", (only, limit)) if only is not None else ("id > ?", (after, limit))
        rows = self.db.execute(
            "SELECT id, team, deadline, escalation_level, next_escalation_at FROM conversations"
            f" WHERE {selection} AND state = 'open' AND deadline IS NOT NULL AND escalation_reason = '' ORDER BY id LIMIT ?",
            parameters,
        ).fetchall()
        changes = []
        earliest: datetime | None = None
        for row_id, team, deadline, level, stored in rows:
            fired = self._fired_levels(row_id) if level else None
            new_level, due = planner(team, parse_instant(deadline), level, fired)
            text = format_instant(due) if due is not None else None
            if text != stored or new_level != level:
                changes.append((new_level, text, row_id))
                if due is not None and (earliest is None or due < earliest):
                    earliest = due
        self.db.executemany("UPDATE conversations SET escalation_level = ?, next_escalation_at = ? WHERE id = ?", changes)
        more = only is None and len(rows) == limit
        if digest and not more and only is None:
            self.db.execute("INSERT OR REPLACE INTO facts (name, value) VALUES (?, ?)", (SCHEDULE_RULES, digest))
        return Rescheduled(len(changes), rows[-1][0] if rows else after, more, earliest)

    def forget_other_schedule_rules(self, digest: str) -> None:
        """Remove the stored SCHEDULE_RULES unless it is `digest`."""
        self.db.execute("DELETE FROM facts WHERE name = ? AND value != ?", (SCHEDULE_RULES, digest))

    def _fired_levels(self, conversation_id: int) -> list[LevelTarget]:
        """Return the recipients of each chain level that fired for the conversation since its clock last started, oldest first.

        A conversation that a customer's message reopened climbs its chain
        again from the first level, so the escalations before the last
        `reopened` event belong to an earlier deadline.
        """
        rows = self.db.execute(
            "SELECT detail FROM events WHERE conversation_id = ?1 AND kind = 'escalated' AND id >"
            " COALESCE((SELECT MAX(id) FROM events WHERE conversation_id = ?1 AND kind = 'reopened'), 0) ORDER BY id",
            (conversation_id,),
        ).fetchall()
        details = [json.loads(detail) for (detail,) in rows]
        # An unstaffed team's escalation names no level of the chain.
        return [event_target(detail) for detail in details if isinstance(detail.get("level"), int)]

    def _visit(self, table: str, sql: str, cutoff: str, limit: int, pending: set[int]) -> tuple[list[int], bool]:
        """Return the ids to empty among the next `limit` rows of `table`, and whether rows are left; record where it stopped."""
        start = self.db.execute("SELECT last_id FROM retention WHERE name = ?", (table,)).fetchone()
        last = start[0] if start else 0
        rows = self.db.execute(sql, (last, limit)).fetchall()
        # Ids follow the order of writing. Take a row dated from the cutoff on
        # that a row older than the cutoff follows: a clock that ran ahead and
        # was set back dated it, and it is as old as the rows after it.
        earliest_after = [cutoff] * len(rows)
        for index in range(len(rows) - 2, -1, -1):
            earliest_after[index] = min(rows[index + 1][1], earliest_after[index + 1])
        chosen: list[int] = []
        stopped = False
        for (row_id, created_at, has_bytes, is_pending), later in zip(rows, earliest_after):
            misdated = later < cutoff
            if (created_at >= cutoff and not misdated) or is_pending or row_id in pending:
                stopped = True
                break
            if has_bytes:
                chosen.append(row_id)
            last = row_id
        self.db.execute("INSERT OR REPLACE INTO retention (name, last_id) VALUES (?, ?)", (table, last))
        return chosen, not stopped and len(rows) == limit

    # -- reads for decisions --------------------------------------------------

    def _existing_keys(self, keys: list[str], cutoff: str) -> set[str]:
        marks = ",".join("?" * len(keys))
        sql = f"SELECT dedupe_key FROM messages WHERE dedupe_key IN ({marks}) AND received_at >= ?"
        with closing(self.db.execute(sql, (*keys, cutoff))) as cursor:
            return {row[0] for row in cursor.fetchall()}

    def _earlier_copies(self, submissions: list[Submission], cutoff: str) -> dict[str, list[EarlierCopy]]:
        """Return the stored messages received since `cutoff` that share a Message-ID with a submission, by Message-ID.

        The conversation's message_ids entry leads to the message; its bytes
        are read only for such a match, which most mail never has.
        """
        message_ids = sorted({s.summary.message_id for s in submissions if s.summary.message_id and not s.is_postmaster})
        if not message_ids:
            return {}
        marks = ",".join("?" * len(message_ids))
        # Only the first few messages of the conversation under that id are
        # read, and no copy, whose bytes match a message before it. Any sender
        # can thread any number of messages under one id into a conversation,
        # and reading them all would hold every one in memory.
        sql = (
            "SELECT i.message_id, m.id, m.raw, c.id, c.reference, c.route, c.team, c.participants,"
            " c.destination, c.state, c.subject FROM message_ids i"
            " JOIN conversations c ON c.id = i.conversation_id"
            " JOIN messages m ON m.id IN (SELECT e.id FROM messages e WHERE e.conversation_id = i.conversation_id"
            " AND e.message_id = i.message_id AND e.received_at >= ? AND e.disposition != 'copy' ORDER BY e.id LIMIT ?)"
            f" WHERE i.message_id IN ({marks}) ORDER BY m.id"
        )
        earlier: dict[str, list[EarlierCopy]] = {}
        with closing(self.db.execute(sql, (cutoff, COPY_CANDIDATES, *message_ids))) as cursor:
            for message_id, row, raw, *conversation in cursor.fetchall():
                earlier.setdefault(message_id, []).append(EarlierCopy(row, _known(conversation), bytes(raw)))
        return earlier

    def _fresh_references(self, submissions: list[Submission]) -> list[str]:
        """Return one reference per submission, distinct and unused by any stored conversation.

        A submission's proposed reference is kept when it is free, so the
        acknowledgement rendered for it can be used as it is.
        """
        prefix = self.settings.reference_prefix
        references = [submission.proposed_reference for submission in submissions]
        while True:
            seen: set[str] = set()
            for index, reference in enumerate(references):
                if not reference or reference in seen:
                    references[index] = reference = new_reference(prefix)
                seen.add(reference)
            if len(seen) < len(references):
                continue  # a new reference repeated another one in the batch
            marks = ",".join("?" * len(references))
            sql = f"SELECT reference FROM conversations WHERE reference IN ({marks})"
            with closing(self.db.execute(sql, references)) as cursor:
                in_use = {row[0] for row in cursor.fetchall()}
            if not in_use:
                return references
            references = ["" if reference in in_use else reference for reference in references]

    def _ack_history(self, submissions: list[Submission]) -> dict[str, list[tuple[datetime, str, str]]]:
        recipients = sorted({s.ack.to_address.lower() for s in submissions if s.ack is not None})
        if not recipients:
            return {}
        cutoff = format_instant(min(s.received_at for s in submissions) - self.settings.ack_window)
        marks = ",".join("?" * len(recipients))
        sql = f"SELECT recipient, at, decision, signal FROM acknowledgements WHERE recipient IN ({marks}) AND at >= ?"
        history: dict[str, list[tuple[datetime, str, str]]] = {}
        with closing(self.db.execute(sql, (*recipients, cutoff))) as cursor:
            for recipient, at, decision, signal in cursor.fetchall():
                history.setdefault(recipient, []).append((parse_instant(at), decision, signal))
        return history

    def _known_conversations(
        self, submissions: list[Submission]
    ) -> tuple[dict[str, KnownConversation], dict[str, KnownConversation]]:
        prefix = self.settings.reference_prefix
        thread_ids = sorted({mid for s in submissions for mid in s.thread_ids})
        references = sorted({ref for s in submissions for ref in find_references(s.summary.subject, prefix)})
        by_message_id: dict[str, KnownConversation] = {}
        by_reference: dict[str, KnownConversation] = {}
        columns = "c.id, c.reference, c.route, c.team, c.participants, c.destination, c.state, c.subject"
        if thread_ids:
            marks = ",".join("?" * len(thread_ids))
            sql = (f"SELECT m.message_id, {columns} FROM message_ids m"
                   f" JOIN conversations c ON c.id = m.conversation_id WHERE m.message_id IN ({marks})")
            with closing(self.db.execute(sql, thread_ids)) as cursor:
                for row in cursor.fetchall():
                    by_message_id[row[0]] = _known(row[1:])
        if references:
            marks = ",".join("?" * len(references))
            sql = f"SELECT {columns} FROM conversations c WHERE c.reference IN ({marks})"
            with closing(self.db.execute(sql, references)) as cursor:
                for row in cursor.fetchall():
                    by_reference[row[1]] = _known(row)
        return by_message_id, by_reference

    def flush(self) -> None:
        for name, sql in _STATEMENTS.items():
            if self.rows[name]:
                self.db.executemany(sql, self.rows[name])


def _ack_counts(history: dict[str, list[tuple[datetime, str, str]]], submission: Submission, window: timedelta) -> tuple[int, bool]:
    """Return (acknowledgements sent, whether the limit was already reported) in the sender's window."""
    if submission.ack is None:
        return 0, False
    since = submission.received_at - window
    entries = [entry for entry in history.get(submission.ack.to_address.lower(), []) if entry[0] > since]
    sent = sum(1 for _, decision, _ in entries if decision == "sent")
    warned = any(signal == RATE_LIMIT_SIGNAL for _, _, signal in entries)
    return sent, warned


def _delivery_target(destination: Destination, received_for: str, team: str = "") -> dict[str, Any]:
    """Return the outbox target of a delivery to `destination`, with the recipient its Received header names, if given.

    An SMTP target names the team, so that a rejected address's alarm goes
    to the owner of the team whose destination lists it.
    """
    target = destination.to_record()
    if received_for:
        target["received_for"] = received_for
    if team and destination.kind == "smtp":
        target["team"] = team
    return target


def _known(row: Any) -> KnownConversation:
    conversation_id, reference, route, team, participants, destination, state, subject = row
    return KnownConversation(
        conversation_id, reference, route, team, frozenset(json.loads(participants)),
        Destination.from_record(json.loads(destination)) if destination else None, state, subject or "",
    )


# The last error of an escalation row that was not sent because its conversation was answered first.
WITHDRAWN_ERROR = "withdrawn: the conversation was answered before it was sent"
# The escalation rows of conversation ?2 still waiting to be sent: webhooks and escalation mails.
_PENDING_ESCALATIONS = (
    "conversation_id = ?2 AND state = 'pending'"
    " AND (kind = 'webhook' OR (kind = 'mail' AND json_extract(target, '$.purpose') = 'escalation'))"
)

# Each alarm table as (time, kind, what it is about, detail) rows raised after ?1.
_ALARM_SOURCES = {
    "alarms": "SELECT at, 'route', route, detail FROM alarms WHERE at > ?1",
    "address_alarms": "SELECT at, 'address', address, detail FROM address_alarms WHERE at > ?1",
}


def alarms_query(tables: set[str] | None = None) -> str | None:
    """Return the query for the newest ?2 alarms raised after ?1, from those alarm tables in `tables` (all when None).

    None comes when no alarm table is there, as in a database an older daemon last opened.
    """
    parts = [sql for table, sql in _ALARM_SOURCES.items() if tables is None or table in tables]
    return " UNION ALL ".join(parts) + " ORDER BY 1 DESC LIMIT ?2" if parts else None


_STATEMENTS = {
    "conversations": (
        "INSERT INTO conversations (id, reference, route, team, destination, state, opened_at, updated_at,"
        " subject, customer, participants, deadline, escalation_reason, next_escalation_at)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    ),
    "moves": "UPDATE conversations SET route = ?, team = ?, destination = ?, updated_at = ? WHERE id = ?",
    "participants": "UPDATE conversations SET participants = ?, updated_at = ? WHERE id = ?",
    # A clock that starts again climbs the chain from its first level. The
    # last parameter is the state the plan saw: no_reply_needed or answered.
    "clock_starts": (
        "UPDATE conversations SET state = 'open', deadline = ?, escalation_level = 0, escalation_reason = ?,"
        " next_escalation_at = ?, updated_at = ? WHERE id = ? AND state = ?"
    ),
    # answered_at and answered_by keep the first response when a reopened
    # conversation is answered again, for the first-response figures.
    "answers": (
        "UPDATE conversations SET state = 'answered', answered_at = COALESCE(answered_at, ?),"
        " answered_by = COALESCE(answered_by, ?), updated_at = ?, next_escalation_at = NULL WHERE id = ? AND state = 'open'"
    ),
    "messages": (
        "INSERT INTO messages (id, conversation_id, received_at, peer, helo, mail_from, rcpt_tos, message_id,"
        " dedupe_key, size, summary, route, team, route_reasons, disposition, machine_signal, shadow, raw, protocol)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    ),
    "message_ids": "INSERT OR IGNORE INTO message_ids (message_id, conversation_id) VALUES (?,?)",
    "outbox": (
        "INSERT INTO outbox (id, kind, conversation_id, message_row, target, payload, state, attempts,"
        " created_at, next_attempt_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
    ),
    # Only a pending row takes an attempt's result: a row withdrawn while its
    # attempt ran stays withdrawn.
    "outbox_updates": (
        "UPDATE outbox SET state = ?, attempts = ?, next_attempt_at = ?, done_at = ?, last_error = ?"
        " WHERE id = ? AND state = 'pending'"
    ),
    "outbox_recipients": (
        "UPDATE outbox SET target = json_set(target, '$.addresses', json(?), '$.delivered', json(?), '$.undelivered', json(?))"
        " WHERE id = ?"
    ),
    # An answered conversation needs no escalation that is still waiting to
    # be sent, such as a webhook or a mail to retry while its receiver is
    # down. The timeline names each one, then the rows end as done.
    "withdrawn_events": (
        "INSERT INTO events (conversation_id, message_row, at, kind, detail)"
        " SELECT conversation_id, message_row, ?1, 'escalation_withdrawn',"
        " json_object('outbox_id', id, 'kind', kind, 'attempts', attempts, 'reason', 'the conversation was answered')"
        f" FROM outbox WHERE {_PENDING_ESCALATIONS}"
    ),
    "withdrawn_escalations": (
        f"UPDATE outbox SET state = 'done', done_at = ?1, last_error = '{WITHDRAWN_ERROR}' WHERE {_PENDING_ESCALATIONS}"
    ),
    # A permanent delivery failure escalates at once, unless the conversation
    # was already escalated as unstaffed or is answered. A conversation that
    # needed no reply becomes open, because someone must now act on it.
    # SQLite computes every SET expression from the row as it was before.
    "failed_conversations": (
        "UPDATE conversations SET delivery_failed = 1, updated_at = ?,"
        " escalation_reason = CASE WHEN escalation_reason = '' AND state IN ('open', 'no_reply_needed')"
        " THEN ? ELSE escalation_reason END,"
        " next_escalation_at = CASE WHEN escalation_reason = '' AND state IN ('open', 'no_reply_needed')"
        " THEN ? ELSE next_escalation_at END,"
        " state = CASE WHEN state = 'no_reply_needed' THEN 'open' ELSE state END"
        " WHERE id = ?"
    ),
    # A failed delivery that reaches the team after a retry clears the flag,
    # unless another delivery of the conversation still failed. A conversation
    # that escalated at once because of the failure becomes due again, so the
    # scheduler resumes its chain from its stored level.
    "restored_conversations": (
        "UPDATE conversations SET delivery_failed = 0, updated_at = ?1,"
        " next_escalation_at = CASE WHEN (instr(escalation_reason, ?2) = 1 OR instr(escalation_reason, ?3) = 1)"
        " AND state = 'open' AND deadline IS NOT NULL THEN ?1 ELSE next_escalation_at END,"
        " escalation_reason = CASE WHEN instr(escalation_reason, ?2) = 1 OR instr(escalation_reason, ?3) = 1"
        " THEN '' ELSE escalation_reason END"
        " WHERE id = ?4 AND delivery_failed = 1 AND NOT EXISTS (SELECT 1 FROM outbox o"
        " WHERE o.conversation_id = ?4 AND o.kind = 'deliver' AND o.state = 'failed')"
    ),
    "escalation_updates": (
        "UPDATE conversations SET escalation_level = ?, next_escalation_at = ?, updated_at = ? WHERE id = ?"
    ),
    "acknowledgements": (
        "INSERT INTO acknowledgements (message_row, conversation_id, at, recipient, decision, signal, language,"
        " variant, message_id) VALUES (?,?,?,?,?,?,?,?,?)"
    ),
    "alarms": "INSERT INTO alarms (route, at, detail) VALUES (?,?,?)",
    "rejections": "INSERT INTO rejections (address, conversation_id, at, reply, team) VALUES (?,?,?,?,?)",
    "address_alarms": "INSERT INTO address_alarms (address, at, detail, team) VALUES (?,?,?,?)",
    "events": "INSERT INTO events (conversation_id, message_row, at, kind, detail) VALUES (?,?,?,?,?)",
}
