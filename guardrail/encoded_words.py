"""Decode the RFC 2047 encoded words in a header value.

A word whose base64 or Q text is invalid, or whose bytes are invalid in its
charset (a multi-byte character cut short, for one), stays as written, and
the words around it still decode. Shown as written, it stays readable, where
decoding it with a guessed charset would give garbage.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

# =?charset?encoding?encoded-text?= (RFC 2047 section 2). The charset may
# carry an RFC 2231 language ("utf-8*en"). The text ends at the first "?",
# which keeps each search short, and it may contain spaces, as the email
# package also allows.
_WORD = re.compile(r"=\?([^?*\s]+)(?:\*[^?\s]*)?\?([BbQq])\?([^?\r\n]*)\?=")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]*")
# Printable ASCII and space, with "=" only before two hex digits (RFC 2047 section 4.2).
_Q_TEXT = re.compile(r"(?:[ -<>-~]|=[0-9A-Fa-f]{2})*")
# White space that may separate encoded words, folding included.
_SPACE = " \t\r\n"
# Charset names that Python's codecs do not know, and the codec with the same
# bytes. RFC 1556: the "-i" and "-e" forms of the Hebrew and Arabic sets only
# mark the direction of the text.
_CHARSET_ALIASES = {
    "iso-8859-6-e": "iso-8859-6",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-8-i": "iso-8859-8",
}


@dataclass(frozen=True)
class _Word:
    """An encoded word whose text is valid base64 or Q encoding."""

    charset: str
    data: bytes
    written: str  # the word as it appears in the header
    space_before: str = ""  # the white space between it and the word before, which is not shown


def decode_encoded_words(text: str) -> str:
    """Return `text` with its encoded words decoded. A word that does not decode stays as written."""
    if "=?" not in text:
        return text
    tokens: list[str | _Word] = []
    position = 0
    for match in _WORD.finditer(text):
        between = text[position:match.start()]
        position = match.end()
        data = _word_bytes(match.group(2), match.group(3))
        if data is None:
            tokens += [between, match.group(0)]
            continue
        space_before = ""
        if tokens and isinstance(tokens[-1], _Word) and not between.strip(_SPACE):
            # RFC 2047 section 6.2: white space between two encoded words is not shown.
            space_before, between = between, ""
        if between:
            tokens.append(between)
        tokens.append(_Word(match.group(1).lower(), data, match.group(0), space_before))
    tokens.append(text[position:])

    # Adjacent words of one charset are decoded together, as the email
    # package does, because a multi-byte character may be split between them.
    pieces: list[str] = []
    run: list[_Word] = []
    for token in tokens:
        if isinstance(token, _Word) and run and token.charset == run[0].charset:
            run.append(token)
            continue
        if run:
            pieces.append(_decode_run(run))
            run = []
        if isinstance(token, _Word):
            run = [token]
        else:
            pieces.append(token)
    # The tokens end with a string, so the last run is decoded by now.
    return "".join(pieces)


def _word_bytes(encoding: str, text: str) -> bytes | None:
    """Return the bytes that the text of an encoded word stands for, or None when it is not valid in `encoding` (B or Q)."""
    if encoding in "Bb":
        letters = text.rstrip("=")
        # A length of one more than a multiple of four cannot be base64.
        if not _BASE64_TEXT.fullmatch(letters) or len(letters) % 4 == 1:
            return None
        # Missing padding is added, as the email package does.
        return binascii.a2b_base64(letters + "=" * (-len(letters) % 4))
    if not _Q_TEXT.fullmatch(text):
        return None
    return binascii.a2b_qp(text.encode("ascii"), header=True)


def _decode_run(words: list[_Word]) -> str:
    """Decode adjacent encoded words of one charset, together when their joined bytes decode, else one by one."""
    charset = words[0].charset
    joined = _decoded(b"".join(word.data for word in words), charset)
    if joined is not None:
        return joined
    decoded = [_decoded(word.data, charset) for word in words]
    pieces = []
    for index, (word, text) in enumerate(zip(words, decoded)):
        if index and (text is None or decoded[index - 1] is None):
            # A word shown as written keeps the space that separates it from its neighbours.
            pieces.append(word.space_before)
        pieces.append(word.written if text is None else text)
    return "".join(pieces)


def _decoded(data: bytes, charset: str) -> str | None:
    """Return `data` decoded from `charset`, or None when it is invalid there.

    A charset that Python does not know is read as UTF-8, which also covers
    ASCII. Bytes that are not valid UTF-8 then return None too.
    """
    try:
        return data.decode(_CHARSET_ALIASES.get(charset, charset))
    except LookupError:
        pass
    except ValueError:
        # UnicodeDecodeError, or UnicodeError from codecs such as idna.
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
