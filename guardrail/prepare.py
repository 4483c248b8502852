"""Turn a received message into a Submission: a pure function of the message, rules and time.

Routing, the acknowledgement decision, the deadline and whether the team is
staffed are all decided here, before the commit, for the case where the
message opens a conversation. The store applies them only in that case.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime

from .acknowledgement import (
    AckRequest,
    capped_references,
    choose_language,
    merge_fields,
)
from .authresults import is_verified, verified_domains
from .config import Config
from .conversations import find_references
from .deadlines import start_clock
from .escalation import UNROUTED_REASON
from .gratitude import NEW_TEXT_LIMIT, is_thanks_only
from .lists import ListSender, list_sender
from .loops import (
    has_our_loop_marker,
    has_too_many_hops,
    is_subject_signal,
    machine_signal,
    person_signal,
)
from .message import BODY_TEXT_LIMIT, Summary, body_sample, summarize
from .plan import Submission
from .routing import Facts, match_route, matched_recipients, shadow_results
from .rules import Destination, Route, RuleSet, Team
from .team_copies import addressed_teams


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of a message: sender, recipients, peer, HELO name and protocol."""

    mail_from: str  # "" for the null sender
    rcpt_tos: tuple[str, ...]
    peer: str
    helo: str
    protocol: str = "ESMTP"  # SMTP after HELO, ESMTP after EHLO, ESMTPS over STARTTLS


@dataclass(frozen=True)
class Site:
    """The config values these decisions read."""

    hostname: str
    inboxes: frozenset[str]
    inbox_domains: frozenset[str]
    local_domains: frozenset[str]
    postmaster_owner: str
    sender_patterns: tuple[re.Pattern[str], ...]
    first_inbox: str = ""
    max_received_headers: int = 30
    reference_prefix: str = "GR"
    inbox_lists: frozenset[str] = frozenset()  # List-Id identifiers, lower case
    copy_other_teams: bool = True  # [conversations] copy_other_teams

    @classmethod
    def from_config(cls, config: Config) -> Site:
        smtp = config.smtp
        return cls(
            hostname=smtp.hostname,
            inboxes=smtp.inboxes,
            inbox_domains=smtp.inbox_domains,
            local_domains=smtp.local_domains,
            postmaster_owner=config.postmaster_owner,
            sender_patterns=config.acknowledgements.sender_patterns,
            first_inbox=smtp.first_inbox,
            max_received_headers=smtp.max_received_headers,
            reference_prefix=config.reference_prefix,
            inbox_lists=smtp.inbox_lists,
            copy_other_teams=config.copy_other_teams,
        )


def is_inbox(address: str, site: Site) -> bool:
    """Return True for an address we receive mail for."""
    address = address.lower()
    return address in site.inboxes or address.rpartition("@")[2] in site.inbox_domains


def reply_address_signal(mail_from: str, site: Site, sender: ListSender | None = None) -> str | None:
    """Return why the address to which an acknowledgement goes cannot get one, or None.

    That address is the envelope sender. A message that one of our lists
    passed on carries the list's bounce address there, so its
    acknowledgement goes to the person behind it, `sender`, instead.
    Such a message may still come from a person, so it keeps its deadline.
    An address without a domain is not valid in a reverse path (RFC 5321
    section 4.1.2), and an MTA further on would complete it with a domain of
    its own choosing. An acknowledgement to one of our own addresses, as from
    a forwarder that puts the inbox in every envelope, would come back in.
    """
    if sender is not None:
        return "sender is one of our own addresses" if is_accepted_recipient(sender.address, site) else None
    if mail_from and "@" not in mail_from:
        return "envelope sender has no domain"
    if mail_from and is_accepted_recipient(mail_from, site):
        return "envelope sender is one of our own addresses"
    return None


def is_accepted_recipient(address: str, site: Site) -> bool:
    """Return True for a recipient that intake accepts: an inbox of ours or postmaster."""
    return is_inbox(address, site) or is_postmaster(address, site)


def is_postmaster(address: str, site: Site) -> bool:
    """Return True for postmaster@ one of our domains or our host name, and for the bare "postmaster" (RFC 5321 section 4.5.1)."""
    local, at, domain = address.lower().rpartition("@")
    if not at:
        return domain == "postmaster"
    return local == "postmaster" and (domain in site.local_domains or domain == site.hostname.lower())


@dataclass(frozen=True)
class TooManyHops:
    """A message rejected before routing, because its Received headers show a mail loop."""

    message_id: str
    received_count: int


@dataclass(frozen=True)
class BareLineEnding:
    """A message rejected before parsing, because a line in it ends with a bare CR or LF."""


def has_bare_line_ending(data: bytes) -> bool:
    """Return True if `data` contains a CR not followed by LF, or an LF not preceded by CR.

    Servers that accept such line endings can be fooled into reading one
    transaction as two (SMTP smuggling), so intake rejects them.
    """
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def prepare_received(
    envelope: Envelope, raw: bytes, rules: RuleSet, site: Site, now: datetime
) -> Submission | TooManyHops | BareLineEnding:
    """Check and prepare a message as it arrived over SMTP, with its dot-stuffing undone.

    The line-ending check runs here, beside the parsing, so that a parse
    process rather than the event loop reads every byte of a large message.
    """
    if has_bare_line_ending(raw):
        return BareLineEnding()
    return prepare_message(envelope, raw, rules, site, now)


def prepare_message(envelope: Envelope, raw: bytes, rules: RuleSet, site: Site, now: datetime) -> Submission | TooManyHops:
    """Summarize `raw` and return its Submission, or TooManyHops when it has passed too many hosts."""
    summary = summarize(raw, with_body=rules.needs_body)
    if has_too_many_hops(summary, site.max_received_headers):
        return TooManyHops(summary.message_id, summary.received_count)
    return prepare_submission(envelope, raw, summary, rules, site, now)


def prepare_submission(envelope: Envelope, raw: bytes, summary: Summary, rules: RuleSet, site: Site, now: datetime) -> Submission:
    """Return the Submission for a message received at `now`."""
    common = dict(
        raw=raw, mail_from=envelope.mail_from, rcpt_tos=envelope.rcpt_tos, peer=envelope.peer, helo=envelope.helo,
        protocol=envelope.protocol,
        received_at=now, summary=summary, is_loop=has_our_loop_marker(summary, site.hostname),
    )
    postmasters = postmaster_recipients(envelope, site)
    owner = Destination("smtp", addresses=(site.postmaster_owner,)) if postmasters else None
    if postmasters and len(postmasters) == len(envelope.rcpt_tos):
        return Submission(
            **common, route="postmaster", team="postmaster", destination=owner,
            route_reasons=("every recipient is postmaster",), team_members=frozenset(), is_postmaster=True,
            postmaster_recipient=postmasters[0],
            ack_signal="mail to postmaster", sla_applies=False,
        )

    sender = list_sender(summary, site.inbox_lists, site.inboxes)
    facts = Facts(envelope.rcpt_tos, summary, sender)
    # With several recipients, each one alone is routed again (see team_copies), and
    # the conditions on other fields keep the results they have for the whole message.
    known: dict[int, str | None] | None = {} if len(facts.rcpt_tos) > 1 else None
    match = match_route(rules, facts, known)
    team = match.team
    is_staff, from_inbox, staff_unverified = staff_sender(envelope, summary, rules, site, sender)
    machine = machine_signal(summary, envelope.mail_from, site.hostname, site.sender_patterns, sender)
    ack_signal = machine or person_signal(summary, is_staff) or reply_address_signal(envelope.mail_from, site, sender)

    clock = start_clock(team, match.route, rules, now)
    sla_applies = (machine is None or is_subject_signal(machine)) and not from_inbox
    ack = None
    if ack_signal is None and team.templates:
        inbox = reply_inbox(envelope, facts, match.route, site, known)
        ack = _ack_request(envelope, raw, summary, team, clock.deadline, inbox, sender)
    return Submission(
        **common, route=match.route.name, team=team.name, destination=team.destination,
        route_reasons=match.reasons, team_members=team.member_addresses,
        ack_signal=ack_signal, ack=ack, deadline=clock.deadline,
        first_escalation_at=clock.first_escalation_at, unstaffed=clock.unstaffed,
        # The team's own mail, such as a help-desk tool's copy of a message
        # it sent to a customer, needs no reply from the team.
        sla_applies=sla_applies, is_staff=is_staff, from_inbox=from_inbox,
        # Only a person's reply can reopen a conversation, so only its text is read for thanks.
        thanks_only=sla_applies and not (machine or is_staff) and is_reply(summary, site) and is_thanks_message(raw, summary, rules),
        staff_unverified=staff_unverified,
        member_of=_member_of(rules, _sender_addresses(summary, envelope, sender)) if is_staff else frozenset(),
        machine_signal=machine or "", list_sender=sender.address if sender else "",
        shadow=tuple(
            {"route": result.route, "team": result.team, "would_win": result.would_win}
            for result in shadow_results(rules, facts, match)
        ),
        # RFC 5321 section 3.3: every accepted recipient gets the message, so
        # postmaster beside an inbox gets a copy while the inbox's is routed.
        postmaster_copy=owner,
        postmaster_recipient=postmasters[0] if postmasters else "",
        team_names=rules.team_names,
        addressed_teams=addressed_teams(rules, facts, match, postmasters, known) if site.copy_other_teams else (),
    )


# Top-level media types of a message whose text alone can be a thank-you.
# Any other (multipart/mixed, multipart/related, signed or encrypted mail)
# may carry an attachment or an inline image, which is more than thanks.
_TEXT_ONLY_TYPES = frozenset({"text/plain", "text/html", "multipart/alternative"})
# Characters of text decoded first: the longest new text of a thank-you and
# the lines after it that tell where it ends.
_THANKS_SAMPLE = 2 * NEW_TEXT_LIMIT


def is_reply(summary: Summary, site: Site) -> bool:
    """Return True when the message names an earlier one (In-Reply-To, References) or carries a reference of ours in its subject."""
    return bool(summary.in_reply_to or summary.references or find_references(summary.subject, site.reference_prefix))


def is_thanks_message(raw: bytes, summary: Summary, rules: RuleSet) -> bool:
    """Return True when the message is text without attachments and its new text only says thanks (see guardrail.gratitude).

    Without body conditions the summary has no body text. The start of the
    text is decoded then, which rules out nearly every reply. Only a
    thank-you is decoded in full, because an answer between quoted lines
    further down makes it more than thanks.
    """
    if summary.media_type not in _TEXT_ONLY_TYPES or summary.part_types:
        return False
    if rules.needs_body:
        return is_thanks_only(summary.body_text)
    return is_thanks_only(body_sample(raw, summary, _THANKS_SAMPLE)) and is_thanks_only(body_sample(raw, summary, BODY_TEXT_LIMIT))


def prepare_unrouted(envelope: Envelope, raw: bytes, rules: RuleSet, site: Site, now: datetime, reason: str) -> Submission | TooManyHops | BareLineEnding:
    """Prepare a message whose routing never finished, for the default route's team, with an escalation at once.

    Routing a message evaluates the ops' regular expressions, and one that
    backtracks badly on this message's text can run for hours. Here nothing
    of the rules is evaluated: the header block alone is read (a linear
    pass), the default route takes the message, and `reason`, as the
    conversation's unstaffed reason, escalates it at once to the team's
    first named human. No acknowledgement goes out, because the machine
    check that would allow one reads the ops' sender patterns too.
    """
    if has_bare_line_ending(raw):
        return BareLineEnding()
    summary = summarize(raw, with_body=False)
    if has_too_many_hops(summary, site.max_received_headers):
        return TooManyHops(summary.message_id, summary.received_count)
    if len(postmaster_recipients(envelope, site)) == len(envelope.rcpt_tos):
        # Postmaster mail is never routed, so it goes its usual way.
        return prepare_submission(envelope, raw, summary, rules, site, now)
    route = rules.default_route
    team = rules.teams[route.team]
    clock = start_clock(team, route, rules, now)
    # Staff and inbox senders are set lookups, not patterns, so a team's
    # reply still marks its conversation answered.
    sender = list_sender(summary, site.inbox_lists, site.inboxes)
    is_staff, from_inbox, staff_unverified = staff_sender(envelope, summary, rules, site, sender)
    return Submission(
        raw=raw, mail_from=envelope.mail_from, rcpt_tos=envelope.rcpt_tos, peer=envelope.peer, helo=envelope.helo,
        protocol=envelope.protocol, received_at=now, summary=summary, is_loop=has_our_loop_marker(summary, site.hostname),
        route=route.name, team=team.name, destination=team.destination, route_reasons=(reason,),
        team_members=team.member_addresses, ack_signal=UNROUTED_REASON, deadline=clock.deadline,
        first_escalation_at=clock.first_escalation_at, unstaffed=reason, team_names=rules.team_names,
        is_staff=is_staff, from_inbox=from_inbox, staff_unverified=staff_unverified,
        list_sender=sender.address if sender else "",
    )


def staff_sender(
    envelope: Envelope, summary: Summary, rules: RuleSet, site: Site, sender: ListSender | None = None,
) -> tuple[bool, bool, str]:
    """Return whether the sender is staff, whether From is a shared inbox, and why a claim to either was not verified.

    A reply written as the shared inbox itself is the team's. Only From
    names the writer, because a forwarder may put the inbox, or an address
    of its own domain (SRS), in the envelope sender of every customer's
    message. Of a message that one of our lists passed on, the writer is
    `sender`, since the list may have put its own address, an inbox, in
    From. With `[staff] authserv_id` set, a claim counts only when that
    MTA's Authentication-Results header verifies the domain of the address.
    """
    address = sender.address if sender else summary.from_address.lower()
    from_inbox = address in site.inboxes
    claimed = from_inbox or (bool(address) and rules.is_staff(address))
    if not claimed:
        return False, False, ""
    if not rules.staff_authserv_id:
        return True, from_inbox, ""
    domains, problem = verified_domains(summary.undecoded_header("authentication-results"), rules.staff_authserv_id)
    if rules.staff_authserv_peers and not peer_in(envelope.peer, rules.staff_authserv_peers):
        domains, problem = frozenset(), f"sent from {envelope.peer or 'an unknown client'}, not from [staff] authserv_peers"
    if is_verified(address, domains):
        return True, from_inbox, ""
    if problem:
        return False, False, f"{address} not verified: {problem}"
    passed = ", ".join(sorted(domains)) if domains else "none"
    return False, False, f"{rules.staff_authserv_id} did not verify the domain of {address} (verified: {passed})"


def peer_in(peer: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Return True when the SMTP client address in `peer` ("[192.0.2.1]:4000") is in one of `networks`."""
    host = peer.rpartition("]")[0].lstrip("[") if peer.startswith("[") else peer.rpartition(":")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack listener reports an IPv4 client as ::ffff:a.b.c.d.
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _sender_addresses(summary: Summary, envelope: Envelope, sender: ListSender | None) -> tuple[str, ...]:
    """Return the addresses that name who wrote the message: the person behind one of our lists, else From and the envelope sender."""
    if sender is not None:
        return (sender.address,)
    return (summary.from_address.lower(), envelope.mail_from.lower())


def _member_of(rules: RuleSet, addresses: tuple[str, ...]) -> frozenset[str]:
    """Return the teams whose members include one of `addresses`."""
    teams = rules.member_teams
    return frozenset().union(*(teams.get(address, frozenset()) for address in addresses))


def postmaster_recipients(envelope: Envelope, site: Site) -> list[str]:
    """Return the recipients that are postmaster and not one of our inboxes, in envelope order."""
    return [address for address in envelope.rcpt_tos if is_postmaster(address, site) and not is_inbox(address, site)]


def reply_inbox(
    envelope: Envelope, facts: Facts, route: Route, site: Site, known: dict[int, str | None] | None = None,
) -> str:
    """Return the inbox that the acknowledgement comes from.

    Of several recipient inboxes, it is the first that a recipient condition
    of the winning `route` names, where that condition is true for `facts`.
    So a message to support@ and billing@ that a route on billing@ sends to
    the billing team is acknowledged from billing@. Otherwise it is the first
    recipient inbox, and without one, the first recipient. `known` is as for
    routing.match_route.
    """
    inboxes = tuple(address for address in envelope.rcpt_tos if is_inbox(address, site))
    if len(inboxes) > 1:
        named = [address for address in matched_recipients(route, facts, known) if address in inboxes]
        if named:
            return named[0]
    return inboxes[0] if inboxes else envelope.rcpt_tos[0]


def _ack_request(
    envelope: Envelope, raw: bytes, summary: Summary, team: Team, deadline: datetime | None, inbox: str,
    sender: ListSender | None,
) -> AckRequest:
    language = choose_language(summary, team, lambda: f"{summary.subject}\n{summary.body_text or body_sample(raw, summary)}")
    return AckRequest(
        # RFC 3834 section 4: reply to the envelope sender, never Reply-To. Its
        # local part keeps its case (RFC 5321 section 2.4); the rate limit
        # compares it in lower case. One of our lists puts its own bounce
        # address in the envelope, so the acknowledgement of its mail goes
        # to the person who wrote it.
        to_address=sender.address if sender else envelope.mail_from,
        from_address=inbox,
        language=language,
        template=team.templates[language],
        fields=merge_fields(summary, envelope.mail_from, team, language, deadline, (sender.name, sender.address) if sender else None),
        in_reply_to=summary.message_id,
        references=capped_references(summary),
    )
