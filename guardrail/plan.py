"""Decide what accepting one message creates: a pure function over values.

The store calls `plan_submission` inside its commit, with the lookups it made
for the whole batch. The plan lists every row to write, so the message, its
conversation and its outbox rows are committed together.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, TypeVar

from .acknowledgement import AckRequest, RenderedAck, render_acknowledgement
from .conversations import (
    KnownConversation,
    choose_conversation,
    find_references,
    new_reference,
)
from .deadlines import ClockPlanner, SlaClock
from .gratitude import is_same_matter
from .message import Summary, decode_header_value
from .rules import Destination
from .team_copies import TeamCopy

_Frozen = TypeVar("_Frozen")


def _copy(value: _Frozen, **changes: Any) -> _Frozen:
    """Return a copy of a frozen dataclass instance with `changes`, keeping the cached properties it contains.

    dataclasses.replace runs __init__ again, which is slow for a class with
    this many fields, and the values here were valid already.
    """
    copy = object.__new__(type(value))
    copy.__dict__.update(value.__dict__, **changes)
    return copy


# Threading looks at the newest ids only: a References header can list
# hundreds, and the newest ones are the nearest parents.
THREAD_IDS_CONSIDERED = 20


@dataclass(frozen=True)
class Submission:
    """The facts intake has about one message once its DATA is read."""

    raw: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]
    peer: str
    helo: str
    received_at: datetime
    summary: Summary
    route: str
    team: str
    destination: Destination | None
    route_reasons: tuple[str, ...]
    team_members: frozenset[str]
    is_loop: bool = False
    is_postmaster: bool = False
    # Acknowledgement and SLA, decided by intake for the case where the
    # message opens a conversation; the store applies them only then.
    ack_signal: str | None = None
    ack: AckRequest | None = None
    deadline: datetime | None = None
    first_escalation_at: datetime | None = None
    unstaffed: str = ""
    sla_applies: bool = True
    # Whether the message, as a follow-up, counts as the team's answer.
    is_staff: bool = False
    from_inbox: bool = False  # its From is one of the shared inboxes
    # Why a sender that claims to be staff or the inbox was not taken as such, or "".
    staff_unverified: str = ""
    # The teams whose members include the sender in the rules now, when the sender counts as staff.
    member_of: frozenset[str] = frozenset()
    machine_signal: str = ""  # why the message looks written by software, or ""
    # Shadow routes that match: {"route", "team", "would_win"} each.
    shadow: tuple[dict[str, object], ...] = ()
    # An acknowledgement rendered before the commit for a proposed new
    # conversation reference. The store uses it when the message gets that
    # reference, and renders the acknowledgement again otherwise.
    proposed_reference: str = ""
    rendered_ack: RenderedAck | None = None
    protocol: str = "ESMTP"  # how the client sent it, for the Received header: SMTP, ESMTP or ESMTPS
    # The postmaster owner, when postmaster was a recipient beside an inbox.
    postmaster_copy: Destination | None = None
    # The first postmaster recipient, which the Received header of the
    # owner's copy names, or "" when postmaster was not a recipient.
    postmaster_recipient: str = ""
    # The teams of the rules the message was routed by. A follow-up whose
    # conversation's team is not among them takes this message's route, team
    # and destination. None keeps every conversation's team.
    team_names: frozenset[str] | None = None
    # The person who wrote a message that one of [smtp] inbox_lists passed
    # on, or "" for other mail. It replaces From and the envelope sender,
    # which may name the list.
    list_sender: str = ""
    # A person's reply whose new text only says thanks, without attachments
    # (see guardrail.gratitude). False for every other message.
    thanks_only: bool = False
    # The teams the recipients are addressed to (see team_copies). Each one
    # other than the conversation's team gets a copy. Empty when
    # [conversations] copy_other_teams is off.
    addressed_teams: tuple[TeamCopy, ...] = ()

    @cached_property
    def dedupe_key(self) -> str:
        """Identify a retransmission: same Message-ID, envelope and content."""
        digest = hashlib.sha256()
        for part in (self.summary.message_id, self.mail_from, ",".join(sorted(self.rcpt_tos))):
            digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(hashlib.sha256(self.raw).digest())
        return digest.hexdigest()

    def with_rendered_ack(self, reference_prefix: str, hostname: str) -> Submission:
        """Return a copy with a proposed reference and the acknowledgement rendered for it, if one is requested."""
        if self.ack is None:
            return self
        reference = new_reference(reference_prefix)
        rendered = render_acknowledgement(self.ack, reference, hostname, self.received_at)
        return _copy(self, proposed_reference=reference, rendered_ack=rendered)

    def detached(self) -> Submission:
        """Return a copy without the raw bytes, decoded headers and body, small enough to pass between processes.

        The copy keeps the dedupe key computed from the raw bytes; `attached`
        puts the bytes back.
        """
        summary = _copy(self.summary, headers={}, body_text="")
        return _copy(self, raw=b"", summary=summary, dedupe_key=self.dedupe_key)

    def attached(self, raw: bytes) -> Submission:
        """Return a copy of a detached Submission carrying `raw`, the bytes it was prepared from."""
        if "dedupe_key" not in self.__dict__:
            raise ValueError("attached() needs a Submission made by detached()")
        return _copy(self, raw=raw)

    @property
    def clock(self) -> SlaClock:
        """Return the SLA clock that intake decided for the message's own route, for a conversation it opens or starts."""
        return SlaClock(self.deadline, self.first_escalation_at, self.unstaffed)

    @property
    def thread_ids(self) -> tuple[str, ...]:
        ids = self.summary.references + self.summary.in_reply_to
        return ids[-THREAD_IDS_CONSIDERED:]

    @property
    def sender_addresses(self) -> frozenset[str]:
        if self.list_sender:
            return frozenset((self.list_sender,))
        addresses = {self.summary.from_address, self.mail_from.lower()}
        return frozenset(address for address in addresses if address)

    @property
    def sender(self) -> str:
        """The address of who wrote the message: the person behind one of our lists, else From, else the envelope sender."""
        return self.list_sender or self.summary.from_address or self.mail_from


@dataclass(frozen=True)
class EarlierCopy:
    """A stored message with the same Message-ID as one being committed, as the copy check reads it."""

    message_row: int
    conversation: KnownConversation
    raw: bytes


# Header fields that forwarders pass on unchanged, besides every Content-*
# field. Trace fields (Received, Return-Path, Delivered-To, DKIM and ARC
# signatures) differ between copies.
_ORIGIN_FIELDS = frozenset({
    b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
    b"content-transfer-encoding",
})
_FOLDING = re.compile(rb"[ \t\r\n]+")


def copy_signature(raw: bytes) -> bytes:
    """Return what every copy of the message in `raw` shares: its origin header fields, unfolded and sorted, and its body."""
    end = raw.find(b"\r\n\r\n")
    header, body = (raw[:end], raw[end + 4 :]) if end >= 0 else (raw, b"")
    fields = []
    for line in re.split(rb"\r\n(?![ \t])", header):
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        if colon and (name in _ORIGIN_FIELDS or name.startswith(b"content-")):
            fields.append(name + b":" + _FOLDING.sub(b" ", value).strip())
    return b"\n".join(sorted(fields)) + b"\n\n" + body


# The header fields a relay may re-encode while their decoded text stays. The
# transfer encoding is left out, since a relay that re-encodes a part rewrites it.
_DECODED_FIELDS = frozenset(name.decode() for name in _ORIGIN_FIELDS) - {"content-transfer-encoding"}
_TRAILING_SPACE = re.compile(rb"[ \t]+(?=\n)|[ \t\n]+\Z")


def content_signature(raw: bytes) -> tuple[object, ...] | None:
    """Return what a copy keeps when a relay re-encodes it, or None when `raw` cannot be parsed.

    A relay that passes 8-bit text to a server without 8BITMIME (RFC 6152)
    has to convert it to quoted-printable or base64, or bounce it, and some
    relays write 8-bit header text as RFC 2047 words. What stays is the
    decoded text of the origin fields, of every header field of each MIME
    part but its transfer encoding, and each part's decoded content, with
    line endings and trailing white space set aside.
    """
    try:
        message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)
        signature: list[object] = []
        for part in message.walk():
            signature.append(sorted(
                (name.lower(), " ".join(decode_header_value(value).split()))
                for name, value in part.items()
                if name.lower() in _DECODED_FIELDS or _is_mime_field(name.lower(), part is message)
            ))
            if part.is_multipart():
                # The text around the parts is no part, but it is still text the sender wrote.
                signature.append((part.preamble, part.epilogue))
            else:
                data = part.get_payload(decode=True) or b""
                signature.append(_TRAILING_SPACE.sub(b"", data.replace(b"\r\n", b"\n")))
    except Exception:  # noqa: BLE001 - a message the parser rejects is no copy
        return None
    return tuple(signature)


def _is_mime_field(name: str, top_level: bool) -> bool:
    """Return whether `name` describes a MIME part's content: any field of a nested part, the Content-* fields of the message."""
    if name == "content-transfer-encoding":
        return False
    return not top_level or name.startswith("content-")


def find_copy(submission: Submission, earlier: list[EarlierCopy]) -> EarlierCopy | None:
    """Return the earlier message that `submission` is a copy of, or None.

    Forwarding rules that each pass a message on to another of our inboxes
    deliver it once per inbox, in separate transactions, each with trace
    headers of its own and often with a rewritten envelope sender. A copy
    keeps the rest: the Message-ID (the lookup key), From, To, Cc, Subject,
    Date, the MIME fields and the body. Most copies keep them byte for
    byte. A relay that re-encodes the message keeps their decoded text
    (see `content_signature`), which is compared only when no candidate
    matches byte for byte. A mail program that reuses a Message-ID for a
    new text changes some of them, so its message is not taken for a copy.
    """
    if not earlier:
        return None
    signature = copy_signature(submission.raw)
    for candidate in earlier:
        if copy_signature(candidate.raw) == signature:
            return candidate
    content = content_signature(submission.raw)
    if content is None:
        return None
    return next((candidate for candidate in earlier if content_signature(candidate.raw) == content), None)


COPY_SIGNAL = "copy of a message already received"


@dataclass
class Plan:
    """The rows one accepted message adds, and how intake should describe it."""

    disposition: str  # "new", "follow_up", "copy", "loop", "postmaster" or "duplicate"
    conversation: KnownConversation | None = None
    opens_conversation: bool = False
    thread_reason: str = ""
    route: str = ""
    team: str = ""
    destination: Destination | None = None
    participants_added: frozenset[str] = field(default_factory=frozenset)
    answers: bool = False
    ack_decision: str = ""  # "sent", "suppressed" or "" when none was considered
    ack_signal: str = ""
    moved_from: str = ""  # the conversation's former team, when the message moves it to `team`
    move_reason: str = ""  # why it moves: MOVED_TEAM_REMOVED or MOVED_CLOCK_STARTED
    starts_clock: bool = False  # a person wrote to a conversation that needed no reply so far
    reopens: bool = False  # a customer wrote to a conversation that the team had answered
    thanked: bool = False  # a customer's thank-you after the team's answer, which left the conversation answered
    # The clock that the message starts in the conversation it joins, when starts_clock or reopens is set.
    clock: SlaClock | None = None
    # The copies for other teams that the message was addressed to (see team_copies).
    team_copies: tuple[TeamCopy, ...] = ()


def plan_submission(
    submission: Submission,
    *,
    is_duplicate: bool,
    reference_prefix: str,
    by_message_id: dict[str, KnownConversation],
    by_reference: dict[str, KnownConversation],
    new_conversation: KnownConversation,
    acks_in_window: int = 0,
    ack_limit: int = 3,
    copy_of: EarlierCopy | None = None,
    reopened_clock: ClockPlanner | None = None,
) -> Plan:
    """Return what committing `submission` creates.

    `new_conversation` is the conversation to open if the message starts one;
    `acks_in_window` counts acknowledgements already sent to its sender in
    the rate window, of which at most `ack_limit` are allowed. `copy_of` is
    the stored message it is a copy of (see find_copy), if any: a copy joins
    that message's conversation and is neither delivered nor acknowledged
    again, as the second recipient of one transaction would be.
    `reopened_clock` gives the clock that a customer's message starts again
    in an answered conversation. Without it, no conversation reopens.
    """
    if is_duplicate:
        return Plan("duplicate")
    if submission.is_postmaster:
        return Plan(
            "postmaster",
            route=submission.route,
            team=submission.team,
            destination=submission.destination,
        )
    if copy_of is not None and not submission.is_loop:
        # Our own delivery coming back is a copy too, but a loop first.
        known = copy_of.conversation
        return Plan(
            "copy",
            conversation=known,
            thread_reason=f"copy of message {copy_of.message_row}",
            route=known.route,
            team=known.team,
            destination=known.destination,
            ack_decision="suppressed",
            ack_signal=COPY_SIGNAL,
        )

    tagged = find_references(submission.summary.subject, reference_prefix)
    known, reason = choose_conversation(
        submission.thread_ids, tagged, submission.sender_addresses, by_message_id, by_reference,
        from_inbox=submission.from_inbox, member_of=submission.member_of,
    )
    if known is not None:
        plan = _plan_follow_up(submission, known, reason, reopened_clock, reference_prefix)
        if plan.starts_clock:
            # The sender is the first here to wait for a reply, so the acknowledgement tells them when it is due.
            plan.ack_decision, plan.ack_signal = decide_acknowledgement(submission, acks_in_window, ack_limit)
        return plan
    decision, signal = decide_acknowledgement(submission, acks_in_window, ack_limit)
    return Plan(
        "loop" if submission.is_loop else "new",
        conversation=new_conversation,
        opens_conversation=True,
        route=submission.route,
        team=submission.team,
        destination=submission.destination,
        ack_decision=decision,
        ack_signal=signal,
    )


MOVED_TEAM_REMOVED = "team removed from the rules"
MOVED_CLOCK_STARTED = "a person's message routed to this team started the clock"


def _plan_follow_up(
    submission: Submission, known: KnownConversation, reason: str, reopened_clock: ClockPlanner | None,
    reference_prefix: str,
) -> Plan:
    """Return the plan of a message that joins `known`.

    A follow-up of a conversation whose team was removed from the rules is
    routed as a new message would be, and the conversation moves to that team.
    So does a person's message that starts the clock of a conversation that
    machine mail opened, when the rules send it to another team. That team
    handles people's mail of this kind, and the deadline and escalation
    chain of the message's own route are the ones that start. A customer's
    message that reopens an answered conversation does not move it, because
    the customer answers the team that wrote, and the clock of the
    conversation's route and team starts again. A thank-you on the same
    matter reopens it only where the rules set reopen_on_thanks.
    """
    starts_clock = known.state == "no_reply_needed" and is_reply_expected(submission) and not submission.is_staff
    move_reason = ""
    if is_team_removed(known.team, submission.team_names):
        move_reason = MOVED_TEAM_REMOVED
    elif starts_clock and submission.team and submission.team != known.team:
        move_reason = MOVED_CLOCK_STARTED
    joining = submission.sender_addresses
    route, team, destination = known.route, known.team, known.destination
    if move_reason:
        joining = joining | submission.team_members
        route, team, destination = submission.route, submission.team, submission.destination
    clock = submission.clock if starts_clock else None
    reopening = is_reopening(known.state, submission)
    thanks = reopening and is_thanks(submission, known, reference_prefix)
    if reopened_clock is not None and reopening:
        clock = reopened_clock(team, route, submission.received_at, thanks)
    return Plan(
        "loop" if submission.is_loop else "follow_up",
        conversation=known,
        thread_reason=reason,
        route=route,
        team=team,
        destination=destination,
        participants_added=joining - known.participants,
        answers=known.state == "open" and submission.is_staff and not submission.machine_signal,
        ack_decision="suppressed",
        ack_signal="follow-up in an existing conversation",
        moved_from=known.team if move_reason else "",
        move_reason=move_reason,
        starts_clock=starts_clock,
        reopens=clock is not None and not starts_clock,
        thanked=thanks and clock is None,
        clock=clock,
    )


def is_reply_expected(submission: Submission) -> bool:
    """Return True when `submission` is a person's message, so the conversation it opens or joins awaits a reply.

    Machine mail and our own mail coming back (loop messages) need none.
    """
    return submission.sla_applies and not submission.is_loop


def is_reopening(state: str, submission: Submission) -> bool:
    """Return True when `submission`, joining a conversation in `state`, is a customer's message after the team's answer.

    Mail that only its subject marks as an auto-reply or a delivery report
    counts as software's here, unlike in a conversation it opens. A person's
    reply in a conversation usually starts its subject with "Re:", and an
    out-of-office reply to the team's answer with "Automatic reply:" or the like.
    """
    return (
        state == "answered" and is_reply_expected(submission) and not submission.machine_signal and not submission.is_staff
    )


def is_thanks(submission: Submission, known: KnownConversation, reference_prefix: str) -> bool:
    """Return True when `submission` only thanks the team, in a reply whose subject still names the matter of `known`.

    A thank-you under a new or forwarded subject may bring a new matter, so it counts as a reply that waits.
    """
    return submission.thanks_only and is_same_matter(submission.summary.subject, known.subject, reference_prefix)


def is_team_removed(team: str, team_names: frozenset[str] | None) -> bool:
    """Return True when `team` is missing from `team_names`, the teams of the current rules; False when those are unknown (None)."""
    return team_names is not None and team not in team_names


RATE_LIMIT_SIGNAL = "rate limit"


def decide_acknowledgement(submission: Submission, acks_in_window: int, ack_limit: int) -> tuple[str, str]:
    """Return ("sent", "") or ("suppressed", signal) for a message that opens a conversation."""
    if submission.ack_signal:
        return "suppressed", submission.ack_signal
    if submission.ack is None:
        return "suppressed", "no acknowledgement template"
    if acks_in_window >= ack_limit:
        return "suppressed", RATE_LIMIT_SIGNAL
    return "sent", ""


def opening_participants(submission: Submission) -> frozenset[str]:
    """Return who takes part in a conversation that `submission` opens."""
    summary: Summary = submission.summary
    return submission.sender_addresses | frozenset(summary.reply_to) | submission.team_members
