"""Summarize raw message bytes into the plain values that decisions read.

Parsing never raises: malformed MIME, raw 8-bit headers, unknown charsets and
missing headers all produce a summary with empty fields where nothing could be
read, so intake can still store and route the message.
"""

from __future__ import annotations

import binascii
import email.header
import email.parser
import email.policy
import email.utils
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message

from .encoded_words import decode_encoded_words
from .htmltext import html_text

# Header values are decoded up to this many characters, so that one header
# of megabytes, such as a Subject of 200,000 encoded words, cannot hold up parsing.
HEADER_DECODE_LIMIT = 64 * 1024

# Text bodies are decoded up to this many characters for body conditions.
# NOTE: a body condition does not see text past the first 256 KiB characters.
BODY_TEXT_LIMIT = 256 * 1024
# Characters of an HTML part read for its text: markup is often several
# times longer than the text it shows.
HTML_MARKUP_LIMIT = 4 * BODY_TEXT_LIMIT

_CHARSET = re.compile(r'charset\s*=\s*"?([^";\s]+)', re.IGNORECASE)
_BASE64_NOISE = re.compile(rb"[^A-Za-z0-9+/]")
# <meta charset="..."> or <meta http-equiv="Content-Type" content="text/html; charset=...">.
_META_CHARSET = re.compile(rb"""<meta\b[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE)

# A message id between angle brackets. Control characters (NUL, ESC, DEL)
# are not allowed in one (RFC 5322 section 3.6.4). An id containing them is
# dropped, because ids are copied into the headers of our own mail.
_MESSAGE_ID = re.compile(r"<[^<>\s\x00-\x1f\x7f]+>")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")
_ADDRESS_HEADERS = ("from", "to", "cc", "reply-to")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=")
_WHITESPACE = re.compile(r"\s+")
# A header line with white space between the field name and its colon, as
# RFC 5322 section 4.5.3 still allows in mail it reads (obs-optional). The
# standard library's parser takes such a line for the start of the body and
# drops every header after it.
_SPACED_COLON = re.compile(rb"^([!-9;-~]+)[ \t]+:", re.MULTILINE)
# Most address headers are a list of plain mailboxes: "local@domain", or
# "<local@domain>" behind a display name of plain words. Those are read with
# one regular expression. Anything else (quotes, comments, groups, encoded
# words, domain literals) goes to the email package's full parser.
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext, one or more
_PLAIN_ADDRESS = rf"{ATOM}(?:\.{ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
# Only the whitespace of RFC 5322 separates words. The email package keeps
# any other (a no-break space, for one) inside the word.
_SPACE = r"[ \t\r\n]"
_PLAIN_MAILBOX = re.compile(
    rf"{_SPACE}*(?:((?:{ATOM}{_SPACE}+)*{ATOM})?{_SPACE}*<({_PLAIN_ADDRESS})>|({_PLAIN_ADDRESS})){_SPACE}*"
)
_WORD_BREAK = re.compile(rf"{_SPACE}+")

# Bytes of a multipart body searched for the parts that `listed_part_types`
# lists, when the body is not parsed otherwise.
# NOTE: a report or calendar part that starts past this many bytes of the
# body, behind a large attachment, is not found then.
PART_SCAN_LIMIT = 256 * 1024
# Delivery reports (RFC 3464, RFC 6533), read receipts (RFC 8098) and
# abuse feedback (RFC 5965): multipart/report wraps them, and each of its
# report parts has one of the message/* types.
REPORT_TYPES = frozenset({
    "multipart/report",
    "message/delivery-status",
    "message/global-delivery-status",
    "message/disposition-notification",
    "message/global-disposition-notification",
    "message/feedback-report",
})
# Content types that `listed_part_types` lists. Every other part is left out.
LISTED_PART_TYPES = REPORT_TYPES | {"text/calendar"}
# Searched in a lower-cased copy, because a case-insensitive search of the
# bytes took five times as long (375 us against 76 us on 69 KB of text).
_LISTED_PART = re.compile(
    rb"content-type:[ \t\r\n]*(?:multipart/report|message/(?:global-)?(?:delivery-status|disposition-notification)"
    rb"|message/feedback-report|text/calendar)"
)
# Parts of the message, not of one attached to it, are listed up to this many.
MAX_LISTED_PARTS = 100


@dataclass(frozen=True)
class Summary:
    """The values that routing, threading and later decisions read from a message."""

    message_id: str
    from_address: str
    from_name: str
    reply_to: tuple[str, ...]
    to: tuple[str, ...]
    cc: tuple[str, ...]
    subject: str
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    date: str
    headers: Mapping[str, tuple[str, ...]] = field(repr=False)
    body_text: str = field(default="", repr=False)
    received_count: int = 0
    # The Content-Type values, unfolded, of the parts below the top level
    # whose type is in LISTED_PART_TYPES (see listed_part_types).
    part_types: tuple[str, ...] = ()

    def header(self, name: str) -> tuple[str, ...]:
        """Return every decoded value of header `name` (case-insensitive)."""
        return self.headers.get(name.lower(), ())

    @property
    def media_type(self) -> str:
        """The message's own media type in lower case, such as "text/plain" (the default), without parameters."""
        return (self.header("content-type") or ("text/plain",))[0].split(";", 1)[0].strip().lower()

    def undecoded_header(self, name: str) -> tuple[str, ...]:
        """Return every value of header `name` (case-insensitive) as received, with RFC 2047 words left encoded.

        A structured header that a server in front writes, such as
        Authentication-Results, may quote text the sender chose. Decoded, an
        encoded word in that text could turn into the header's own syntax.
        """
        headers = self.headers
        if isinstance(headers, DecodedHeaders):
            return headers.undecoded(name.lower())
        return headers.get(name.lower(), ())

    def to_record(self) -> dict[str, object]:
        """Return the stored form: everything but the headers and the body."""
        return {
            "message_id": self.message_id,
            "from_address": self.from_address,
            "from_name": self.from_name,
            "reply_to": list(self.reply_to),
            "to": list(self.to),
            "cc": list(self.cc),
            "subject": self.subject,
            "in_reply_to": list(self.in_reply_to),
            "references": list(self.references),
            "date": self.date,
        }


def summarize(raw: bytes, *, with_body: bool = True) -> Summary:
    """Summarize `raw` message bytes; the body is decoded only if `with_body`."""
    parser = email.parser.BytesParser(policy=email.policy.compat32)
    raw, end = _without_spaced_colons(raw, raw.find(b"\r\n\r\n"))
    whole = raw
    if not with_body:
        # The parser reads every body line even with headersonly=True, so it
        # gets only the header block (up to the first empty line).
        raw = raw[: end + 4] if end >= 0 else raw
    try:
        message = parser.parsebytes(raw, headersonly=not with_body)
    except Exception:  # noqa: BLE001 - the parser must never stop intake
        message = Message()

    headers = _decoded_headers(message)
    raw_headers = _raw_headers(message)
    from_name, from_address = _first_address(raw_headers.get("from", ()))
    return Summary(
        message_id=_first_message_id(headers.get("message-id", ())),
        from_address=from_address,
        from_name=from_name,
        reply_to=_addresses(raw_headers.get("reply-to", ())),
        to=_addresses(raw_headers.get("to", ())),
        cc=_addresses(raw_headers.get("cc", ())),
        subject=_WHITESPACE.sub(" ", " ".join(headers.get("subject", ()))).strip(),
        # Read undecoded and whole: ids need no decoding, and in a References
        # header past HEADER_DECODE_LIMIT the newest ids come last.
        in_reply_to=_message_ids(_undecoded(message, "in-reply-to")),
        references=_message_ids(_undecoded(message, "references")),
        date=(headers.get("date") or ("",))[0],
        headers=headers,
        # A message without a plain-text part is read through its HTML part.
        body_text=(_body_text(message) or _html_text(message)) if with_body else "",
        received_count=headers.count("received"),
        part_types=listed_part_types(message, whole, parsed_body=with_body),
    )


def _without_spaced_colons(raw: bytes, end: int) -> tuple[bytes, int]:
    """Return `raw` with the white space before each header field's colon removed, and where its header block now ends.

    `end` is the offset of the empty line that ends the header block, or -1
    when there is none. The parser then reads every field.
    """
    head_end = end + 2 if end >= 0 else len(raw)
    # Two substring searches rule out nearly every message faster than the pattern.
    if raw.find(b" :", 0, head_end) < 0 and raw.find(b"\t:", 0, head_end) < 0:
        return raw, end
    if not _SPACED_COLON.search(raw, 0, head_end):
        return raw, end
    head = _SPACED_COLON.sub(rb"\1:", raw[:head_end])
    return head + raw[head_end:], (len(head) - 2 if end >= 0 else -1)


def listed_part_types(message: Message, raw: bytes, *, parsed_body: bool = True) -> tuple[str, ...]:
    """Return the Content-Type values of the parts below the top level whose type is in LISTED_PART_TYPES.

    A delivery or read report may sit inside another multipart (RFC 6522
    section 3 lets it), and a meeting reply carries its text/calendar part
    beside a text one. A message/* report part counts only inside a
    multipart/report. Parts of an attached message (message/rfc822), such
    as a bounce that a person forwards, are not the message's own and are
    skipped. `message` is the parsed message, or its header block alone
    when not `parsed_body`. In that case the start of `raw` is parsed, but
    only when the message is a multipart one and names one of those types.
    """
    if not message.is_multipart() and message.get_content_maintype() != "multipart":
        return ()  # a single part: any report or calendar type is the top-level one
    if not parsed_body:
        end = raw.find(b"\r\n\r\n")
        head = raw[: end + 4 + PART_SCAN_LIMIT] if end >= 0 else b""
        if not _LISTED_PART.search(head.lower(), end + 4 if end >= 0 else 0):
            return ()
        try:
            message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head)
        except Exception:  # noqa: BLE001 - the parser must never stop intake
            return ()
    found: list[str] = []
    try:
        _list_parts(message, found, [MAX_LISTED_PARTS])
    except Exception:  # noqa: BLE001
        pass
    return tuple(found)


def _list_parts(message: Message, found: list[str], budget: list[int]) -> None:
    if not message.is_multipart() or message.get_content_maintype() != "multipart":
        return  # a message/* part: its contents belong to another message
    # A report part (message/delivery-status and the like) is one only in a
    # multipart/report (RFC 3464 section 2, RFC 5965 section 2, RFC 8098
    # section 3). Beside a person's text in a multipart/mixed, it is a report
    # that the person forwards inline, as mail programs do with its parts.
    in_report = message.get_content_type() == "multipart/report"
    for part in message.get_payload():
        budget[0] -= 1
        if budget[0] < 0:
            return
        kind = part.get_content_type()
        if kind in LISTED_PART_TYPES and (in_report or not kind.startswith("message/")):
            found.append(_FOLD.sub(" ", _repair_surrogates(str(part.get("content-type", "")))).strip())
        _list_parts(part, found, budget)


class DecodedHeaders(Mapping[str, tuple[str, ...]]):
    """Header values by lower-case name, decoded on first access.

    Most headers (Received, DKIM-Signature) are never read by a decision,
    so decoding them all up front would be wasted work on every message.
    """

    def __init__(self, raw: dict[str, list[object]]) -> None:
        self._raw = raw
        self._decoded: dict[str, tuple[str, ...]] = {}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        decoded = self._decoded.get(name)
        if decoded is None:
            decoded = self._decoded[name] = tuple(decode_header_value(value) for value in self._raw[name])
        return decoded

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def undecoded(self, name: str) -> tuple[str, ...]:
        """Return the values of header `name` without decoding RFC 2047 words, raw 8-bit bytes repaired."""
        return tuple(_repair_surrogates(str(value)) for value in self._raw.get(name, ()))

    def count(self, name: str) -> int:
        """Return how many times header `name` occurs, without decoding it."""
        return len(self._raw.get(name, ()))


def _decoded_headers(message: Message) -> DecodedHeaders:
    headers: dict[str, list[object]] = {}
    try:
        # raw_items skips the per-header wrapping that items() does.
        items = list(message.raw_items())
    except Exception:  # noqa: BLE001
        items = []
    for name, value in items:
        headers.setdefault(name.lower(), []).append(value)
    return DecodedHeaders(headers)


def _raw_headers(message: Message) -> dict[str, tuple[str, ...]]:
    """Return address headers as received: unfolded, with RFC 2047 words still encoded.

    Addresses are parsed before decoding, so an encoded display name that
    decodes to "@", "," or a line break can never become an address.
    """
    headers: dict[str, list[str]] = {}
    try:
        items = message.raw_items()
    except Exception:  # noqa: BLE001
        items = iter(())
    for name, value in items:
        if name.lower() in _ADDRESS_HEADERS:
            unfolded = _FOLD.sub(" ", _repair_surrogates(str(value)))
            headers.setdefault(name.lower(), []).append(_ENCODED_WORD.sub(_quote, unfolded))
    return {name: tuple(values) for name, values in headers.items()}


def _quote(match: re.Match[str]) -> str:
    # Some mailers leave "@", ":" or "," raw inside an encoded word, which RFC
    # 2047 section 5 forbids. Quoted, the word stays part of the display name.
    word = match.group(0).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{word}"'


def decode_header_value(value: object) -> str:
    """Decode a header value with RFC 2047 words and raw 8-bit bytes into text.

    An encoded word that does not decode (invalid base64 or Q text, bytes
    invalid in its charset) stays as written, and the rest still decodes.
    """
    text = _repair_surrogates(str(value)[:HEADER_DECODE_LIMIT])
    if not isinstance(value, email.header.Header):
        try:
            return decode_encoded_words(text)
        except Exception:  # noqa: BLE001 - the parser must never stop intake
            return text
    try:
        # compat32 wraps raw 8-bit header bytes in a Header whose charset
        # is unknown-8bit; its chunks are bytes decoded below.
        parts = email.header.decode_header(value)
    except Exception:  # noqa: BLE001
        return text
    decoded = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            decoded.append(_decode_bytes(chunk, charset))
        else:
            decoded.append(chunk)
    return "".join(decoded)


def _repair_surrogates(text: str) -> str:
    # BytesParser keeps raw 8-bit header bytes as surrogate escapes. Most such
    # headers are UTF-8 written by clients that skip RFC 2047 encoding.
    if text.isascii() or _SURROGATE_ESCAPE.search(text) is None:
        return text
    # UTF-8 with surrogateescape also takes text that mixes real non-ASCII
    # characters with escapes, so this never raises.
    raw = text.encode("utf-8", "surrogateescape")
    return _decode_bytes(raw, "utf-8")


def _decode_bytes(data: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8"):
        if not candidate or candidate.lower() in ("unknown-8bit", "x-unknown"):
            continue
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


def parse_addresses(values: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """Return (display name, address) pairs from address header values, as email.utils.getaddresses does."""
    pairs: list[tuple[str, str]] = []
    for value in values:
        plain = _plain_mailboxes(value)
        if plain is None:
            # The email package reads the values joined by commas, so a
            # comment or quote opened in one can run into the next.
            return email.utils.getaddresses(list(values))
        pairs += plain
    return pairs


def _plain_mailboxes(value: str) -> list[tuple[str, str]] | None:
    """Return the pairs of a list of plain mailboxes, or None when `value` needs the full parser."""
    pairs = []
    for part in value.split(","):
        match = _PLAIN_MAILBOX.fullmatch(part)
        if match is None:
            return None
        name, bracketed, bare = match.groups()
        # The full parser joins the words of a display name with one space.
        pairs.append((_WORD_BREAK.sub(" ", name) if name else "", bracketed or bare))
    return pairs


def _addresses(values: tuple[str, ...]) -> tuple[str, ...]:
    try:
        pairs = parse_addresses(values)
    except Exception:  # noqa: BLE001
        return ()
    return tuple(address.lower() for _, address in pairs if "@" in address)


def _first_address(values: tuple[str, ...]) -> tuple[str, str]:
    found = _mailboxes(values[:1])
    return found[0] if found else ("", "")


def mailboxes(values: tuple[str, ...]) -> list[tuple[str, str]]:
    """Return the (display name, lower-cased address) pairs of address header `values` as received, RFC 2047 words still encoded.

    Names are decoded after the addresses are parsed, as for From, so an
    encoded "@" or "," in a name never becomes part of an address.
    """
    return _mailboxes(tuple(_ENCODED_WORD.sub(_quote, _FOLD.sub(" ", value)) for value in values))


def _mailboxes(values: tuple[str, ...]) -> list[tuple[str, str]]:
    try:
        pairs = parse_addresses(values)
    except Exception:  # noqa: BLE001
        return []
    return [(_unquoted(" ".join(decode_header_value(name).split())), address.lower()) for name, address in pairs if "@" in address]


def _unquoted(name: str) -> str:
    """Return `name` without the pair of quotes around it, which some mailers put inside an encoded word.

    Quotes that belong to the name ('"JJ" Doe', 'Doe, John "JJ"') stay.
    """
    if len(name) >= 2 and name[0] == name[-1] == '"' and '"' not in name[1:-1]:
        return name[1:-1].strip()
    return name


def _undecoded(message: Message, name: str) -> tuple[str, ...]:
    """Return the values of header `name` as received, with surrogates for raw 8-bit bytes repaired."""
    try:
        return tuple(_repair_surrogates(str(value)) for value in message.get_all(name, ()))
    except Exception:  # noqa: BLE001
        return ()


def _message_ids(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(match for value in values for match in _MESSAGE_ID.findall(value))


def _first_message_id(values: tuple[str, ...]) -> str:
    found = _message_ids(values[:1])
    return found[0] if found else ""


def body_sample(raw: bytes, summary: Summary, limit: int = 4096) -> str:
    """Return up to `limit` characters from the start of the first text/plain part, else of the first HTML part's text, with lines ending in "\n".

    Cheaper than a full parse on large mail, for decisions that need a few
    words of the body, such as the language of the acknowledgement. A
    single-part message is decoded without the email parser from `limit`
    bytes of its body; of a multipart message, four times that is parsed.
    """
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return ""
    content_type = (summary.header("content-type") or ("text/plain",))[0]
    if summary.media_type in ("", "text/plain"):
        chunk = raw[end + 4 : end + 4 + limit]
        encoding = (summary.header("content-transfer-encoding") or ("7bit",))[0].strip().lower()
        try:
            if encoding == "base64":
                letters = _BASE64_NOISE.sub(b"", chunk)
                chunk = binascii.a2b_base64(letters[: len(letters) // 4 * 4])
            elif encoding == "quoted-printable":
                chunk = binascii.a2b_qp(chunk)
        except binascii.Error:
            return ""
        charset = _CHARSET.search(content_type)
        return _decode_sample(chunk, charset.group(1) if charset else None).replace("\r\n", "\n")
    try:
        # A multipart message may put its text after a long HTML part, so more of it is read.
        message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw[: end + 4 + 4 * limit])
    except Exception:  # noqa: BLE001 - the parser must never stop intake
        return ""
    return (_body_text(message) or _html_text(message))[:limit]


def _html_text(message: Message) -> str:
    """Return the text of the first text/html part that is not an attachment (see html_text), or ""."""
    try:
        for part in message.walk():
            if part.get_content_type() == "text/html" and part.get_content_disposition() != "attachment":
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    # Cut after decoding, since a cut inside a UTF-8 sequence would make it fall back to Latin-1.
                    charset = part.get_content_charset() or _meta_charset(payload)
                    markup = _decode_bytes(payload, charset)[:HTML_MARKUP_LIMIT]
                    return html_text(markup)[:BODY_TEXT_LIMIT]
    except Exception:  # noqa: BLE001 - the parser must never stop intake
        return ""
    return ""


def _meta_charset(markup: bytes) -> str | None:
    """Return the charset that a <meta> tag in the first 1024 bytes of `markup` declares, or None.

    The HTML standard has browsers look for it there when the Content-Type
    has no charset parameter. HTML saved from a web page may declare its
    charset only there.
    """
    found = _META_CHARSET.search(markup[:1024])
    return found.group(1).decode("ascii") if found else None


def _decode_sample(data: bytes, charset: str | None) -> str:
    """Decode the start of a text. A character cut at its end is replaced, so the text does not fall back to Latin-1."""
    try:
        return data.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def _body_text(message: Message) -> str:
    try:
        for part in message.walk():
            if part.get_content_maintype() == "multipart":
                continue
            if part.get_content_type() != "text/plain":
                continue
            if part.get_content_disposition() == "attachment":
                continue
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                # Lines end in CRLF on the wire. With "\n", as in the text of an HTML part, "$" in a multi-line pattern finds them.
                return _decode_bytes(payload, part.get_content_charset())[:BODY_TEXT_LIMIT].replace("\r\n", "\n")
    except Exception:  # noqa: BLE001
        return ""
    return ""
