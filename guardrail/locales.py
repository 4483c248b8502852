"""Write acknowledgement deadlines in a language, with Babel.

Rule files name languages with BCP 47 tags such as "pt-BR" or "zh-Hant",
while Babel names its locales with underscores ("pt_BR"). The rules loader
checks each language by formatting a deadline with `deadline_text`, the
function acknowledgements use, so a language that loads can always be
written.
"""

from __future__ import annotations

import functools
import re
from datetime import date, time

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_time

_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,8}(?:-[A-Za-z0-9]{1,8})*")


@functools.lru_cache(maxsize=64)
def babel_locale(language: str) -> Locale:
    """Return Babel's locale for the BCP 47 tag `language`.

    Raises ValueError for a malformed tag and UnknownLocaleError for a
    language Babel has no data for.
    """
    return Locale.parse(language.strip().replace("-", "_"))


@functools.lru_cache(maxsize=1024)
def deadline_text(day: date, hour: int, minute: int, language: str, zone: str) -> str:
    """Return a local date and time as acknowledgements write it, such as "Monday, December 1, 2025, 09:30 (Europe/Paris)"."""
    # Deadlines of messages that arrive together fall in the same minute, and
    # Babel takes tens of microseconds for each date it formats.
    locale = babel_locale(language)
    written = format_date(day, format="full", locale=locale)
    return f"{written}, {format_time(time(hour, minute), 'HH:mm', locale=locale)} ({zone})"


def is_supported_language(language: str) -> bool:
    """Return whether `language` is a BCP 47 tag in which `deadline_text` can write dates."""
    # Babel would also take "pt_BR", but the tag goes into Content-Language,
    # which takes BCP 47 tags, written with hyphens.
    if not _LANGUAGE_TAG.fullmatch(language):
        return False
    try:
        deadline_text(date(2026, 1, 1), 9, 0, language, "UTC")
    except (ValueError, UnknownLocaleError):
        return False
    return True


# The words before a person's name and address, as in "write to NAME <ADDRESS>", by language.
_WRITE_TO = {
    "en": "write to",
    "fr": "écrivez à",
    "de": "schreiben Sie an",
    "es": "escriba a",
    "nl": "schrijf naar",
    "it": "scrivete a",
    "pt": "escreva para",
}


def write_to(language: str) -> str:
    """Return the words before a person's name and address that invite the sender to write to them, in `language`; English if unknown."""
    return _WRITE_TO.get(language, _WRITE_TO["en"])
