"""The text a reader sees in an HTML part: a pure function that reads each character at most a few times.

Body conditions and language detection read the plain-text part of a
message. Many web forms and some mail clients send only HTML, so its text
is read in place of the missing plain part. This is not a renderer: it drops
tags, comments, scripts and styles, decodes character references, and ends
a line where a block element (paragraph, list item, table row, <br>) ends
one, so that patterns anchored at line ends keep working. Line breaks in
the source are spaces, as a browser shows them, and empty lines are left out.

Each scan step searches forward from where the last one stopped, and an
unclosed comment, script or tag ends the scan, so the time stays linear in
the length of the markup whatever it holds. A regular expression such as
<script.*?</script> would search to the end of the text from every opening
tag, which is quadratic on a body of unclosed tags.
"""

from __future__ import annotations

import html
import re

# Elements whose start or end begins a new line of text.
_BLOCK_ELEMENTS = frozenset({
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "fieldset", "figcaption",
    "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav",
    "ol", "p", "pre", "section", "table", "td", "th", "tr", "ul",
})
# Elements whose content is not shown: it runs to the matching end tag.
# The head is not one of them: HTML lets its end tag be left out, and what
# it contains besides these (meta and link tags) shows no text anyway.
_HIDDEN_ELEMENTS = ("script", "style", "title", "template", "noscript")
# Their end tags, matched ignoring ASCII case only. markup.lower() turns "\u0130"
# into two characters, so its indices would not match those of the markup.
_HIDDEN_END_TAGS = {name: re.compile(f"</{name}", re.IGNORECASE | re.ASCII) for name in _HIDDEN_ELEMENTS}

# Inline elements, whose tags may stand inside a word, as in "a<b>b</b>".
# Any other tag separates words.
_INLINE_ELEMENTS = frozenset({"a", "abbr", "b", "code", "em", "font", "i", "mark", "small", "span", "strong", "sub", "sup", "u"})

_TAG_NAME = re.compile(r"</?([A-Za-z][A-Za-z0-9-]*)")
# A quote opens an attribute value only right after "=" and optional spaces.
# Elsewhere, as in <p class=x title=don't>, it is an ordinary character.
_TAG_END_OR_QUOTED_VALUE = re.compile(r""">|=[ \t\n\r\f]*(["'])""")
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")


def _tag_end(markup: str, position: int) -> int:
    """Return the index of the ">" that ends the tag whose attributes start at `position`, or -1.

    A ">" inside a quoted attribute value does not end the tag.
    """
    while True:
        found = _TAG_END_OR_QUOTED_VALUE.search(markup, position)
        if found is None:
            return -1
        if found.group() == ">":
            return found.start()
        closing_quote = markup.find(found.group(1), found.end())
        if closing_quote < 0:
            return -1
        position = closing_quote + 1


def html_text(markup: str) -> str:
    """Return the text of `markup`, one line per block, with spaces collapsed and entities decoded."""
    pieces: list[str] = []
    position = 0
    length = len(markup)
    while position < length:
        start = markup.find("<", position)
        if start < 0:
            pieces.append(_text(markup[position:]))
            break
        if start > position:
            pieces.append(_text(markup[position:start]))
        if markup.startswith("<!--", start):
            end = markup.find("-->", start + 4)
            if end < 0:
                break  # an unclosed comment hides the rest
            position = end + 3
            continue
        name_match = _TAG_NAME.match(markup, start)
        if name_match is None:
            if markup.startswith(("<!", "<?"), start):
                # A declaration such as <!DOCTYPE html> or a processing instruction.
                end = markup.find(">", start)
                if end < 0:
                    break
                position = end + 1
                continue
            # A "<" that starts no tag, as in "a < b", is text.
            pieces.append("<")
            position = start + 1
            continue
        end = _tag_end(markup, name_match.end())
        if end < 0:
            break  # an unclosed tag hides the rest, as in a browser
        name = name_match.group(1).lower()
        closing = markup.startswith("</", start)
        position = end + 1
        if name in _BLOCK_ELEMENTS:
            pieces.append("\n")
        elif not closing and name in _HIDDEN_ELEMENTS and not markup.startswith("/>", end - 1):
            pieces.append(" ")
            close = _HIDDEN_END_TAGS[name].search(markup, position)
            if close is None:
                break
            after = markup.find(">", close.start())
            if after < 0:
                break
            position = after + 1
        elif name not in _INLINE_ELEMENTS:
            pieces.append(" ")
    lines = (_SPACES.sub(" ", line).strip() for line in "".join(pieces).split("\n"))
    return "\n".join(line for line in lines if line)


def _text(data: str) -> str:
    """Return text between tags with its character references decoded. A line break in HTML source is a space."""
    return html.unescape(data).replace("\n", " ")
