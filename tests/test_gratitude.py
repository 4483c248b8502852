"""A reply that only says thanks, told apart from one that says more: tables over the pure functions."""

from __future__ import annotations

import pytest

from guardrail.gratitude import (
    GRATITUDE,
    GRATITUDE_STEMS,
    is_same_matter,
    is_thanks_only,
)
from guardrail.htmltext import html_text

GMAIL_QUOTE = (
    "On Mon, 7 Dec 2026 at 10:02, Sam Ortiz <sam@example.org> wrote:\n"
    "> Could you try again now? Does the invoice look right?\n"
    "> \n"
    "> Sam\n"
)
WRAPPED_QUOTE = (
    "On Mon, 7 Dec 2026 at 10:02, Sam Ortiz from the support team <sam@example.org>\n"
    "wrote:\n"
    "> Does it work now?\n"
)
OUTLOOK_BLOCK = (
    "________________________________\n"
    "From: Sam Ortiz <sam@example.org>\n"
    "Sent: Monday, December 7, 2026 10:02\n"
    "To: Alice <alice@example.com>\n"
    "Subject: RE: Invoice wrong\n"
    "\n"
    "Can you check whether it works now?\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Thanks, alone or with greetings, praise, sign-offs and a name.
        ("Thanks!", True),
        ("thanks", True),
        ("THANK YOU!!!", True),
        ("Thanks, that works!", True),
        ("Thank you so much, it works perfectly now 🙏", True),
        ("Hi Sam,\n\nthanks a lot for the quick reply, that did the trick.\n\nBest regards,\nAlice Martin", True),
        ("Ok thanks, all good now.\nCheers", True),
        ("Much appreciated!", True),
        ("Thanks again, that's perfect.", True),
        ("Merci !", True),
        ("Bonjour Sam,\nMerci beaucoup pour votre aide, ça marche.\nCordialement,\nAlice", True),
        ("Un grand merci, c'est réglé. Bonne journée !", True),
        ("Danke!", True),
        ("Hallo Sam,\nvielen Dank für die schnelle Hilfe, es funktioniert jetzt.\nViele Grüße\nAnna", True),
        ("Danke, alles klar. Noch einen schönen Tag!", True),
        ("¡Muchas gracias! Ya funciona.\nSaludos,\nJuan", True),
        ("Hola Sam, mil gracias por tu ayuda. Un saludo", True),
        ("Thanks!\n\nSent from my iPhone", True),
        # A thank-you above a quote, a reply header or a signature: what is below does not count.
        ("Thanks, that works!\n\n" + GMAIL_QUOTE, True),
        ("Thank you!\n" + WRAPPED_QUOTE, True),
        ("Thanks, all sorted.\n\n" + OUTLOOK_BLOCK, True),
        ("Thanks!\n-----Original Message-----\nFrom: Sam\nDoes it work now?\n", True),
        ("Merci !\n\nLe lun. 7 déc. 2026 à 10:02, Sam Ortiz <sam@example.org> a écrit :\n> Est-ce que ça marche ?\n", True),
        ("Danke!\n\nAm 07.12.2026 um 10:02 schrieb Sam Ortiz <sam@example.org>:\n> Funktioniert es jetzt?\n", True),
        ("¡Gracias!\n\nEl lun, 7 dic 2026 a las 10:02, Sam Ortiz (<sam@example.org>) escribió:\n> ¿Funciona ahora?\n", True),
        ("Merci\n\nDe : Sam Ortiz\nEnvoyé : lundi 7 décembre 2026 10:02\nObjet : Facture\n\nÇa marche ?\n", True),
        ("Thanks!\n-- \nAlice Martin\nACME Corp, +33 1 23 45 67 89\nWhy not visit our shop?", True),
        # Without its space, "--" is no signature separator, so the text below it counts.
        ("Thanks\n--\nNew problem: the printer on floor 3 is broken\n", False),
        ("Thanks!\n--\nAlice Martin\n", True),
        # Thanks followed by more to say.
        ("Thanks, but it still fails", False),
        ("Thanks! One more thing: the invoice is wrong", False),
        ("thanks?", False),
        ("Thanks. Could you also send the receipt", False),
        ("Thanks, please cancel my order", False),
        ("Thanks, it works now. However the PDF is empty.", False),
        ("Thank you, it doesn't work", False),
        ("Thanks, it is not fixed", False),
        ("Thanks in advance for your help", False),
        ("Thanks, I will try tomorrow", False),
        ("Thanks for order 1234", False),
        ("Thanks! See https://example.com/screenshot", False),
        ("Merci, mais ça ne marche toujours pas", False),
        ("Merci d'avance", False),
        ("Merci, pourquoi la facture est-elle en double", False),
        ("Danke, aber die Rechnung ist noch falsch", False),
        ("Danke, aber ...", False),
        ("Danke! Noch eine Frage", False),
        ("Danke, es funktioniert nicht", False),
        ("Gracias, pero todavía no funciona", False),
        ("Gracias, sigue fallando", False),
        ("Gracias, por favor envíen la factura", False),
        # Not thanks at all.
        ("No thanks", False),
        ("Thanks for nothing", False),
        ("", False),
        ("\n\n   \n", False),
        ("Great, all good now!", False),
        ("Cheers", False),
        (GMAIL_QUOTE, False),
        ("Hi Sam Ortiz Junior Third, thanks!", False),
        ("thanks " * 41, False),
        ("Thanks!\n" + "\n".join(["ok"] * 300), False),
        # A thank-you above a forwarded message, or with answers between the quoted lines.
        ("Thanks! FYI\n\n---------- Forwarded message ---------\nFrom: bank\nYour card was declined\n", False),
        ("Thanks!\n\nBegin forwarded message:\n\nFrom: bank\n", False),
        ("Thanks!\n\n" + GMAIL_QUOTE + "\nIt still fails for me though\n", False),
        ("Thanks!\n> Does it work now?\nNo.\n> Is the invoice right?\n", False),
        ("Thanks!\n> Does it work now?\n-- \nAlice Martin, ACME\n", True),
        # Names where people write them: after a greeting, thanks, a sign-off or a title, or on a line of their own.
        ("Dear Mr. Ortiz, thank you!", True),
        ("Thank you, Sam.", True),
        ("Sam, thanks!", True),
        ("Thanks!\nJ. Smith", True),
        ("Danke, Herr Müller!", True),
        ("Gracias!\nSaludos, Juan", True),
        # A capitalized word that starts a sentence, or one in capitals, is no name.
        ("Thanks. Refund it.", False),
        ("Thanks! Cancel it.", False),
        ("Thank you. Escalate", False),
        ("Thanks, that works. Now Cancel My Account", False),
        ("Thanks for the reply. Waiting", False),
        ("Merci. Annulez.", False),
        ("Danke. Stornieren.", False),
        ("Danke! Und Die Rechnung", False),
        ("Gracias. Reembolso.", False),
        ("Merci beaucoup ! Et La Facture", False),
        ("THANKS. CALL ME", False),
        ("thanks\nTHE PRINTER IS ON FIRE", False),
        ("Hi Sam, thanks! Refund Now", False),
        # A name alone says nothing; "my colleague wrote:" is no reply header.
        ("Thanks! My colleague wrote:\n> it fails\n", False),
    ],
)
def test_thanks_only_text(text: str, expected: bool) -> None:
    assert is_thanks_only(text) is expected


def test_gratitude_phrases_have_stems() -> None:
    # is_thanks_only rules out text without a stem before reading its lines.
    missing = [phrase for phrase in GRATITUDE if not any(stem in " ".join(phrase) for stem in GRATITUDE_STEMS)]

    assert missing == []


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        ("<div dir='ltr'>Thanks, that works!</div><br><div class='gmail_quote'><div>On Mon, 7 Dec 2026 at 10:02, "
         "Sam Ortiz &lt;sam@example.org&gt; wrote:<br></div><blockquote>Does it work now?</blockquote></div>", True),
        ("<html><head><style>p { margin: 0 }</style></head><body><p>Merci beaucoup !</p>"
         "<hr><p><b>De :</b> Sam Ortiz<br><b>Envoyé :</b> lundi 7 décembre 2026</p><p>Ça marche ?</p></body></html>", True),
        ("<p>Thanks, but the invoice is still wrong</p><blockquote>Does it work now?</blockquote>", False),
        ("<p>Thanks?</p>", False),
    ],
)
def test_thanks_only_html_text(markup: str, expected: bool) -> None:
    assert is_thanks_only(html_text(markup)) is expected


@pytest.mark.parametrize(
    ("subject", "conversation_subject", "expected"),
    [
        ("Re: Invoice wrong [GR-7K3M9Q]", "Invoice wrong", True),
        ("RE: Re: invoice  WRONG", "Invoice wrong", True),
        ("AW: [GR-7K3M9Q] Invoice wrong", "Invoice wrong", True),
        ("Re: We received your message: Invoice wrong [GR-7K3M9Q]", "Invoice wrong", True),
        ("Re: [GR-7K3M9Q]", "Invoice wrong", True),
        ("", "Invoice wrong", True),
        ("Re: Fwd: Invoice wrong", "Fwd: Invoice wrong", True),
        ("Re: New problem with my account [GR-7K3M9Q]", "Invoice wrong", False),
        ("Re: Invoice wrong - and the shipping too", "Invoice wrong", False),
        ("Fwd: Invoice wrong [GR-7K3M9Q]", "Invoice wrong", False),
        ("WG: Invoice wrong", "Invoice wrong", False),
        ("Re: Invoice wrong", "", False),
    ],
)
def test_same_matter_subject(subject: str, conversation_subject: str, expected: bool) -> None:
    assert is_same_matter(subject, conversation_subject, "GR") is expected
