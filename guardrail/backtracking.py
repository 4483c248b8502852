"""Find regular expressions that can backtrack catastrophically: a pure look at a compiled pattern's parse tree.

Python's backtracking engine can take exponential time when a repeat that
can give back text contains another such repeat, as in (a+)+$, or repeats
alternatives that can match the same text, as in (a|aa)+. Possessive
repeats (a++) and atomic groups (?>...), both new in Python 3.11, give
nothing back, so they are never reported.

The parse tree comes from the standard library's private re._parser
module. The tests' table of patterns gives the same results on Python
3.11.7, 3.12.1 and 3.13.0. If the module is missing or its tree changes
shape, find_backtracking returns None for every pattern rather than guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

try:
    from re import _constants as sre
    from re import _parser as sre_parser
except ImportError:  # re's private modules were renamed or removed
    sre = sre_parser = None  # type: ignore[assignment]

# A bounded repeat of a repeat takes time that grows with the input's length
# to the power of its maximum. From this maximum on it is reported.
LARGE_REPEAT = 3

# How many strings a repeat's body may stand for before its alternatives are not compared.
_MAX_LITERALS = 256

# The characters on which two single-character matchers are compared: Latin-1
# and a few others that Unicode classes treat specially.
_PROBES = tuple(chr(code) for code in range(256)) + tuple("\u017f\u0130\u212a\u2028\u3000\u0663\u4e2d\u2014")


# The single-character matchers of a parse tree.
_SINGLE_CHARACTER = (sre.LITERAL, sre.NOT_LITERAL, sre.IN, sre.ANY) if sre is not None else ()

# A leading repeat as written: one character, escape or class, then a quantifier.
_LEADING_REPEAT = re.compile(r"(?:\\.|\[(?:\\.|[^\]])+\]|[^\\(\[])(?:[*+]|\{\d*,\d*\})[?+]?")
# The maximum of a {min,max} quantifier at the end of a repeat, empty when unbounded.
_BOUNDS = re.compile(r"\{\d*,(\d*)\}[?+]?$")

# From this maximum on, a bounded leading repeat is reported as a slow
# search: \s{1,1000}$ took 1.6 s on 256 KiB of spaces, the most text a body
# condition reads.
LONG_LEADING_REPEAT = 1000


@dataclass(frozen=True)
class Backtracking:
    """The reason a pattern can backtrack catastrophically."""

    # "nested": a repeat inside a repeat. "alternatives": ones that can match
    # the same text. "search": a leading repeat that a search tries at every
    # position of a run (see find_slow_search).
    cause: str
    # The outer repeat's maximum count, or None when unbounded. For "search":
    # the leading repeat's maximum, or None when unbounded.
    maximum: int | None
    leading: str = ""  # for "search": the leading repeat as written, such as \s+
    # For "search": single characters come before the repeat, as \s does in \s\s+$.
    prefixed: bool = False

    def describe(self, pattern: str) -> str:
        """Return a sentence naming `pattern`, the time it can take, and the fix."""
        # Quoted as written in regex syntax, because repr would double every backslash.
        quoted = f"'{pattern}'" if pattern.isprintable() else repr(pattern)
        if self.cause == "search":
            if self.prefixed:
                fix = (
                    f"anchor it with ^ or \\b, or give the repeat a maximum below {LONG_LEADING_REPEAT}, such as"
                    " {1,100}, since a lookbehind cannot keep the same matches here"
                )
            elif self.leading in (".*", ".*?"):
                fix = f"remove the leading {self.leading}, since a search finds the rest anywhere without it"
            else:
                fix = (
                    "start it with a lookbehind, such as (?<!\\s) before \\s+, so that only the start of a run is tried"
                    " and the matches stay the same (or with \\b or ^, where that is what you mean)"
                )
            growth = (
                "the square of the text's length" if self.maximum is None
                else f"the text's length times the repeat's maximum of {self.maximum}"
            )
            return (
                f"the pattern {quoted} can take time that grows with {growth}, because a search tries its"
                f" {'repeat' if self.prefixed else 'leading'} {self.leading or 'repeat'} at every position of a long run"
                f" of matching characters; {fix}"
            )
        growth = "exponential time" if self.maximum is None else f"time that grows with the input's length to the power {self.maximum}"
        if self.cause == "alternatives":
            return (
                f"the pattern {quoted} can take {growth} on some inputs, because alternatives under a repeat can match"
                " the same text; rewrite them so that they cannot, or make the repeat possessive (such as ++ for +)"
            )
        return (
            f"the pattern {quoted} can take {growth} on some inputs; rewrite it without a repeat inside a repeat,"
            " or make the inner repeat possessive (such as a++ for a+) or atomic ((?>...))"
        )


def find_backtracking(pattern: re.Pattern[str]) -> Backtracking | None:
    """Return the reason `pattern` can backtrack catastrophically, or None if its structure shows no such risk.

    NOTE: alternatives that are not all literal text are compared by their
    first character only, and a bounded repeat below LARGE_REPEAT, such as
    (.*a){2}, is not reported.
    """
    if sre_parser is None:
        return None
    try:
        tree = sre_parser.parse(pattern.pattern, pattern.flags)
        ignore_case = bool(tree.state.flags & re.IGNORECASE)
        for op, argument in _walk(list(tree)):
            found = _check_repeat(op, argument, ignore_case)
            if found:
                return found
    except Exception:  # noqa: BLE001 - re._parser is private, so a changed tree shape means "unknown"
        return None
    return None


def find_slow_search(pattern: re.Pattern[str]) -> Backtracking | None:
    """Return why searching text for `pattern` can take time quadratic in its length, or None.

    A search tries the pattern at each position in turn. Take a pattern
    that starts with an unbounded repeat of single characters, such as \\s+
    in \\s+$, followed by something that can fail. At every position of a
    long run of such characters, the repeat consumes the rest of the run
    before the match fails: n positions of up to n steps each. A bounded
    repeat of LONG_LEADING_REPEAT or more, such as \\s{1,5000}$, takes up to
    its maximum steps at each position. Single characters before the
    repeat change nothing when one character matches them all and the
    repeat too, as \\s does in \\s\\s+$ and a does in a[a-z]+\\d: a run of
    that character starts a match at every position. A pattern anchored
    with ^ or \\b, or started with a lookaround, is tried in earnest at few
    positions and is not reported.
    """
    if sre_parser is None:
        return None
    try:
        tree = sre_parser.parse(pattern.pattern, pattern.flags)
        found = _slow_start(_flatten(list(tree)), [], _folds_case(tree))
        if found is False:
            return None
        maximum, prefixed = found
        return Backtracking("search", maximum, _leading_text(pattern.pattern, prefixed), prefixed)
    except Exception:  # noqa: BLE001 - re._parser is private, so a changed tree shape means "unknown"
        return None


def _slow_start(
    items: list[Any], before: list[Any], ignore_case: bool, skipped: bool = False,
) -> tuple[int | None, bool] | Literal[False]:
    """Return the maximum of a long repeat of single characters that starts the sequence and that what follows can make fail.

    The maximum is None for an unbounded repeat. `before` contains the
    single-character matchers passed on the way, and one character must
    match all of them and the repeat, in either case when `ignore_case` is
    True. The second value is True when there were any, or when an
    optional item was `skipped` on the way. False means there is no such
    repeat.

    A search tries every branch of a leading alternation at each position,
    so one such branch is enough, as in \\s+$|urgent. An atomic group gives
    nothing back but is still tried at every position, as a possessive
    repeat is.
    """
    if not items:
        return False
    op, argument = items[0]
    if op is sre.BRANCH:
        found = [_slow_start(_flatten(branch) + items[1:], before, ignore_case, skipped) for branch in argument[1]]
        slow = [result for result in found if result is not False]
        if not slow:
            return False
        maximums = [maximum for maximum, _ in slow]
        return (None if None in maximums else max(maximums)), any(prefixed for _, prefixed in slow)  # type: ignore[type-var]
    if op is sre.ATOMIC_GROUP:
        return _slow_start(_flatten(argument) + items[1:], before, ignore_case, skipped)
    if op in _SINGLE_CHARACTER:
        return _slow_start(items[1:], before + [(op, argument)], ignore_case, skipped)
    if op not in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
        return False
    minimum, maximum, body = argument
    body_items = _flatten(body)
    if len(body_items) != 1 or body_items[0][0] not in _SINGLE_CHARACTER:
        return False
    if maximum != sre.MAXREPEAT and maximum < LONG_LEADING_REPEAT:
        # A short repeat, such as \s{2}, passes on as single characters do.
        # One that may match nothing, such as \s?, is skipped: the search at
        # a position can leave it out.
        if minimum >= 1:
            return _slow_start(items[1:], before + body_items, ignore_case, skipped)
        return _slow_start(items[1:], before, ignore_case, skipped=True)
    if before and not _common_character(before + body_items, ignore_case):
        return False
    if not _can_fail(items[1:]):
        return False
    return (None if maximum == sre.MAXREPEAT else maximum), bool(before) or skipped


def _common_character(matchers: list[Any], ignore_case: bool) -> bool:
    """Return True when some character meets every one of `matchers`, in either case when `ignore_case` is True."""
    matches = _matches if ignore_case else _matches_exactly
    # The literals themselves are tried too, so that "я" in я[а-я]+ counts outside Latin-1.
    literals = tuple(chr(argument) for op, argument in matchers if op is sre.LITERAL)
    return any(all(matches(matcher, probe) for matcher in matchers) for probe in _PROBES + literals)


def _folds_case(tree: Any) -> bool:
    """Return True when the pattern ignores case anywhere: by its flags, or in a group such as (?i:A)."""
    if tree.state.flags & re.IGNORECASE:
        return True
    return any(op is sre.SUBPATTERN and argument[1] & re.IGNORECASE for op, argument in _walk(list(tree)))


def _can_fail(items: list[Any]) -> bool:
    """Return True unless every item can match the empty string, as an optional repeat does."""
    return any(not (op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT) and argument[0] == 0) for op, argument in items)


def _leading_text(pattern: str, prefixed: bool) -> str:
    """Return the slow repeat of `pattern` as written, such as \\s+ or [a-z]{2,}; "" when it cannot be cut out plainly.

    The repeat starts the pattern, or when `prefixed` is True, it is the
    first repeat written that is unbounded or has a maximum of
    LONG_LEADING_REPEAT or more, since a shorter one, such as \\s{2,3},
    is among the characters before it.
    """
    if not prefixed:
        match = _LEADING_REPEAT.match(pattern)
        return match.group(0) if match else ""
    for match in _LEADING_REPEAT.finditer(pattern):
        bounds = _BOUNDS.search(match.group(0))
        if bounds is None or not bounds.group(1) or int(bounds.group(1)) >= LONG_LEADING_REPEAT:
            return match.group(0)
    return ""


def _check_repeat(op: Any, argument: Any, ignore_case: bool) -> Backtracking | None:
    if op not in (sre.MAX_REPEAT, sre.MIN_REPEAT):
        return None
    _, maximum, body = argument
    if maximum != sre.MAXREPEAT and maximum < LARGE_REPEAT:
        return None
    reported_maximum = None if maximum == sre.MAXREPEAT else maximum
    items = _flatten(body)
    words = _literal_words(items)
    if words is not None and not _is_uniquely_decodable(words, ignore_case):
        return Backtracking("alternatives", reported_maximum)
    if words is None and _branches_overlap(items):
        return Backtracking("alternatives", reported_maximum)
    # The next iteration starts with the body again, so that is what follows the body's last item.
    if _has_ambiguous_repeat(items, _first_characters(items, None)):
        return Backtracking("nested", reported_maximum)
    return None


def _branches_overlap(items: list[Any]) -> bool:
    """Return True when the body is an alternation of which two branches can start with the same character.

    Such as (a|a?): under a repeat, a run of a's splits into branches in
    exponentially many ways. A branch that can match nothing, or whose
    first character is unknown, counts as overlapping.
    """
    if len(items) != 1 or items[0][0] is not sre.BRANCH:
        return False
    starts = [_first_characters(_flatten(branch), None) for branch in items[0][1][1]]
    if any(start is None for start in starts):
        return True
    return any(_overlap(first, second) for index, first in enumerate(starts) for second in starts[index + 1:])


def _walk(items: list[Any]) -> Iterator[tuple[Any, Any]]:
    """Yield every node of a parse tree, outer nodes first."""
    for op, argument in items:
        yield op, argument
        for child in _children(op, argument):
            yield from _walk(list(child))


def _children(op: Any, argument: Any) -> list[Any]:
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
        return [argument[2]]
    if op is sre.SUBPATTERN:
        return [argument[3]]
    if op is sre.ATOMIC_GROUP:
        return [argument]
    if op is sre.BRANCH:
        return list(argument[1])
    if op in (sre.ASSERT, sre.ASSERT_NOT):
        return [argument[1]]
    if op is sre.GROUPREF_EXISTS:
        return [branch for branch in argument[1:] if branch is not None]
    return []


def _flatten(items: Any) -> list[Any]:
    """Return the items of a sequence with groups spliced in, since a group adds no choice of its own."""
    flat = []
    for op, argument in items:
        if op is sre.SUBPATTERN:
            flat += _flatten(argument[3])
        else:
            flat.append((op, argument))
    return flat


def _has_ambiguous_repeat(items: list[Any], after: list[Any] | None) -> bool:
    """Return True when the sequence contains a repeat that can give back text to what follows it.

    `after` lists the single-character matchers that can follow the sequence,
    or is None when that is not known. A repeat is safe when the character
    after it can never start another of its iterations, because then where
    it stops is fixed.
    """
    for index, (op, argument) in enumerate(items):
        follower = _first_characters(items[index + 1:], after)
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            minimum, maximum, body = argument
            # A long bounded repeat of varying length, such as a{1,100}, gives back text as an unbounded one does.
            if maximum == sre.MAXREPEAT or (maximum >= LARGE_REPEAT and maximum > minimum):
                starts = _first_characters(_flatten(body), None)
                if starts is None or follower is None or _overlap(starts, follower):
                    return True
            elif _has_ambiguous_repeat(_flatten(body), None):
                return True
        elif op is sre.BRANCH:
            if any(_has_ambiguous_repeat(_flatten(branch), follower) for branch in argument[1]):
                return True
            # An empty branch makes the others optional, as the parser writes (\d|\d\d) as \d(?:|\d):
            # when what follows can start as they do, where the optional part stops is not fixed.
            if any(not branch for branch in argument[1]):
                starts = [_first_characters(_flatten(branch), None) for branch in argument[1] if branch]
                if follower is None or any(start is None or _overlap(start, follower) for start in starts):
                    return True
        elif op is sre.GROUPREF_EXISTS:
            branches = [branch for branch in argument[1:] if branch is not None]
            if any(_has_ambiguous_repeat(_flatten(branch), follower) for branch in branches):
                return True
    return False


def _first_characters(items: list[Any], after: list[Any] | None) -> list[Any] | None:
    """Return the single-character matchers one of which the sequence's first character meets, or None if unknown."""
    for index, (op, argument) in enumerate(items):
        if op is sre.AT:
            continue  # an anchor such as \b matches no character
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.IN, sre.ANY):
            return [(op, argument)]
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            starts = _first_characters(_flatten(argument[2]), None)
            if argument[0] >= 1 or starts is None:
                return starts
            # A repeat that may match nothing lets the items after it supply the first character too.
            rest = _first_characters(items[index + 1:], after)
            return None if rest is None else starts + rest
        if op is sre.ATOMIC_GROUP:
            return _first_characters(_flatten(argument), None)
        if op is sre.BRANCH:
            found: list[Any] = []
            for branch in argument[1]:
                starts = _first_characters(_flatten(branch) + items[index + 1:], after)
                if starts is None:
                    return None
                found += starts
            return found
        return None
    return after


def _overlap(first: list[Any], second: list[Any]) -> bool:
    """Return True when some character meets a matcher in `first` and one in `second`."""
    return any(
        any(_matches(matcher, probe) for matcher in first) and any(_matches(matcher, probe) for matcher in second)
        for probe in _PROBES
    )


def _matches(matcher: tuple[Any, Any], character: str) -> bool:
    """Return True when `character`, in either case, meets a single-character matcher; unknown items meet every character."""
    # Some characters change length with case ("ß".upper() is "SS"); those forms cannot match one character.
    variants = {variant for variant in (character, character.lower(), character.upper()) if len(variant) == 1}
    return any(_matches_exactly(matcher, variant) for variant in variants)


def _matches_exactly(matcher: tuple[Any, Any], character: str) -> bool:
    op, argument = matcher
    if op is sre.LITERAL:
        return ord(character) == argument
    if op is sre.NOT_LITERAL:
        return ord(character) != argument
    if op is sre.IN:
        negated = bool(argument) and argument[0][0] is sre.NEGATE
        items = argument[1:] if negated else argument
        return any(_in_item(item, character) for item in items) != negated
    return True  # ANY, and anything else, is taken to match every character


def _in_item(item: tuple[Any, Any], character: str) -> bool:
    op, argument = item
    code = ord(character)
    if op is sre.LITERAL:
        return code == argument
    if op is sre.RANGE:
        return argument[0] <= code <= argument[1]
    if op is sre.CATEGORY:
        categories = {
            sre.CATEGORY_DIGIT: character.isdecimal(),
            sre.CATEGORY_SPACE: character.isspace(),
            sre.CATEGORY_WORD: character.isalnum() or character == "_",
        }
        negations = {sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT, sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE,
                     sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD}
        if argument in categories:
            return categories[argument]
        if argument in negations:
            return not categories[negations[argument]]
    return True


def _literal_words(items: list[Any]) -> list[str] | None:
    """Return every text the sequence matches, when it is built only of literal characters and alternatives of them."""
    words = [""]
    for op, argument in items:
        if op is sre.LITERAL:
            words = [word + chr(argument) for word in words]
        elif op is sre.BRANCH:
            choices: list[str] = []
            for branch in argument[1]:
                found = _literal_words(_flatten(branch))
                if found is None:
                    return None
                choices += found
            words = [word + choice for word in words for choice in choices]
        else:
            return None
        if len(words) > _MAX_LITERALS:
            return None
    return words


def _is_uniquely_decodable(words: list[str], ignore_case: bool) -> bool:
    """Return True when no text splits into `words` in two ways (the Sardinas-Patterson test).

    An empty word is left out, because the engine stops a repeat whose iteration matched nothing.
    """
    normalized = [word.casefold() if ignore_case else word for word in words if word]
    code = set(normalized)
    if len(code) < len(normalized):
        return False
    # Each dangling suffix is a suffix of a word, so the search ends once no new one turns up.
    pending = _dangling_suffixes(code, code)
    seen: set[str] = set()
    while pending:
        suffix = pending.pop()
        if suffix in code:
            return False
        seen.add(suffix)
        pending |= (_dangling_suffixes(code, {suffix}) | _dangling_suffixes({suffix}, code)) - seen
    return True


def _dangling_suffixes(prefixes: set[str], words: set[str]) -> set[str]:
    """Return what is left of each word in `words` after a shorter one of `prefixes` that starts it."""
    return {word[len(prefix):] for prefix in prefixes for word in words if len(word) > len(prefix) and word.startswith(prefix)}
