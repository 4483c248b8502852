"""Authentication-Results: reading the header, and which sender domains it verifies."""

from __future__ import annotations

import pytest

from guardrail.authresults import (
    MethodResult,
    is_verified,
    parse_authentication_results,
    verified_domains,
)

MX = "mx.example.org"


@pytest.mark.parametrize(("value", "authserv_id", "results"), [
    ("mx.example.org; none", "mx.example.org", []),
    ("MX.Example.ORG 1; spf=pass smtp.mailfrom=a@example.com", "mx.example.org",
     [MethodResult("spf", "pass", {"smtp.mailfrom": "a@example.com"})]),
    # Comments, nested ones too, and folded lines are left out.
    ("mx.example.org (Postfix; v1);\r\n\tdkim=pass (2048-bit key (rsa)) header.d=example.com header.i=@example.com header.b=Ab12;"
     " dmarc=fail (p=reject dis=none) header.from=example.com",
     "mx.example.org",
     [MethodResult("dkim", "pass", {"header.d": "example.com", "header.i": "@example.com", "header.b": "Ab12"}),
      MethodResult("dmarc", "fail", {"header.from": "example.com"})]),
    # A method version, upper case and a quoted value.
    ('mx.example.org; DKIM/1=PASS header.d="example.com"', "mx.example.org",
     [MethodResult("dkim", "pass", {"header.d": "example.com"})]),
    # A parenthesis inside a quoted string is not a comment.
    ('mx.example.org; spf=pass smtp.mailfrom="a(b)@example.com"', "mx.example.org",
     [MethodResult("spf", "pass", {"smtp.mailfrom": "a(b)@example.com"})]),
    # A quoted local part may hold ";", "=" and spaces, which split nothing there.
    ('mx.example.org; spf=pass smtp.mailfrom="x; dkim=pass header.d=example.org a.b="@evil.example', "mx.example.org",
     [MethodResult("spf", "pass", {"smtp.mailfrom": '"x; dkim=pass header.d=example.org a.b="@evil.example'})]),
    ('mx.example.org; dkim=pass reason="good key; \\"aligned\\"" header.d=example.com', "mx.example.org",
     [MethodResult("dkim", "pass", {"header.d": "example.com"})]),
    # A reason and unreadable statements are skipped.
    ("mx.example.org; garbage; dmarc=pass reason=\"aligned\" header.from=example.com;;", "mx.example.org",
     [MethodResult("dmarc", "pass", {"header.from": "example.com"})]),
    ("", "", []),
])
def test_parse_table(value: str, authserv_id: str, results: list[MethodResult]) -> None:
    assert parse_authentication_results(value) == (authserv_id, results)


NO_HEADER = "no Authentication-Results header from mx.example.org"


@pytest.mark.parametrize(("values", "domains", "problem"), [
    # DMARC names the From domain, DKIM the signing domain, SPF the envelope sender's domain.
    (("mx.example.org; dmarc=pass header.from=Example.COM",), {"example.com"}, ""),
    (("mx.example.org; dkim=pass header.d=mail.example.com",), {"mail.example.com"}, ""),
    (("mx.example.org; dkim=pass header.i=@example.com",), {"example.com"}, ""),
    (("mx.example.org; spf=pass smtp.mailfrom=bounce@example.com",), {"example.com"}, ""),
    (("mx.example.org; spf=pass smtp.mailfrom=example.com",), {"example.com"}, ""),
    (("mx.example.org; spf=pass smtp.helo=mail.example.com",), set(), ""),
    # Only a pass verifies.
    (("mx.example.org; dkim=fail header.d=example.com; spf=softfail smtp.mailfrom=a@example.com; dmarc=none",), set(), ""),
    (("mx.example.org; dkim=pass header.d=a.example; dkim=pass header.d=b.example",), {"a.example", "b.example"}, ""),
    # Another server's header proves nothing.
    (("relay.example.net; dmarc=pass header.from=example.com",), set(), NO_HEADER),
    (("relay.example.net; dmarc=pass header.from=evil.example",
      "mx.example.org; dkim=pass header.d=example.com"), {"example.com"}, ""),
    # A sender's address quoted in the header verifies its own domain and no other.
    (('mx.example.org; spf=pass smtp.mailfrom="x;dmarc=pass header.from=example.com a.b="@evil.example;'
      " dmarc=fail header.from=example.com",), {"evil.example"}, ""),
    # A second header with our id may be the sender's, wherever it is.
    (("mx.example.org; dmarc=pass header.from=example.com", "MX.example.org; dmarc=fail header.from=example.com"), set(),
     "2 Authentication-Results headers name mx.example.org, so a sender may have added one"),
    ((), set(), NO_HEADER),
])
def test_verified_domains_table(values: tuple[str, ...], domains: set[str], problem: str) -> None:
    assert verified_domains(values, MX) == (domains, problem)


@pytest.mark.parametrize(("address", "domains", "verified"), [
    ("sam@example.com", {"example.com"}, True),
    ("Sam@EXAMPLE.com", {"example.com"}, True),
    # A verified parent domain covers its subdomains, and not the other way round.
    ("sam@eu.example.com", {"example.com"}, True),
    ("sam@example.com", {"eu.example.com"}, False),
    ("sam@badexample.com", {"example.com"}, False),
    ("sam@example.com", set(), False),
    ("", {"example.com"}, False),
])
def test_is_verified_table(address: str, domains: set[str], verified: bool) -> None:
    assert is_verified(address, frozenset(domains)) is verified
