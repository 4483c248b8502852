"""The language of a message's text, for acknowledgements sent without a language header to go by."""

from __future__ import annotations

import base64
import time

import pytest
from conftest import message

from guardrail.language import MAX_CHARACTERS, guess_language, own_text
from guardrail.message import body_sample, summarize

SHIPPED = ("en", "fr", "de", "es")


@pytest.mark.parametrize(
    ("text", "candidates", "language"),
    [
        ("Hello, I cannot log in to my account since yesterday. Thanks for your help", SHIPPED, "en"),
        ("Bonjour, je n'arrive plus à me connecter à mon compte depuis hier. Merci d'avance", SHIPPED, "fr"),
        ("Guten Tag, ich kann mich seit gestern nicht mehr anmelden. Vielen Dank", SHIPPED, "de"),
        ("Hola, desde ayer no puedo entrar en mi cuenta. Muchas gracias", SHIPPED, "es"),
        ("Goedemorgen, ik kan sinds gisteren niet inloggen op mijn account. Bedankt", (*SHIPPED, "nl"), "nl"),
        ("Buongiorno, non riesco ad accedere al mio account. Grazie mille", (*SHIPPED, "it"), "it"),
        ("Olá, não consigo entrar na minha conta. Obrigado", (*SHIPPED, "pt"), "pt"),
        ("お世話になっております。ログインできません。", (*SHIPPED, "ja"), "ja"),
        # Capitals and accents do not matter.
        ("BONJOUR, MERCI POUR VOTRE AIDE", SHIPPED, "fr"),
        # An English message with a French sign-off is English.
        (
            "Hi team, the invoice you sent has the wrong address and I need it fixed for our records. Thanks! Cordialement, Marie",
            SHIPPED,
            "en",
        ),
        # Too little to go by.
        ("Merci", SHIPPED, None),
        ("INV-2025-114 / 4711", SHIPPED, None),
        ("", SHIPPED, None),
        # Two languages in equal measure.
        ("Hello and thanks. Bonjour et merci.", SHIPPED, None),
        # Only the candidates count: French text for a team without French.
        ("Bonjour, je n'arrive plus à me connecter à mon compte. Merci", ("en", "de"), None),
        # Kana without a Japanese template is not Japanese.
        ("ログインできません。よろしくお願いします。", SHIPPED, None),
        # Italian and Portuguese lead for teams without those templates: no guess, rather than Spanish.
        ("Buongiorno, ho una domanda con il mio ordine: non riesco a pagare. Grazie per l'aiuto", SHIPPED, None),
        ("Olá, tenho uma pergunta sobre o meu pedido para a minha conta, por favor. Obrigado", SHIPPED, None),
        # A language that has no word list is never chosen.
        ("Dzień dobry, nie mogę się zalogować. Dziękuję", ("pl",), None),
    ],
)
def test_guess_language_table(text: str, candidates: tuple[str, ...], language: str | None) -> None:
    assert guess_language(text, candidates) == language


ENGLISH_ORIGINAL = (
    "Hello, thank you for your order. Your order has been shipped and you can track it with the link below. "
    "If you have any questions, please reply to this email. We are happy to help you with anything you need."
)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        # A reply quotes the message it replies to, often in another language and longer than the reply.
        (
            "Re: Your order\nBonjour, je n'ai pas reçu le colis. Merci\n\n"
            f"Le lun. 3 nov. 2025 à 10:00, Shop <shop@example.com> a écrit :\n> {ENGLISH_ORIGINAL}\n> {ENGLISH_ORIGINAL}",
            "fr",
        ),
        # Quoted text above the reply (bottom posting), also nested.
        (f"Re: order\n> {ENGLISH_ORIGINAL}\n>> {ENGLISH_ORIGINAL}\n\nHola, no he recibido mi pedido. Gracias", "es"),
        # Outlook puts the original below a separator line, without "> ".
        (
            "AW: Your ticket\nHallo, das Problem ist noch nicht gelöst. Danke\n\n-----Ursprüngliche Nachricht-----\n"
            f"Von: Support <support@example.org>\n{ENGLISH_ORIGINAL}",
            "de",
        ),
        (
            "RE: Your ticket\nBonjour, le problème n'est pas résolu. Merci\n\n________________________________\n"
            f"From: Support <support@example.org>\nSent: Monday\n{ENGLISH_ORIGINAL}",
            "fr",
        ),
        # A forwarded message, and a signature with a disclaimer in another language.
        (
            "Fwd: Invoice\nHola, les reenvío la factura. Gracias\n\n---------- Forwarded message ---------\n"
            f"{ENGLISH_ORIGINAL}",
            "es",
        ),
        (
            "Invoice\nHi, the invoice you sent has the wrong address. Thanks\n-- \nJean Dupont\n"
            "Le contenu de ce message est confidentiel et destiné à son destinataire. Si vous avez reçu ce message "
            "par erreur, merci de le supprimer et de nous en informer.",
            "en",
        ),
        # Outlook and Apple Mail put a header block above the quoted or
        # forwarded message, in the mail program's language, often without a separator line.
        (
            "RE: Your order 1234\nBonjour, je n'ai toujours rien reçu. Merci\n\n"
            f"De : Shop <shop@example.com>\nEnvoyé : mardi 4 novembre 2025 10:00\nÀ : Marie\n{ENGLISH_ORIGINAL}",
            "fr",
        ),
        (
            "AW: Your order 1234\nHallo, die Bestellung ist noch nicht da. Danke\n\n"
            f"Von: Shop <shop@example.com>\nGesendet: Dienstag, 4. November 2025 10:00\n{ENGLISH_ORIGINAL}",
            "de",
        ),
        (
            "RE: Your order 1234\nHola, todavía no tengo el pedido. Gracias\n\n"
            f"De: Shop <shop@example.com>\nEnviado el: martes, 4 de noviembre de 2025 10:00\n{ENGLISH_ORIGINAL}",
            "es",
        ),
        (
            "Fwd: Your order 1234\nBonjour, pouvez-vous m'aider avec cette commande ?\n\nDébut du message réexpédié :\n\n"
            f"De: Shop <shop@example.com>\nObjet: Your order 1234\n\n{ENGLISH_ORIGINAL}",
            "fr",
        ),
        (
            "Re: Your order 1234\nBonjour, toujours rien. Merci pour votre aide\n\n"
            f"*From:* Shop <shop@example.com>\n*Sent:* Tuesday, November 4, 2025\n{ENGLISH_ORIGINAL}",
            "fr",
        ),
        # Nothing of the sender's own: no guess from the forwarded text.
        (f"Fwd: Your order\n-------- Forwarded Message --------\n{ENGLISH_ORIGINAL}", None),
        # Dashes inside a line of the sender's are text.
        ("Facture\nBonjour -- je ne trouve pas ma facture -- merci pour votre aide", "fr"),
    ],
)
def test_guess_reads_the_senders_own_text(text: str, language: str | None) -> None:
    assert guess_language(text, SHIPPED) == language


@pytest.mark.parametrize(
    ("text", "own"),
    [
        ("Bonjour\n\nFrom: Shop\nSent: Monday\nHello", "Bonjour\n"),
        ("Hallo\nVon: Shop\nBetreff: Bestellung\nHello", "Hallo"),
        # A From line alone, or before a line that is not a header field, is the sender's own text.
        ("Bonjour\nDe : Paris\nJe voudrais deux billets", "Bonjour\nDe : Paris\nJe voudrais deux billets"),
        ("Hello\nFrom: Paris\n\nSent: yesterday", "Hello\nFrom: Paris\n\nSent: yesterday"),
    ],
)
def test_own_text_ends_at_header_block(text: str, own: str) -> None:
    assert own_text(text) == own


def test_own_text_is_bounded() -> None:
    quote = "> " + "the and you with " * 10 + "\n"
    french = "Bonjour, merci pour votre aide avec mon compte.\n"
    assert own_text(quote * 50 + french * 100) == (french * 100)[:MAX_CHARACTERS].rstrip("\n")
    assert len(own_text("word " * 100_000)) == MAX_CHARACTERS


def test_own_text_dash_line_is_fast() -> None:
    # Dash runs all along one long line, as a quoted-printable body can join
    # into one line. A pattern that backtracks over them takes seconds.
    line = "----a" + "-" * 30_000 + "x"
    started = time.perf_counter()
    assert own_text(f"Bonjour\n{line}\nmerci") == f"Bonjour\n{line}"[:MAX_CHARACTERS]
    assert time.perf_counter() - started < 1.0


def test_guess_reads_the_start_of_the_text() -> None:
    # English past the first MAX_CHARACTERS does not outvote the French start.
    french = "Bonjour, merci pour votre aide avec mon compte. "
    text = french * (MAX_CHARACTERS // len(french) + 1) + "the and you with " * 5000
    assert guess_language(text, SHIPPED) == "fr"
    assert guess_language(text[MAX_CHARACTERS:], SHIPPED) == "en"


@pytest.mark.parametrize(
    ("extra_headers", "body", "expected"),
    [
        ("", "Bonjour, merci.\r\n", "Bonjour, merci.\r\n"),
        (
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n",
            base64.encodebytes("Grüße, danke schön\r\n".encode()).decode().replace("\n", "\r\n"),
            "Grüße, danke schön\r\n",
        ),
        (
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n",
            "Gr=FC=DFe, danke sch=F6n\r\n",
            "Grüße, danke schön\r\n",
        ),
        # A base64 body cut inside a quantum, as the limit may cut it.
        (
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n",
            base64.b64encode("¿Hola? Gracias".encode()).decode()[:-3] + "\r\n",
            "¿Hola? Grac",
        ),
        (
            'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b"\r\n',
            "--b\r\nContent-Type: text/html\r\n\r\n<p>Hola</p>\r\n--b\r\nContent-Type: text/plain\r\n\r\nHola, gracias\r\n--b--\r\n",
            # The CRLF before a boundary belongs to the boundary (RFC 2046 section 5.1.1).
            "Hola, gracias",
        ),
    ],
)
def test_body_sample_reads_the_first_text_part(extra_headers: str, body: str, expected: str) -> None:
    raw = message(extra_headers=extra_headers, body=body)
    # Whether the line break after the last line is kept differs by encoding.
    assert body_sample(raw, summarize(raw, with_body=False)).rstrip("\r\n") == expected.rstrip("\r\n")


FILLER = ("y" * 76 + "\r\n") * 20_000


@pytest.mark.parametrize(
    ("raw", "start"),
    [
        (message(body="Bonjour, merci.\r\n" + FILLER), "Bonjour, merci.\n"),
        (
            message(
                extra_headers='MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n',
                body="--b\r\nContent-Type: text/plain\r\n\r\nHallo, danke\r\n" + FILLER + "--b--\r\n",
            ),
            "Hallo, danke\n",
        ),
    ],
    ids=["single part", "multipart"],
)
def test_body_sample_of_large_message(raw: bytes, start: str) -> None:
    sample = body_sample(raw, summarize(raw, with_body=False), limit=4096)
    assert sample.startswith(start)
    assert len(sample) <= 4096


def test_body_sample_text_after_html() -> None:
    raw = message(
        extra_headers='MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b"\r\n',
        body="--b\r\nContent-Type: text/html\r\n\r\n" + "<p>Hallo</p>\r\n" * 600
        + "--b\r\nContent-Type: text/plain\r\n\r\nHallo, ich habe eine Frage. Danke\r\n--b--\r\n",
    )
    assert body_sample(raw, summarize(raw, with_body=False)) == "Hallo, ich habe eine Frage. Danke"


def test_body_sample_html_only() -> None:
    raw = message(
        extra_headers="MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n",
        body="--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><head><style>p { color: red }</style></head>"
        "<body><p>Bonjour, je n&#39;ai pas re&ccedil;u ma facture. Merci</p><script>track()</script></body></html>\r\n--b--\r\n",
    )
    sample = body_sample(raw, summarize(raw, with_body=False))
    assert " ".join(sample.split()) == "Bonjour, je n'ai pas reçu ma facture. Merci"
    assert guess_language(sample, SHIPPED) == "fr"
