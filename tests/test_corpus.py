"""Conformance over the message corpus: every real-world message crosses the relay byte for byte.

The corpus lives outside the repository. The environment variable
GUARDRAIL_CORPUS names its folder, and CORPUS below shows the default.
"""

from __future__ import annotations

import asyncio
import collections
import email.parser
import email.policy
import email.utils
import os
import re
import smtplib
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import maildir_messages, wait_until, write_config

CORPUS = Path(os.environ.get("GUARDRAIL_CORPUS") or Path(__file__).resolve().parents[2] / "shared" / "corpus")
MANIFEST_COLUMNS = ["file", "category", "expect_ack", "is_reply", "source_repo", "source_path", "license", "note"]
RECIPIENT = "support@example.org"
CONNECTIONS = 4

# The lines Transport.send and trace_headers put in front of a message delivered
# to a maildir, in order: Return-Path, Received (three lines), then our own three.
PREPENDED_PREFIXES = (
    b"Return-Path: <",
    b"Received: from ",
    b"\tby mx.test.example (guardrail) with ESMTP id ",
    b"\tfor <",
    b"X-Guardrail-Conversation: ",
    b"X-Guardrail-Route: ",
    b"X-Guardrail-Loop: mx.test.example",
)

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
# Only a plain address (no spaces, quotes, brackets or other RFC 5322 specials) serves as an envelope sender.
_PLAIN_ADDRESS = re.compile(r"[^@\s<>()\",;:\\\[\]]+@[^@\s<>()\",;:\\\[\]]+")


@dataclass(frozen=True)
class CorpusMessage:
    name: str
    wire: bytes  # CRLF line endings and a final CRLF, as an MTA sends it before dot-stuffing
    sender: str  # "" for the null sender


def _corpus_folder() -> Path:
    if CORPUS.is_dir():
        return CORPUS
    reason = f"message corpus folder {str(CORPUS)!r} not found; set GUARDRAIL_CORPUS to the corpus folder"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _read_manifest(folder: Path) -> list[dict[str, str]]:
    lines = (folder / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    assert header == MANIFEST_COLUMNS, f"unexpected MANIFEST.tsv header: {header}"
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line]


def to_wire(raw: bytes) -> bytes:
    """Return `raw` with CRLF, bare LF and bare CR all turned into CRLF, ending in CRLF."""
    wire = _LINE_ENDING.sub(b"\r\n", raw)
    if not wire.endswith(b"\r\n"):
        # smtplib adds this CRLF before the final dot too, so it is part of what the server stores.
        wire += b"\r\n"
    return wire


def envelope_sender(wire: bytes) -> str:
    """Return the first From address of a message, or "" when none can serve as an envelope sender."""
    headers = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(wire, headersonly=True)
    values = headers.get_all("From") or []
    if not values:
        return ""
    value = str(values[0])
    if any("\udc80" <= char <= "\udcff" for char in value):
        # The parser returns raw 8-bit header bytes as surrogate escapes, and the corpus writes them in UTF-8.
        value = value.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    for _, address in email.utils.getaddresses([value]):
        if _PLAIN_ADDRESS.fullmatch(address):
            return address
    return ""


@pytest.fixture(scope="module")
def corpus() -> list[CorpusMessage]:
    folder = _corpus_folder()
    messages = []
    for entry in _read_manifest(folder):
        wire = to_wire((folder / entry["file"]).read_bytes())
        messages.append(CorpusMessage(entry["file"], wire, envelope_sender(wire)))
    return messages


def test_manifest_files_all_exist() -> None:
    folder = _corpus_folder()
    missing = [entry["file"] for entry in _read_manifest(folder) if not (folder / entry["file"]).is_file()]

    assert missing == []


def test_every_corpus_file_in_manifest() -> None:
    folder = _corpus_folder()
    listed = {entry["file"] for entry in _read_manifest(folder)}
    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*.eml")}

    assert sorted(present - listed) == []


def test_manifest_lists_each_file_once() -> None:
    names = [entry["file"] for entry in _read_manifest(_corpus_folder())]

    duplicates = [name for name, count in collections.Counter(names).items() if count > 1]
    assert duplicates == []


def _send_share(port: int, messages: list[CorpusMessage]) -> dict[str, tuple[int, str]]:
    """Send `messages` over one connection and return each one's last reply by file name."""
    replies: dict[str, tuple[int, str]] = {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.test.example", timeout=30) as client:
        client.ehlo()
        for item in messages:
            options = [] if item.sender.isascii() else ["SMTPUTF8"]
            steps = (lambda: client.mail(item.sender, options), lambda: client.rcpt(RECIPIENT), lambda: client.data(item.wire))
            for step in steps:
                try:
                    code, text = step()
                except smtplib.SMTPResponseException as error:
                    code, text = error.smtp_code, error.smtp_error
                replies[item.name] = (code, text.decode("utf-8", "replace"))
                if code not in (250, 251):
                    client.rset()
                    break
    return replies


def _unstamped(delivered: bytes) -> tuple[list[bytes], bytes]:
    """Split a delivered file into the lines guardrail prepended and the message after them."""
    lines = delivered.split(b"\r\n", len(PREPENDED_PREFIXES))
    return lines[:-1], lines[-1]


async def test_every_corpus_message_delivered_unchanged(tmp_path: Path, start_daemon, corpus: list[CorpusMessage]) -> None:
    daemon = await start_daemon(write_config(tmp_path))
    # Copies with the same envelope and bytes share a Message-ID too, so intake
    # stores the first and replies to the others that they are duplicates.
    copies: dict[tuple[str, bytes], list[str]] = collections.defaultdict(list)
    for item in corpus:
        copies[(item.sender, item.wire)].append(item.name)
    expected = collections.Counter(wire for _, wire in copies)
    extra_copies = [names for names in copies.values() if len(names) > 1]

    shares = [corpus[index::CONNECTIONS] for index in range(CONNECTIONS)]
    replies: dict[str, tuple[int, str]] = {}
    for share in await asyncio.gather(*(asyncio.to_thread(_send_share, daemon.port, share) for share in shares)):
        replies.update(share)

    not_accepted = {name: reply for name, reply in replies.items() if reply[0] != 250}
    assert not_accepted == {}
    assert len(replies) == len(corpus)
    for names in extra_copies:
        duplicate_replies = [name for name in names if "already queued" in replies[name][1]]
        assert len(duplicate_replies) == len(names) - 1, f"replies to identical files {names}: {[replies[n] for n in names]}"

    maildirs = [tmp_path / "var" / "maildir" / team for team in ("support", "billing")]

    def delivered() -> list[bytes]:
        return [content for folder in maildirs for content in maildir_messages(folder)]

    # Generous for a machine that runs other suites at the same time; an idle one needs 2 to 4 s.
    try:
        await wait_until(lambda: len(delivered()) >= len(copies), timeout=60, what=f"{len(copies)} deliveries")
    except AssertionError as error:
        raise AssertionError(f"{error}; {len(delivered())} delivered") from None
    stamped = [_unstamped(content) for content in delivered()]
    senders = {wire: sender for sender, wire in copies}
    for prepended, original in stamped:
        assert [line[: len(prefix)] for line, prefix in zip(prepended, PREPENDED_PREFIXES)] == list(PREPENDED_PREFIXES)
        if original in senders:
            assert prepended[0] == f"Return-Path: <{senders[original]}>".encode()
    arrived = collections.Counter(original for _, original in stamped)
    missing = sorted(name for (_, wire), names in copies.items() if arrived[wire] < expected[wire] for name in names)
    assert missing == []
    unexpected = [original[:80] for original in arrived if original not in expected]
    assert unexpected == []
    assert arrived == expected

    stored = await daemon.store.fetch_all("SELECT COUNT(*) FROM messages")
    assert stored[0][0] == len(copies)

    async def deliveries_recorded() -> bool:
        rows = await daemon.store.fetch_all("SELECT COUNT(*) FROM outbox WHERE kind = 'deliver' AND state != 'done'")
        return rows[0][0] == 0

    # A file is in new/ before its outbox row is marked done, in the commit after its batch's fsync,
    # so on a busy machine the last batch's rows may still be pending here.
    await wait_until(deliveries_recorded, timeout=30, what="every delivery recorded as done")
    outbox = await daemon.store.fetch_all("SELECT state, COUNT(*) FROM outbox WHERE kind = 'deliver' GROUP BY state")
    assert dict((state, count) for state, count in outbox) == {"done": len(copies)}

    print(
        f"\ncorpus: {len(corpus)} files sent, {len(replies) - len(not_accepted)} got 250,"
        f" {sum(arrived.values())} delivered unchanged; identical files stored once: {extra_copies}"
    )


# Messages whose label we disagree with, and why. Every other message must be
# acknowledged exactly when its label says so.
LABEL_DISAGREEMENTS = {
    # A role or robot sender: an acknowledgement to it reaches nobody, or
    # a robot that may answer back.
    "charset/freescout-message-5-iso-2022-jp.eml": "sender noreply@ is a no-reply address",
    "malformed/rubymail-encoding_madness.eml": "sender no-reply@ is a no-reply address",
    "malformed/rubymail-raw_email_trailing_dot.eml": "envelope sender noreply@ is a no-reply address",
    "malformed/flanker-long-links.eml": "sender postmaster@ is a role address that auto-responders never answer",
    # No header, sender or subject marks this bulk mail; only its body does,
    # and body heuristics would also silence customers who write "unsubscribe".
    "list-bulk/phpmmp-issue230.eml": "bulk mail without any machine signal in its headers",
}
_RETURN_PATH = re.compile(rb"^Return-Path:[ \t]*<?([^>\r\n]*)>?", re.IGNORECASE | re.MULTILINE)


def mta_envelope_sender(item: CorpusMessage) -> str:
    """Return the envelope sender an MTA would hand us: the Return-Path it recorded, else the From address."""
    header_end = item.wire.find(b"\r\n\r\n")
    match = _RETURN_PATH.search(item.wire[: header_end if header_end >= 0 else None])
    if match:
        address = match.group(1).decode("utf-8", "replace").strip()
        return "" if address.lower() in ("", "mailer-daemon") and "@" not in address else address
    return item.sender


async def test_corpus_acknowledgements_match_labels(tmp_path: Path, start_daemon, corpus: list[CorpusMessage]) -> None:
    labels = {entry["file"]: entry["expect_ack"] == "yes" for entry in _read_manifest(_corpus_folder())}
    daemon = await start_daemon(write_config(tmp_path, sections={"acknowledgements": {"max_per_sender": 1000}}))

    decisions: dict[str, tuple[str, str]] = {}
    for item in corpus:
        sender = mta_envelope_sender(item)
        replies = await asyncio.to_thread(_send_share, daemon.port, [CorpusMessage(item.name, item.wire, sender)])
        assert replies[item.name][0] == 250, replies
        if "already queued" in replies[item.name][1]:
            decisions[item.name] = ("duplicate", "identical to an earlier file")
            continue
        rows = await daemon.store.fetch_all(
            "SELECT decision, signal FROM acknowledgements WHERE message_row = (SELECT MAX(id) FROM messages)"
        )
        decisions[item.name] = rows[0] if rows else ("none", "no decision stored")

    # A reply whose parent came earlier in the corpus joins that conversation
    # and is rightly not acknowledged; sent alone, it opens one of its own.
    for item in corpus:
        if decisions[item.name][1] != "follow-up in an existing conversation":
            continue
        alone = await start_daemon(write_config(tmp_path / item.name.replace("/", "_")))
        await asyncio.to_thread(_send_share, alone.port, [CorpusMessage(item.name, item.wire, mta_envelope_sender(item))])
        rows = await alone.store.fetch_all("SELECT decision, signal FROM acknowledgements")
        decisions[item.name] = rows[0]

    wrong = {
        name: (labels[name], decision)
        for name, decision in decisions.items()
        if (decision[0] == "sent") != labels[name] and name not in LABEL_DISAGREEMENTS
    }
    assert wrong == {}
    disagreements = {name for name, decision in decisions.items() if (decision[0] == "sent") != labels[name]}
    assert disagreements == set(LABEL_DISAGREEMENTS)

    sent = sum(1 for decision, _ in decisions.values() if decision == "sent")
    by_signal = collections.Counter(
        re.sub(r" \S+@\S+ ", " ADDRESS ", signal) for decision, signal in decisions.values() if decision != "sent"
    )
    print(f"\nacknowledgements: {sent} sent, {sum(labels.values())} expected by the labels, "
          f"{len(decisions) - sent} not sent; {len(LABEL_DISAGREEMENTS)} label disagreements")
    for signal, count in by_signal.most_common():
        print(f"  suppressed {count:3} x {signal}")
