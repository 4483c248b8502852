"""Acknowledgements: choose the language, render the template safely, build the message.

RFC 3834 shapes the message: it goes to the envelope sender of the original
(section 4), with a null return path so that nothing answers it back (as
other auto-responders do), `Auto-Submitted: auto-replied`, and In-Reply-To and
References so that replies thread.
"""

from __future__ import annotations

import binascii
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.utils import format_datetime

from .conversations import without_references
from .language import guess_language
from .locales import deadline_text
from .loops import LOOP_HEADER
from .message import Summary
from .rules import Team
from .rules_sla import Template

# At most this many ids go into References: the first (the thread's root)
# and the newest, so the header never grows without bound.
MAX_REFERENCES = 20
# Maximum length of a message id copied into In-Reply-To or References. fold_header
# writes a longer word as RFC 2047 encoded words, which a msg-id must not
# contain (RFC 2047 section 5), and one this long still fits on a line of
# its own (RFC 5322 section 2.1.1).
MAX_COPIED_ID = 900

_LANGUAGE_TAG = re.compile(r"^\s*([A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*)\s*(?:;\s*q\s*=\s*([01](?:\.\d{0,3})?))?\s*$")


@dataclass(frozen=True)
class AckRequest:
    """Everything needed to acknowledge a new conversation except its reference."""

    to_address: str
    from_address: str
    language: str
    template: Template
    fields: dict[str, str]
    in_reply_to: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class RenderedAck:
    data: bytes
    message_id: str
    used_plain: bool
    problem: str  # why the plain variant was used, or ""


def choose_language(summary: Summary, team: Team, sample: Callable[[], str] = str) -> str:
    """Return the language of the acknowledgement, one that the team's template has.

    That is the first language the sender names in Content-Language or
    Accept-Language. Without one, it is the language that `sample()` (the
    subject and the start of the body) is clearly written in. Otherwise it
    is the team's language.
    """
    for tag in requested_languages(summary):
        language = template_language(tag, team)
        if language is not None:
            return language
    if len(team.templates) > 1:
        guessed = guess_language(sample(), {_primary(language) for language in team.templates})
        if guessed is not None:
            return template_language(guessed, team) or team.language
    return team.language


def template_language(tag: str, team: Team) -> str | None:
    """Return the language of the team's template that serves a reader of `tag`, or None.

    The tag itself comes first, then the tag with its last subtags cut off
    one by one, as RFC 4647 lookup does ("pt-br" then "pt"). Then comes a
    template with the same primary subtag ("pt-br" for "pt"): the team's own
    language if it is one, else the first in alphabetical order.
    """
    tag = tag.lower()
    subtags = tag.split("-")
    for end in range(len(subtags), 0, -1):
        if "-".join(subtags[:end]) in team.templates:
            return "-".join(subtags[:end])
    related = sorted(language for language in team.templates if _primary(language) == subtags[0])
    if team.language in related:
        return team.language
    return related[0] if related else None


def _primary(tag: str) -> str:
    return tag.split("-", 1)[0].lower()


def requested_languages(summary: Summary) -> list[str]:
    """Return the language tags, in lower case, of Content-Language, then of Accept-Language by weight."""
    languages: list[str] = []
    for value in summary.header("content-language"):
        for tag in value.split(","):
            match = _LANGUAGE_TAG.match(tag)
            if match:
                languages.append(match.group(1).lower())
    weighted: list[tuple[float, int, str]] = []
    for value in summary.header("accept-language"):
        for position, tag in enumerate(value.split(",")):
            match = _LANGUAGE_TAG.match(tag)
            if match:
                weight = float(match.group(2)) if match.group(2) else 1.0
                weighted.append((-weight, position, match.group(1).lower()))
    languages += [language for weight, _, language in sorted(weighted) if weight < 0]
    return languages


def format_deadline(deadline: datetime | None, team: Team, language: str) -> str:
    """Return `deadline` as local date and time in the team's zone, in `language`; "" if None."""
    if deadline is None:
        return ""
    local = deadline.astimezone(team.calendar.zone)
    return deadline_text(local.date(), local.hour, local.minute, language, team.calendar.zone.key)


# Maximum numbers of characters of the sender's subject and display name that an acknowledgement quotes.
MAX_QUOTED_SUBJECT = 200
MAX_QUOTED_NAME = 100


# C0 and C1 control characters and DEL. Those that are not whitespace
# (NUL, ESC, DEL, CSI) are not allowed in a header field either (RFC 5322
# section 3.2.5), and a terminal that shows the message would act on them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """Return `text` on one line, with each run of whitespace or control characters as one space, safe inside a header."""
    return " ".join(_CONTROL.sub(" ", text).split())


def shortened(text: str, limit: int) -> str:
    """Return `text` cut to at most `limit` characters, ending in "…" where it was cut."""
    if len(text) <= limit:
        return text
    return text[:limit - 1].rstrip() + "…"


def merge_fields(
    summary: Summary, mail_from: str, team: Team, language: str, deadline: datetime | None,
    person: tuple[str, str] | None = None,
) -> dict[str, str]:
    """Return the template values for a message; "reference" is added when it is known.

    `person` is the (display name, address) of who wrote a message that one
    of our lists passed on, which replaces From's. The sender writes the
    subject and display name, so the acknowledgement quotes at most
    MAX_QUOTED_SUBJECT and MAX_QUOTED_NAME characters of them: enough to
    recognise the message, too little to carry someone else's text to a
    forged sender address.
    """
    name, sender = person or (summary.from_name, summary.from_address or mail_from)
    return {
        "sender_name": shortened(one_line(name), MAX_QUOTED_NAME) or sender,
        "sender": sender,
        "subject": shortened(one_line(summary.subject), MAX_QUOTED_SUBJECT),
        "team": team.name,
        "deadline": format_deadline(deadline, team, language),
        "urgent_contact": one_line(team.urgent_contact_in(language)),
    }


def is_copyable_id(message_id: str) -> bool:
    """Return True for a message id that In-Reply-To or References can carry as it is.

    An id with non-ASCII characters (RFC 6532 allows them in a message sent
    with SMTPUTF8) or longer than MAX_COPIED_ID would be written as encoded
    words, which no reader takes for the id, so it is left out.
    """
    return bool(message_id) and message_id.isascii() and len(message_id) <= MAX_COPIED_ID


def capped_references(summary: Summary) -> tuple[str, ...]:
    """Return the References of a reply to `summary`: its chain plus its id, capped, without ids that cannot be copied.

    A message without References whose In-Reply-To names one id has that
    id as its chain (RFC 5322 section 3.6.4). Some mail programs write only
    In-Reply-To.
    """
    parents = summary.references or (summary.in_reply_to if len(summary.in_reply_to) == 1 else ())
    chain = [message_id for message_id in parents if is_copyable_id(message_id)]
    if is_copyable_id(summary.message_id) and summary.message_id not in chain:
        chain.append(summary.message_id)
    if len(chain) > MAX_REFERENCES:
        chain = chain[:1] + chain[-(MAX_REFERENCES - 1):]
    return tuple(chain)


def fold_header(name: str, value: str) -> bytes:
    """Return one header line, folded at spaces to 78 octets, RFC 2047-encoded when not ASCII.

    `value` must be one line already: callers pass one_line() text, addresses
    and message ids, so no merge field can start a header of its own.
    """
    if name in ("From", "To") and not value.isascii():
        # An internationalized address is written as UTF-8 (RFC 6532);
        # RFC 2047 encoding is not allowed inside an address.
        return f"{name}: {value}\r\n".encode("utf-8")
    if value.isascii() and len(name) + 2 + len(value) <= 78:
        return f"{name}: {value}\r\n".encode("ascii")  # fits on one line as it is
    # A word longer than a line allows is split by encoding it (RFC 2047).
    if not value.isascii() or any(len(word) > 900 for word in value.split(" ")):
        encoded = Header(value, "utf-8", maxlinelen=78, header_name=name).encode(linesep="\r\n")
        return f"{name}: {encoded}\r\n".encode("ascii")
    lines: list[str] = []
    line = f"{name}:"
    for word in value.split(" "):
        if len(line) + 1 + len(word) > 78 and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def build_text_message(headers: list[tuple[str, str]], body: str) -> bytes:
    """Build a UTF-8 text/plain message with quoted-printable body and CRLF line endings."""
    head = b"".join(fold_header(name, value) for name, value in headers)
    head += (
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: text/plain; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    encoded = binascii.b2a_qp(body.encode("utf-8"), istext=True).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return head + b"\r\n" + encoded


def new_message_id(kind: str, reference: str, hostname: str) -> str:
    return f"<{kind}.{reference.lower()}.{secrets.token_hex(6)}@{hostname}>"


def render_acknowledgement(request: AckRequest, reference: str, hostname: str, now: datetime) -> RenderedAck:
    """Render and build the acknowledgement for conversation `reference`.

    When a merge field is missing or empty, the template's plain variant is
    used instead, and `problem` names the field.
    """
    fields = {**request.fields, "reference": reference}
    if "subject" in fields:
        # The subject quoted from the message may carry the tag of another
        # conversation, which the reply to this acknowledgement would repeat
        # beside this one's.
        fields["subject"] = without_references(fields["subject"], reference.rpartition("-")[0])
    template = request.template
    problem = ""
    try:
        subject = template.subject.format_map(fields)
        body = template.body.format_map(fields)
        empty = sorted(name for name in template.fields if not fields.get(name, "").strip())
        if empty:
            problem = f"empty merge field {{{empty[0]}}}"
    except (KeyError, IndexError, ValueError) as error:
        problem = f"unresolved merge field {error}"
    if problem:
        subject, body = template.plain_subject, template.plain_body

    message_id = new_message_id("ack", reference, hostname)
    headers = [
        ("From", request.from_address),
        ("To", request.to_address),
        ("Subject", f"{one_line(subject)} [{reference}]"),
        ("Date", format_datetime(now)),
        ("Message-ID", message_id),
    ]
    if is_copyable_id(request.in_reply_to):
        headers.append(("In-Reply-To", request.in_reply_to))
    if request.references:
        headers.append(("References", " ".join(request.references)))
    headers += [
        ("Auto-Submitted", "auto-replied"),
        ("X-Auto-Response-Suppress", "All"),
        (LOOP_HEADER, hostname),
        ("X-Guardrail-Conversation", reference),
        ("Content-Language", request.language),
    ]
    return RenderedAck(build_text_message(headers, body.strip() + "\n"), message_id, bool(problem), problem)
