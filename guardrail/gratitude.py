"""Whether a customer's reply is only a thank-you: pure functions over the reply's text and subject.

A customer's message after the team's answer reopens the conversation,
because the customer usually waits again. A reply that only says thanks
("Thanks, that works!") waits for nothing, and reopening it would page a
human about a conversation that needs no answer. The test is conservative,
because a real question taken for thanks is never answered, while a
thank-you taken for a question costs one extra look:

- only the new text counts: what comes before the first quoted line ("> "),
  reply header ("On ... wrote:"), Outlook header block or signature
  separator ("-- ");
- that text must contain a gratitude phrase, and besides it only greetings,
  sign-offs, praise such as "that works", punctuation, emoji and at most a
  short capitalized name;
- a question mark, a digit, a negation or contrast word ("but", "still",
  "mais", "noch", "pero"), a request ("please"), a forwarded message, or
  text written between quoted lines below it makes it not thanks.

English, French, German and Spanish are read, the languages of the
acknowledgement templates.
"""

from __future__ import annotations

import re

from .conversations import without_references
from .language import QUOTED_FIELD, QUOTED_FROM


def _phrases(text: str) -> frozenset[tuple[str, ...]]:
    """Return the phrases of `text`, separated by commas or line ends, each as a tuple of words."""
    return frozenset(tuple(_words(phrase)) for phrase in re.split(r"[,\n]", text) if phrase.strip())


def _words(text: str) -> list[str]:
    """Return the lower-case words of `text`. Apostrophes, hyphens, digits and punctuation separate words."""
    return _WORD.findall(text.casefold())


_WORD = re.compile(r"[^\W\d_]+")

# At least one of these must be in the new text.
GRATITUDE = _phrases("""
thanks, thank you, thank u, thankyou, thanx, thx, many thanks, big thanks, much appreciated, appreciated
appreciate it, i appreciate it, i really appreciate it, much obliged, merci, mille mercis, un grand merci
grand merci, merci mille fois, je vous remercie, je te remercie, danke, dankeschön, danke schön, danke sehr
vielen dank, vielen lieben dank, vielen herzlichen dank, herzlichen dank, besten dank, tausend dank
danke vielmals, ich danke ihnen, ich danke dir, gracias, muchas gracias, muchísimas gracias, mil gracias
te lo agradezco, se lo agradezco, le agradezco, muy agradecido, muy agradecida
""")

# A stem of every phrase in GRATITUDE. Most replies contain none in their
# first NEW_TEXT_LIMIT characters, so a few substring searches rule them out
# before any line is read. One regular expression with these alternatives
# took about 15 us on 600 characters, against 1 us for the searches.
GRATITUDE_STEMS = ("thank", "thanx", "thx", "appreciat", "obliged", "merci", "remerci", "dank", "gracias", "agrade")

# The phrases after which a name may follow in the same sentence:
# greetings, sign-offs and titles ("Hi Sam", "Cheers, Bob", "Dear Mr. Ortiz").
NAME_INTRODUCERS = _phrases("""
hi, hello, hey, hiya, dear, good morning, good afternoon, good evening, best, best regards, kind regards
warm regards, regards, cheers, best wishes, all the best, sincerely, yours, yours sincerely, take care
mr, mrs, ms, miss, dr, bonjour, bonsoir, salut, coucou, cher, chère, madame, monsieur, mademoiselle, m, mme
cordialement, bien cordialement, très cordialement, bien à vous, bien à toi, amicalement, merci encore
encore merci, hallo, guten morgen, guten tag, guten abend, liebe, lieber, liebes, sehr geehrte, sehr geehrter
servus, moin, herr, frau, viele grüße, beste grüße, liebe grüße, herzliche grüße, freundliche grüße
mit freundlichen grüßen, schöne grüße, grüße, gruß, mfg, lg, vg, nochmals danke, danke nochmals, hola
buenos días, buenas tardes, buenas noches, buenas, estimado, estimada, querido, querida, sr, sra, srta, don
doña, saludos, un saludo, saludos cordiales, atentamente, cordialmente, un abrazo, abrazos
""")
# The titles above that are written with a full stop ("Mr. Ortiz", "Sr. Ortiz").
_TITLES = frozenset({"mr", "mrs", "ms", "dr", "m", "sr", "sra", "srta"})

# Everything else a thank-you may say: greetings, sign-offs, intensifiers
# and praise. Single words here are harmless alone; a word that is harmless
# only in a phrase ("help" in "for your help") is listed in its phrases.
# Any other lower-case word is substance, so a request such as "thanks,
# please cancel my order" fails on "cancel" even where its small words pass.
COURTESY = _phrases("""
hi, hello, hey, hiya, dear, good morning, good afternoon, good evening, best, best regards, kind regards
warm regards, regards, cheers, best wishes, all the best, sincerely, yours, yours sincerely, take care
have a nice day, have a good day, have a great day, have a nice weekend, have a good weekend
have a great weekend, so, much, very, really, a, lot, a million, again, once again, you, guys, team, all
everyone, both, of, for, your, the, that, this, it, s, is, was, now, perfect, perfectly, great, awesome
excellent, wonderful, brilliant, fantastic, super, lovely, amazing, ok, okay, cool, nice, fine, good, helpful
quick, fast, prompt, kind, works, worked, working, fixed, sorted, solved, resolved, all good, all sorted
problem solved, that did it, that did the trick, got it, your help, the help, helping, that helps, that helped
reply, response, answer, support, getting back to me, bonjour, bonsoir, salut, coucou, cher, chère, madame
monsieur, cordialement, bien cordialement, très cordialement, bien à vous, bien à toi, salutations
sincères salutations, amicalement, à bientôt, bonne journée, belle journée, bonne soirée, bon week end
bonne fin de journée, bonne continuation, merci encore, encore merci, merci à vous, merci à toi, beaucoup
bien, très, vraiment, infiniment, pour, votre, ton, vos, tes, le, la, les, l, de, du, des, d, aide, votre aide
ton aide, réponse, retour, rapide, rapidité, parfait, génial, top, nickel, excellent, ça marche, ça fonctionne
ça a marché, ça a fonctionné, c est parfait, c est bon, c est réglé, tout est bon, tout fonctionne
problème résolu, résolu, réglé, hallo, guten morgen, guten tag, guten abend, liebe, lieber, liebes
sehr geehrte, sehr geehrter, servus, moin, grüße, gruß, viele grüße, beste grüße, liebe grüße, herzliche grüße
freundliche grüße, mit freundlichen grüßen, mfg, lg, vg, schöne grüße, schönen tag, einen schönen tag
noch einen schönen tag, schönes wochenende, ein schönes wochenende, noch ein schönes wochenende, nochmals
nochmal, nochmals danke, danke nochmals, sehr, vielmals, für, ihre, deine, die, eure, hilfe, antwort, schnelle
perfekt, prima, toll, klasse, funktioniert, es funktioniert, hat funktioniert, klappt, es klappt, hat geklappt
alles gut, alles klar, passt, jetzt, problem gelöst, gelöst, hola, buenos días, buenas tardes, buenas noches
buenas, estimado, estimada, querido, querida, saludos, un saludo, saludos cordiales, atentamente, cordialmente
un abrazo, abrazos, que tengas un buen día, que tenga un buen día, buen día, buen fin de semana, de nuevo
otra vez, muy, mucho, por, tu, su, ayuda, respuesta, rápida, rápido, perfecto, genial, excelente, estupendo
funciona, ya funciona, todo bien, todo correcto, resuelto, solucionado, ya
""") | NAME_INTRODUCERS

# Words that turn thanks into something else when they stand outside the
# phrases above: negation and contrast ("thanks, but it still fails"),
# requests ("please"), questions without a question mark and more to say
# ("another thing"). "no" is both English and Spanish.
NOT_THANKS = frozenset("""
but still not no nor never nothing none nobody neither however though although yet except unfortunately
only anymore cannot cant dont doesnt didnt isnt wasnt wont aint haven hasn hadn isn wasn weren aren
doesn didn don won couldn wouldn shouldn also another more else if why how what when where who which
please pls plz
mais toujours pas ne n plus rien jamais aucun aucune cependant pourtant sauf malheureusement aussi autre
pourquoi comment quand où quoi quel quelle plaît svp stp
aber noch nicht nichts kein keine keinen nie niemals jedoch trotzdem leider nur auch weitere warum wie
wann wo was welche bitte
pero todavía aún sigue siguen nada nunca tampoco sin embargo excepto desafortunadamente solo sólo también
otra otro qué cómo cuándo dónde por qué favor
""".split())

# At most this many characters of new text are read; a thank-you is short.
NEW_TEXT_LIMIT = 600
# More words than this in the new text make it more than a thank-you.
MAX_WORDS = 40
# Capitalized words outside the phrases, taken for the names in a greeting
# or below a sign-off ("Hi Sam, thanks! Alice Martin").
MAX_NAME_WORDS = 3

_QUESTION_MARKS = "?¿？"
# The signature separator is "-- ", with its space. A bare "--" line may
# start new text as well as a signature, so it ends nothing.
_SIGNATURE = re.compile(r"-- [ \t]*")
# A line above a forwarded message: what follows is the customer's new
# matter, whatever the text above it contains.
_FORWARDED = re.compile(
    r"\s*(?:-{2,}\s*(?:forwarded message|message transféré|weitergeleitete nachricht"
    r"|mensaje reenviado)\s*-{2,}|begin forwarded message:|début du message réexpédié\s*:"
    r"|anfang der weitergeleiteten nachricht\s*:|inicio del mensaje reenviado\s*:)\s*",
    re.IGNORECASE,
)
# A line that starts the quoted message in Outlook's and other clients'
# replies: dashes around a title ("-----Original Message-----",
# "-----Message d'origine-----", "-----Ursprüngliche Nachricht-----",
# "-----Mensaje original-----") or a line of underscores.
_QUOTE_START = re.compile(r"\s*(?:-{3,}[^-\n]{1,40}-{3,}|_{8,})\s*")
# The line above a quoted message that names its author. A line ends with
# the verb and a colon, or the German verb stands before the name and its
# address. The line must start like a reply header or name an address or a
# date, so that "My colleague wrote:" in a customer's text is not one.
_REPLY_VERB = re.compile(
    r"\b(?:wrote|writes|a écrit|schrieb|escribió)\b[^\n]{0,200}:\s*$", re.IGNORECASE,
)
_REPLY_START = re.compile(r"\s*(?:on|le|am|el)\s", re.IGNORECASE)
_ADDRESS_OR_DATE = re.compile(r"@|\d")
# The line that mail programs on phones add below the text. It is no
# separator, so the text of the reply goes on after it.
_MOBILE_SIGNATURE = re.compile(
    r"\s*(?:sent from my|get outlook for|envoyé de mon|envoyé depuis mon|von meinem|gesendet von meinem"
    r"|enviado desde mi)\b[^\n]{0,60}",
    re.IGNORECASE,
)


def is_thanks_only(text: str) -> bool:
    """Return True when the new text of the reply in `text` says only thanks.

    `text` is the plain text of the message, or the text of its HTML part,
    with lines ending in "\n". Text that cannot be read within the limits
    counts as more than thanks.
    """
    start = text[:NEW_TEXT_LIMIT].casefold()
    if not any(stem in start for stem in GRATITUDE_STEMS):
        return False
    new_lines, after = _new_text(text)
    if new_lines is None or not _is_gratitude("\n".join(new_lines)):
        return False
    return not _has_text_between_quotes(text, after)


def _new_text(text: str) -> tuple[list[str] | None, int]:
    """Return the lines before the first quote, reply header or signature, and the offset where the quoted part starts.

    The lines are None when the new text is longer than NEW_TEXT_LIMIT or
    introduces a forwarded message. The offset is -1 when the quoted part is
    not made of "> " lines, as in a signature, an Outlook header block or
    the text of an HTML quote, so nothing below it is read.
    """
    lines: list[str] = []
    size = 0
    start = 0
    while start < len(text):
        stop = text.find("\n", start)
        stop = len(text) if stop < 0 else stop
        line = text[start:stop].rstrip("\r")
        following = _next_line(text, stop + 1)
        if line.lstrip().startswith(">"):
            return lines, start
        if _FORWARDED.fullmatch(line):
            return None, -1
        if _SIGNATURE.fullmatch(line) or _QUOTE_START.fullmatch(line):
            return lines, -1
        if QUOTED_FROM.match(line) and QUOTED_FIELD.match(following):
            return lines, -1
        header = _reply_header_end(line, following, stop + 1)
        if header >= 0:
            return lines, header if _next_line(text, header).lstrip().startswith(">") else -1
        size += len(line) + 1
        if size > NEW_TEXT_LIMIT:
            return None, -1
        if not _MOBILE_SIGNATURE.fullmatch(line):
            lines.append(line)
        start = stop + 1
    return lines, -1


def _next_line(text: str, start: int) -> str:
    stop = text.find("\n", start, start + NEW_TEXT_LIMIT)
    return text[start : stop if stop >= 0 else start + NEW_TEXT_LIMIT].rstrip("\r")


def _reply_header_end(line: str, following: str, following_start: int) -> int:
    """Return where the text after a reply header starting at `line` begins, or -1 when `line` starts none.

    Mail programs wrap a long header, so "On Mon, 1 Dec 2026, Sam Ortiz
    <sam@example.com>" may end on the next line with "wrote:".
    """
    if _is_reply_header(line):
        return following_start
    is_wrapped = _is_reply_header(f"{line} {following}") and not _is_reply_header(following)
    return following_start + len(following) + 1 if following and is_wrapped else -1


def _is_reply_header(line: str) -> bool:
    return bool((_REPLY_START.match(line) or _ADDRESS_OR_DATE.search(line)) and _REPLY_VERB.search(line))


def _has_text_between_quotes(text: str, quote_start: int) -> bool:
    """Return True when a line that is not quoted follows the "> " lines that start at `quote_start`, before a signature.

    A customer who replies between the lines of the team's message writes
    new text below the first quote: "> Did the fix work?" then "No, it
    still fails".
    """
    if quote_start < 0:
        return False
    for line in text[quote_start:].split("\n"):
        line = line.rstrip("\r")
        if _SIGNATURE.fullmatch(line):
            return False
        if line.strip() and not line.lstrip().startswith(">"):
            return True
    return False


def _is_gratitude(new_text: str) -> bool:
    """Return True when `new_text` contains a gratitude phrase and, besides it, only courtesy phrases and a short name."""
    if any(mark in new_text for mark in _QUESTION_MARKS) or any(char.isdigit() for char in new_text):
        return False
    matches = list(_WORD.finditer(new_text))
    if not matches or len(matches) > MAX_WORDS:
        return False
    folded = [match.group().casefold() for match in matches]
    thanked = False
    names = 0
    position = 0
    introducer: tuple[str, ...] = ()  # the gratitude phrase or name introducer just read
    while position < len(folded):
        length, is_gratitude = _longest_phrase(folded, position)
        if length:
            phrase = tuple(folded[position : position + length])
            introducer = phrase if is_gratitude or phrase in NAME_INTRODUCERS else ()
            thanked = thanked or is_gratitude
            position += length
            continue
        length = _name_length(new_text, matches, position, introducer)
        introducer = ()
        if not length or any(word in NOT_THANKS for word in folded[position : position + length]):
            return False
        names += length
        position += length
    return thanked and names <= MAX_NAME_WORDS


# The separator between a name introducer and the name after it: "Hi
# Sam", "Thanks, Sam", and a title's full stop in "Dear Mr. Ortiz".
_BEFORE_NAME = re.compile(r"[ \t\u00a0,]*|\.[ \t\u00a0]*")
# Between the words of one name: "Alice Martin", "Jean-Pierre", "O'Brien",
# and after an initial, "J. Smith".
_WITHIN_NAME = re.compile(r"[ \t\u00a0]+|[-'’]")
_AFTER_INITIAL = re.compile(r"\.[ \t\u00a0]*")


def _name_length(text: str, matches: list[re.Match[str]], position: int, introducer: tuple[str, ...]) -> int:
    """Return how many words from `position` on form a name, or 0 when the words there cannot be one.

    A name is a run of capitalized words, such as "Sam" or "Alice Martin",
    in one of the places where people write names: after a greeting, a
    gratitude phrase or a sign-off (`introducer`, the phrase just before,
    or () when another word is) in the same sentence ("Thanks Sam!"),
    alone on its line ("Best regards" then "Alice"), or at the start of a
    line before a comma ("Sam, thanks!"). A capitalized word that starts a
    sentence is no name, so "Thanks. Refund it." and "Thanks! Cancel My
    Account" say more than thanks. A word in capitals is no name either
    ("Thanks. URGENT"), but a single initial is.
    """
    # NOTE: a capitalized word in a name's place still passes for a name, so
    # "Thanks, Refund" and "Thanks!" above "Refund" alone on a line count as thanks.
    stop = position
    while stop < len(matches) and _is_name_word(matches[stop].group()):
        stop += 1
        if stop < len(matches) and not _joins_name(text[matches[stop - 1].end() : matches[stop].start()], matches[stop - 1]):
            break
    if stop == position:
        return 0

    before = text[matches[position - 1].end() if position else 0 : matches[position].start()]
    after = text[matches[stop - 1].end() : matches[stop].start() if stop < len(matches) else len(text)]
    starts_line = position == 0 or "\n" in before
    if starts_line and ("\n" in after or stop == len(matches) or after.strip().startswith(",")):
        return stop - position
    if not introducer or starts_line or not _BEFORE_NAME.fullmatch(before):
        return 0
    if "." in before and introducer[-1] not in _TITLES:
        return 0
    return stop - position


def _joins_name(between: str, previous: re.Match[str]) -> bool:
    return bool(_WITHIN_NAME.fullmatch(between) or (len(previous.group()) == 1 and _AFTER_INITIAL.fullmatch(between)))


def _is_name_word(word: str) -> bool:
    return word[0].isupper() and (len(word) == 1 or not word.isupper())


# The number of words in the longest phrase of GRATITUDE and COURTESY.
_MAX_PHRASE_WORDS = max(len(phrase) for phrase in GRATITUDE | COURTESY)


def _longest_phrase(words: list[str], position: int) -> tuple[int, bool]:
    """Return the length of the longest phrase at `position` and whether it is a gratitude phrase; (0, False) when none starts there."""
    for length in range(min(_MAX_PHRASE_WORDS, len(words) - position), 0, -1):
        candidate = tuple(words[position : position + length])
        if candidate in GRATITUDE:
            return length, True
        if candidate in COURTESY:
            return length, False
    return 0, False


# Prefixes that mail programs put before the subject of a reply, in the
# languages above and as Outlook writes them in others ("AW:", "SV:").
_REPLY_PREFIX = re.compile(r"\s*(?:re|aw|sv|vs|antw|réf|ref|rif|r)\s*(?:\[\d+\]|\(\d+\))?\s*:\s*", re.IGNORECASE)
# Prefixes of a forwarded message's subject: English, French ("TR:"),
# German ("WG:") and Spanish ("RV:") mail programs.
_FORWARD_PREFIX = re.compile(r"\s*(?:fwd?|tr|wg|rv|enc)\s*:", re.IGNORECASE)


def is_same_matter(subject: str, conversation_subject: str, reference_prefix: str) -> bool:
    """Return True when a reply's `subject` still names the conversation's matter.

    The reply prefixes and our reference tags are left out of both. The
    reply's subject must then be empty or end with the conversation's, as a
    reply to the team's answer or to the acknowledgement does ("Re: We
    received your message: Invoice 1234"). A forwarded message or an edited
    subject is a new matter.
    """
    if _FORWARD_PREFIX.match(subject):
        return False
    reply = _topic(subject, reference_prefix)
    if not reply:
        return True
    topic = _topic(conversation_subject, reference_prefix)
    return bool(topic) and reply.endswith(topic)


def _topic(subject: str, reference_prefix: str) -> str:
    """Return `subject` without our reference tags and leading reply prefixes, in lower case with single spaces."""
    text = without_references(subject, reference_prefix)
    while True:
        prefix = _REPLY_PREFIX.match(text)
        if prefix is None:
            return " ".join(text.casefold().split())
        text = text[prefix.end() :]
