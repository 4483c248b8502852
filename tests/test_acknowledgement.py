"""The acknowledgement: its headers, language, template safety, and when one is sent at all."""

from __future__ import annotations

import email
import email.policy
import json
import re
from datetime import datetime, timezone
from email.header import Header
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from conftest import (
    case_file,
    maildir_messages,
    message,
    rules_folder,
    send,
    settle,
    wait_until,
    write_config,
)
from structlog.testing import capture_logs

from guardrail.acknowledgement import (
    MAX_COPIED_ID,
    MAX_QUOTED_NAME,
    MAX_QUOTED_SUBJECT,
    MAX_REFERENCES,
    AckRequest,
    capped_references,
    choose_language,
    format_deadline,
    merge_fields,
    one_line,
    render_acknowledgement,
    requested_languages,
    shortened,
)
from guardrail.clock import ManualClock
from guardrail.daemon import Daemon
from guardrail.errors import ConfigErrors
from guardrail.loops import acknowledgement_signal
from guardrail.message import summarize
from guardrail.rules import RuleSet, load_rules

HOSTNAME = "mx.test.example"
ARRIVAL = datetime(2025, 11, 4, 10, 0, tzinfo=timezone.utc)  # Tue 11:00 in Paris
SUPPORT_URGENT = "call the support line +33 1 84 88 00 01"
BILLING_URGENT = "appelez le +33 1 84 88 00 00"

RULES = f"""
[[calendar]]
name = "office"
timezone = "Europe/Paris"
hours = {{ mon = ["09:00-18:00"], tue = ["09:00-18:00"], wed = ["09:00-18:00"], thu = ["09:00-18:00"], fri = ["09:00-18:00"] }}

[[team]]
name = "support"
destination = {{ maildir = "var/maildir/support" }}
members = [{{ name = "Sam Ortiz", address = "sam@example.org" }}]
calendar = "office"
first_response = "4h"
urgent_contact = "{SUPPORT_URGENT}"

[[team]]
name = "billing"
destination = {{ maildir = "var/maildir/billing" }}
members = [{{ name = "Bea Keller", address = "bea@example.org" }}]
calendar = "office"
first_response = "4h"
language = "fr"
urgent_contact = "{BILLING_URGENT}"

[[route]]
name = "billing"
team = "billing"
any = [{{ rcpt.is = "billing@example.org" }}]

[[route]]
name = "default"
team = "support"
default = true
"""

# The deadline of a message received at ARRIVAL (4h from Tue 11:00), as each template writes it.
DEADLINE_TEXT = {
    "en": "Tuesday, November 4, 2025, 15:00 (Europe/Paris)",
    "fr": "mardi 4 novembre 2025, 15:00 (Europe/Paris)",
    "de": "Dienstag, 4. November 2025, 15:00 (Europe/Paris)",
    "es": "martes, 4 de noviembre de 2025, 15:00 (Europe/Paris)",
}
SUBJECT_START = {
    "en": "We received your message",
    "fr": "Nous avons bien reçu votre message",
    "de": "Wir haben Ihre Nachricht erhalten",
    "es": "Hemos recibido su mensaje",
}


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    return load_rules(rules_folder(tmp_path, RULES), tmp_path)


async def start(tmp_path: Path, start_daemon) -> tuple[Daemon, ManualClock]:
    clock = ManualClock(ARRIVAL)
    daemon = await start_daemon(write_config(tmp_path, rules=RULES), clock=clock)
    return daemon, clock


def sent_acknowledgements(folder: Path) -> list[tuple[bytes, EmailMessage]]:
    """Return each acknowledgement in the outbound maildir as (file bytes, parsed message)."""
    found = []
    for data in maildir_messages(folder / "var" / "outbound"):
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        if parsed["Auto-Submitted"] == "auto-replied":
            found.append((data, parsed))
    return found


async def acknowledge_one(tmp_path: Path, start_daemon, mail_from: str, data: bytes, rcpt: str = "support@example.org"):
    """Send one message and return the daemon and the single acknowledgement it sends."""
    daemon, clock = await start(tmp_path, start_daemon)
    await send(daemon.port, mail_from, [rcpt], data)
    await settle(daemon, clock)
    await wait_until(lambda: sent_acknowledgements(tmp_path), what="the acknowledgement")
    acknowledgements = sent_acknowledgements(tmp_path)
    assert len(acknowledgements) == 1
    return daemon, *acknowledgements[0]


def subject(ack: EmailMessage) -> str:
    # Python's folder may break a long Subject right after the colon, and its
    # parser then keeps the space that starts the continuation line.
    return str(ack["Subject"]).strip()


def body(ack: EmailMessage) -> str:
    return ack.get_content().replace("\r\n", "\n")


def header_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# -- the message ---------------------------------------------------------------


async def test_acknowledgement_headers_follow_rfc_3834(tmp_path: Path, start_daemon) -> None:
    original = message(
        message_id="<printer-3@example.com>",
        extra_headers="Reply-To: Alice Replies <replies@example.net>\r\nReferences: <earlier@example.com>\r\n",
    )
    daemon, data, ack = await acknowledge_one(tmp_path, start_daemon, "alice.smtp@example.com", original)
    ((reference,),) = await daemon.store.fetch_all("SELECT reference FROM conversations")

    assert data.startswith(b"Return-Path: <>\r\n")
    assert ack["X-Guardrail-Envelope-To"] == "alice.smtp@example.com"
    assert ack["To"] == "alice.smtp@example.com"
    assert not any(b"replies@example.net" in line for line in header_lines(data))
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["X-Auto-Response-Suppress"] == "All"
    assert ack["X-Guardrail-Loop"] == HOSTNAME
    assert ack["Message-ID"] != "<printer-3@example.com>"
    assert ack["Message-ID"].endswith(f"@{HOSTNAME}>")
    assert ack["In-Reply-To"] == "<printer-3@example.com>"
    assert ack["References"].split() == ["<earlier@example.com>", "<printer-3@example.com>"]
    assert re.fullmatch(r"GR-[0-9A-Z]{6}", reference)
    assert subject(ack).endswith(f" [{reference}]")
    assert DEADLINE_TEXT["en"] in body(ack)
    assert SUPPORT_URGENT in body(ack)
    stored = await daemon.store.fetch_all("SELECT decision, message_id FROM acknowledgements")
    assert [tuple(row) for row in stored] == [("sent", ack["Message-ID"])]


async def test_each_acknowledgement_has_own_message_id(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await start(tmp_path, start_daemon)
    for index in range(3):
        data = message(sender=f"Customer {index} <c{index}@example.com>", message_id=f"<question-{index}@example.com>")
        await send(daemon.port, f"c{index}@example.com", ["support@example.org"], data)
    await settle(daemon, clock)
    await wait_until(lambda: len(sent_acknowledgements(tmp_path)) == 3, what="three acknowledgements")

    message_ids = {ack["Message-ID"] for _, ack in sent_acknowledgements(tmp_path)}
    assert len(message_ids) == 3


# -- language ------------------------------------------------------------------


PRINTER = ("Printer on floor 3 jams", "Hello,\r\nthe printer jams.\r\n")
FRENCH = ("Facture", "Bonjour, je ne trouve pas ma facture. Merci\r\n")


@pytest.mark.parametrize(
    ("rcpt", "headers", "text", "language"),
    [
        ("support@example.org", "Content-Language: fr\r\n", PRINTER, "fr"),
        ("support@example.org", "Accept-Language: de-CH, de;q=0.9, en;q=0.5\r\n", PRINTER, "de"),
        ("support@example.org", "Accept-Language: es\r\n", PRINTER, "es"),
        # No Portuguese template: the team's language.
        ("support@example.org", "Content-Language: pt\r\n", PRINTER, "en"),
        # Without a header, the language the message is written in.
        ("billing@example.org", "", PRINTER, "en"),
        ("support@example.org", "", FRENCH, "fr"),
        ("support@example.org", "", ("Rechnung", "Hallo, ich habe die Rechnung nicht bekommen. Danke\r\n"), "de"),
        ("support@example.org", "", ("Factura", "Hola, no encuentro mi factura. Gracias\r\n"), "es"),
        # A reply quotes the English message it replies to: the language is the sender's own.
        ("support@example.org", "", ("Re: Your parcel has shipped", "Bonjour, je n'ai rien reçu. Merci\r\n\r\n"
                                     "On Mon, 3 Nov 2025, Shop <shop@example.com> wrote:\r\n"
                                     "> Hello, your parcel has shipped and you can track it with the link below.\r\n"
                                     "> If you have any questions, please reply to this email. Thank you for your order!\r\n"),
         "fr"),
        # Outlook puts the quoted message below a header block in the sender's language.
        ("support@example.org", "", ("RE: Your parcel has shipped", "Bonjour, je n'ai rien reçu. Merci\r\n\r\n"
                                     "De : Shop <shop@example.com>\r\nEnvoyé : lundi 3 novembre 2025 10:00\r\n"
                                     "Objet : Your parcel has shipped\r\n\r\n"
                                     "Hello, your parcel has shipped and you can track it with the link below.\r\n"
                                     "If you have any questions, please reply to this email. Thank you for your order!\r\n"),
         "fr"),
        # A header still comes first.
        ("support@example.org", "Content-Language: de\r\n", FRENCH, "de"),
        # Nothing to tell the language by: billing's, which is French.
        ("billing@example.org", "", ("INV-2025-114", "INV-2025-114\r\n"), "fr"),
    ],
)
async def test_acknowledgement_uses_requested_language(
    tmp_path: Path, start_daemon, rcpt: str, headers: str, text: tuple[str, str], language: str
) -> None:
    data = message(to=rcpt, extra_headers=headers, subject=text[0], body=text[1])
    daemon, _, ack = await acknowledge_one(tmp_path, start_daemon, "alice@example.com", data, rcpt=rcpt)

    assert ack["Content-Language"] == language
    assert subject(ack).startswith(SUBJECT_START[language])
    assert DEADLINE_TEXT[language] in body(ack)
    stored = await daemon.store.fetch_all("SELECT language, variant FROM acknowledgements")
    assert [tuple(row) for row in stored] == [(language, "template")]


@pytest.mark.parametrize(
    ("headers", "languages"),
    [
        ("", []),
        ("Content-Language: fr\r\n", ["fr"]),
        ("Content-Language: en-GB, fr-CA\r\n", ["en-gb", "fr-ca"]),
        ("Accept-Language: de-CH, de;q=0.9, en;q=0.5\r\n", ["de-ch", "de", "en"]),
        ("Accept-Language: en;q=0.2, es;q=0.8, fr\r\n", ["fr", "es", "en"]),
        # Weight zero means "not acceptable", and malformed tags are skipped.
        ("Accept-Language: de;q=0, fr\r\n", ["fr"]),
        ("Accept-Language: !!, 12, es\r\n", ["es"]),
        # Content-Language names the message's own language, so it comes first.
        ("Accept-Language: de\r\nContent-Language: es\r\n", ["es", "de"]),
    ],
)
def test_requested_languages_table(headers: str, languages: list[str]) -> None:
    assert requested_languages(summarize(message(extra_headers=headers))) == languages


@pytest.mark.parametrize(
    ("team_name", "headers", "language"),
    [
        ("support", "", "en"),
        ("billing", "", "fr"),
        ("support", "Accept-Language: pt-BR, pt;q=0.9, es;q=0.5\r\n", "es"),
        ("support", "Accept-Language: pt-BR, ja\r\n", "en"),
        ("billing", "Content-Language: de\r\n", "de"),
        ("billing", "Content-Language: EN\r\n", "en"),
    ],
)
def test_choose_language_table(rules: RuleSet, team_name: str, headers: str, language: str) -> None:
    assert choose_language(summarize(message(extra_headers=headers)), rules.teams[team_name]) == language


def regional_rules(languages: list[str], team_language: str) -> str:
    """Return rules whose one team has a template "custom" in each of `languages`."""
    templates = "".join(
        f'''
[[template]]
name = "custom"
language = "{language}"
subject = "Received ({language}): {{subject}}"
body = "Hello {{sender_name}}."
plain_subject = "Received ({language})"
plain_body = "Hello."
'''
        for language in languages
    )
    return templates + f'''
[[team]]
name = "support"
destination = {{ maildir = "var/maildir/support" }}
members = [{{ name = "Sam Ortiz", address = "sam@example.org" }}]
template = "custom"
language = "{team_language}"

[[route]]
name = "default"
team = "support"
default = true
'''


PORTUGUESE = ("Pedido", "Olá, não recebi o meu pedido. Obrigado\r\n")


@pytest.mark.parametrize(
    ("languages", "team_language", "headers", "text", "language"),
    [
        # A regional tag finds the template of that region, and a more specific one finds it too (RFC 4647 lookup).
        (["en", "pt-BR"], "en", "Content-Language: pt-BR\r\n", PRINTER, "pt-br"),
        (["en", "pt-BR"], "en", "Accept-Language: pt-br-x-custom, en;q=0.5\r\n", PRINTER, "pt-br"),
        (["en", "pt"], "en", "Content-Language: pt-BR\r\n", PRINTER, "pt"),
        (["en", "zh-Hant"], "en", "Content-Language: zh-Hant-TW\r\n", PRINTER, "zh-hant"),
        # A reader of the bare language gets one of its regional templates: the team's own if it is one.
        (["en", "pt-BR", "pt-PT"], "en", "Content-Language: pt\r\n", PRINTER, "pt-br"),
        (["en", "pt-BR", "pt-PT"], "pt-PT", "Content-Language: pt\r\n", PRINTER, "pt-pt"),
        (["en", "pt-PT"], "en", "Accept-Language: pt-BR, en;q=0.5\r\n", PRINTER, "pt-pt"),
        # The exact regional template comes before another region's.
        (["en-GB", "en-US"], "en-GB", "Content-Language: en-US\r\n", PRINTER, "en-us"),
        # Without a header, the language the text is written in, in that language's regional template.
        (["en", "pt-BR"], "en", "", PORTUGUESE, "pt-br"),
        (["en-GB", "pt-BR"], "pt-BR", "", PRINTER, "en-gb"),
        # Nothing matches: the team's language.
        (["en", "pt-BR"], "en", "Content-Language: de-CH\r\n", PRINTER, "en"),
    ],
)
def test_regional_template_chosen(
    tmp_path: Path, languages: list[str], team_language: str, headers: str, text: tuple[str, str], language: str
) -> None:
    team = load_rules(rules_folder(tmp_path, regional_rules(languages, team_language)), tmp_path).teams["support"]
    summary = summarize(message(extra_headers=headers, subject=text[0], body=text[1]))

    assert choose_language(summary, team, lambda: f"{summary.subject}\n{summary.body_text}") == language


async def test_regional_template_acknowledged(tmp_path: Path, start_daemon) -> None:
    rules = regional_rules(["en", "pt-BR"], "en")
    daemon = await start_daemon(write_config(tmp_path, rules=rules), clock=ManualClock(ARRIVAL))

    data = message(extra_headers="Content-Language: pt-BR\r\n", subject="Pedido")
    await send(daemon.port, "alice@example.com", ["support@example.org"], data)
    await settle(daemon, daemon.clock)
    await wait_until(lambda: sent_acknowledgements(tmp_path), what="the acknowledgement")

    ((_, ack),) = sent_acknowledgements(tmp_path)
    assert ack["Content-Language"] == "pt-br"
    assert subject(ack).startswith("Received (pt-BR): Pedido")
    stored = await daemon.store.fetch_all("SELECT language FROM acknowledgements")
    assert [row[0] for row in stored] == ["pt-br"]


@pytest.mark.parametrize(
    ("deadline", "language", "text"),
    [
        ("2025-12-01T08:30:00", "en", "Monday, December 1, 2025, 09:30 (Europe/Paris)"),
        ("2025-12-01T08:30:00", "fr", "lundi 1 décembre 2025, 09:30 (Europe/Paris)"),
        ("2025-12-01T08:30:00", "de", "Montag, 1. Dezember 2025, 09:30 (Europe/Paris)"),
        ("2025-12-01T08:30:00", "es", "lunes, 1 de diciembre de 2025, 09:30 (Europe/Paris)"),
        # Summer time: the same UTC hour is one hour later in Paris.
        ("2025-07-01T08:30:00", "fr", "mardi 1 juillet 2025, 10:30 (Europe/Paris)"),
        # BCP 47 tags, lowercased by the loader; Babel writes them with "_".
        ("2025-12-01T08:30:00", "pt-br", "segunda-feira, 1 de dezembro de 2025, 09:30 (Europe/Paris)"),
        ("2025-12-01T08:30:00", "zh-hant", "2025年12月1日 星期一, 09:30 (Europe/Paris)"),
        ("2025-12-01T08:30:00", "de-ch", "Montag, 1. Dezember 2025, 09:30 (Europe/Paris)"),
    ],
)
def test_format_deadline_table(rules: RuleSet, deadline: str, language: str, text: str) -> None:
    instant = datetime.fromisoformat(deadline).replace(tzinfo=timezone.utc)
    assert format_deadline(instant, rules.teams["support"], language) == text


def test_format_deadline_none_is_empty(rules: RuleSet) -> None:
    assert format_deadline(None, rules.teams["support"], "en") == ""


# -- template safety -----------------------------------------------------------


async def test_empty_subject_sends_plain_variant(tmp_path: Path, start_daemon) -> None:
    daemon, clock = await start(tmp_path, start_daemon)
    with capture_logs() as events:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10) as client:
            await client.sendmail("alice@example.com", ["support@example.org"], message(subject=""))
    fallbacks = daemon.metrics.ack_template_fallbacks._value.get()
    await settle(daemon, clock)
    await wait_until(lambda: sent_acknowledgements(tmp_path), what="the acknowledgement")

    ((_, ack),) = sent_acknowledgements(tmp_path)
    ((reference,),) = await daemon.store.fetch_all("SELECT reference FROM conversations")
    assert subject(ack) == f"We received your message [{reference}]"
    text = body(ack)
    assert text.startswith("Hello,\n\nWe received your message, and a member of our team")
    assert "{" not in text
    assert DEADLINE_TEXT["en"] not in text
    assert fallbacks == 1
    warnings = [event for event in events if event["event"] == "ack_template_fallback"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["template"] == "standard"
    assert warnings[0]["problem"] == "empty merge field {subject}"
    stored = await daemon.store.fetch_all("SELECT decision, variant FROM acknowledgements")
    assert [tuple(row) for row in stored] == [("sent", "plain")]


def custom_template(key: str, text: str) -> str:
    """Return rules whose team uses a template "custom" with `key` set to `text`."""
    texts = {
        "subject": "Received: {subject}",
        "body": "Hello {sender_name}, see {reference}.",
        "plain_subject": "Received",
        "plain_body": "Hello.",
    }
    texts[key] = text
    fields = "\n".join(f"{name} = {json.dumps(value)}" for name, value in texts.items())
    return f"""
[[template]]
name = "custom"
language = "en"
{fields}

[[team]]
name = "support"
destination = {{ maildir = "var/maildir/support" }}
members = [{{ name = "Sam Ortiz", address = "sam@example.org" }}]
template = "custom"

[[route]]
name = "default"
team = "support"
default = true
"""


@pytest.mark.parametrize(
    ("key", "text", "problem"),
    [
        ("body", "Hello {foo}", "unknown merge fields ['foo']"),
        ("subject", "Hi {sender.__class__}", "unknown merge fields ['sender.__class__']"),
        ("body", "{subject[0]} and {0}", "unknown merge fields"),
        ("plain_body", "Hello {sender_name}", "the plain variant must have no merge fields"),
        ("plain_subject", "Received {reference}", "the plain variant must have no merge fields"),
        ("subject", "Line one\nBcc: evil@example.net", "a subject must be one line"),
        ("plain_subject", "Line one\r\nline two", "a subject must be one line"),
        ("body", "Unclosed {subject", "invalid template"),
        # Every merge field is text, so a number format fails on every message.
        ("body", "Filed as {reference:d}", "write merge fields as {name}, without a format or conversion: {reference:d}"),
        ("subject", "Hi {sender_name!r}", "write merge fields as {name}, without a format or conversion: {sender_name!r}"),
    ],
)
def test_bad_template_rejected_at_load(tmp_path: Path, key: str, text: str, problem: str) -> None:
    directory = rules_folder(tmp_path, custom_template(key, text))

    with pytest.raises(ConfigErrors) as raised:
        load_rules(directory, tmp_path)

    (error,) = raised.value.errors
    assert Path(error.path).name == "rules.toml"
    assert error.key == f"template[0] (custom/en).{key}"
    assert problem in error.problem


LANGUAGE_EXPECTED = 'expected a BCP 47 language tag that Babel has dates for, such as "en", "fr", "pt-BR" or "zh-Hant"'
UNKNOWN_LANGUAGES = ["tlh", "xx", "pt_BR", "en-US-u-ca-gregory", "i-klingon", "en US"]


@pytest.mark.parametrize("language", UNKNOWN_LANGUAGES)
def test_template_language_babel_lacks(tmp_path: Path, language: str) -> None:
    rules = custom_template("body", "Hello {sender_name}.").replace('language = "en"', f'language = "{language}"', 1)

    with pytest.raises(ConfigErrors) as raised:
        load_rules(rules_folder(tmp_path, rules), tmp_path)

    messages = [str(error) for error in raised.value.errors]
    key = f"template[0] (custom/{language})"
    assert f"{tmp_path / 'rules' / 'rules.toml'}: {key}.language: invalid value {language!r}; {LANGUAGE_EXPECTED}" in messages


@pytest.mark.parametrize("language", UNKNOWN_LANGUAGES)
def test_team_language_babel_lacks(tmp_path: Path, language: str) -> None:
    rules = RULES.replace('language = "fr"', f'language = "{language}"', 1)

    with pytest.raises(ConfigErrors) as raised:
        load_rules(rules_folder(tmp_path, rules), tmp_path)

    (error,) = raised.value.errors
    assert str(error) == (
        f"{tmp_path / 'rules' / 'rules.toml'}: team[1] (billing).language: invalid value {language.lower()!r}; {LANGUAGE_EXPECTED}"
    )


@pytest.mark.parametrize("language", ["pt-BR", "zh-Hant", "sr-Latn"])
async def test_regional_language_acknowledged(tmp_path: Path, start_daemon, language: str) -> None:
    template = custom_template("body", "Hello {sender_name}, we answer by {deadline}.")
    rules = template.replace('language = "en"', f'language = "{language}"', 1).replace(
        'template = "custom"', f'template = "custom"\nlanguage = "{language}"', 1,
    )
    daemon = await start_daemon(write_config(tmp_path, rules=rules), clock=ManualClock(ARRIVAL))

    await send(daemon.port, "alice@example.com", ["support@example.org"], message(to="support@example.org"))
    await settle(daemon, daemon.clock)
    await wait_until(lambda: sent_acknowledgements(tmp_path), what="the acknowledgement")

    ((_, ack),) = sent_acknowledgements(tmp_path)
    assert ack["Content-Language"] == language.lower()
    assert "we answer by " in body(ack)


def test_good_custom_template_loads(tmp_path: Path) -> None:
    rules = load_rules(rules_folder(tmp_path, custom_template("body", "Hello {sender_name}, see {reference}.")), tmp_path)
    assert rules.teams["support"].templates["en"].fields == {"subject", "sender_name", "reference"}


# -- header injection and line lengths -----------------------------------------

ENCODED_CRLF = "=?utf-8?q?x=0D=0ABcc:_evil@example.net?="


async def test_encoded_crlf_cannot_add_headers(tmp_path: Path, start_daemon) -> None:
    data = message(sender=f"{ENCODED_CRLF} <alice@example.com>", subject=ENCODED_CRLF)
    daemon, raw, ack = await acknowledge_one(tmp_path, start_daemon, "alice@example.com", data)

    assert ack.get_all("Bcc") is None
    assert ack.get_all("Cc") is None
    assert not any(line.lower().startswith(b"bcc") for line in header_lines(raw))
    assert ack["To"] == "alice@example.com"
    assert ack["X-Guardrail-Envelope-To"] == "alice@example.com"
    ((target,),) = await daemon.store.fetch_all("SELECT target FROM outbox WHERE kind = 'mail'")
    assert json.loads(target)["addresses"] == ["alice@example.com"]
    ((reference,),) = await daemon.store.fetch_all("SELECT reference FROM conversations")
    assert subject(ack) == f"We received your message: x Bcc: evil@example.net [{reference}]"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


async def test_broken_encoded_word_quoted_as_written(tmp_path: Path, start_daemon) -> None:
    # Invalid base64, a UTF-8 character cut short, and a valid word between them.
    data = message(subject="Printer =?utf-8?B?####?= =?utf-8?Q?caf=C3=A9?= =?utf-8?B?w6nD?=")
    shown = "Printer =?utf-8?B?####?= café =?utf-8?B?w6nD?="
    daemon, clock = await start(tmp_path, start_daemon)

    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=daemon.port, timeout=10) as client:
        await client.mail("alice@example.com")
        await client.rcpt("support@example.org")
        reply = await client.data(data)
    await settle(daemon, clock)
    await wait_until(lambda: sent_acknowledgements(tmp_path), what="the acknowledgement")

    ((_, ack),) = sent_acknowledgements(tmp_path)
    ((reference, stored),) = await daemon.store.fetch_all("SELECT reference, subject FROM conversations")
    assert reply.code == 250
    assert stored == shown
    assert subject(ack) == f"We received your message: {shown} [{reference}]"
    assert f'"{shown}"' in body(ack)
    assert "\ufffd" not in subject(ack) + body(ack)


def test_long_subject_is_folded(rules: RuleSet) -> None:
    long_subject = "Printer-" + "x" * 1500 + " " + "on floor 3 " * 100
    summary = summarize(message(subject=long_subject))
    request = AckRequest(
        to_address="alice@example.com", from_address="support@example.org", language="en",
        template=rules.teams["support"].templates["en"],
        fields={"subject": summary.subject, "sender_name": "Alice", "sender": "alice@example.com", "team": "support",
                "deadline": DEADLINE_TEXT["en"], "urgent_contact": SUPPORT_URGENT},
        in_reply_to=summary.message_id, references=capped_references(summary),
    )

    rendered = render_acknowledgement(request, "GR-7K3M9Q", HOSTNAME, ARRIVAL)

    assert rendered.used_plain is False
    assert max(len(line) for line in rendered.data.split(b"\r\n")) <= 998
    parsed = email.message_from_bytes(rendered.data, policy=email.policy.default)
    assert subject(parsed) == f"We received your message: {summary.subject} [GR-7K3M9Q]"


# -- References ----------------------------------------------------------------


async def test_long_references_are_capped(tmp_path: Path, start_daemon) -> None:
    original = case_file("threading", "long-references.eml")
    _, raw, ack = await acknowledge_one(tmp_path, start_daemon, "erin@example.com", original)

    references = ack["References"].split()
    assert references[0] == "<thread-000@lists.example.net>"
    assert references[-1] == "<long-refs-1@example.com>"
    assert len(references) <= 20
    assert ack["In-Reply-To"] == "<long-refs-1@example.com>"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    ("references", "message_id", "expected"),
    [
        ([], "<m@x>", ["<m@x>"]),
        (["<a@x>", "<b@x>"], "<m@x>", ["<a@x>", "<b@x>", "<m@x>"]),
        # A message listing itself is not repeated.
        (["<a@x>", "<m@x>"], "<m@x>", ["<a@x>", "<m@x>"]),
        ([], "", []),
        # Past the cap: the root and the newest ids.
        ([f"<t{index}@x>" for index in range(30)], "<m@x>", ["<t0@x>", *[f"<t{index}@x>" for index in range(12, 30)], "<m@x>"]),
    ],
)
def test_capped_references_table(references: list[str], message_id: str, expected: list[str]) -> None:
    headers = f"References: {' '.join(references)}\r\n" if references else ""
    summary = summarize(message(message_id=message_id, extra_headers=headers))
    capped = capped_references(summary)
    assert list(capped) == expected
    assert len(capped) <= MAX_REFERENCES


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # RFC 5322 section 3.6.4: without References, the one id of In-Reply-To starts the chain.
        ("In-Reply-To: <p@x>\r\n", ["<p@x>", "<m@x>"]),
        ("In-Reply-To: Your message of Monday <p@x>\r\n", ["<p@x>", "<m@x>"]),
        # Two ids in In-Reply-To name no single parent.
        ("In-Reply-To: <p@x> <q@x>\r\n", ["<m@x>"]),
        # References, when present, is the chain.
        ("In-Reply-To: <p@x>\r\nReferences: <a@x> <p@x>\r\n", ["<a@x>", "<p@x>", "<m@x>"]),
        ("In-Reply-To: <p@x>\r\nReferences: <a@x>\r\n", ["<a@x>", "<m@x>"]),
        ("In-Reply-To: <ré@x.example>\r\n", ["<m@x>"]),
    ],
)
def test_references_from_in_reply_to(headers: str, expected: list[str]) -> None:
    summary = summarize(message(message_id="<m@x>", extra_headers=headers))
    assert list(capped_references(summary)) == expected


LONG_ID = "<" + "a" * (MAX_COPIED_ID - 14) + "@example.com>"  # MAX_COPIED_ID characters
TOO_LONG_ID = "<" + "a" * 1200 + "@example.com>"


def ack_for(rules: RuleSet, raw: bytes) -> EmailMessage:
    """Return the support team's English acknowledgement of `raw`, rendered and parsed again."""
    summary = summarize(raw)
    request = AckRequest(
        to_address="alice@example.com", from_address="support@example.org", language="en",
        template=rules.teams["support"].templates["en"],
        fields=merge_fields(summary, "alice@example.com", rules.teams["support"], "en", ARRIVAL),
        in_reply_to=summary.message_id, references=capped_references(summary),
    )
    data = render_acknowledgement(request, "GR-7K3M9Q", HOSTNAME, ARRIVAL).data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    return email.message_from_bytes(data, policy=email.policy.default)


@pytest.mark.parametrize(
    ("message_id", "references", "in_reply_to", "expected"),
    [
        ("<m@x>", ["<a@x>"], "<m@x>", ["<a@x>", "<m@x>"]),
        # RFC 6532 allows UTF-8 in a message id. Written into our header it
        # would be RFC 2047 encoded, which no reader takes for an id, and one
        # such id would have encoded the whole References header.
        ("<café@x.example>", ["<a@x>"], None, ["<a@x>"]),
        ("<m@x>", ["<a@x>", "<ré@x.example>", "<b@x>"], "<m@x>", ["<a@x>", "<b@x>", "<m@x>"]),
        ("<ü@x>", [], None, None),
        # An id longer than a header line can hold is left out too.
        (TOO_LONG_ID, ["<a@x>"], None, ["<a@x>"]),
        ("<m@x>", [TOO_LONG_ID, "<a@x>"], "<m@x>", ["<a@x>", "<m@x>"]),
        (LONG_ID, [], LONG_ID, [LONG_ID]),
    ],
)
def test_ack_copies_only_ids_it_can_write(
    rules: RuleSet, message_id: str, references: list[str], in_reply_to: str | None, expected: list[str] | None
) -> None:
    headers = f"References: {' '.join(references)}\r\n" if references else ""
    raw = message(message_id=message_id, extra_headers=headers)
    assert summarize(raw).message_id == message_id

    ack = ack_for(rules, raw)

    assert ack["In-Reply-To"] == in_reply_to
    assert (ack["References"].split() if ack["References"] else None) == expected
    for name in ("In-Reply-To", "References"):
        assert all("=?" not in value for value in ack.get_all(name, []))


def test_capped_references_of_long_thread() -> None:
    capped = capped_references(summarize(case_file("threading", "long-references.eml")))
    assert len(capped) == MAX_REFERENCES
    assert capped[0] == "<thread-000@lists.example.net>"
    assert capped[-2] == "<thread-119@lists.example.net>"
    assert capped[-1] == "<long-refs-1@example.com>"


# -- when an acknowledgement is sent -------------------------------------------


def encoded(text: str) -> str:
    """Return `text` as RFC 2047 encoded words, as a mail client writes a non-ASCII Subject."""
    return Header(text, "utf-8").encode()


HUMAN = "Alice Example <alice@example.com>"


@pytest.mark.parametrize(
    ("mail_from", "sender", "headers", "subject", "is_staff", "signal"),
    [
        ("alice@example.com", HUMAN, "Auto-Submitted: auto-replied\r\n", "Printer", False, "Auto-Submitted: auto-replied"),
        ("alice@example.com", HUMAN, "Auto-Submitted: auto-generated\r\n", "Printer", False, "Auto-Submitted: auto-generated"),
        ("alice@example.com", HUMAN, "Precedence: bulk\r\n", "Printer", False, "Precedence: bulk"),
        ("alice@example.com", HUMAN, "List-Id: <printers.lists.example.com>\r\n", "Printer", False, "list-id header"),
        ("alice@example.com", HUMAN, "List-Archive: <https://lists.example.com/printers/>\r\n", "Printer", False,
         "list-archive header"),
        ("alice@example.com", HUMAN, "X-Autoreply: yes\r\n", "Printer", False, "x-autoreply header"),
        ("alice@example.com", HUMAN, "X-Auto-Response-Suppress: OOF\r\n", "Printer", False, "X-Auto-Response-Suppress: OOF"),
        ("alice@example.com", HUMAN, "X-Apple-Action: VACATION\r\n", "Printer", False, "X-Apple-Action: VACATION"),
        ("alice@example.com", HUMAN, "X-MS-Exchange-Inbox-Rules-Loop: alice@example.com\r\n", "Printer", False,
         "x-ms-exchange-inbox-rules-loop header"),
        ("alice@example.com", HUMAN, 'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n',
         "Printer", False, "multipart/report"),
        ("alice@example.com", HUMAN, "X-Failed-Recipients: bob@example.com\r\n", "Printer", False, "x-failed-recipients header"),
        ("", HUMAN, "", "Printer", False, "null envelope sender"),
        ("MAILER-DAEMON@mx.example.com", "Mail Delivery System <MAILER-DAEMON@mx.example.com>", "", "Printer", False,
         "envelope sender mailer-daemon@mx.example.com looks automated"),
        ("noreply@shop.example.com", "Shop <noreply@shop.example.com>", "", "Your order", False,
         "envelope sender noreply@shop.example.com looks automated"),
        ("alice@example.com", HUMAN, "", "Out of Office: back on Monday", False,
         "auto-reply subject 'Out of Office: back on Monday'"),
        ("alice@example.com", HUMAN, "", encoded("Réponse automatique : absente"), False,
         "auto-reply subject 'Réponse automatique : absente'"),
        ("alice@example.com", HUMAN, "", "Absence du bureau", False, "auto-reply subject 'Absence du bureau'"),
        ("alice@example.com", HUMAN, "", "Absence du bureau : retour lundi", False, "auto-reply subject 'Absence du bureau : retour lundi'"),
        ("alice@example.com", HUMAN, "", "Abwesenheitsnotiz: bis 10.11.", False, "auto-reply subject 'Abwesenheitsnotiz: bis 10.11.'"),
        ("alice@example.com", HUMAN, "", encoded("Respuesta automática: de vacaciones"), False,
         "auto-reply subject 'Respuesta automática: de vacaciones'"),
        ("alice@example.com", HUMAN, "", "Automatisch antwoord: niet op kantoor", False,
         "auto-reply subject 'Automatisch antwoord: niet op kantoor'"),
        ("alice@example.com", HUMAN, "", encoded("Automatyczna odpowiedź: urlop"), False,
         "auto-reply subject 'Automatyczna odpowiedź: urlop'"),
        ("alice@example.com", HUMAN, "", encoded("自動応答: 不在です"), False, "auto-reply subject '自動応答: 不在です'"),
        ("sam@example.org", "Sam Ortiz <sam@example.org>", "", "Printer", True, "sender is a team member"),
        ("alice@example.com", HUMAN, f"X-Guardrail-Loop: {HOSTNAME}\r\n", "Printer", False, "our loop marker"),
        # Mail that a person wrote is acknowledged.
        ("alice@example.com", HUMAN, "Auto-Submitted: no\r\n", "Printer", False, None),
        ("alice@example.com", HUMAN, "X-Guardrail-Loop: mx.other.example\r\n", "Printer", False, None),
        ("alice@example.com", HUMAN, "", "Question about my away-day booking", False, None),
        ("alice@example.com", HUMAN, "", "Absence du bureau de poste de Lyon ?", False, None),
    ],
)
def test_acknowledgement_signal_table(
    mail_from: str, sender: str, headers: str, subject: str, is_staff: bool, signal: str | None
) -> None:
    summary = summarize(message(sender=sender, subject=subject, extra_headers=headers))
    assert acknowledgement_signal(summary, mail_from, HOSTNAME, is_staff) == signal


@pytest.mark.parametrize(
    ("mail_from", "sender", "headers", "subject", "decision", "signal"),
    [
        ("alice@example.com", HUMAN, "Auto-Submitted: auto-replied\r\n", "Printer", "suppressed", "Auto-Submitted: auto-replied"),
        ("alice@example.com", HUMAN, "Precedence: bulk\r\n", "Printer", "suppressed", "Precedence: bulk"),
        ("", HUMAN, "", "Printer", "suppressed", "null envelope sender"),
        ("sam@example.org", "Sam Ortiz <sam@example.org>", "", "Printer", "suppressed", "sender is a team member"),
        ("alice@example.com", HUMAN, f"X-Guardrail-Loop: {HOSTNAME}\r\n", "Printer", "suppressed", "our loop marker"),
        ("alice@example.com", HUMAN, "", encoded("Réponse automatique : absente"), "suppressed",
         "auto-reply subject 'Réponse automatique : absente'"),
        ("alice@example.com", HUMAN, "Auto-Submitted: no\r\n", "Printer", "sent", ""),
        ("alice@example.com", HUMAN, "", "Printer", "sent", ""),
    ],
)
async def test_acknowledgement_decision_stored(
    tmp_path: Path, start_daemon, mail_from: str, sender: str, headers: str, subject: str, decision: str, signal: str
) -> None:
    daemon, clock = await start(tmp_path, start_daemon)
    await send(daemon.port, mail_from, ["support@example.org"], message(sender=sender, subject=subject, extra_headers=headers))
    await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT recipient, decision, signal FROM acknowledgements")
    assert [tuple(row) for row in rows] == [(mail_from.lower(), decision, signal)]
    assert len(sent_acknowledgements(tmp_path)) == (1 if decision == "sent" else 0)


async def test_encoded_display_name_is_not_member(tmp_path: Path, start_daemon) -> None:
    # The display name is an RFC 2047 word that decodes to a member's
    # address, but the sender is still the outsider in the angle brackets.
    data = message(sender="=?utf-8?q?sam=40example.org?= <mallory@example.net>")
    daemon, clock = await start(tmp_path, start_daemon)
    await send(daemon.port, "mallory@example.net", ["support@example.org"], data)
    await settle(daemon, clock)

    rows = await daemon.store.fetch_all("SELECT decision, signal FROM acknowledgements")
    assert [tuple(row) for row in rows] == [("sent", "")]
    ((customer,),) = await daemon.store.fetch_all("SELECT customer FROM conversations")
    assert customer == "mallory@example.net"



@pytest.mark.parametrize(
    ("sender", "greeting"),
    [
        ('"Doe, John \\"JJ\\"" <jd@example.com>', 'Hello Doe, John "JJ",'),
        ('"\\"JJ\\" Doe" <jd@example.com>', 'Hello "JJ" Doe,'),
    ],
)
async def test_quoted_display_name_greeting(tmp_path: Path, start_daemon, sender: str, greeting: str) -> None:
    _, _, ack = await acknowledge_one(tmp_path, start_daemon, "jd@example.com", message(sender=sender))

    assert body(ack).startswith(greeting + "\n")



URGENT_RULES = """
[[team]]
name = "support"
destination = { maildir = "var/maildir/support" }
members = [{ name = "Sam Ortiz", address = "sam@example.org" }]
urgent_contact = { en = "call +1 555 0100", fr = "appelez le +1 555 0100" }

[[team]]
name = "billing"
destination = { maildir = "var/maildir/billing" }
members = [{ name = "Bea Keller", address = "bea@example.org" }]

[[route]]
name = "default"
team = "support"
default = true
"""


@pytest.mark.parametrize(
    ("team", "language", "text"),
    [
        ("support", "en", "call +1 555 0100"),
        ("support", "fr", "appelez le +1 555 0100"),
        # A language the table leaves out gets the text of the team's own language.
        ("support", "de", "call +1 555 0100"),
        # Without urgent_contact, the first person to escalate to, in the acknowledgement's language.
        ("billing", "en", "write to Dana Duty <duty-manager@example.org>"),
        ("billing", "es", "escriba a Dana Duty <duty-manager@example.org>"),
        ("billing", "de", "schreiben Sie an Dana Duty <duty-manager@example.org>"),
    ],
)
def test_urgent_contact_by_language(tmp_path: Path, team: str, language: str, text: str) -> None:
    loaded = load_rules(rules_folder(tmp_path, URGENT_RULES), tmp_path)
    assert merge_fields(summarize(message()), "alice@example.com", loaded.teams[team], language, None)["urgent_contact"] == text


@pytest.mark.parametrize(
    ("text", "limit", "shown"),
    [
        ("Printer on floor 3 jams", 200, "Printer on floor 3 jams"),
        ("x" * 200, 200, "x" * 200),
        ("x" * 201, 200, "x" * 199 + "…"),
        ("word " * 60, 20, "word word word word…"),
    ],
)
def test_shortened_table(text: str, limit: int, shown: str) -> None:
    assert shortened(text, limit) == shown
    assert len(shortened(text, limit)) <= limit


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("Printer  on\r\n floor 3", "Printer on floor 3"),
        ("a\x00b", "a b"),
        # Control characters that are not whitespace are not allowed in a
        # header, and a terminal showing the message would act on ESC or CSI.
        ("red\x1b[31m alert", "red [31m alert"),
        ("a\x7fb\x9bc\x85d", "a b c d"),
        ("x\u2028Bcc: evil@example.net", "x Bcc: evil@example.net"),
        ("Réponse — ünïcode", "Réponse — ünïcode"),
    ],
)
def test_one_line_table(text: str, line: str) -> None:
    assert one_line(text) == line


@pytest.mark.parametrize("control", ["\x1b", "\x7f", "\x9b", "\x08"])
def test_ack_subject_without_control_characters(rules: RuleSet, control: str) -> None:
    raw = message(subject=encoded(f"Printer{control}[2J jams"), sender=encoded(f"Alice{control}") + " <alice@example.com>")

    ack = ack_for(rules, raw)

    assert subject(ack) == "We received your message: Printer [2J jams [GR-7K3M9Q]"
    assert control not in body(ack)
    assert "Hello Alice," in body(ack)


@pytest.mark.parametrize(
    ("original", "quoted"),
    [
        ("Re: [GR-ABCDEF] Printer jams", "Re: Printer jams"),
        ("[gr-abcdef]Printer [ GR-HJKMNP ] jams", "Printer jams"),
        # Another prefix, or a tag of the wrong length, is the sender's own text.
        ("[TKT-ABCDEF] Printer jams", "[TKT-ABCDEF] Printer jams"),
        ("[GR-ABC] Printer jams", "[GR-ABC] Printer jams"),
    ],
)
def test_ack_subject_drops_other_conversation_tags(rules: RuleSet, original: str, quoted: str) -> None:
    ack = ack_for(rules, message(subject=original))

    assert subject(ack) == f"We received your message: {quoted} [GR-7K3M9Q]"


def test_ack_shortens_long_subject(tmp_path: Path) -> None:
    loaded = load_rules(rules_folder(tmp_path, URGENT_RULES), tmp_path)
    raw = message(subject="Refund " + "please " * 400, sender=f'"{"Alice " * 50}" <alice@example.com>')
    fields = merge_fields(summarize(raw), "alice@example.com", loaded.teams["support"], "en", None)

    assert fields["subject"].startswith("Refund please please")
    assert fields["subject"].endswith("…")
    assert len(fields["subject"]) == MAX_QUOTED_SUBJECT
    assert len(fields["sender_name"]) <= MAX_QUOTED_NAME
    assert fields["sender_name"].endswith("…")



def test_urgent_contact_for_a_language_without_template(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, URGENT_RULES.replace('fr = "appelez', 'pt = "ligue'))
    with pytest.raises(ConfigErrors) as raised:
        load_rules(folder, tmp_path)
    [problem] = [str(error) for error in raised.value.errors]
    assert problem == (
        f"{folder / 'rules.toml'}: team[0] (support).urgent_contact.pt: template 'standard' has no 'pt' variant;"
        " it has ['de', 'en', 'es', 'fr']"
    )
