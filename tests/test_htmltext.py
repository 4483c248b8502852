"""The text of HTML parts, which body conditions read when a message has no plain-text part."""

from __future__ import annotations

import pytest

from guardrail.htmltext import html_text
from guardrail.message import BODY_TEXT_LIMIT, HTML_MARKUP_LIMIT, summarize


@pytest.mark.parametrize(
    ("markup", "text"),
    [
        ("<p>I would like a <b>refund</b></p>", "I would like a refund"),
        # Inline tags join the letters of a word. Other tags separate words.
        ("re<span>fu</span>nd", "refund"),
        ("<img src=x>refund", "refund"),
        ("one<td>two", "one\ntwo"),
        # Block elements end lines, so ^ and $ in a multi-line pattern find them.
        ("<div>Order 1234</div><div>Thanks</div>", "Order 1234\nThanks"),
        ("line one<br>line two<br/>line three", "line one\nline two\nline three"),
        # A line break in the source is a space. Only blocks make lines.
        ("<p>a</p>\n\n\n\n<p>b\nc</p>", "a\nb c"),
        # Scripts, styles, the head and comments show nothing.
        ("<head><title>Invoice</title><style>p { color: red }</style></head><p>Hi</p>", "Hi"),
        # The head's end tag may be left out.
        ('<html><head><meta charset="utf-8"><title>Invoice</title><body><p>Hi</p></body></html>', "Hi"),
        ("a<script>var refund = 1;</script>b", "a b"),
        ("a<SCRIPT type='x'>if (a > b) {}</Script >b", "a b"),
        ("a<!-- refund -->b", "ab"),
        # A dotted capital I (U+0130) has a two-character lower case. It moves no end tag.
        (
            "<title>\u0130ADE \u0130STE\u011e\u0130: S\u0130PAR\u0130\u015e \u0130PTAL\u0130 \u0130\u00c7\u0130N"
            " \u0130LET\u0130\u015e\u0130M B\u0130LG\u0130LER\u0130</title><p>Refund please</p>",
            "Refund please",
        ),
        (
            "<p>\u0130STANBUL \u0130ADE MERKEZ\u0130NE \u0130LET\u0130LD\u0130. \u0130LG\u0130N\u0130Z \u0130\u00c7\u0130N"
            " TE\u015eEKK\u00dcRLER.</p><style>p {}</style><p>Refund please</p>",
            "\u0130STANBUL \u0130ADE MERKEZ\u0130NE \u0130LET\u0130LD\u0130. \u0130LG\u0130N\u0130Z \u0130\u00c7\u0130N"
            " TE\u015eEKK\u00dcRLER.\nRefund please",
        ),
        ("<ul>\n  <li>one</li>\n  <li>two</li>\n</ul>", "one\ntwo"),
        ("<!DOCTYPE html><html><body>Hello</body></html>", "Hello"),
        # Character references are decoded, and a no-break space is a space.
        ("caf&eacute; &amp; cr&#232;me&nbsp;br&#xFB;l&eacute;e", "café & crème brûlée"),
        # A ">" in a quoted attribute value does not end the tag.
        ('<a title="a > b" href=\'x>y\'>refund</a>', "refund"),
        # Elsewhere in a tag a quote is an ordinary character.
        ("<p class=x title=don't>Refund please</p>", "Refund please"),
        ("<b'>Refund</b> please", "Refund please"),
        # A "<" that starts no tag is text.
        ("1 < 2 and 3 <= 4", "1 < 2 and 3 <= 4"),
        # Something left open hides the rest, as in a browser.
        ("shown <!-- never closed refund", "shown"),
        ("shown <script>never closed refund", "shown"),
        ('shown <a href="never closed>refund', "shown"),
        ("shown <p never closed", "shown"),
        ("", ""),
    ],
)
def test_html_text(markup: str, text: str) -> None:
    assert html_text(markup) == text


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "markup",
    [
        # From each opening tag, a non-greedy regular expression would search
        # to the end of the text: an estimated 10**10 steps for each of these.
        "<script>" * 100_000,
        "<!--" * 200_000,
        '<a "' * 200_000,
        "<style" * 100_000,
        "<" * 500_000,
        "<p>&" * 200_000,
        "<p a= = '" * 100_000,
    ],
)
def test_html_text_reads_unclosed_markup_in_one_pass(markup: str) -> None:
    # The timeout is a safety net: a quadratic scan of these takes far longer.
    assert len(html_text(markup)) <= len(markup)


def _message(content_type: str, body: str, encoding: str = "7bit") -> bytes:
    return (
        f"From: a@b.example\r\nSubject: x\r\nMIME-Version: 1.0\r\nContent-Type: {content_type}\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n{body}"
    ).encode()


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (_message("text/html; charset=utf-8", "<p>Please <b>refund</b> order 12</p>\r\n"), "Please refund order 12"),
        (_message("text/html; charset=utf-8", "PHA+UmVmdW5kIHBsZWFzZTwvcD4=\r\n", "base64"), "Refund please"),
        # A plain-text part wins over the HTML one.
        (
            _message(
                "multipart/alternative; boundary=B",
                "--B\r\nContent-Type: text/html\r\n\r\n<p>from html</p>\r\n"
                "--B\r\nContent-Type: text/plain\r\n\r\nfrom plain\r\n--B--\r\n",
            ),
            "from plain",
        ),
        # An HTML part inside multipart/mixed, beside an attachment.
        (
            _message(
                "multipart/mixed; boundary=B",
                "--B\r\nContent-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                "<div>Caf=E9 order</div>\r\n"
                "--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment\r\n\r\nJVBERi0=\r\n--B--\r\n",
            ),
            "Café order",
        ),
        # An HTML attachment is not the body.
        (
            _message(
                "multipart/mixed; boundary=B",
                "--B\r\nContent-Type: text/html\r\nContent-Disposition: attachment; filename=r.html\r\n\r\n"
                "<p>report</p>\r\n--B--\r\n",
            ),
            "",
        ),
    ],
)
def test_body_text_of_a_message_without_plain_text(raw: bytes, text: str) -> None:
    assert summarize(raw, with_body=True).body_text.strip() == text


def test_html_markup_cut_keeps_utf8() -> None:
    # The last character, a two-byte one, starts at the last byte within the limit.
    raw = _message("text/html; charset=utf-8", "<p>caf\u00e9 " + "x" * (HTML_MARKUP_LIMIT - 10) + "\u00e9</p>\r\n")
    assert summarize(raw, with_body=True).body_text.startswith("café ")


def test_html_body_text_cut_at_limit() -> None:
    raw = _message("text/html", "<p>" + "word " * (BODY_TEXT_LIMIT // 4) + "</p>\r\n")
    assert len(summarize(raw, with_body=True).body_text) == BODY_TEXT_LIMIT


def _html_message(content_type: str, markup: bytes) -> bytes:
    return b"From: a@b.example\r\nSubject: x\r\nContent-Type: " + content_type.encode() + b"\r\n\r\n" + markup + b"\r\n"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        # Without a charset parameter, the <meta> declaration names the charset.
        (
            _html_message(
                "text/html",
                '<head><meta http-equiv="Content-Type" content="text/html; charset=Shift_JIS"></head><p>返金してください</p>'.encode("shift_jis"),
            ),
            "返金してください",
        ),
        (_html_message("text/html", "<meta charset=windows-1252><p>\u201crefund\u201d</p>".encode("cp1252")), "\u201crefund\u201d"),
        # The Content-Type's parameter wins over the <meta> declaration.
        (_html_message("text/html; charset=utf-8", "<meta charset=iso-8859-1><p>café</p>".encode()), "café"),
        # An unknown charset falls back to UTF-8.
        (_html_message("text/html", "<meta charset=no-such-charset><p>café</p>".encode()), "café"),
    ],
)
def test_html_charset_from_meta_tag(raw: bytes, text: str) -> None:
    assert summarize(raw, with_body=True).body_text == text
