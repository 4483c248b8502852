"""The structural check for route regexes that can backtrack catastrophically."""

from __future__ import annotations

import re

import pytest

from guardrail import backtracking
from guardrail.backtracking import Backtracking, find_backtracking, find_slow_search

FLAGGED = [
    # (pattern, flags, cause, maximum of the outer repeat or None when unbounded)
    (r"(a+)+$", 0, "nested", None),
    (r"(\w+\s?)*$", 0, "nested", None),
    (r"(.*a){12}", 0, "nested", 12),
    (r"(.*,){3}", 0, "nested", 3),
    (r"(a+?)+", 0, "nested", None),
    (r"(\d+)*", 0, "nested", None),
    (r"((ab)*)+", 0, "nested", None),
    (r"(x+x+)+y", 0, "nested", None),
    (r"^(\w+\.?)+@", 0, "nested", None),
    (r"(?:a+|b)+", 0, "nested", None),
    (r"((a+){2})+", 0, "nested", None),
    (r"(?=(a+)+b)", 0, "nested", None),
    (r"(?>(a+)+b)", 0, "nested", None),
    (r"(a)?(?(1)a+|b)+", 0, "nested", None),
    (r"(a|aa)+", 0, "alternatives", None),
    (r"(?:x|x)*", 0, "alternatives", None),
    (r"(a|b|ab)*", 0, "alternatives", None),
    (r"(a|ab|ba)+", 0, "alternatives", None),
    (r"(?i)(ab|AB)+", 0, "alternatives", None),
    (r"(ab|AB)+", re.IGNORECASE, "alternatives", None),
    # Alternatives that are not literal text but can start alike. The parser
    # writes (\d|\d\d) as \d(?:|\d), an optional part inside the repeat.
    (r"(\d|\d\d)+$", 0, "nested", None),
    (r"(\s|\s\s)+$", 0, "nested", None),
    (r"(a|a?)+$", 0, "alternatives", None),
    (r"(\d|\d?x)+$", 0, "alternatives", None),
    # A long bounded repeat of varying length inside a repeat.
    (r"(a{1,100}){1,100}$", 0, "nested", 100),
]

NOT_FLAGGED = [
    r"^\[ticket #\d+\]",
    r"(?i)invoice|receipt",
    r"\b(refund|chargeback)\b",
    r".*urgent.*",
    r"[a-z]+@example\.com",
    r"^(re|fwd?):\s*",
    r"[^@]+@[^@]+",
    # Possessive repeats and atomic groups give nothing back.
    r"(a++)+",
    r"(a*+)*",
    r"(?>a+)+",
    r"(a+)*+",
    r"(?>a|aa)+",
    r"(a|aa)++",
    # The character after the inner repeat fixes where it stops.
    r"^([a-z0-9-]+\.)*example\.com$",
    r"(\d+\.){3}\d+",
    r"(a+b)+",
    r"(\w+\s)*",
    r"([a-z]+\s+)*",
    r"(\.a+)+",
    r"\d{1,3}(,\d{3})*",
    r"([a-z]+[0-9]*\.)+",
    r"(\w+\b\s)*",
    # Alternatives that no text can be split into in two ways.
    r"(ab|a)+",
    r"(ab|AB)+",
    r"(?i)(a|A)+",
    # Alternatives that cannot start alike, and bounded repeats that the next character fixes.
    r"(\w|-)+@",
    r"([a-z]|\d)+",
    r"(\d{1,3}\.){3}\d{1,3}",
    # A bounded repeat below LARGE_REPEAT takes polynomial time.
    r"(.*a){2}",
]


@pytest.mark.parametrize(("pattern", "flags", "cause", "maximum"), FLAGGED, ids=[row[0] for row in FLAGGED])
def test_backtracking_pattern_flagged(pattern: str, flags: int, cause: str, maximum: int | None) -> None:
    assert find_backtracking(re.compile(pattern, flags)) == Backtracking(cause, maximum)


@pytest.mark.parametrize("pattern", NOT_FLAGGED)
def test_safe_pattern_not_flagged(pattern: str) -> None:
    assert find_backtracking(re.compile(pattern)) is None


def test_description_names_pattern_and_fix() -> None:
    nested = Backtracking("nested", None).describe(r"(\w+\s?)*$")

    assert nested.startswith(r"the pattern '(\w+\s?)*$' can take exponential time on some inputs;")
    assert "make the inner repeat possessive (such as a++ for a+) or atomic ((?>...))" in nested


def test_description_of_bounded_repeat_names_power() -> None:
    bounded = Backtracking("nested", 12).describe("(.*a){12}")

    assert "can take time that grows with the input's length to the power 12 on some inputs" in bounded


def test_description_of_alternatives_names_cause() -> None:
    alternatives = Backtracking("alternatives", None).describe("(a|aa)+")

    assert "because alternatives under a repeat can match the same text" in alternatives
    assert "make the repeat possessive (such as ++ for +)" in alternatives


SLOW_SEARCHES = [
    # (pattern, the leading repeat as the description quotes it)
    (r"\s+$", r"\s+"),
    (r"\d+\s*$", r"\d+"),
    (r"[A-Z]{2,}-\d+", "[A-Z]{2,}"),
    (r".*urgent", ".*"),
    (r".*?urgent.*", ".*?"),
    (r"[^@]+@[^@]+", "[^@]+"),
    # Possessive repeats give nothing back, but the search still tries every position.
    (r"\s++$", r"\s++"),
    (r"(\s+)$", ""),
    # A search tries every branch of a leading alternation at each position.
    (r"\s+$|urgent", r"\s+"),
    (r"(?:urgent|\s+$)", ""),
    (r"(?>\s+)$", ""),
]

FAST_SEARCHES = [
    r"^\s+$",
    r"\b[A-Z]{2,}-\d+",
    r"(?<!\s)\s+$",
    r"\s+",
    r"\s+.*",
    r"urgent.*",
    r"a{2,5}b",
    r"x*y*",
    r"(?i)invoice|receipt",
    r"(?:\s+|urgent)",
    r"^\s+$|^urgent",
]


@pytest.mark.parametrize(("pattern", "leading"), SLOW_SEARCHES)
def test_slow_search_flagged(pattern: str, leading: str) -> None:
    assert find_slow_search(re.compile(pattern)) == Backtracking("search", None, leading)


@pytest.mark.parametrize("pattern", FAST_SEARCHES)
def test_fast_search_not_flagged(pattern: str) -> None:
    assert find_slow_search(re.compile(pattern)) is None


@pytest.mark.parametrize(
    ("pattern", "maximum", "leading"),
    [
        (r"\s{1,5000}$", 5000, r"\s{1,5000}"),
        (r"[0-9]{0,1000}x", 1000, "[0-9]{0,1000}"),
        # The longest of a leading alternation's repeats counts.
        (r"\s{1,2000}$|\d{1,3000}x", 3000, r"\s{1,2000}"),
        (r"\s{1,2000}$|\d+x", None, r"\s{1,2000}"),
    ],
)
def test_long_bounded_leading_repeat_flagged(pattern: str, maximum: int, leading: str) -> None:
    assert find_slow_search(re.compile(pattern)) == Backtracking("search", maximum, leading)


@pytest.mark.parametrize("pattern", [r"\s{1,999}$", r"\d{4,8}-x", r"[A-Z]{2,5}\d"])
def test_short_bounded_leading_repeat_not_flagged(pattern: str) -> None:
    assert find_slow_search(re.compile(pattern)) is None


# Single characters before a repeat that one character matches together with it:
# a run of that character starts a match at every position all the same.
SLOW_PREFIXED_SEARCHES = [
    # (pattern, the repeat as the description quotes it)
    (r"\s?\s+$", r"\s+"),
    ("я[а-я]+\\d", "[а-я]+"),
    (r"\s\s+$", r"\s+"),
    (r" \s+x", r"\s+"),
    (r"a[a-z]+\d", "[a-z]+"),
    (r"[a-z]\w+@", r"\w+"),
    (r"\s{2}\s+$", r"\s+"),
    (r"x.*urgent", ".*"),
    (r"(?:\s|-)\s+$|urgent", r"\s+"),
    # A short repeat before the slow one is not the repeat that the description names.
    (r"\s{2,3}\s+$", r"\s+"),
    # Case folding lets "A" and [a-z] match one character.
    (r"(?i)A[a-z]+\d", "[a-z]+"),
    (r"(?i:A)[a-z]+\d", "[a-z]+"),
]

FAST_PREFIXED_SEARCHES = [
    r"a\s+$",  # no character is both "a" and a space
    r"x\d+y",
    r"(?i)re:\s+$",
    r"\.[a-z]+$",
    r"-\s*-+$",
    r"a\s+",  # nothing after the repeat can fail
    r"\ba[a-z]+\d",
    r"[A-Z]{2,5}\d",
    r"A[a-z]+\d",  # without case folding, no character is both "A" and a lowercase letter
    r"É[a-zé]+\d",
]


@pytest.mark.parametrize(("pattern", "repeat"), SLOW_PREFIXED_SEARCHES)
def test_prefixed_slow_search_flagged(pattern: str, repeat: str) -> None:
    assert find_slow_search(re.compile(pattern)) == Backtracking("search", None, repeat, prefixed=True)


@pytest.mark.parametrize("pattern", FAST_PREFIXED_SEARCHES)
def test_prefixed_fast_search_passes(pattern: str) -> None:
    assert find_slow_search(re.compile(pattern)) is None


def test_description_of_prefixed_search_names_fix() -> None:
    text = Backtracking("search", None, "[a-z]+", prefixed=True).describe(r"a[a-z]+\d")

    assert text.startswith(r"the pattern 'a[a-z]+\d' can take time that grows with the square of the text's length,")
    assert "a search tries its repeat [a-z]+ at every position of a long run of matching characters" in text
    assert r"anchor it with ^ or \b, or give the repeat a maximum below 1000, such as {1,100}" in text


def test_description_of_bounded_search_names_maximum() -> None:
    bounded = Backtracking("search", 5000, r"\s{1,5000}").describe(r"\s{1,5000}$")

    assert "grows with the text's length times the repeat's maximum of 5000" in bounded


def test_description_of_slow_search_names_fix() -> None:
    run = Backtracking("search", None, r"\s+").describe(r"\s+$")
    dot = Backtracking("search", None, ".*").describe(".*urgent")

    assert run.startswith(r"the pattern '\s+$' can take time that grows with the square of the text's length,")
    assert r"start it with a lookbehind, such as (?<!\s) before \s+, so that only the start of a run is tried" in run
    assert "remove the leading .*, since a search finds the rest anywhere without it" in dot


def test_missing_parser_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backtracking, "sre_parser", None)

    assert find_backtracking(re.compile(r"(a+)+$")) is None
    assert find_slow_search(re.compile(r"\s+$")) is None


def test_changed_parse_tree_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    class ChangedParser:
        @staticmethod
        def parse(pattern: str, flags: int) -> list[str]:
            return ["a node of a shape this module does not know"]

    monkeypatch.setattr(backtracking, "sre_parser", ChangedParser)

    assert find_backtracking(re.compile(r"(a+)+$")) is None
