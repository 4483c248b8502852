"""RFC 2047 encoded words: valid ones decode, and each one that does not decode stays as written."""

from __future__ import annotations

import pytest

from guardrail.encoded_words import decode_encoded_words


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Printer jams", "Printer jams"),
        ("=?utf-8?B?SGVsbG8gV29ybGQ=?=", "Hello World"),
        ("=?UTF-8?b?SGVsbG8gV29ybGQ=?=", "Hello World"),
        # Missing padding is added, as the email package does.
        ("=?utf-8?B?SGVsbG8gV29ybGQ?=", "Hello World"),
        ("=?utf-8?Q?caf=C3=A9?=", "café"),
        ("=?utf-8?q?a_b=5F?=", "a b_"),
        ("=?iso-8859-1?Q?caf=E9?=", "café"),
        ("=?utf-8*en?Q?hi?=", "hi"),
        # Invalid base64: characters outside its alphabet, a length of 4n + 1, "=" inside.
        ("=?utf-8?B?####?=", "=?utf-8?B?####?="),
        ("=?utf-8?B?SGVsb?=", "=?utf-8?B?SGVsb?="),
        ("=?utf-8?B?SGV=sbG8?=", "=?utf-8?B?SGV=sbG8?="),
        # Invalid Q text: "=" not followed by two hex digits, a character that is not ASCII.
        ("=?utf-8?Q?50=ZZ?=", "=?utf-8?Q?50=ZZ?="),
        ("=?utf-8?Q?50=?=", "=?utf-8?Q?50=?="),
        ("=?utf-8?Q?caf\u00e9?=", "=?utf-8?Q?caf\u00e9?="),
        # A multi-byte character cut short.
        ("=?utf-8?B?w6nD?=", "=?utf-8?B?w6nD?="),
        ("=?utf-8?Q?caf=C3?=", "=?utf-8?Q?caf=C3?="),
        # A charset Python does not know is read as UTF-8 when its bytes are valid UTF-8.
        ("=?x-unknown?Q?abc?=", "abc"),
        ("=?x-unknown?B?Y2Fmw6k=?=", "café"),
        ("=?x-unknown?Q?caf=E9?=", "=?x-unknown?Q?caf=E9?="),
        ("=?iso-8859-8-i?Q?=F9=EC=E5=ED?=", "\u05e9\u05dc\u05d5\u05dd"),
        # The rest of the value still decodes around a word that does not.
        ("Re: =?utf-8?B?####?= and =?utf-8?Q?caf=C3=A9?= tail", "Re: =?utf-8?B?####?= and café tail"),
        ("=?utf-8?Q?caf=C3=A9?= =?utf-8?B?S?=", "café =?utf-8?B?S?="),
        ("Printer =?utf-8?B?w6nD?= =?utf-8?Q?caf=C3=A9?=", "Printer =?utf-8?B?w6nD?= café"),
        ("=?utf-8?Q?caf=C3?= =?utf-8?Q?ok?=", "=?utf-8?Q?caf=C3?= ok"),
        # White space between two encoded words is not shown, folding included.
        ("=?utf-8?Q?a?= =?utf-8?Q?b?=", "ab"),
        ("=?utf-8?Q?a?=\r\n =?utf-8?Q?b?=", "ab"),
        ("=?iso-8859-1?Q?caf=E9?= =?utf-8?Q?caf=C3=A9?=", "cafécafé"),
        # A character split between two words of one charset.
        ("=?utf-8?Q?caf=C3?= =?utf-8?Q?=A9?=", "café"),
        ("=?utf-8?B?w6nD?= =?utf-8?B?qQ==?=", "éé"),
        # Text outside the words stays as it is.
        ("\u20ac =?utf-8?Q?caf=C3=A9?=", "\u20ac café"),
        ("a\r\n =?utf-8?Q?b?=", "a\r\n b"),
    ],
)
def test_encoded_words_table(value: str, expected: str) -> None:
    assert decode_encoded_words(value) == expected
