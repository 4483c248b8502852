"""Pure decisions about automated mail and mail loops.

guardrail never answers a machine. `machine_signal` names the first sign that
a message was written by software (auto-replies, bounces, lists, bulk mail,
our own mail coming back); `acknowledgement_signal` adds the reasons that are
not about machines but still rule out an acknowledgement. Each returns the
signal as text, which is stored with the decision, or None.

A message that one of `[smtp] inbox_lists` passed on carries that list's
headers and its bounce address as the envelope sender, whoever wrote it.
Given the person behind it (a ListSender), `machine_signal` leaves those out
and reads every other sign.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable

from .lists import ListSender
from .message import REPORT_TYPES, Summary

LOOP_HEADER = "X-Guardrail-Loop"

_PRECEDENCE_VALUES = {"bulk", "junk", "list", "auto_reply"}
# The Precedence values that a list writes on each message it passes on.
_LIST_PRECEDENCE_VALUES = frozenset({"bulk", "list"})
# List-Id (RFC 2919), the six List-* headers of RFC 2369, and Mailing-List,
# which ezmlm sets.
_LIST_HEADERS = (
    "list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
    "mailing-list",
)
# Headers that list software writes on each message it passes on: Mailman
# 2.1 writes Errors-To beside the list headers.
_LIST_WRITTEN_HEADERS = frozenset({*_LIST_HEADERS, "errors-to"})
_AUTOREPLY_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder")
_SUPPRESS_TOKENS = {"oof", "autoreply", "all"}
_SUPPRESS_SEPARATORS = re.compile(r"[\s,;]+")
_OTHER_SIGNAL_HEADERS = ("x-failed-recipients", "x-ms-exchange-inbox-rules-loop", "errors-to")
# The iTIP method of a text/calendar part, which iMIP requires on its
# Content-Type (RFC 6047 section 2.4). A REPLY accepts or declines an
# invitation, and a calendar program writes it when someone clicks a button.
_CALENDAR_METHOD = re.compile(r";\s*method\s*=\s*\"?([A-Za-z-]+)", re.IGNORECASE)
# Every header _header_signal reads before Content-Type, by lower-case name.
_SIGNAL_HEADERS = frozenset({
    "auto-submitted", "precedence", "x-precedence", "x-apple-action",
    *_AUTOREPLY_HEADERS, *_LIST_HEADERS, *_OTHER_SIGNAL_HEADERS,
})

# Local parts of role and robot senders, matched whole and ignoring case.
DEFAULT_SENDER_PATTERNS = (
    r"mailer[-_]?daemon",
    r"post_?master",
    r"no[-_.]?reply([-+._].*)?",
    r"do[-_.]?not[-_.]?reply([-+._].*)?",
    r"bounces?([-+._].*)?",
    r".*[-_.]bounces?([-+._].*)?",
    r"(e[-_]?)?news(letters?)?",
    r"announce(ments?)?",
    # List managers: the owner and command addresses of a list, and the
    # robots behind them, send notices that no person writes.
    r"owner-.+",
    r".+-request",
    r"listserv",
    r"majordomo",
)

# Subjects of out-of-office replies and delivery reports. Software puts the
# phrase first, alone or before a separator and the original subject
# ("Automatic reply: Order 1234"). People write the same words inside
# sentences ("My parcel is undelivered", "Question about auto-reply
# settings"), and those must still be acknowledged, so a phrase counts only
# at the start. A bare word for an absence ("Absence", "Abwesenheit",
# "Nieobecność", "休暇") also starts a person's leave notice ("Absence: Marie
# Dupont, 3 March"), so only the longer phrases that auto-replies use count.
# A delivery report also comes from the null sender and carries a report
# part, so the phrases that read as a customer's complaint about a parcel
# ("Delivery delayed: order 1234", "Non remis", "No entregado") are left to
# those signals. Subjects are compared after case folding and removing
# accents, so patterns are written without them.
_SUBJECT_PHRASES = (
    # English. Sieve vacation responders put "Auto: " before the original
    # subject when the script sets none, so "Auto:" counts, although a
    # person may start a subject with it too.
    r"auto(?=\s*:)",
    r"auto(matic|mated)?[- ]?(reply|response|answer)",
    r"out of (the )?office( reply| notice| auto-?reply)?",
    r"away from (the |my )?office",
    r"on (vacation|holiday|leave)",
    r"vacation (reply|notice|message)",
    r"undeliverable",
    r"undelivered mail( returned to sender)?",
    r"delivery (status notification|failure|has failed)",
    r"mail delivery (failed|failure|system)",
    r"returned mail",
    r"failure notice",
    # French
    r"reponse automatique",
    r"(message|notification) d['’]absence",
    r"absence du bureau",
    r"absent(e)? du bureau",
    # German
    r"automatische antwort",
    r"abwesenheits(notiz|meldung|assistent)",
    r"nicht im buro",
    r"ausser haus",
    r"unzustellbar",
    # Spanish ("Ausente" also in Portuguese)
    r"respuesta automatica",
    r"fuera de (la )?oficina",
    r"ausente",
    # Italian
    r"risposta automatica",
    r"fuori (sede|ufficio)",
    # Portuguese
    r"resposta automatica",
    r"fora do escritorio",
    # Dutch
    r"automatisch antwoord",
    r"afwezig(heidsbericht|heidsmelding)?",
    r"niet aanwezig",
    r"onbestelbaar",
    # Swedish ("automatiskt"), Danish and Norwegian ("automatisk")
    r"automatiskt? svar",
    r"autosvar",
    r"franvaromeddelande",
    # Polish
    r"automatyczna odpowiedz",
    r"odpowiedz automatyczna",
    r"autoodpowiedz",
    r"poza biurem",
    # Czech
    r"automaticka odpoved",
    r"mimo kancelar",
    # Japanese
    "自動(応答|返信)(メール)?",
    "不在",
)
# The phrase, in square or lenticular (Japanese) brackets or in none, then
# the end of the subject, a colon, a closing bracket or an opening
# parenthesis.
_AUTOREPLY_SUBJECTS = re.compile(r"\s*[\[【]?(?:" + "|".join(_SUBJECT_PHRASES) + r")\s*(?:$|[:：\]】\(])")


def fold(text: str) -> str:
    """Case-fold `text` and remove accents, so "Réponse" compares as "reponse"."""
    if text.isascii():
        return text.lower()  # the same result for ASCII text, about 30 times faster
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def compile_sender_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(pattern, re.IGNORECASE) for pattern in patterns)


DEFAULT_SENDERS = compile_sender_patterns(DEFAULT_SENDER_PATTERNS)


def has_our_loop_marker(summary: Summary, hostname: str) -> bool:
    """Return True when the message carries our loop marker for `hostname`."""
    ours = hostname.strip().lower()
    return any(value.strip().lower() == ours for value in summary.header(LOOP_HEADER))


def has_too_many_hops(summary: Summary, max_received: int) -> bool:
    """Return True when the Received headers show more hops than `max_received`.

    RFC 5321 section 6.3 recommends treating a large hop count as a loop.
    """
    return summary.received_count > max_received


def header_keyword(value: str) -> str:
    """Return the keyword of a header value in lower case, without comments, whitespace and parameters.

    RFC 3834 section 5 allows comments (which nest and may contain quoted
    pairs) around the Auto-Submitted keyword, and parameters after a ";".
    Precedence has no standard syntax and is read the same way. A value
    without a keyword gives "", and words left over after the keyword stay
    in the result, so neither equals "no" or "bulk".
    """
    return " ".join(_outside_comments(value, stop=";").split()).lower()


def _outside_comments(value: str, stop: str = "") -> str:
    """Return `value` up to the first `stop` character outside a comment, with each comment replaced by a space."""
    outside: list[str] = []
    depth = 0
    escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif depth and char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
            outside.append(" ")  # a comment separates words, as whitespace does
        elif char == ")" and depth:
            depth -= 1
        elif depth:
            continue
        elif char in stop:
            break
        else:
            outside.append(char)
    return "".join(outside)


def _unfolded(value: str) -> str:
    """Return a header value with each run of whitespace, line breaks of a folded header included, as one space."""
    return " ".join(value.split())


def _first_value(summary: Summary, name: str) -> str:
    values = summary.header(name)
    return values[0].strip() if values else ""


def _header_signal(summary: Summary, passed_on: bool) -> str | None:
    """Return the first sign in the headers or the MIME parts that software wrote the message, or None.

    With `passed_on`, the message came through one of our lists, which
    writes each list header, Errors-To and one Precedence of `list` or
    `bulk` once. Those count only when the message carries a second one,
    which came with the message the list passed on.
    """
    if _SIGNAL_HEADERS.isdisjoint(summary.headers):
        # Most mail from people carries none of these headers, so only Content-Type is left to read.
        return _report_signal(summary)
    # A header may appear more than once, and a machine value in any of them counts.
    # RFC 3834 section 5: any Auto-Submitted keyword except "no" marks automatic mail.
    for value in summary.header("auto-submitted"):
        if header_keyword(value) != "no":
            return f"Auto-Submitted: {_unfolded(value)}"
    for name in ("precedence", "x-precedence"):
        keywords = [header_keyword(value) for value in summary.header(name)]
        written_by_list = passed_on and sum(keyword in _LIST_PRECEDENCE_VALUES for keyword in keywords) == 1
        for keyword in keywords:
            if keyword in _PRECEDENCE_VALUES and not (written_by_list and keyword in _LIST_PRECEDENCE_VALUES):
                return f"{name.title()}: {keyword}"
    # Errors-To is a legacy header that only list and bulk software still sets.
    for name in (*_AUTOREPLY_HEADERS, *_LIST_HEADERS, *_OTHER_SIGNAL_HEADERS):
        values = summary.header(name)
        if values and not (passed_on and name in _LIST_WRITTEN_HEADERS and len(values) == 1):
            return f"{name} header"
    if any(value.strip().upper() == "VACATION" for value in summary.header("x-apple-action")):
        return "X-Apple-Action: VACATION"
    return _report_signal(summary)


def _report_signal(summary: Summary) -> str | None:
    """Name the report or meeting reply that the message is or carries, or None.

    The top level counts, and so does a part below it (a report may be
    nested in another multipart, RFC 6522 section 3), but not a part of an
    attached message, which the summary does not list.
    """
    content_type = _first_value(summary, "content-type")
    for value, where in ((content_type, ""), *((part, " part") for part in summary.part_types)):
        kind = value.split(";", 1)[0].strip().lower()
        if kind in REPORT_TYPES:
            return kind + where
        if kind == "text/calendar" and _calendar_method(value) == "reply":
            return "calendar reply"
    return None


def _calendar_method(content_type: str) -> str:
    match = _CALENDAR_METHOD.search(content_type)
    return match.group(1).lower() if match else ""


def _sender_signal(
    summary: Summary, mail_from: str, patterns: tuple[re.Pattern[str], ...], sender: ListSender | None,
) -> str | None:
    if not mail_from:
        return "null envelope sender"
    for name in ("return-path", "x-envelope-from"):
        if any(value.strip() == "<>" for value in summary.header(name)):
            return f"{name.title()}: <>"
    automated = _any_of(patterns)
    for where, address in _sender_candidates(summary, mail_from, sender):
        local, at, domain = address.lower().rpartition("@")
        if not at:
            # An address without "@", such as the envelope sender MAILER-DAEMON, is a local part alone.
            local, domain = domain, ""
        # Mail systems deliver a subaddress ("mailer-daemon+1234") to its base mailbox, so the base is matched too.
        base = local.partition("+")[0]
        if local and (automated(local) or (base and automated(base))):
            return f"{where} {address.lower()} looks automated"
        # Bulk senders use per-message (VERP) addresses at a bounce host.
        if domain.split(".")[0] in ("bounce", "bounces"):
            return f"{where} {address.lower()} is a bounce address"
    return None


def _sender_candidates(summary: Summary, mail_from: str, sender: ListSender | None) -> list[tuple[str, str]]:
    """Return the (header, address) pairs whose local part or domain may show a robot sender.

    A list of ours puts its bounce address in the envelope sender, Sender,
    Return-Path or Errors-To of every message it passes on, so of such a
    message only From and the person recovered behind it are read.
    """
    if sender is not None:
        candidates = [("From", summary.from_address)]
        if sender.header != "From":
            candidates.append((sender.header, sender.address))
        return candidates
    candidates = [("envelope sender", mail_from), ("From", summary.from_address)]
    for name in ("sender", "return-path", "errors-to"):
        for value in summary.header(name):
            match = re.search(r"[^\s<>\"]+@[^\s<>\"]+", value)
            if match:
                candidates.append((name.title(), match.group(0)))
    return candidates


# A numbered or named backreference, or a conditional group.
_GROUP_REFERENCE = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")


@functools.lru_cache(maxsize=16)
def _any_of(patterns: tuple[re.Pattern[str], ...]) -> Callable[[str], bool]:
    """Return a test for whether one of `patterns` matches a whole text, with one pattern where they combine."""

    def each(text: str) -> bool:
        return any(pattern.fullmatch(text) for pattern in patterns)

    flags = {pattern.flags for pattern in patterns}
    # Joined, a backreference or a conditional would count groups of the
    # other patterns, and patterns compiled with different flags differ.
    if len(flags) > 1 or any(_GROUP_REFERENCE.search(pattern.pattern) for pattern in patterns):
        return each
    try:
        combined = re.compile("|".join(f"(?:{pattern.pattern})" for pattern in patterns), flags.pop() if flags else 0)
    except re.error:
        return each  # inline global flags, for instance, cannot be joined
    return lambda text: combined.fullmatch(text) is not None


# The start of the signal of a message that only its subject marks as machine-written.
SUBJECT_SIGNAL = "auto-reply subject"


def machine_signal(
    summary: Summary,
    mail_from: str,
    hostname: str,
    sender_patterns: tuple[re.Pattern[str], ...] = DEFAULT_SENDERS,
    sender: ListSender | None = None,
) -> str | None:
    """Return why the message looks written by software, or None for a person.

    `sender` is the person behind a message that one of our lists passed on
    (see lists.list_sender), or None for other mail.
    """
    if has_our_loop_marker(summary, hostname):
        return "our loop marker"
    passed_on = sender is not None
    signal = _header_signal(summary, passed_on) or _sender_signal(summary, mail_from, sender_patterns, sender)
    if signal:
        return signal
    if _AUTOREPLY_SUBJECTS.match(fold(summary.subject)):
        return f"{SUBJECT_SIGNAL} {summary.subject[:80]!r}"
    return None


def is_subject_signal(signal: str) -> bool:
    """Return True when `signal`, from machine_signal, rests on the subject alone.

    People start subjects with the same words ("Auto: Termin zur
    Inspektion", where Auto means car; "Out of office: can you cover my
    shift?"). Such a message gets no acknowledgement, but it still needs a
    reply, so its deadline runs and a person on the team reads it either way.
    """
    return signal.startswith(SUBJECT_SIGNAL)


def person_signal(summary: Summary, is_staff: bool) -> str | None:
    """Return why a message from a person still gets no acknowledgement, or None."""
    if not summary.from_address:
        return "no From header"
    if is_staff:
        return "sender is a team member"
    return suppression_request(summary)


def suppression_request(summary: Summary) -> str | None:
    """Return the X-Auto-Response-Suppress header that requests no automatic replies, or None.

    The header is a request from the sender's side, not a sign of software:
    an Exchange client writes it from a property that any message may carry
    ([MS-OXCMAIL] section 2.1.3.2.20), and mail that people write carries
    it too. The acknowledgement is an automatic reply, so it is not sent,
    but the message keeps its deadline.
    """
    for suppress in summary.header("x-auto-response-suppress"):
        # [MS-OXCMAIL] section 2.1.3.2.20 separates the values with ", ".
        # Spaces and semicolons alone separate them here too, and comments are skipped.
        tokens = set(_SUPPRESS_SEPARATORS.split(_outside_comments(suppress).lower()))
        if tokens & _SUPPRESS_TOKENS:
            return f"X-Auto-Response-Suppress: {_unfolded(suppress)}"
    return None


def acknowledgement_signal(
    summary: Summary,
    mail_from: str,
    hostname: str,
    is_staff: bool,
    sender_patterns: tuple[re.Pattern[str], ...] = DEFAULT_SENDERS,
) -> str | None:
    """Return why the message must not be acknowledged, or None when it must be."""
    return machine_signal(summary, mail_from, hostname, sender_patterns) or person_signal(summary, is_staff)
