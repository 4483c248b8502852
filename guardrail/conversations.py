"""Conversation references and the pure decision of which conversation a message joins.

A reference such as GR-7K3M9Q travels in subjects as "[GR-7K3M9Q]". A message
joins a conversation when its In-Reply-To or References names a message we
know, or when its subject carries a reference of ours and its sender already
takes part in that conversation.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from functools import lru_cache

from .rules import Destination

# Maximum length of the name that the CLI or the HTTP API records for who answered a conversation or inspected the rules.
MAX_NAME_LENGTH = 200

# Crockford's base32 alphabet: no I, L, O or U, so references survive being
# read aloud or typed from a screenshot.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
REFERENCE_LENGTH = 6


def is_storable_name(name: str) -> bool:
    """Return True when `name` fits MAX_NAME_LENGTH and has no control character or unpaired surrogate.

    Operators see the name in `guardrail status` and the API, and SQLite stores text as UTF-8, which has no surrogates.
    """
    if len(name) > MAX_NAME_LENGTH:
        return False
    return not any(ord(char) < 0x20 or ord(char) == 0x7F or 0xD800 <= ord(char) <= 0xDFFF for char in name)


def new_reference(prefix: str) -> str:
    """Return a random reference such as GR-7K3M9Q (32**6, about 1e9, values)."""
    # Five random bits per character, since the alphabet has 32 letters: one
    # read of the system's random source instead of one per character.
    bits = secrets.randbits(5 * REFERENCE_LENGTH)
    code = "".join(_ALPHABET[(bits >> shift) & 31] for shift in range(0, 5 * REFERENCE_LENGTH, 5))
    return f"{prefix}-{code}"



@lru_cache(maxsize=16)
def _tag_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"\[\s*({re.escape(prefix)}-[{_ALPHABET}]{{{REFERENCE_LENGTH}}})\s*\]", re.IGNORECASE)


def find_references(subject: str, prefix: str) -> tuple[str, ...]:
    """Return every reference of ours tagged in `subject`, upper-cased."""
    return tuple(match.upper() for match in _tag_pattern(prefix).findall(subject))


def without_references(subject: str, prefix: str) -> str:
    """Return `subject` without the tags of our references, its whitespace runs made single spaces."""
    return " ".join(_tag_pattern(prefix).sub(" ", subject).split())


@dataclass(frozen=True)
class KnownConversation:
    """A stored conversation, with the fields that threading reads."""

    id: int
    reference: str
    route: str
    team: str
    participants: frozenset[str]
    destination: Destination | None
    state: str = "open"
    subject: str = ""  # the subject of the message that opened it


def choose_conversation(
    thread_ids: tuple[str, ...],
    tagged_references: tuple[str, ...],
    sender_addresses: frozenset[str],
    by_message_id: dict[str, KnownConversation],
    by_reference: dict[str, KnownConversation],
    *,
    from_inbox: bool = False,
    member_of: frozenset[str] = frozenset(),
) -> tuple[KnownConversation | None, str]:
    """Pick the conversation a message joins, and say why; (None, "") means a new one.

    Thread headers win over a subject tag. The nearest parent counts first, so
    the last id of References (and In-Reply-To) is tried before older ones.
    A subject tag counts for a sender who takes part in the conversation, for
    a sender who is now a member of its team (`member_of`), such as one added
    to the team after it opened, and for mail written as a shared inbox
    (`from_inbox`), as help-desk tools that thread by subject send it.
    """
    for message_id in reversed(thread_ids):
        known = by_message_id.get(message_id)
        if known is not None:
            return known, f"thread header names {message_id}"

    for reference in tagged_references:
        known = by_reference.get(reference)
        if known is None:
            continue
        if sender_addresses & known.participants:
            return known, f"subject carries [{reference}] and the sender takes part"
        if known.team in member_of:
            return known, f"subject carries [{reference}] and the sender is a member of team {known.team}"
        if from_inbox:
            return known, f"subject carries [{reference}] and the message is written as a shared inbox"
    return None, ""
