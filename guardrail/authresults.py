"""Authentication-Results (RFC 8601): which sender domains the MTA in front of guardrail verified.

guardrail does not check SPF, DKIM or DMARC itself. An MTA in front of it
does, and records its findings in an Authentication-Results header named by
its authserv-id. When the rules name that id (`[staff] authserv_id`), a
message counts as staff mail only if its one such header shows a pass for
the sender's domain. A pass is `dmarc=pass` for the From domain,
`dkim=pass` for the signing domain, or `spf=pass` for the envelope sender's
domain. The functions here are pure and read only header text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Results that verify a domain, by method, and the property that names the domain.
_DOMAIN_PROPERTIES = {
    "dmarc": ("header.from",),
    "dkim": ("header.d", "header.i"),
    # A HELO check verifies the host that connected, not the sender.
    "spf": ("smtp.mailfrom",),
}


@dataclass(frozen=True)
class MethodResult:
    """One `method=result` entry of an Authentication-Results header, with its properties."""

    method: str
    result: str
    properties: dict[str, str] = field(default_factory=dict)


def _without_comments(text: str) -> str:
    """Return `text` with its parenthesised comments removed, nested ones included, outside quoted strings."""
    output: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            escaped = False
            if depth == 0:
                output.append(char)
            continue
        if char == "\\":
            escaped = True
            if depth == 0:
                output.append(char)
            continue
        if quoted:
            quoted = char != '"'
            output.append(char)
        elif char == '"' and depth == 0:
            quoted = True
            output.append(char)
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
            output.append(" ")
        elif depth == 0:
            output.append(char)
    return "".join(output)


def _split_outside_quotes(text: str, separator: str | None) -> list[str]:
    """Split `text` at `separator` (at runs of whitespace when None), except inside quoted strings.

    A property value is often an address the sender chose, and a quoted
    local part may hold ";", "=" and spaces. Split inside it, such a value
    would read as further method results.
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            # As in _without_comments, a backslash takes the next character as it is.
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted and (char == separator if separator else char.isspace()):
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts if separator else [part for part in parts if part]


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def parse_authentication_results(value: str) -> tuple[str, list[MethodResult]]:
    """Return the authserv-id (lower case) and the method results of one header value.

    Entries that cannot be read are left out, so a damaged header verifies nothing.
    """
    statements = _split_outside_quotes(_without_comments(value), ";")
    head = statements[0].split()
    authserv_id = head[0].lower() if head else ""
    results = []
    for statement in statements[1:]:
        tokens = _split_outside_quotes(statement, None)
        if not tokens or "=" not in tokens[0]:
            continue
        method, _, result = tokens[0].partition("=")
        properties = {}
        for token in tokens[1:]:
            name, equals, property_value = token.partition("=")
            if equals and "." in name:
                properties[name.lower()] = _unquoted(property_value)
        results.append(MethodResult(method.partition("/")[0].lower(), result.lower(), properties))
    return authserv_id, results


def verified_domains(values: tuple[str, ...], authserv_id: str) -> tuple[frozenset[str], str]:
    """Return the domains that the header by `authserv_id` shows as passed, in lower case, and why none can be read.

    An MTA may remove, from incoming mail, any header that claims its own
    id. Where it keeps them, a sender can add one, and MTAs differ in where
    they put their own header. So exactly one header with the id must be
    there, and with two or more nothing is verified.
    """
    expected_id = authserv_id.lower()
    found = [results for found_id, results in map(parse_authentication_results, values) if found_id == expected_id]
    if not found:
        return frozenset(), f"no Authentication-Results header from {authserv_id}"
    if len(found) > 1:
        return frozenset(), f"{len(found)} Authentication-Results headers name {authserv_id}, so a sender may have added one"
    domains = set()
    for entry in found[0]:
        if entry.result != "pass":
            continue
        for name in _DOMAIN_PROPERTIES.get(entry.method, ()):
            domain = entry.properties.get(name, "").rpartition("@")[2].strip().strip(".").lower()
            if domain:
                domains.add(domain)
                break
    return frozenset(domains), ""


def is_verified(address: str, domains: frozenset[str]) -> bool:
    """Return True when the domain of `address` is one of `domains` or a subdomain of one.

    A verified parent domain covers its subdomains, as DMARC's relaxed
    alignment does within one organisation. A verified subdomain does not
    cover its parent, because without the public suffix list a subdomain
    may belong to someone else, as on a hosting provider's domain.
    """
    domain = address.rpartition("@")[2].strip().strip(".").lower()
    if not domain or not domains:
        return False
    return any(domain == verified or domain.endswith("." + verified) for verified in domains)
