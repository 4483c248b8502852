"""Which language a short text is written in, among a few candidates.

Most mail programs send no Content-Language header, so the acknowledgement
would go out in the team's default language to everyone. This guess counts
common function words (articles, pronouns, greetings, "please" and "thanks")
of each language that has a word list, in the subject and the start of the body. It
answers only when one of the candidates clearly leads, and None otherwise,
so the caller falls back to the team's language rather than to a wrong
guess.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

# Words that are frequent in one language and rare in the others listed.
# Frequent words of two of them (French and Spanish "de", "la", "que";
# French and Italian "il") are left out: they tell those two apart no
# better than chance.
FUNCTION_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the and is are you your with have has this that for not please thanks thank my i it "
        "can would could hello hi dear regards since when what there they we our be been".split()
    ),
    "fr": frozenset(
        "le les des est et je vous votre vos pour pas une avec bonjour merci mon ma mes sur dans qui "
        "au aux cette ce suis avez ai nous elle depuis cordialement madame monsieur être".split()
    ),
    "de": frozenset(
        "der die das und ist ich sie nicht mit für ein eine bitte danke mein meine ihr ihre auf zu "
        "den dem hallo guten habe wir kann noch auch sehr seit grüße freundlichen vielen dank".split()
    ),
    "es": frozenset(
        "el los las y yo usted su sus para por con una gracias hola mi mis del al está tengo favor "
        "pero como muy buenos buenas días saludos puedo desde cuenta".split()
    ),
    "nl": frozenset(
        "het een van ik niet met voor bedankt graag mijn zijn hallo goedemorgen alstublieft uw wij "
        "ons heb kan ook nog groeten vriendelijke".split()
    ),
    "it": frozenset(
        "gli della per non sono grazie ciao buongiorno mio mia questo questa che ho ordine "
        "cordiali saluti salve".split()
    ),
    "pt": frozenset(
        "os não obrigado obrigada olá você seu sua meu minha tenho bom dia conta pedido "
        "atenciosamente".split()
    ),
}

# Punctuation and digits separate words, so "j'ai" is read as "j" and "ai".
_SEPARATORS = str.maketrans(dict.fromkeys(string.punctuation + string.digits + "«»¿¡‘’“”„…–—·", " "))
_KANA = re.compile(r"[\u3040-\u30ff]")
# Only the start of the sender's own text is read: enough to decide, and bounded on long mail.
MAX_CHARACTERS = 1500
# The leader needs this many function words, and at least twice the next language's count.
MIN_HITS = 2
# Hiragana or katakana characters that mark a text as Japanese.
MIN_KANA = 5
# A line that ends what the sender wrote: a signature separator ("-- ",
# RFC 3676 section 4.3), a line of underscores that Outlook puts before the
# message it replies to, or dashes around a title ("-----Original
# Message-----", "---------- Forwarded message ---------", "-----Ursprüngliche
# Nachricht-----"). What follows is another author's text or a disclaimer,
# often in another language. The closing dashes follow a character other
# than a dash, so a long line of dash runs is matched in linear time.
_OWN_TEXT_END = re.compile(r"\s*(?:--\s*|_{8,}\s*|-{4,}[^-](?:.*[^-])?-{4,}\s*)")
# The first two lines of the header block above a quoted or forwarded
# message: "From:", then "Sent:", "Date:", "To:" or "Subject:". Outlook
# often writes no separator line before the block. The labels are in the
# mail program's language, and those of the languages with a word list are
# here ("De :" then "Envoyé :", "Von:" then "Gesendet:"). Gmail's plain
# text puts each label of such a block between asterisks.
QUOTED_FROM = re.compile(r"\s*\*?(?:from|de|von|da|van)\s*:", re.IGNORECASE)
QUOTED_FIELD = re.compile(
    r"\s*\*?(?:sent|date|to|subject|envoyé|à|objet|gesendet|datum|an|betreff|enviad[oa](?: el| em)?|fecha|para"
    r"|asunto|inviato|data|a|oggetto|assunto|verzonden|aan|onderwerp)\s*:",
    re.IGNORECASE,
)
# Characters searched for the sender's text, which may come after a long quote.
_OWN_TEXT_SCAN = 64 * 1024


def guess_language(text: str, candidates: Iterable[str]) -> str | None:
    """Return the one of `candidates` that `text` is most likely written in, or None when no language clearly leads.

    Every language with a word list competes, not only the candidates, so
    that Italian mail is not taken for Spanish because a team has a Spanish
    template and no Italian one.
    """
    text = own_text(text)
    candidates = set(candidates)
    if len(_KANA.findall(text)) >= MIN_KANA:
        return "ja" if "ja" in candidates else None
    counts = Counter(text.lower().translate(_SEPARATORS).split())
    words = counts.keys()
    scores = sorted(
        ((sum(counts[word] for word in words & vocabulary), language) for language, vocabulary in FUNCTION_WORDS.items()),
        reverse=True,
    )
    best, language = scores[0]
    runner_up = scores[1][0]
    if language in candidates and best >= MIN_HITS and best >= 2 * runner_up:
        return language
    return None


def own_text(text: str, limit: int = MAX_CHARACTERS) -> str:
    """Return up to `limit` characters of what the sender wrote in `text`: without quoted lines, up to a signature or the start of a quoted or forwarded message.

    A reply in French to an English message quotes the English one, with
    "> " before each line, or below a separator line or a header block, and
    the quote is often the longer text.
    """
    own_lines: list[str] = []
    size = 0
    after_from = False  # whether the last line kept starts like the From line of a quoted header block
    start, end = 0, min(len(text), _OWN_TEXT_SCAN)
    # Lines are cut one at a time, so a long message costs no more than the lines the loop reaches.
    while start < end:
        stop = text.find("\n", start, end)
        if stop < 0:
            stop = end
        line = text[start:stop].rstrip("\r")
        start = stop + 1
        if _OWN_TEXT_END.fullmatch(line):
            break
        if line.lstrip().startswith(">"):
            continue
        if after_from and QUOTED_FIELD.match(line):
            own_lines.pop()  # the From line belongs to the quoted message
            break
        after_from = QUOTED_FROM.match(line) is not None
        own_lines.append(line)
        size += len(line) + 1
        if size >= limit:
            break
    return "\n".join(own_lines)[:limit]
