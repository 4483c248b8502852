"""Escalations: whom to tell, the mail they get, and the webhook bodies.

`plan_escalation` is a pure function: given a due conversation, the rules
and the time, it returns the messages and webhooks to queue and when the
conversation is next due. The store commits its result in one transaction
with the conversation's new escalation level, so each level fires once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from email.utils import format_datetime

from .acknowledgement import build_text_message, new_message_id, one_line
from .loops import LOOP_HEADER
from .rules import RuleSet, Team
from .rules_sla import EscalationLevel, Human, Webhook

SIGNATURE_HEADER = "X-Guardrail-Signature"

# The start of the escalation reason of a message accepted without routing
# (see prepare.prepare_unrouted). Its team is staffed and its sender was not
# acknowledged, so its escalation mail states both rather than "unstaffed".
UNROUTED_REASON = "routing did not finish"
# The start of the escalation reason of a conversation whose message its
# destination refused for good. The team never got the message, so its
# escalation mail states that rather than "unstaffed".
DELIVERY_FAILED_REASON = "delivery to the destination failed permanently"
# The start of the escalation reason of a conversation whose message some of
# its destination's addresses took and the others never took. The reason
# names both, and so does the escalation mail.
PARTIAL_DELIVERY_FAILED_REASON = "delivery to some of the destination's addresses failed permanently"
# Addresses that the reason of a partly failed delivery names in each list; the rest are counted.
LISTED_ADDRESSES = 5


# The recipients of an escalation level: the person's address and the webhook's URL, either one empty.
# A level that names a rotation is recorded by the rotation's name after ROTATION_TARGET in
# place of the address, so that a hand-off after the level fired does not make it a new level.
LevelTarget = tuple[str, str]
ROTATION_TARGET = "rotation:"


@dataclass(frozen=True)
class DueConversation:
    """A stored conversation whose next escalation is due."""

    id: int
    reference: str
    team: str
    route: str
    subject: str
    customer: str
    opened_at: datetime
    deadline: datetime | None
    level: int
    reason: str  # "" for a missed deadline, else why the team is unstaffed
    message_id: str = ""  # Message-ID of the message that opened the conversation
    # The recipients of each chain level that fired, oldest first, or None when they were not read.
    fired: tuple[LevelTarget, ...] | None = None
    # When a customer's message last reopened the conversation after the team's answer, or None.
    reopened_at: datetime | None = None


@dataclass(frozen=True)
class QueuedMail:
    recipients: tuple[str, ...]
    data: bytes
    # The mail to send in its place if it fails for good, or None when there is no one else to send it to.
    fallback: QueuedMail | None = None


@dataclass(frozen=True)
class QueuedWebhook:
    webhook: Webhook
    body: dict[str, object]
    fallback: QueuedMail | None


@dataclass
class EscalationPlan:
    mails: list[QueuedMail] = field(default_factory=list)
    webhooks: list[QueuedWebhook] = field(default_factory=list)
    level: int = 0
    next_at: datetime | None = None
    events: list[dict[str, object]] = field(default_factory=list)


@dataclass(frozen=True)
class Sender:
    """How escalation mail is addressed and how to tell people to mark an answer."""

    hostname: str
    from_address: str
    answer_command: str  # e.g. "guardrail answer --config /etc/guardrail.toml"


def _chain(team: Team | None, rules: RuleSet) -> tuple[EscalationLevel, ...]:
    if team is not None and team.escalation:
        return team.escalation
    if rules.fallback is not None:
        return (EscalationLevel(timedelta(0), rules.fallback, None),)
    return ()


def next_escalation(team: Team | None, rules: RuleSet, deadline: datetime, level: int) -> datetime | None:
    """Return when a conversation past `level` levels of its team's chain is next due, or None when the chain has ended.

    The first escalation of a new conversation is the one at level 0.
    """
    chain = _chain(team, rules)
    return deadline + chain[level].after if level < len(chain) else None


def level_target(level: EscalationLevel) -> LevelTarget:
    """Return the recipients that `level` notifies, as the `escalated` events record them."""
    url = level.webhook.url if level.webhook else ""
    if level.rotation is not None:
        return (ROTATION_TARGET + level.rotation.name, url)
    return (level.human.address.lower() if level.human else "", url)


def event_target(detail: dict[str, object]) -> LevelTarget:
    """Return the recipients that an `escalated` event's level notified."""
    url = str(detail.get("webhook", ""))
    if detail.get("rotation"):
        return (ROTATION_TARGET + str(detail["rotation"]), url)
    return (str(detail.get("to", "")).lower(), url)


def levels_passed(team: Team | None, rules: RuleSet, fired: list[LevelTarget]) -> int:
    """Return how many levels at the start of the team's chain count as fired, matching levels to fired escalations by recipient.

    After the chain changes, each level of the new one is matched to an
    escalation that fired under the old one with the same person or
    webhook. Each fired escalation is used once, so a level repeated for
    the same person counts each time. Every level up to the last matched one
    counts as fired. So a level removed from the chain does not hide the
    levels after it. A level whose address or URL changed after later
    levels fired does not send those again. A level added before fired
    ones is skipped, since the conversation has escalated past it.
    """
    remaining: dict[LevelTarget, int] = {}
    for target in fired:
        remaining[target] = remaining.get(target, 0) + 1
    passed = 0
    for index, level in enumerate(_chain(team, rules)):
        target = level_target(level)
        if remaining.get(target):
            remaining[target] -= 1
            passed = index + 1
    return passed


def current_level(team: Team | None, rules: RuleSet, level: int, fired: Sequence[LevelTarget] | None) -> int:
    """Return how many levels of the team's chain in `rules` count as fired for a conversation stored at `level`.

    The stored level counts levels of the chain that was in force when it
    was written, which a reload or a start under changed rule files may have
    replaced. `fired` are the recipients of the levels that fired, as the
    `escalated` events record them. When they account for fewer levels than
    the stored count, as after events were lost, the stored level is kept.
    """
    if fired is None or len(fired) < level:
        return level
    return levels_passed(team, rules, list(fired))


def plan_escalation(conversation: DueConversation, rules: RuleSet, now: datetime, sender: Sender) -> EscalationPlan:
    """Return what to send for a due conversation, and when it is next due."""
    team = rules.teams.get(conversation.team)
    if conversation.reason:
        return _plan_unstaffed(conversation, team, rules, now, sender)

    chain = _chain(team, rules)
    # The stored level may count levels of a chain that the rules have since
    # changed, until the reschedule after a reload or start has run.
    plan = EscalationPlan(level=current_level(team, rules, conversation.level, conversation.fired))
    assert conversation.deadline is not None
    while plan.level < len(chain):
        level = chain[plan.level]
        fires_at = conversation.deadline + level.after
        if fires_at > now:
            plan.next_at = fires_at
            break
        plan.level += 1
        _add_level(plan, conversation, level, plan.level, now, sender, rules.escalation_contact(team) if team else rules.fallback,
                   _zone(team))
    return plan


def _plan_unstaffed(conversation: DueConversation, team: Team | None, rules: RuleSet, now: datetime, sender: Sender) -> EscalationPlan:
    contact = rules.escalation_contact(team) if team else rules.fallback
    if contact is None:
        contact = next((level.human_at(now) for level in _chain(team, rules) if level.names_human), None)
    plan = EscalationPlan(level=conversation.level, next_at=None)
    if contact is None:
        plan.events.append({"kind": "escalation_failed", "reason": "nobody to escalate to"})
        return plan
    title, text = at_once_wording(conversation)
    subject = f"[{conversation.reference}] {title}: team {conversation.team}: {one_line(conversation.subject)}"
    zone = _zone(team)
    data = escalation_mail(conversation, contact, subject, text, now, sender, zone=zone)
    fallback = _redirected(conversation, contact, rules.fallback, subject, text, now, sender, zone)
    plan.mails.append(QueuedMail((contact.address,), data, fallback))
    plan.events.append({"kind": "escalated", "level": "unstaffed", "to": contact.address, "reason": conversation.reason})
    return plan


def _zone(team: Team | None) -> tzinfo:
    """Return the time zone of `team`'s calendar, in which its escalation mails show times; UTC without a team."""
    return team.calendar.zone if team is not None else UTC


def _redirected(
    conversation: DueConversation, human: Human, other: Human | None, subject: str, text: str, now: datetime, sender: Sender,
    zone: tzinfo = UTC,
) -> QueuedMail | None:
    """Return the mail for `other` to send in place of the mail to `human` if that one fails for good, or None.

    None when there is no one else: `other` is missing or has the same address.
    """
    if other is None or other.address.lower() == human.address.lower():
        return None
    note = f"The escalation mail to {human.name} <{human.address}> could not be delivered, so it comes to you."
    return QueuedMail((other.address,), escalation_mail(conversation, other, subject, f"{note}\n\n{text}", now, sender, zone=zone))


def delivery_failure_reason(delivered: tuple[str, ...], undelivered: tuple[str, ...], error: str) -> str:
    """Return the escalation reason of a conversation whose delivery failed for good with `error`.

    When some addresses have the message, the reason names them and the addresses that do not.
    """
    if not delivered:
        return f"{DELIVERY_FAILED_REASON}: {error}"
    return (
        f"{PARTIAL_DELIVERY_FAILED_REASON}: delivered to {_listed(delivered)};"
        f" not delivered to {_listed(undelivered)}: {error}"
    )


def _listed(addresses: tuple[str, ...]) -> str:
    """Join the first LISTED_ADDRESSES of `addresses` with commas, and count the rest.

    The reason is stored cut to 500 characters, so a long list would push the destination's reply out of it.
    """
    named = ", ".join(addresses[:LISTED_ADDRESSES])
    rest = len(addresses) - LISTED_ADDRESSES
    return f"{named} and {rest} more" if rest > 0 else named


def at_once_wording(conversation: DueConversation) -> tuple[str, str]:
    """Return the subject's title and the text of a mail that escalates `conversation` at once, by its reason."""
    team, reason = conversation.team, conversation.reason
    if reason.startswith(UNROUTED_REASON):
        return "Routing did not finish", (
            f"The rules could not route this message: {reason}.\n"
            f"It went to team {team!r} by the default route. The sender was not acknowledged."
        )
    if reason.startswith(DELIVERY_FAILED_REASON):
        return "Delivery failed", (
            f"This message never reached team {team!r}: {reason}.\n"
            "Nobody on the team has it. Answer the sender, or pass the message on to the team and fix its destination."
        )
    if reason.startswith(PARTIAL_DELIVERY_FAILED_REASON):
        return "Delivery failed in part", (
            f"This message reached only some addresses of team {team!r}: {reason}.\n"
            "The addresses it was not delivered to do not have it. "
            "Pass the message on to the people there, or answer the sender, and fix those addresses."
        )
    return "Unstaffed destination", f"Team {team!r} is unstaffed: {reason}.\nThe sender was acknowledged; nobody on the team can answer."


def _add_level(
    plan: EscalationPlan,
    conversation: DueConversation,
    level: EscalationLevel,
    number: int,
    now: datetime,
    sender: Sender,
    contact: Human | None,
    zone: tzinfo = UTC,
) -> None:
    late = now - conversation.deadline if conversation.deadline else timedelta(0)
    subject = f"[{conversation.reference}] Unanswered past its deadline (level {number}): {one_line(conversation.subject)}"
    text = f"Nobody answered before the first-response deadline; this is escalation level {number}."
    if conversation.reopened_at is not None:
        text = (
            "The sender wrote again after the team's answer, and nobody answered before the new deadline."
            f" This is escalation level {number}."
        )
    event: dict[str, object] = {"kind": "escalated", "level": number, "late_seconds": int(late.total_seconds())}
    human = level.human_at(now)
    rotation = level.rotation.name if level.rotation else None
    mail = None
    if human is not None:
        mail_text = f"{text}\nYou are on call for rotation {rotation}, so this escalation comes to you." if rotation else text
        # The person the failed mail goes to instead is not on call, so their text leaves that line out.
        fallback = _redirected(conversation, human, contact, subject, text, now, sender, zone)
        mail = QueuedMail((human.address,), escalation_mail(conversation, human, subject, mail_text, now, sender, zone=zone), fallback)
        plan.mails.append(mail)
        event["to"] = human.address
    if rotation is not None:
        event["rotation"] = rotation
    if level.webhook is not None:
        fallback = None
        if mail is None and contact is not None:
            fallback = QueuedMail((contact.address,), escalation_mail(conversation, contact, subject, text, now, sender, zone=zone))
        body = webhook_body(conversation, number, human, now, sender, rotation=rotation)
        plan.webhooks.append(QueuedWebhook(level.webhook, body, fallback))
        event["webhook"] = level.webhook.url
    plan.events.append(event)


def _age(opened_at: datetime, now: datetime) -> str:
    minutes = int((now - opened_at).total_seconds() // 60)
    days, minutes = divmod(minutes, 1440)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{days}d"] if days else []
    return " ".join(parts + [f"{hours}h", f"{minutes:02}m"])


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def shown_time(instant: datetime, zone: tzinfo) -> str:
    """Return `instant` as a person reads it: local time in `zone` with its abbreviation, then UTC unless that is the zone.

    Names of days and months are English whatever the machine's locale,
    as is the rest of the mail.
    """
    local = instant.astimezone(zone)
    text = (
        f"{_WEEKDAYS[local.weekday()]} {local.day} {_MONTHS[local.month - 1]} {local.year}"
        f" {local.hour:02}:{local.minute:02} {local.tzname()}"
    )
    if local.utcoffset() == timedelta(0) and local.tzname() in ("UTC", "GMT"):
        return text
    in_utc = instant.astimezone(UTC)
    return f"{text} ({in_utc.hour:02}:{in_utc.minute:02} UTC)"


def escalation_mail(
    conversation: DueConversation, human: Human, subject: str, text: str, now: datetime, sender: Sender,
    *, zone: tzinfo = UTC,
) -> bytes:
    """Build the escalation mail about `conversation` to `human`, with times shown in `zone`, the team's."""
    deadline = shown_time(conversation.deadline, zone) if conversation.deadline else "none"
    body = "\n".join([
        f"Hello {human.name},",
        "",
        text,
        "",
        f"Reference:  {conversation.reference}",
        f"From:       {conversation.customer}",
        f"Subject:    {one_line(conversation.subject)}",
        f"Message-ID: {conversation.message_id or 'none'}",
        f"Team:       {conversation.team}",
        f"Route:      {conversation.route}",
        f"Received:   {shown_time(conversation.opened_at, zone)}",
        *([f"Reopened:   {shown_time(conversation.reopened_at, zone)}"] if conversation.reopened_at else []),
        f"Deadline:   {deadline}",
        f"Age:        {_age(conversation.opened_at, now)}",
        "",
        "To mark it answered, reply to the sender with the shared inbox in Cc or Bcc,",
        f"or run: {sender.answer_command} {conversation.reference}",
        "",
    ])
    return notice_mail(
        sender, human, one_line(subject), body, now, ("escalation", conversation.reference),
        extra_headers=[("X-Guardrail-Conversation", conversation.reference)],
    )


def notice_mail(
    sender: Sender, human: Human, subject: str, body: str, now: datetime, message_id: tuple[str, str],
    *, extra_headers: list[tuple[str, str]] | None = None,
) -> bytes:
    """Build a mail that guardrail writes to `human`, marked automatic and with our loop header.

    `message_id` is the kind and the reference that the Message-ID names.
    """
    kind, reference = message_id
    headers = [
        ("From", f"guardrail <{sender.from_address}>"),
        ("To", human.formatted()),
        ("Subject", subject),
        ("Date", format_datetime(now)),
        ("Message-ID", new_message_id(kind, reference, sender.hostname)),
        ("Auto-Submitted", "auto-generated"),
        (LOOP_HEADER, sender.hostname),
        *(extra_headers or []),
    ]
    return build_text_message(headers, body)


def webhook_body(
    conversation: DueConversation, level: int, human: Human | None, now: datetime, sender: Sender, *, rotation: str | None = None,
) -> dict[str, object]:
    """Return the generic JSON body of an escalation webhook; `rotation` names the rotation that `human` is on call for."""
    return {
        "event": "escalation",
        "reference": conversation.reference,
        "level": level,
        "team": conversation.team,
        "route": conversation.route,
        "sender": conversation.customer,
        "subject": conversation.subject,
        "message_id": conversation.message_id,
        "received_at": conversation.opened_at.isoformat(),
        # When the customer wrote again after the team's answer, which started this round; None before any answer.
        "reopened_at": conversation.reopened_at.isoformat() if conversation.reopened_at else None,
        "deadline": conversation.deadline.isoformat() if conversation.deadline else None,
        "escalated_at": now.isoformat(),
        "human": {"name": human.name, "address": human.address} if human else None,
        "rotation": rotation,
        "answer_command": f"{sender.answer_command} {conversation.reference}",
    }


def slack_body(body: dict[str, object]) -> dict[str, object]:
    """Return a Slack-compatible body ({"text": ...}) for a generic escalation body."""
    human = body.get("human")
    who = f" for {human['name']}" if isinstance(human, dict) else ""
    if who and body.get("rotation"):
        who += f", on call for {body['rotation']}"
    again = ", written again after the team's answer" if body.get("reopened_at") else ""
    text = (
        f":rotating_light: {body['reference']} unanswered past its deadline (level {body['level']}){who}{again}\n"
        f"*{body['subject']}* from {body['sender']}, team {body['team']}, route {body['route']}\n"
        f"Mark it answered: `{body['answer_command']}`"
    )
    return {"text": text}


def sign(secret: str, timestamp: int, payload: bytes) -> str:
    """Return the signature header value: HMAC-SHA256 over "TIMESTAMP.BODY"."""
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def encode_fallback(mail: QueuedMail | None) -> dict[str, object] | None:
    if mail is None:
        return None
    return {"addresses": list(mail.recipients), "payload": base64.b64encode(mail.data).decode()}


def decode_fallback(record: dict[str, object] | None) -> QueuedMail | None:
    if not record:
        return None
    return QueuedMail(tuple(record["addresses"]), base64.b64decode(str(record["payload"])))  # type: ignore[arg-type]


def webhook_payload(webhook: Webhook, body: dict[str, object]) -> bytes:
    """Return the bytes to POST for `webhook`."""
    chosen = slack_body(body) if webhook.format == "slack" else body
    return json.dumps(chosen, separators=(",", ":")).encode()
