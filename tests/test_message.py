"""Summaries of malformed and unusual messages never raise and keep what can be read."""

from __future__ import annotations

import email.utils
from datetime import timedelta
from pathlib import Path

import pytest

from guardrail.delivery import clean_header_value, retry_delay
from guardrail.errors import TemporaryDeliveryError
from guardrail.maildir import write_maildirs
from guardrail.message import parse_addresses, summarize


@pytest.mark.parametrize(
    ("raw", "field", "expected"),
    [
        (b"From: =?utf-8?q?Ren=C3=A9?= <rene@example.com>\r\n\r\nx", "from_name", "René"),
        (b"From: Ren\xc3\xa9 <Rene@Example.com>\r\n\r\nx", "from_address", "rene@example.com"),
        (b"Subject: caf\xe9 latin-1 bytes\r\n\r\nx", "subject", "café latin-1 bytes"),
        (b"Subject: caf\xc3\xa9 UTF-8 bytes\r\n\r\nx", "subject", "café UTF-8 bytes"),
        (b"From: Ren\xc3\xa9 <rene@example.com>\r\n\r\nx", "from_name", "René"),
        (b"Subject: =?x-unknown-charset?q?abc?=\r\n\r\nx", "subject", "abc"),
        (b"Subject: line one\r\n  folded\r\n\r\nx", "subject", "line one folded"),
        (b"To: a@example.com, \"B, Jr\" <b@example.com>\r\n\r\nx", "to", ("a@example.com", "b@example.com")),
        (b"Message-ID: junk <id@x> more\r\n\r\nx", "message_id", "<id@x>"),
        (b"Message-ID: no brackets\r\n\r\nx", "message_id", ""),
        (b"In-Reply-To: <a@x>\r\nReferences: <r1@x>\r\n <r2@x>\r\n\r\nx", "references", ("<r1@x>", "<r2@x>")),
        (b"In-Reply-To: <a@x>\r\n <b@x>\r\n\r\nx", "in_reply_to", ("<a@x>", "<b@x>")),
        # A References header longer than the decoding limit keeps its newest ids, which come last.
        (
            b"References: " + b"\r\n ".join(b"<r%d@example.com>" % number for number in range(5000)) + b"\r\n\r\nx",
            "references",
            tuple(f"<r{number}@example.com>" for number in range(5000)),
        ),
        (b"Subject: no from at all\r\n\r\nx", "from_address", ""),
        (b"", "subject", ""),
        (b"\r\n\r\n\r\n", "subject", ""),
        (b"Received: a\r\nReceived: b\r\n\r\nx", "received_count", 2),
        # Encoded display names are decoded only after the address is parsed.
        (b"From: =?utf-8?q?sam=40example.org?= <mallory@example.net>\r\n\r\nx", "from_address", "mallory@example.net"),
        (b"From: =?utf-8?q?x=0D=0ABcc:_evil@example.net?= <alice@example.com>\r\n\r\nx", "from_address", "alice@example.com"),
        (b"From: =?utf-8?q?P=C3=A9rez=2C_Jos=C3=A9?= <jose@example.com>\r\n\r\nx", "from_name", "Pérez, José"),
        (b"To: =?utf-8?q?a=2C_b?= <ab@example.com>, c@example.com\r\n\r\nx", "to", ("ab@example.com", "c@example.com")),
        # Quotes inside a display name are part of it. A pair around the whole decoded name is not.
        (b'From: "Doe, John \\"JJ\\"" <jd@example.com>\r\n\r\nx', "from_name", 'Doe, John "JJ"'),
        (b'From: "\\"JJ\\" Doe" <jd@example.com>\r\n\r\nx', "from_name", '"JJ" Doe'),
        (b'From: jd@example.com (John "JJ" Doe)\r\n\r\nx', "from_name", 'John "JJ" Doe'),
        (b"From: =?utf-8?q?=22Ren=C3=A9=22?= <rene@example.com>\r\n\r\nx", "from_name", "René"),
        # An encoded word that does not decode stays as written, and the others still decode.
        (b"Subject: Re: =?utf-8?B?####?= =?utf-8?Q?caf=C3=A9?=\r\n\r\nx", "subject", "Re: =?utf-8?B?####?= café"),
        (b"Subject: =?utf-8?B?w6nD?=\r\n\r\nx", "subject", "=?utf-8?B?w6nD?="),
        (b"From: =?utf-8?B?w6nD?= <rene@example.com>\r\n\r\nx", "from_name", "=?utf-8?B?w6nD?="),
    ],
)
def test_summary_fields(raw: bytes, field: str, expected: object) -> None:
    assert getattr(summarize(raw), field) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\nSMOpbGxv\r\n", "Héllo"),
        (b"Content-Type: text/plain; charset=nonsense-8\r\n\r\nplain\r\n", "plain\r\n"),
        (
            b"Content-Type: multipart/alternative; boundary=B\r\n\r\n--B\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n"
            b"--B\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"caf=E9\r\n--B--\r\n",
            "café",
        ),
        # A boundary that never appears: the parser must not raise.
        (b"Content-Type: multipart/mixed; boundary=NEVER\r\n\r\nbody without parts\r\n", ""),
        (b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter\r\n", ""),
    ],
)
def test_body_text_decoding(raw: bytes, expected: str) -> None:
    assert summarize(raw).body_text.strip() == expected.strip()


@pytest.mark.parametrize(
    "value",
    [
        "casey@example.net",
        "Casey Customer <Casey@Example.NET>",
        "Casey   Customer\t<casey@example.net>",
        "<casey@example.net>",
        "a@example.net, B Two <b.two+tag@mail.example.org>,c@example.com",
        # These need the full parser: quotes, comments, groups, encoded words,
        # an "@" in the display name, a domain literal, an empty list entry.
        '"Customer, Casey" <casey@example.net>',
        "casey@example.net (Casey Customer)",
        "J. Doe <j@example.net>",
        "undisclosed-recipients:;",
        '"=?utf-8?q?Ren=C3=A9?=" <rene@example.net>',
        "alice@example.org <bob@example.org>",
        "user@[192.0.2.1]",
        "a@example.net,,b@example.net",
        "a..b@example.net",
        "",
        # Only spaces, tabs and line breaks separate words.
        "Casey\xa0Customer <casey@example.net>",
        "casey@example.net\x0b",
        "\x85casey@example.net",
        "Casey\r\n Customer <casey@example.net>",
    ],
)
def test_parse_addresses_agrees_with_the_email_package(value: str) -> None:
    assert parse_addresses([value]) == email.utils.getaddresses([value])


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["a@example.net", "B <b@example.net>"],
        # A comment opened in one value runs into the next.
        ["a@example.net (comment", "c@example.net"],
        ["group: a@example.net", "c@example.net;"],
    ],
)
def test_parse_addresses_joins_values(values: list[str]) -> None:
    assert parse_addresses(values) == email.utils.getaddresses(values)


def test_headers_only_summary_skips_body() -> None:
    assert summarize(b"Subject: s\r\n\r\nbody", with_body=False).body_text == ""


@pytest.mark.parametrize("with_body", [True, False])
@pytest.mark.parametrize("spaced", [b"Auto-Submitted : auto-replied", b"Auto-Submitted\t: auto-replied", b"Auto-Submitted \t : auto-replied"])
def test_space_before_colon_keeps_later_headers(spaced: bytes, with_body: bool) -> None:
    # RFC 5322 obsolete syntax: white space between a field name and its colon.
    raw = b"From: A <a@example.com>\r\n" + spaced + b"\r\nSubject : Re : hello\r\nTo: s@example.org\r\n\r\nNote : kept\r\n"
    summary = summarize(raw, with_body=with_body)
    assert summary.headers["auto-submitted"] == ("auto-replied",)
    assert summary.subject == "Re : hello"
    assert summary.to == ("s@example.org",)
    assert summary.body_text == ("Note : kept\n" if with_body else "")


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 20])
def test_retry_delay_grows_and_stays_capped(attempt: int) -> None:
    initial, maximum = timedelta(seconds=30), timedelta(hours=1)
    delay = retry_delay(attempt, initial, maximum)
    assert delay <= maximum
    assert delay >= min(initial * 2 ** (attempt - 1), maximum)


def test_clean_header_value_removes_line_breaks() -> None:
    assert clean_header_value("a\r\nBcc: x@y\x00") == "a  Bcc: x@y "


def test_maildir_write_is_idempotent(tmp_path: Path) -> None:
    assert write_maildirs([(tmp_path / "box", "1.G1.host", b"one")]) == [True]
    assert write_maildirs([(tmp_path / "box", "1.G1.host", b"one")]) == [False]
    assert [path.name for path in (tmp_path / "box" / "new").iterdir()] == ["1.G1.host"]
    assert list((tmp_path / "box" / "tmp").iterdir()) == []


def test_maildir_name_collision_keeps_both(tmp_path: Path) -> None:
    # Two databases that deliver to one folder can give different messages the same name.
    assert write_maildirs([(tmp_path / "box", "1.G1.host", b"one")]) == [True]
    assert write_maildirs([(tmp_path / "box", "1.G1.host", b"two"), (tmp_path / "box", "1.G1.host", b"three")]) == [True, True]
    # Written again, each message is found under the name it got.
    assert write_maildirs([(tmp_path / "box", "1.G1.host", b"three"), (tmp_path / "box", "1.G1.host", b"two")]) == [False, False]

    new = tmp_path / "box" / "new"
    contents = {path.name: path.read_bytes() for path in new.iterdir()}
    assert contents["1.G1.host"] == b"one"
    assert sorted(contents) == ["1.G1.host", "1.G1.host.1", "1.G1.host.2"]
    assert sorted(contents.values()) == [b"one", b"three", b"two"]
    assert list((tmp_path / "box" / "tmp").iterdir()) == []


def test_maildir_file_has_lf_line_endings(tmp_path: Path) -> None:
    data = b"Subject: hi\r\n\r\nline one\r\n\r\nline three\r\n"
    assert write_maildirs([(tmp_path / "box", "1.G1.host", data)]) == [True]
    assert (tmp_path / "box" / "new" / "1.G1.host").read_bytes() == b"Subject: hi\n\nline one\n\nline three\n"
    # The same message again, as a retried delivery sends it, adds no copy.
    assert write_maildirs([(tmp_path / "box", "1.G1.host", data)]) == [False]
    assert [path.name for path in (tmp_path / "box" / "new").iterdir()] == ["1.G1.host"]


def test_maildir_crlf_file_counts_as_written(tmp_path: Path) -> None:
    # A file an earlier version wrote with CRLF, found again when a delivery is retried after an upgrade.
    data = b"Subject: hi\r\n\r\nbody\r\n"
    (tmp_path / "box" / "new").mkdir(parents=True)
    (tmp_path / "box" / "new" / "1.G1.host").write_bytes(data)
    assert write_maildirs([(tmp_path / "box", "1.G1.host", data)]) == [False]
    assert [path.name for path in (tmp_path / "box" / "new").iterdir()] == ["1.G1.host"]


def test_maildir_crlf_file_under_numbered_name_counts(tmp_path: Path) -> None:
    # Another message took NAME, so an earlier version wrote this one with CRLF as NAME.1.
    data = b"Subject: hi\r\n\r\nbody\r\n"
    new = tmp_path / "box" / "new"
    new.mkdir(parents=True)
    (new / "1.G1.host").write_bytes(b"Subject: other\n\nbody\n")
    (new / "1.G1.host.1").write_bytes(data)
    assert write_maildirs([(tmp_path / "box", "1.G1.host", data)]) == [False]
    assert sorted(path.name for path in new.iterdir()) == ["1.G1.host", "1.G1.host.1"]
    assert list((tmp_path / "box" / "tmp").iterdir()) == []


def test_maildir_batch_leaves_no_temporary_files(tmp_path: Path) -> None:
    write_maildirs([(tmp_path / "box", "1.G1.host", b"message 1")])
    files = [(tmp_path / "box", f"1.G{row}.host", b"message %d" % row) for row in range(1, 40)]

    results = write_maildirs(files)

    assert results == [False] + [True] * 38
    assert sorted(path.name for path in (tmp_path / "box" / "new").iterdir()) == sorted(name for _, name, _ in files)
    assert (tmp_path / "box" / "new" / "1.G7.host").read_bytes() == b"message 7"
    assert list((tmp_path / "box" / "tmp").iterdir()) == []


def test_maildir_batch_reports_each_file(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a maildir folder should be")
    files = [
        (tmp_path / "a", "1.G1.host", b"one"),
        (blocked, "1.G2.host", b"two"),
        (tmp_path / "b", "1.G3.host", b"three"),
        (tmp_path / "a", "1.G1.host", b"one"),
    ]

    results = write_maildirs(files)

    assert results[0] is True
    assert isinstance(results[1], TemporaryDeliveryError)
    assert str(results[1]).startswith(f"writing to maildir {blocked} failed: ")
    assert results[2] is True
    assert results[3] is False
    assert (tmp_path / "a" / "new" / "1.G1.host").read_bytes() == b"one"
    assert (tmp_path / "b" / "new" / "1.G3.host").read_bytes() == b"three"
