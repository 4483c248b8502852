"""Auto-replies thread into their conversation, are never acknowledged and never count as answers."""

from __future__ import annotations

import email
import email.header
import re
from datetime import datetime, timezone
from email.message import Message
from pathlib import Path

import pytest
from conftest import case_file, maildir_messages, message, send, settle, write_config

from guardrail.clock import ManualClock

IT_RULES = """
[[calendar]]
name = "paris-office"
timezone = "Europe/Paris"
hours = { mon = ["09:00-18:00"], tue = ["09:00-18:00"], wed = ["09:00-18:00"], thu = ["09:00-18:00"], fri = ["09:00-18:00"] }

[[team]]
name = "it"
destination = { maildir = "var/maildir/it" }
members = [
    { name = "Bob Tech", address = "bob@example.org" },
    { name = "Carol Tech", address = "carol@example.org" },
]
calendar = "paris-office"
first_response = "2h"
escalation = [{ after = "0m", name = "Dana Duty", address = "duty-manager@example.org" }]

[[route]]
name = "default"
team = "it"
default = true
"""


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def outbound(folder: Path) -> list[Message]:
    return [email.message_from_bytes(data) for data in maildir_messages(folder / "var" / "outbound")]


def acks(folder: Path) -> list[Message]:
    return [m for m in outbound(folder) if m["Auto-Submitted"] == "auto-replied"]


def escalations(folder: Path) -> list[Message]:
    return [m for m in outbound(folder) if m["X-Guardrail-Envelope-To"] == "duty-manager@example.org"]


def filled(name: str, ack_id: str) -> bytes:
    raw = case_file("auto-reply", name)
    # guardrail forwards the original unchanged, so the team replies to its own Message-ID.
    return raw.replace(b"<ACK-MESSAGE-ID>", ack_id.encode()).replace(b"<FORWARDED-MESSAGE-ID>", b"<laptop-311@example.com>")


async def run_timeline(tmp_path: Path, start_daemon, *, human_reply: bool):
    clock = ManualClock(at("2025-11-04T09:00:00"))
    daemon = await start_daemon(write_config(tmp_path, rules=IT_RULES), clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], case_file("auto-reply", "original.eml"))
    await settle(daemon, clock)
    (ack,) = acks(tmp_path)

    await clock.set(at("2025-11-04T09:00:30"))
    await send(daemon.port, "alice@example.com", ["support@example.org"], filled("ooo-from-sender.eml", ack["Message-ID"]))
    await clock.set(at("2025-11-04T09:01:00"))
    await send(daemon.port, "bob@example.org", ["support@example.org"], filled("ooo-from-team-member.eml", ack["Message-ID"]))
    if human_reply:
        await clock.set(at("2025-11-04T10:15:00"))
        await send(daemon.port, "carol@example.org", ["support@example.org"],
                   filled("human-reply-auto-submitted-no.eml", ack["Message-ID"]))
    await settle(daemon, clock)
    await clock.set(at("2025-11-04T10:59:59"))
    await settle(daemon, clock)
    assert escalations(tmp_path) == []
    await clock.set(at("2025-11-04T11:00:00"))
    await settle(daemon, clock)
    await clock.set(at("2025-11-04T11:05:00"))
    await settle(daemon, clock)
    return daemon


async def test_out_of_office_replies_do_not_answer(tmp_path: Path, start_daemon) -> None:
    daemon = await run_timeline(tmp_path, start_daemon, human_reply=False)

    assert len(acks(tmp_path)) == 1
    conversations = await daemon.store.fetch_all("SELECT id, state, deadline FROM conversations")
    assert conversations == [(1, "open", "2025-11-04T11:00:00.000000Z")]
    messages = await daemon.store.fetch_all("SELECT message_id, conversation_id, disposition, machine_signal FROM messages ORDER BY id")
    assert [row[:3] for row in messages] == [
        ("<laptop-311@example.com>", 1, "new"),
        ("<ooo-alice-1@example.com>", 1, "follow_up"),
        ("<ooo-bob-1@example.org>", 1, "follow_up"),
    ]
    assert messages[0][3] == ""
    assert messages[1][3] == "Auto-Submitted: auto-replied"
    assert messages[2][3] == "Auto-Submitted: auto-replied"
    assert len(escalations(tmp_path)) == 1


async def test_human_reply_with_auto_submitted_no_answers(tmp_path: Path, start_daemon) -> None:
    daemon = await run_timeline(tmp_path, start_daemon, human_reply=True)

    rows = await daemon.store.fetch_all("SELECT state, answered_at, answered_by FROM conversations")
    assert rows == [("answered", "2025-11-04T10:15:00.000000Z", "carol@example.org")]
    assert escalations(tmp_path) == []
    assert len(acks(tmp_path)) == 1


@pytest.mark.parametrize(
    ("header", "automatic"),
    [
        ("Auto-Submitted: no", False),
        ("Auto-Submitted: NO", False),
        ("Auto-Submitted: no (sent by hand)", False),
        ("Auto-Submitted: (typed by a person) no", False),
        ("Auto-Submitted: auto-notified", True),
        ("Auto-Submitted: yes", True),
        ("Auto-Submitted: auto-replied", True),
        ("Auto-Submitted: auto-generated (failure)", True),
        ("Auto-Submitted: Auto-Generated", True),
        ("Auto-Submitted: auto-replied (vacation)", True),
        ("Auto-Submitted: AUTO-REPLIED;owner-email=bob@example.org", True),
        ("Auto-Submitted: (typed by a person) no; x=y", False),
        ("Auto-Submitted: no\r\n (folded)", False),
        ("X-Autoreply: yes", True),
        ("X-Autorespond: vacation", True),
        ("Precedence: bulk", True),
        ("Precedence: junk", True),
        ("Precedence: list", True),
        ("Precedence: auto_reply", True),
        ("Precedence: first-class", False),
        # Case, whitespace, comments and parameters around the keyword (RFC 5322 CFWS).
        ("Precedence:  BULK ", True),
        ("Precedence: Bulk", True),
        ("Precedence: bulk (sent by list)", True),
        ("Precedence: bulk(sent by list)", True),
        ("Precedence: (sent by list) list", True),
        ("Precedence: (a (nested) comment) junk", True),
        ("Precedence: junk ; x", True),
        ("Precedence: list;x=y", True),
        ("Precedence: bulk\r\n (folded)", True),
        ("X-Precedence: (sent by list) LIST", True),
        ("Precedence: normal (bulk)", False),
        ("Precedence: (bulk)", False),
        ("Precedence: bulky", False),
        ("Precedence: bulk list", False),
        ("Precedence: first-class; bulk", False),
        ("X-Precedence: bulk", True),
        ("X-Autoresponder: yes", True),
        ("List-Id: <news.example.org>", True),
        ("List-Unsubscribe: <mailto:leave@example.org>", True),
        ("List-Post: <mailto:list@example.org>", True),
        # RFC 2369: each List-* header alone marks list mail.
        ("List-Help: <mailto:list-request@example.org?subject=help>", True),
        ("List-Subscribe: <mailto:list-request@example.org?subject=subscribe>", True),
        ("List-Owner: <mailto:list-owner@example.org>", True),
        ("List-Archive: <https://lists.example.org/archive/list/>", True),
        # An announcement list, where nobody may post, still sends list mail.
        ("List-Post: NO", True),
        ("Mailing-List: contact list@example.org", True),
        ("X-Failed-Recipients: gone@example.org", True),
        ("X-MS-Exchange-Inbox-Rules-Loop: bob@example.org", True),
        ("Errors-To: owner@example.org", True),
        ("X-Apple-Action: VACATION", True),
        ("Content-Type: multipart/report; report-type=delivery-status", True),
        ("Content-Type: text/plain; charset=utf-8", False),
    ],
)
def test_automatic_header_table(header: str, automatic: bool) -> None:
    from guardrail.loops import machine_signal
    from guardrail.message import summarize

    summary = summarize(f"From: Bob <bob@example.org>\r\nSubject: Re: hi\r\n{header}\r\n\r\nx".encode())
    assert (machine_signal(summary, "bob@example.org", "mx.test.example") is not None) is automatic


@pytest.mark.parametrize(
    ("headers", "signal"),
    [
        (["Auto-Submitted: no", "Auto-Submitted: auto-replied"], "Auto-Submitted: auto-replied"),
        (["Auto-Submitted: auto-generated", "Auto-Submitted: no"], "Auto-Submitted: auto-generated"),
        (["Auto-Submitted: no", "Auto-Submitted: no (sent by hand)"], None),
        (["Precedence: first-class", "Precedence: bulk"], "Precedence: bulk"),
        (["Precedence: normal", "Precedence: list"], "Precedence: list"),
        (["Precedence: first-class", "Precedence: normal"], None),
        (["X-Precedence: normal", "X-Precedence: junk"], "X-Precedence: junk"),
        (["X-Apple-Action: OTHER", "X-Apple-Action: VACATION"], "X-Apple-Action: VACATION"),
    ],
)
def test_repeated_header_any_value_counts(headers: list[str], signal: str | None) -> None:
    from guardrail.loops import machine_signal
    from guardrail.message import summarize

    block = "".join(f"{header}\r\n" for header in headers)
    summary = summarize(f"From: Bob <bob@example.org>\r\nSubject: Re: hi\r\n{block}\r\nx".encode())
    assert machine_signal(summary, "bob@example.org", "mx.test.example") == signal


@pytest.mark.parametrize(
    ("header", "signal"),
    [
        # The stored signal names the keyword alone, or the whole value on one line.
        ("Precedence: Bulk (sent by list)", "Precedence: bulk"),
        ("X-Precedence: junk; x=y", "X-Precedence: junk"),
        ("Auto-Submitted: auto-replied\r\n (vacation)", "Auto-Submitted: auto-replied (vacation)"),
    ],
)
def test_header_signal_text(header: str, signal: str) -> None:
    from guardrail.loops import machine_signal
    from guardrail.message import summarize

    summary = summarize(f"From: Bob <bob@example.org>\r\nSubject: Re: hi\r\n{header}\r\n\r\nx".encode())
    assert machine_signal(summary, "bob@example.org", "mx.test.example") == signal


@pytest.mark.parametrize(
    ("headers", "signal"),
    [
        (["X-Auto-Response-Suppress: OOF, AutoReply"], "X-Auto-Response-Suppress: OOF, AutoReply"),
        (["X-Auto-Response-Suppress: DR"], None),
        (["X-Auto-Response-Suppress: oof"], "X-Auto-Response-Suppress: oof"),
        (["X-Auto-Response-Suppress: DR,OOF"], "X-Auto-Response-Suppress: DR,OOF"),
        (["X-Auto-Response-Suppress: DR, RN, NRN, OOF, AutoReply"], "X-Auto-Response-Suppress: DR, RN, NRN, OOF, AutoReply"),
        (["X-Auto-Response-Suppress: DR RN OOF"], "X-Auto-Response-Suppress: DR RN OOF"),
        (["X-Auto-Response-Suppress:  ALL "], "X-Auto-Response-Suppress: ALL"),
        (["X-Auto-Response-Suppress: (no vacation replies) OOF"], "X-Auto-Response-Suppress: (no vacation replies) OOF"),
        (["X-Auto-Response-Suppress: OOF(x),DR"], "X-Auto-Response-Suppress: OOF(x),DR"),
        (["X-Auto-Response-Suppress: DR, RN"], None),
        (["X-Auto-Response-Suppress: DR (OOF)"], None),
        (["X-Auto-Response-Suppress: NotOOF"], None),
        (["X-Auto-Response-Suppress: DR", "X-Auto-Response-Suppress: OOF"], "X-Auto-Response-Suppress: OOF"),
        # The stored signal has the whole value on one line.
        (["X-Auto-Response-Suppress: DR,\r\n\tOOF"], "X-Auto-Response-Suppress: DR, OOF"),
    ],
)
def test_suppress_request_is_not_machine(headers: list[str], signal: str | None) -> None:
    from guardrail.loops import acknowledgement_signal, machine_signal
    from guardrail.message import summarize

    block = "".join(f"{header}\r\n" for header in headers)
    summary = summarize(f"From: Bob <bob@example.org>\r\nSubject: Order 1234 missing\r\n{block}\r\nx".encode())
    # The header requests no automatic reply and comes on people's mail too,
    # so the acknowledgement is left out but the message is not a machine's.
    assert machine_signal(summary, "bob@example.org", "mx.test.example") is None
    assert acknowledgement_signal(summary, "bob@example.org", "mx.test.example", is_staff=False) == signal


@pytest.mark.parametrize(
    ("value", "keyword"),
    [
        ("no", "no"),
        ("No", "no"),
        ("NO", "no"),
        (" no ", "no"),
        ("\tno\t", "no"),
        ("no (sent by hand)", "no"),
        ("no(sent by hand)", "no"),
        ("(comment) no", "no"),
        ("(a (nested) comment) no", "no"),
        ("(a \\) quoted bracket) no", "no"),
        ("no; x=y", "no"),
        ("no ; x=y", "no"),
        ("no (comment); reason=\"a;b\"", "no"),
        ("auto-replied", "auto-replied"),
        ("Auto-Replied", "auto-replied"),
        ("auto-generated (x)", "auto-generated"),
        ("auto-generated (failure); type=bounce", "auto-generated"),
        ("auto-notified", "auto-notified"),
        ("yes", "yes"),
        # A comment splits a word, and words after the keyword are kept, so neither is "no".
        ("n(x)o", "n o"),
        ("no way", "no way"),
        ("", ""),
        ("(only a comment)", ""),
        ("(unclosed comment no", ""),
    ],
)
def test_auto_submitted_keyword_table(value: str, keyword: str) -> None:
    from guardrail.loops import header_keyword, machine_signal
    from guardrail.message import summarize

    summary = summarize(f"From: Bob <bob@example.org>\r\nSubject: Re: hi\r\nAuto-Submitted: {value}\r\n\r\nx".encode())
    signal = machine_signal(summary, "bob@example.org", "mx.test.example")

    assert header_keyword(value) == keyword
    # RFC 3834 section 5: every value but the keyword "no" marks automatic mail.
    if keyword == "no":
        assert signal is None
    else:
        assert signal is not None and signal.startswith("Auto-Submitted:")


@pytest.mark.parametrize(
    ("patterns", "flags", "local", "expected"),
    [
        ([r"no[-_.]?reply([-+._].*)?", r"bounces?"], re.IGNORECASE, "no-reply+x", True),
        ([r"no[-_.]?reply([-+._].*)?", r"bounces?"], re.IGNORECASE, "replyno", False),
        # A backreference counts groups, so these patterns are tried one by one.
        ([r"(x)y", r"(a)\1"], re.IGNORECASE, "aa", True),
        ([r"(x)y", r"(a)\1"], re.IGNORECASE, "xx", False),
        ([], 0, "anyone", False),
    ],
)
def test_sender_patterns_match_whole_local_parts(patterns: list[str], flags: int, local: str, expected: bool) -> None:
    from guardrail.loops import _any_of

    compiled = tuple(re.compile(pattern, flags) for pattern in patterns)
    assert _any_of(compiled)(local) is expected
    assert any(pattern.fullmatch(local) for pattern in compiled) is expected


def test_sender_patterns_keep_own_flags() -> None:
    from guardrail.loops import _any_of

    compiled = (re.compile("Robot"), re.compile("daemon", re.IGNORECASE))
    assert _any_of(compiled)("robot") is False
    assert _any_of(compiled)("DAEMON") is True


@pytest.mark.parametrize(
    ("subject", "automatic"),
    [
        # Software puts the phrase first, before a colon or alone.
        ("Out of Office: Re: my order", True),
        ("Out of Office AutoReply: Re: my order", True),
        ("Out of office auto-reply", True),
        ("Automatic reply: Order 1234", True),
        ("Auto: hello", True),
        ("[Auto-Reply] hello", True),
        ("Undeliverable: invoice", True),
        ("Undelivered Mail Returned to Sender", True),
        ("Delivery Status Notification (Failure)", True),
        ("Mail delivery failed: returning message to sender", True),
        ("failure notice", True),
        ("Réponse automatique : votre demande", True),
        ("Automatische Antwort: Ihre Anfrage", True),
        ("Respuesta automática: pedido", True),
        ("自動応答: お問い合わせ", True),
        ("Message d’absence : votre demande", True),
        # Italian, Portuguese (Portugal and Brazil), Swedish, Danish, Norwegian, Czech.
        ("Risposta automatica: Ordine 1234", True),
        ("RISPOSTA AUTOMATICA: ordine", True),
        ("Fuori sede: Re: fattura", True),
        ("Fuori ufficio", True),
        ("Resposta automática: Encomenda 1234", True),
        ("Resposta Automática: Pedido 1234", True),
        ("Ausente: Re: pedido", True),
        ("Fora do escritório: Re: pedido", True),
        ("Automatiskt svar: Order 1234", True),
        ("Frånvaromeddelande: Re: faktura", True),
        ("Automatisk svar: Ordre 1234", True),
        ("Autosvar: Ordre 1234", True),
        ("Autoodpowiedź: Zamówienie 1234", True),
        ("Automatická odpověď: Objednávka 1234", True),
        ("Mimo kancelář: Re: faktura", True),
        ("【自動返信】お問い合わせありがとうございます", True),
        ("【自動返信メール】ご注文ありがとうございます", True),
        ("[自動応答] お問い合わせ", True),
        ("【不在】ご連絡ありがとうございます", True),
        # People use the same words inside their own subjects.
        ("Delivery delayed for order 1234", False),
        ("My parcel is undelivered", False),
        ("Colis non remis", False),
        ("I am on holiday next week, please answer before", False),
        ("Question about auto-reply settings", False),
        ("Auto-renewal charged twice", False),
        ("Pedido ausente de la caja", False),
        ("不在票が届きました", False),
        ("Re: Out of office?", False),
        ("Risposta automatica non arrivata", False),
        ("Re: Risposta automatica: Ordine 1234", False),
        ("Fuori sede da lunedì, chi mi sostituisce?", False),
        ("Rimborso fuori sede: trasferta di marzo", False),
        ("Resposta automática não funciona", False),
        ("Fora do escritório amanhã, posso ligar?", False),
        ("Ausentes na reunião: lista", False),
        ("Automatiskt svar saknas", False),
        ("Autoodpowiedź nie działa", False),
        ("Autosvar fungerer ikke", False),
        ("Mimo kancelář zítra", False),
        ("Automatická odpověď nefunguje", False),
        ("自動返信の設定について", False),
        ("【重要】不在票について", False),
        ("Automatic renewal question", False),
        ("Out of office furniture order", False),
        ("Auto renewal: charged twice", False),
        # Auto-replies name an absence with a longer phrase than a person's leave notice does.
        ("Message d'absence : votre demande", True),
        ("Absence du bureau", True),
        ("Abwesenheitsnotiz: Ihre Anfrage", True),
        ("Absence: Marie Dupont, 3 March", False),
        ("Absence", False),
        ("Abwesenheit: Krankmeldung vom 3. März", False),
        ("Nieobecność: Jan Kowalski, 3 marca", False),
        ("休暇：3月の申請について", False),
        # A customer's complaint about a parcel, in the words some delivery reports use.
        ("Delivery delayed: order 1234", False),
        ("Delivery delayed (order 1234)", False),
        ("Non remis : colis 1234", False),
        ("No entregado: pedido 1234", False),
    ],
)
def test_auto_reply_subject_table(subject: str, automatic: bool) -> None:
    from guardrail.loops import machine_signal
    from guardrail.message import summarize

    header = email.header.Header(subject, "utf-8").encode()
    summary = summarize(f"From: Bob <bob@example.org>\r\nSubject: {header}\r\n\r\nx".encode())
    assert summary.subject == subject
    assert (machine_signal(summary, "bob@example.org", "mx.test.example") is not None) is automatic


@pytest.mark.parametrize(
    "text",
    ["".join(map(chr, range(128))), "Automatic Reply: ORDER 1234", "Réponse automatique", "Straße ǅ ﬁ ＡＵＴＯ：", ""],
)
def test_fold_matches_full_folding(text: str) -> None:
    import unicodedata

    from guardrail.loops import fold

    decomposed = unicodedata.normalize("NFKD", text.casefold())
    assert fold(text) == "".join(char for char in decomposed if not unicodedata.combining(char))


def multipart(content_type: str, parts: list[tuple[str, str]], *, subject: str = "Re: hi") -> bytes:
    """Return a message from a person's address whose body is `parts`, each a (Content-Type, body) pair."""
    boundary = "outer-boundary"
    body = "".join(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n{text}\r\n" for kind, text in parts)
    return (
        f"From: Bob <bob@example.org>\r\nTo: support@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <parts-1@example.org>\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: {content_type}; boundary="{boundary}"\r\n\r\n{body}--{boundary}--\r\n'
    ).encode()


DELIVERY_STATUS = "Reporting-MTA: dns; mx.example.net\r\n\r\nFinal-Recipient: rfc822; gone@example.net\r\nAction: failed\r\nStatus: 5.1.1"
NESTED_REPORT = (
    'multipart/report; report-type=delivery-status; boundary="inner"',
    f"--inner\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
    f"--inner\r\nContent-Type: message/delivery-status\r\n\r\n{DELIVERY_STATUS}\r\n--inner--",
)
CALENDAR_REPLY = "BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nATTENDEE;PARTSTAT=ACCEPTED:mailto:bob@example.org\r\nEND:VEVENT\r\nEND:VCALENDAR"
# The parts of a report as a person's mail program forwards them inline.
INLINE_REPORT_PARTS = (
    ("message/delivery-status", DELIVERY_STATUS),
    ("message/global-delivery-status", DELIVERY_STATUS),
    ("message/disposition-notification", "Disposition: manual-action/MDN-sent-manually; displayed"),
    ("message/feedback-report", "Feedback-Type: abuse"),
)
FORWARDED_BOUNCE = (
    "message/rfc822",
    'Subject: Undelivered Mail\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="inner"\r\n\r\n'
    f"--inner\r\nContent-Type: message/delivery-status\r\n\r\n{DELIVERY_STATUS}\r\n--inner--",
)


def test_delay_report_found_without_subject() -> None:
    from guardrail.loops import machine_signal
    from guardrail.message import summarize

    data = multipart("multipart/report; report-type=delivery-status",
                     [("text/plain", "Delivery is delayed."), ("message/delivery-status", DELIVERY_STATUS)],
                     subject="Delivery delayed: Order 1234")
    assert machine_signal(summarize(data), "", "mx.test.example") == "multipart/report"
    # A delay notice in plain text still comes from the null sender (RFC 5321 section 4.5.5).
    plain = b"From: Mail Delivery System <mailer@mx.example.net>\r\nSubject: Delivery delayed: Order 1234\r\n\r\nStill trying.\r\n"
    assert machine_signal(summarize(plain), "", "mx.test.example") == "null envelope sender"


@pytest.mark.parametrize("with_body", [True, False])
@pytest.mark.parametrize(
    ("data", "signal"),
    [
        # RFC 6522 section 3: a report may be a part of another multipart.
        (multipart("multipart/mixed", [("text/plain", "See the report below."), NESTED_REPORT]), "multipart/report part"),
        # A report part counts inside a multipart/report, also one nested in another multipart.
        (multipart("multipart/signed", [NESTED_REPORT, ("application/pkcs7-signature", "x")]), "multipart/report part"),
        (multipart("multipart/mixed", [("text/plain", "x"), ("multipart/report; report-type=feedback-report; boundary=\"inner\"",
                                                             "--inner\r\nContent-Type: message/feedback-report\r\n\r\n"
                                                             "Feedback-Type: abuse\r\n--inner--")]),
         "multipart/report part"),
        # A read receipt (RFC 8098) or a delivery report without its multipart/report wrapper.
        (b"From: Bob <bob@example.org>\r\nSubject: Read: hi\r\nContent-Type: message/disposition-notification\r\n\r\n"
         b"Disposition: manual-action/MDN-sent-manually; displayed\r\n", "message/disposition-notification"),
        (b"From: Bob <bob@example.org>\r\nSubject: hi\r\nContent-Type: message/global-delivery-status\r\n\r\nAction: failed\r\n",
         "message/global-delivery-status"),
        # A meeting reply (iTIP REPLY), on its own or beside the text a calendar program writes.
        (b"From: Bob <bob@example.org>\r\nSubject: Accepted: Weekly call\r\nContent-Type: text/calendar; method=REPLY;"
         b' charset="utf-8"\r\n\r\n' + CALENDAR_REPLY.encode() + b"\r\n", "calendar reply"),
        (multipart("multipart/alternative", [("text/plain", "Bob has accepted."), ('text/calendar; charset="utf-8"; method="REPLY"',
                                                                                  CALENDAR_REPLY)]),
         "calendar reply"),
        # A person's mail: an invitation, or a bounce forwarded as an attachment to ask about it.
        (multipart("multipart/alternative", [("text/plain", "Shall we talk?"), ("text/calendar; method=REQUEST", CALENDAR_REPLY)]),
         None),
        (multipart("multipart/mixed", [("text/plain", "Why did my mail bounce?"), FORWARDED_BOUNCE]), None),
        (multipart("multipart/mixed", [("text/plain", "Content-Type: multipart/report is what I saw"), ("text/plain", "x")]), None),
        # A bounce forwarded inline: the mail program puts the report's parts
        # beside the person's text, outside any multipart/report.
        *((multipart("multipart/mixed", [("text/plain", "Why did my mail bounce?"), part]), None) for part in INLINE_REPORT_PARTS),
    ],
)
def test_report_and_calendar_parts(data: bytes, signal: str | None, with_body: bool) -> None:
    from guardrail.loops import machine_signal
    from guardrail.message import summarize

    summary = summarize(data, with_body=with_body)
    assert machine_signal(summary, "bob@example.org", "mx.test.example") == signal


@pytest.mark.parametrize(
    ("data", "acknowledged"),
    [
        (multipart("multipart/mixed", [("text/plain", "See the report below."), NESTED_REPORT]), False),
        (multipart("multipart/alternative", [("text/plain", "Bob has accepted."), ("text/calendar; method=REPLY", CALENDAR_REPLY)]),
         False),
        (multipart("multipart/mixed", [("text/plain", "Why did my mail bounce?"), FORWARDED_BOUNCE]), True),
        (multipart("multipart/mixed", [("text/plain", "Why did my mail bounce?"), ("text/plain", "Your message could not be"
                                       " delivered."), INLINE_REPORT_PARTS[0], FORWARDED_BOUNCE], subject="Fwd: Undelivered Mail"),
         True),
    ],
)
async def test_reports_and_meeting_replies_unacknowledged(
    tmp_path: Path, start_daemon, data: bytes, acknowledged: bool
) -> None:
    clock = ManualClock(at("2025-11-04T09:00:00"))
    daemon = await start_daemon(write_config(tmp_path, rules=IT_RULES), clock=clock)
    await send(daemon.port, "bob@example.net", ["support@example.org"], data.replace(b"bob@example.org", b"bob@example.net"))
    await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT decision FROM acknowledgements")
    assert [row[0] for row in rows] == ["sent" if acknowledged else "suppressed"]
    assert len(acks(tmp_path)) == (1 if acknowledged else 0)
    ((state,),) = await daemon.store.fetch_all("SELECT state FROM conversations")
    assert state == ("open" if acknowledged else "no_reply_needed")


@pytest.mark.parametrize(
    ("subject", "headers", "state", "deadline"),
    [
        # The subject alone: no acknowledgement, but the deadline runs and the escalation fires.
        ("Out of office: can you cover my shift?", "", "open", "2025-11-04T10:00:00.000000Z"),
        ("Auto: Termin zur Inspektion", "", "open", "2025-11-04T10:00:00.000000Z"),
        # A header says software wrote it: nobody needs to reply.
        ("Out of office: back on Monday", "Auto-Submitted: auto-replied\r\n", "no_reply_needed", None),
    ],
)
async def test_subject_alone_keeps_deadline(
    tmp_path: Path, start_daemon, subject: str, headers: str, state: str, deadline: str | None
) -> None:
    clock = ManualClock(at("2025-11-04T08:00:00"))
    daemon = await start_daemon(write_config(tmp_path, rules=IT_RULES), clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject=subject, extra_headers=headers))
    await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT decision, signal FROM acknowledgements")
    assert [row[0] for row in rows] == ["suppressed"]
    assert acks(tmp_path) == []
    assert await daemon.store.fetch_all("SELECT state, deadline FROM conversations") == [(state, deadline)]
    await clock.set(at("2025-11-04T10:00:00"))
    await settle(daemon, clock)
    assert len(escalations(tmp_path)) == (1 if deadline else 0)


@pytest.mark.parametrize(
    ("first_subject", "reply_subject", "state", "escalated"),
    [
        # A team member's own reply answers a conversation that only its subject marked.
        ("Out of office: can you cover my shift?", "Re: Out of office: can you cover my shift?", "answered", 0),
        # A team member's auto-reply, known by its subject alone, answers nothing.
        ("Printer on floor 3 jams", "Automatic reply: Printer on floor 3 jams", "open", 1),
    ],
)
async def test_team_reply_beside_subject_signal(
    tmp_path: Path, start_daemon, first_subject: str, reply_subject: str, state: str, escalated: int
) -> None:
    clock = ManualClock(at("2025-11-04T08:00:00"))
    daemon = await start_daemon(write_config(tmp_path, rules=IT_RULES), clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(subject=first_subject))
    await settle(daemon, clock)
    reply = message(
        subject=reply_subject, sender="Bob Tech <bob@example.org>", message_id="<reply-1@example.org>",
        extra_headers="In-Reply-To: <m1@example.com>\r\n",
    )
    await send(daemon.port, "bob@example.org", ["support@example.org"], reply)
    await settle(daemon, clock)

    assert await daemon.store.fetch_all("SELECT state FROM conversations") == [(state,)]
    messages = await daemon.store.fetch_all("SELECT conversation_id, disposition FROM messages ORDER BY id")
    assert messages == [(1, "new"), (1, "follow_up")]
    await clock.set(at("2025-11-04T10:00:00"))
    await settle(daemon, clock)
    assert len(escalations(tmp_path)) == escalated


async def test_suppress_request_keeps_deadline(tmp_path: Path, start_daemon) -> None:
    suppress = "X-Auto-Response-Suppress: DR, OOF, AutoReply\r\n"
    clock = ManualClock(at("2025-11-04T08:00:00"))
    daemon = await start_daemon(write_config(tmp_path, rules=IT_RULES), clock=clock)
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(extra_headers=suppress))
    await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT decision, signal FROM acknowledgements")
    assert [tuple(row) for row in rows] == [("suppressed", "X-Auto-Response-Suppress: DR, OOF, AutoReply")]
    assert acks(tmp_path) == []
    conversations = await daemon.store.fetch_all("SELECT state, deadline FROM conversations")
    assert conversations == [("open", "2025-11-04T10:00:00.000000Z")]

    # A team member's reply from the same kind of mail program marks the conversation answered.
    reply = message(
        subject="Re: Printer on floor 3 jams", sender="Bob Tech <bob@example.org>", message_id="<reply-1@example.org>",
        extra_headers=f"In-Reply-To: <m1@example.com>\r\n{suppress}",
    )
    await clock.set(at("2025-11-04T09:00:00"))
    await send(daemon.port, "bob@example.org", ["support@example.org"], reply)
    await settle(daemon, clock)
    assert await daemon.store.fetch_all("SELECT state, answered_by FROM conversations") == [("answered", "bob@example.org")]
    assert await daemon.store.fetch_all("SELECT machine_signal FROM messages ORDER BY id") == [("",), ("",)]
    await clock.set(at("2025-11-04T10:00:00"))
    await settle(daemon, clock)
    assert escalations(tmp_path) == []


@pytest.mark.parametrize(
    ("mail_from", "sender", "signal"),
    [
        ("MAILER-DAEMON+7f3a@mx.example.net", "MAILER-DAEMON+7f3a@mx.example.net",
         "envelope sender mailer-daemon+7f3a@mx.example.net looks automated"),
        ("bob@example.net", "Postmaster+Reports@Example.net", "From postmaster+reports@example.net looks automated"),
        ("bob@example.net", "NoReply+Orders@shop.example", "From noreply+orders@shop.example looks automated"),
        ("bob@example.net", "Newsletter+weekly@shop.example", "From newsletter+weekly@shop.example looks automated"),
        ("owner-users@lists.example.net", "Alice <alice@example.net>",
         "envelope sender owner-users@lists.example.net looks automated"),
        ("bob@example.net", "Users-Request@lists.example.net", "From users-request@lists.example.net looks automated"),
        ("bob@example.net", "LISTSERV@lists.example.net", "From listserv@lists.example.net looks automated"),
        # A bare "owner" or "request", and an address that only contains the words, are people.
        ("owner@example.net", "Owner <owner@example.net>", None),
        ("bob@example.net", "requests-team@example.net", None),
        ("bob@example.net", "shop-owner@example.net", None),
        # An envelope sender without a domain is a local part alone, as some mail systems send it.
        ("MAILER-DAEMON", "Alice <alice@example.net>", "envelope sender mailer-daemon looks automated"),
        ("bounces-7f3a", "Alice <alice@example.net>", "envelope sender bounces-7f3a looks automated"),
        ("alice", "Alice <alice@example.net>", None),
        # A person's own subaddress, and a local part that only starts with a plus, are not robots.
        ("bob+support@example.net", "Bob <bob+support@example.net>", None),
        ("bob@example.net", "+postmaster@example.net", None),
    ],
)
def test_subaddressed_robot_senders(mail_from: str, sender: str, signal: str | None) -> None:
    from guardrail.loops import machine_signal
    from guardrail.message import summarize

    summary = summarize(f"From: {sender}\r\nSubject: Your question\r\n\r\nx".encode())
    assert machine_signal(summary, mail_from, "mx.test.example") == signal


@pytest.mark.parametrize(
    ("mail_from", "sender", "signal"),
    [
        ("MAILER-DAEMON+7f3a@mx.example.net", "Mail Delivery System <MAILER-DAEMON+7f3a@mx.example.net>",
         "envelope sender mailer-daemon+7f3a@mx.example.net looks automated"),
        # An envelope sender without a domain.
        ("MAILER-DAEMON", "Alice <alice@example.net>", "envelope sender mailer-daemon looks automated"),
    ],
    ids=["subaddressed", "unqualified"],
)
async def test_mailer_daemon_not_acknowledged(tmp_path: Path, start_daemon, mail_from: str, sender: str, signal: str) -> None:
    clock = ManualClock(at("2025-11-04T09:00:00"))
    daemon = await start_daemon(write_config(tmp_path, rules=IT_RULES), clock=clock)
    data = f"From: {sender}\r\nSubject: Your message\r\n\r\nIt bounced.\r\n".encode()
    await send(daemon.port, mail_from, ["support@example.org"], data)
    await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT decision, signal FROM acknowledgements")
    assert [tuple(row) for row in rows] == [("suppressed", signal)]
    assert acks(tmp_path) == []
