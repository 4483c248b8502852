"""Pure decisions about people's mail that a group or mailing list of ours passes on.

A shared inbox is often a group (Google Workspace, Microsoft 365) or a
Mailman list that forwards each message it receives to guardrail. The list
adds list headers (RFC 2369, RFC 2919) and often `Precedence: list` to every
message, which would otherwise mark it as list mail. For a sender whose
domain publishes a strict DMARC policy, it also writes its own address into
From ("'Alice' via Support <support@example.com>") and keeps the person in
X-Original-From (Google) or Reply-To (Mailman). A Mailman list whose replies
go to the list, or to an address that its owner sets, adds the person to Cc
instead. `[smtp] inbox_lists` names these lists by List-Id, and
`list_sender` finds the person behind such a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .message import ATOM, Summary, mailboxes

# RFC 2919 section 2: list-label "." list-id-namespace, both dot-atom text,
# at most 255 octets.
_LIST_IDENTIFIER = re.compile(rf"{ATOM}(?:\.{ATOM})+")
MAX_LIST_IDENTIFIER_LENGTH = 255
_BRACKETED = re.compile(r"<([^<>]*)>")
# A mailto URI in a List-Post value (RFC 2369 section 3.4), up to its query.
_MAILTO = re.compile(r"<\s*mailto:([^>?\s]+)", re.IGNORECASE)


@dataclass(frozen=True)
class ListSender:
    """The person who wrote a message that one of `[smtp] inbox_lists` passed on."""

    list_id: str
    address: str  # lower case
    name: str  # the display name, decoded, or ""
    header: str  # where the address was read: "From", "X-Original-From", "Reply-To" or "Cc"


def is_list_identifier(text: str) -> bool:
    """Return True for a List-Id identifier as written between its angle brackets, such as support.example.com."""
    return len(text) <= MAX_LIST_IDENTIFIER_LENGTH and _LIST_IDENTIFIER.fullmatch(text) is not None


def list_identifier(value: str) -> str:
    """Return the identifier between the last pair of angle brackets of a List-Id value, lower-cased, or "".

    The phrase before it may quote angle brackets of its own, so the last
    pair is the identifier.
    """
    found = _BRACKETED.findall(value)
    return found[-1].strip().lower() if found else ""


def inbox_list(summary: Summary, inbox_lists: frozenset[str]) -> str:
    """Return the message's List-Id identifier when it is one of `inbox_lists`, else "".

    A list writes one List-Id. A message with two has passed through another
    list too, such as a newsletter's, and is not taken for one of ours.
    """
    if not inbox_lists:
        return ""
    values = summary.undecoded_header("list-id")
    if len(values) != 1:
        return ""
    identifier = list_identifier(values[0])
    return identifier if identifier in inbox_lists else ""


def list_sender(summary: Summary, inbox_lists: frozenset[str], inboxes: frozenset[str]) -> ListSender | None:
    """Return the person who wrote a message that one of `inbox_lists` passed on, or None.

    From names the person, unless it is the list's own address, which the
    list writes in place of a sender whose domain publishes a strict DMARC
    policy. The list's own addresses are `inboxes`, the List-Post mailto
    address and the address that the List-Id names (see `_is_named_by`). The
    person is then the one mailbox in X-Original-From, else the one Reply-To
    address that is not the list's, else, when Reply-To names none but the
    list's, the one Cc address that Mailman added (see `_copied_author`).
    Without any of them, the result is None, and the message is handled as
    mail from that address.
    """
    list_id = inbox_list(summary, inbox_lists)
    if not list_id or not summary.from_address:
        return None
    own = inboxes | _posting_addresses(summary)
    if summary.from_address not in own and not _is_named_by(summary.from_address, list_id):
        return ListSender(list_id, summary.from_address, summary.from_name, "From")
    own |= {summary.from_address}
    original = mailboxes(summary.undecoded_header("x-original-from"))
    if len(original) == 1:
        name, address = original[0]
        return ListSender(list_id, address, name, "X-Original-From")
    replies = [(name, address) for name, address in mailboxes(summary.undecoded_header("reply-to")) if address not in own]
    if len(replies) == 1:
        name, address = replies[0]
        return ListSender(list_id, address, name, "Reply-To")
    if replies:
        return None
    return _copied_author(summary, list_id, own)


def _copied_author(summary: Summary, list_id: str, own: frozenset[str]) -> ListSender | None:
    """Return the author that a Mailman list's DMARC mitigation put in Cc, or None when that is not certain.

    Mailman 3 (dmarc_mitigate_action munge_from or wrap_message, in
    handlers/dmarc.py) and Mailman 2.1 (from_is_list or
    dmarc_moderation_action "Munge From", in Handlers/CookHeaders.py) write
    From as "<author's name> via <list's name>" at the list's address. When
    the list's replies go to the list, or to an address that its owner
    sets, they add the author to Cc beside the Cc addresses the message came
    with, rather than to Reply-To. So the author is taken from Cc only when
    From's name has that form and Cc contains exactly one address that is
    not the list's. A Cc display name must be the one before " via ". When
    the author's From had no name, Mailman adds the bare address to Cc and
    writes the member's name, or the address with "---" in place of its
    domain, before " via ".
    """
    # NOTE: a list whose language writes another word than "via" is not recovered from Cc.
    if " via " not in summary.from_name:
        return None
    copied = [(name, address) for name, address in mailboxes(summary.undecoded_header("cc")) if address not in own]
    if len(copied) != 1:
        return None
    name, address = copied[0]
    if name and not summary.from_name.casefold().startswith(name.casefold() + " via "):
        return None
    return ListSender(list_id, address, name, "Cc")


def _is_named_by(address: str, list_id: str) -> bool:
    """Return True when `list_id` is `address` with its "@" written as ".", as support.example.com for support@example.com.

    Google groups and Mailman 2.1 and 3 build the List-Id from the list's
    address this way. The address is then the list's own even when
    List-Post does not name it, as with Mailman's "List-Post: NO" on a list
    that takes no posts from members.
    """
    local, at, domain = address.rpartition("@")
    return bool(at) and f"{local}.{domain}" == list_id


def _posting_addresses(summary: Summary) -> frozenset[str]:
    """Return the mailto addresses of List-Post, lower-cased."""
    return frozenset(
        address.lower() for value in summary.undecoded_header("list-post") for address in _MAILTO.findall(value)
    )
