"""Load and validate the daemon's TOML configuration file.

Relative paths in the file are resolved against the file's own folder, so the
daemon behaves the same whatever its working directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import stat
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from .errors import ConfigError, ConfigErrors
from .lists import is_list_identifier
from .loops import DEFAULT_SENDER_PATTERNS
from .tomlcheck import Table, read_toml, toml_text


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


# RFC 6750 section 2.1: the characters a bearer token may contain.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Below this much free space on the database's file system, MAIL gets 452.
# It leaves room for a message of the default maximum size that arrives
# without SIZE: its bytes go to the WAL, the database file and a maildir.
DEFAULT_MIN_FREE_SPACE = 128 * 1024**2
MIN_TOKEN_LENGTH = 16

# A domain name as RFC 5321 section 4.1.2 defines it, with labels of ASCII
# letters, digits and inner hyphens joined by dots. An IDN is written as its A-label.
_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_DOMAIN_LENGTH = 253

# Every SQLite 3 database file starts with these 16 bytes.
SQLITE_HEADER = b"SQLite format 3\x00"


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP listener for health, metrics and the JSON API."""

    enabled: bool = True
    listen: str = "127.0.0.1"
    port: int = 8025
    token: Secret | None = None  # None: every endpoint but /healthz returns 401


@dataclass(frozen=True)
class SmtpSettings:
    first_inbox: str  # the first address listed in inboxes
    listen: str
    port: int
    hostname: str
    inboxes: frozenset[str]
    inbox_domains: frozenset[str]
    max_message_size: int
    max_recipients: int
    max_received_headers: int
    max_connections: int
    timeout: timedelta
    data_timeout: timedelta
    parse_processes: int = 0
    max_connections_per_client: int = 0  # connections from one IP address at once, or 0 for no limit
    tls_certificate: Path | None = None  # PEM chain offered with STARTTLS; None offers no STARTTLS
    tls_key: Path | None = None
    # List-Id identifiers of the groups and lists that forward people's mail to us, lower case.
    inbox_lists: frozenset[str] = frozenset()

    @property
    def local_domains(self) -> frozenset[str]:
        """Domains we receive mail for: those of the inboxes and `inbox_domains`."""
        domains = {address.rpartition("@")[2] for address in self.inboxes}
        return frozenset(domains | self.inbox_domains)


@dataclass(frozen=True)
class Smarthost:
    host: str
    port: int
    starttls: bool
    username: str | None
    password: Secret | None
    timeout: timedelta


@dataclass(frozen=True)
class DeliverySettings:
    retry_initial: timedelta
    retry_max: timedelta
    give_up_after: timedelta
    concurrency: int
    return_path: str


@dataclass(frozen=True)
class AcknowledgementSettings:
    max_per_sender: int
    window: timedelta
    sender_patterns: tuple[re.Pattern[str], ...]


@dataclass(frozen=True)
class WebhookSettings:
    timeout: timedelta
    attempts: int
    retry_initial: timedelta
    retry_max: timedelta


@dataclass(frozen=True)
class ZombieSettings:
    """When a route that keeps receiving mail counts as unanswered."""

    conversations: int  # how many of the route's newest conversations are looked at
    min_answered_share: float
    silent_business_hours: timedelta
    period: timedelta  # at most one alarm per route in this period
    check_every: timedelta


@dataclass(frozen=True)
class UnsetVariable:
    """A `*_env` key whose environment variable is not set in the process that loaded the config."""

    key: str  # the dotted key, such as "http.token_env"
    variable: str  # the variable it names, such as "GUARDRAIL_API_TOKEN"
    state: str = "is not set here"  # or why its value cannot be used


@dataclass(frozen=True)
class Config:
    path: Path
    smtp: SmtpSettings
    postmaster_owner: str
    database_path: Path
    busy_timeout: timedelta
    smarthost: Smarthost | None
    outbound_maildir: Path
    rules_dir: Path
    delivery: DeliverySettings
    reference_prefix: str
    duplicate_window: timedelta
    log_format: str
    log_level: str
    acknowledgements: AcknowledgementSettings
    webhooks: WebhookSettings
    inspection_max_age: timedelta = timedelta(days=90)
    zombie: ZombieSettings | None = None
    http: HttpSettings = HttpSettings()
    # How long stored messages and outbox rows keep their bytes; None keeps them for good.
    keep_bodies: timedelta | None = None
    # Bytes kept free on the database's file system: below it, MAIL gets 452 4.3.1.
    min_free_space: int = DEFAULT_MIN_FREE_SPACE
    # Whether each other team that a message was addressed to gets a copy of it.
    copy_other_teams: bool = True
    # Filled only by load_config(require_secrets=False). The secrets these variables name are None.
    unset_variables: tuple[UnsetVariable, ...] = ()


def is_address(text: str) -> bool:
    """Return True for an email address that mail can be sent to: a local part, one @ and a domain name."""
    local, at, domain = text.rpartition("@")
    if not (at and local) or "@" in local:
        return False
    return " " not in text and "\x00" not in text and _is_mail_domain(domain)


def _is_domain(text: str) -> bool:
    return len(text) <= MAX_DOMAIN_LENGTH and all(_DOMAIN_LABEL.fullmatch(label) for label in text.split("."))


def _is_mail_domain(text: str) -> bool:
    """Return True for a domain name, where non-ASCII labels are checked in their IDNA form."""
    try:
        ascii_form = text.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return _is_domain(ascii_form)


def load_config(path: Path | str, *, require_secrets: bool = True) -> Config:
    """Read and validate the config file at `path`.

    Secrets come from the environment variables that `*_env` keys name. With
    `require_secrets`, which the daemon needs, an unset variable is an error.
    Without it, an unset variable leaves its secret None and is listed in
    `Config.unset_variables`, for commands that do not use the secrets.

    Raises ConfigErrors listing every problem found.
    """
    path = Path(path)
    errors: list[ConfigError] = []
    unset: list[UnsetVariable] = []
    data = read_toml(path, errors)
    if data is None:
        raise ConfigErrors(errors)

    base = path.resolve().parent
    root = Table(path, data, "", errors)
    smtp = _load_smtp(root.table("smtp"), base)
    postmaster = root.table("postmaster")
    database = root.table("database")
    smarthost_table = root.table("smarthost") if root.has("smarthost") else None
    outbound = root.table("outbound")
    rules = root.table("rules")
    delivery_table = root.table("delivery")
    conversations = root.table("conversations")
    log = root.table("log")
    acknowledgements = root.table("acknowledgements")
    webhooks = root.table("webhooks")
    inspection = root.table("inspection")
    zombie = root.table("zombie")

    first_domain = sorted(smtp.local_domains)[0] if smtp.local_domains else smtp.hostname
    owner = postmaster.string("owner", required=True) or ""
    if owner and not is_address(owner):
        postmaster.fail("owner", owner, "an email address such as ops@example.com")

    config = Config(
        path=path,
        smtp=smtp,
        postmaster_owner=owner.lower(),
        database_path=database.local_path("path", base, "var/guardrail.db") or base / "var/guardrail.db",
        busy_timeout=database.duration("busy_timeout", timedelta(seconds=5)),
        smarthost=_load_smarthost(smarthost_table, unset) if smarthost_table else None,
        outbound_maildir=outbound.local_path("maildir", base, "var/outbound") or base / "var/outbound",
        rules_dir=rules.local_path("directory", base, "rules") or base / "rules",
        delivery=_load_delivery(delivery_table, f"postmaster@{first_domain}"),
        reference_prefix=_load_prefix(conversations),
        duplicate_window=conversations.duration("duplicate_window", timedelta(days=1)),
        copy_other_teams=conversations.boolean("copy_other_teams", True),
        log_format=log.choice("format", "auto", ("auto", "json", "console")),
        log_level=log.choice("level", "info", ("debug", "info", "warning", "error")),
        acknowledgements=_load_acknowledgements(acknowledgements),
        webhooks=WebhookSettings(
            timeout=webhooks.duration("timeout", timedelta(seconds=10)),
            attempts=webhooks.integer("attempts", 5, minimum=1, maximum=50),
            retry_initial=webhooks.duration("retry_initial", timedelta(seconds=1)),
            retry_max=webhooks.duration("retry_max", timedelta(seconds=30)),
        ),
    )

    _check_database(database, config.database_path)
    config = replace(
        config,
        inspection_max_age=inspection.duration("max_age", timedelta(days=90)),
        zombie=_load_zombie(zombie),
        keep_bodies=_load_keep_bodies(database, config),
        min_free_space=database.size("min_free_space", DEFAULT_MIN_FREE_SPACE),
    )
    config = replace(config, http=_load_http(root.table("http"), unset, require_secrets))
    if config.http.enabled and config.http.port and config.http.port == config.smtp.port and _same_address(
        config.http.listen, config.smtp.listen,
    ):
        errors.append(ConfigError(
            path, "http.port",
            f"{config.http.port} is also smtp.port on the same address; give the HTTP listener another port",
        ))
    for table in (
        root, postmaster, database, outbound, rules, delivery_table, conversations, log, acknowledgements, webhooks,
        inspection, zombie,
    ):
        table.finish()
    if require_secrets:
        errors += [
            ConfigError(path, item.key, f"environment variable {item.variable!r} is not set; export it or remove the key")
            for item in unset
        ]
    if errors:
        raise ConfigErrors(errors)
    return replace(config, unset_variables=tuple(unset))


def _normalised(address: str) -> str:
    """Return an IP literal in its shortest form, so that two spellings compare equal; a host name as it is."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _same_address(first: str, second: str) -> bool:
    """Return True when listeners on `first` and `second`, with one port, would take the same address.

    "0.0.0.0" takes every IPv4 address and "::" every IPv6 one. asyncio
    binds "::" to IPv6 alone (IPV6_V6ONLY). A host name is compared as written.
    """
    first, second = _normalised(first), _normalised(second)
    if first == second:
        return True
    for wildcard, ipv6 in (("0.0.0.0", False), ("::", True)):
        others = {first, second} - {wildcard}
        if len(others) == 1 and (":" in next(iter(others))) is ipv6:
            return True
    return False


def _load_keep_bodies(table: Table, config: Config) -> timedelta | None:
    """Return `[database] keep_bodies`, or None when unset.

    Delivery retries and the duplicate and copy checks read stored bytes, so
    they must be kept longer than the longest of those windows.
    """
    if not table.has("keep_bodies"):
        table.raw("keep_bodies")
        return None
    keep = table.duration("keep_bodies", timedelta(0))
    needed = max(config.delivery.give_up_after, config.duplicate_window)
    if timedelta(0) < keep <= needed:
        table.problem(
            "keep_bodies",
            f"{toml_text(table.raw('keep_bodies'))} is not longer than delivery.give_up_after"
            f" ({_days(config.delivery.give_up_after)}) and conversations.duplicate_window ({_days(config.duplicate_window)}),"
            " which still read stored messages; keep them longer, such as '90d', or remove the key to keep them for good",
        )
    return keep if keep > needed else None


def _days(duration: timedelta) -> str:
    """Return `duration` as the config writes it, in whole days when it is some."""
    seconds = int(duration.total_seconds())
    return toml_text(f"{seconds // 86400}d" if seconds % 86400 == 0 else f"{seconds}s")


def _read_variable(table: Table, name: str, variable: str, unset: list[UnsetVariable]) -> str | None:
    """Return the value of environment `variable`, which key `name` names.

    The only place that reads secrets from the environment. An unset variable
    is appended to `unset` and reads as None.
    """
    value = os.environ.get(variable)
    if value is None:
        unset.append(UnsetVariable(table.key(name), variable))
    return value


def _check_database(table: Table, path: Path) -> None:
    """Record why `path` cannot hold the daemon's SQLite database. A path that does not exist yet is fine."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    except OSError as error:
        table.problem("path", f"cannot use {path}: {error.strerror}")
        return
    if stat.S_ISDIR(info.st_mode):
        table.problem("path", f"{path} is a directory; expected the path of an SQLite database file, such as var/guardrail.db")
        return
    if not stat.S_ISREG(info.st_mode):
        table.problem("path", f"{path} is not a regular file; expected the path of an SQLite database file")
        return
    if info.st_size == 0:
        return  # SQLite starts a new database in an empty file.
    try:
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as error:
        table.problem("path", f"cannot read {path}: {error.strerror}")
        return
    if header != SQLITE_HEADER:
        table.problem(
            "path",
            f"{path} is not an SQLite database; point database.path at the daemon's database,"
            " or at a path that does not exist yet to start a new one",
        )


def default_parse_processes(cpus: int | None) -> int:
    """Return how many parse processes to start on a machine with `cpus` CPUs.

    One CPU is left to the daemon's event loop and writer thread, which every
    message passes through. At least two run, so that while a message stalls
    one child, the other keeps parsing.
    """
    return max(2, min(4, (cpus or 1) - 1))


def _load_smtp(table: Table, base: Path) -> SmtpSettings:
    errors_before = len(table.errors)
    inboxes = [address.lower() for address in table.strings("inboxes")]
    for address in inboxes:
        if not is_address(address):
            table.fail("inboxes", address, "an email address such as support@example.com")
    domains = [domain.lower().strip(".") for domain in table.strings("inbox_domains")]
    for domain in domains:
        if not _is_mail_domain(domain):
            table.fail("inbox_domains", domain, "a domain name such as example.com")
    # Invalid entries are reported above, and must not reach the default
    # return path, which is built from the first inbox domain.
    inboxes = [address for address in inboxes if is_address(address)]
    domains = [domain for domain in domains if _is_mail_domain(domain)]
    if not inboxes and not domains and len(table.errors) == errors_before:
        table.problem("inboxes", "missing; list at least one address we accept mail for, such as support@example.com")
    lists = [identifier.lower() for identifier in table.strings("inbox_lists")]
    for identifier in lists:
        if not is_list_identifier(identifier):
            table.fail(
                "inbox_lists", identifier,
                "the identifier of a List-Id header without its angle brackets, such as support.example.com",
            )

    hostname = table.string("hostname")
    if hostname is not None and not _is_domain(hostname):
        # The name goes into the greeting, Received headers and the Message-IDs of our mail.
        table.fail(
            "hostname", hostname,
            "a domain name such as mx.example.com (labels of letters, digits and hyphens, up to 63 characters each, joined by dots)",
        )
        hostname = None
    if hostname is None:
        # Resolved once here: aiosmtpd would otherwise look it up per connection.
        hostname = socket.getfqdn()

    settings = SmtpSettings(
        first_inbox=inboxes[0] if inboxes else "",
        listen=_listen_address(table),
        port=table.integer("port", 2525, minimum=0, maximum=65535),
        hostname=hostname,
        inboxes=frozenset(inboxes),
        inbox_domains=frozenset(domains),
        inbox_lists=frozenset(identifier for identifier in lists if is_list_identifier(identifier)),
        max_message_size=table.size("max_message_size", 25 * 1024 * 1024),
        max_recipients=table.integer("max_recipients", 100, minimum=1),
        max_received_headers=table.integer("max_received_headers", 30, minimum=1),
        max_connections=table.integer("max_connections", 100, minimum=1),
        max_connections_per_client=table.integer("max_connections_per_client", 0, minimum=0),
        timeout=table.duration("timeout", timedelta(minutes=5)),
        data_timeout=table.duration("data_timeout", timedelta(minutes=10)),
        # Children parse and route, so the event loop's one thread does less
        # and a stuck message stalls only its child.
        parse_processes=table.integer("parse_processes", default_parse_processes(os.cpu_count()), minimum=0, maximum=64),
    )
    certificate, key = table.string("tls_certificate"), table.string("tls_key")
    if certificate is not None and key is None:
        table.problem("tls_key", "missing; set it with tls_certificate to the PEM file of the certificate's private key")
    elif key is not None and certificate is None:
        table.problem("tls_certificate", "missing; set it with tls_key to the PEM file of the certificate chain")
    elif certificate is not None and key is not None:
        certificate_path, key_path = table.local_path("tls_certificate", base), table.local_path("tls_key", base)
        if certificate_path is None or key_path is None:
            table.finish()
            return settings
        settings = replace(settings, tls_certificate=certificate_path, tls_key=key_path)
        files = {"tls_certificate": settings.tls_certificate, "tls_key": settings.tls_key}
        missing = [(name, path) for name, path in files.items() if path is not None and not path.is_file()]
        for name, path in missing:
            table.problem(name, _not_a_file(path) + "; expected a PEM file (a relative path starts at the config's folder)")
        if not missing:
            try:
                tls_context(settings)
            except (OSError, ssl.SSLError) as error:
                table.problem(
                    "tls_certificate",
                    f"loading {settings.tls_certificate} with the key {settings.tls_key} failed: {error};"
                    " expected a PEM certificate chain and the PEM private key that matches it",
                )
    table.finish()
    return settings


def _not_a_file(path: Path) -> str:
    """Describe why `path`, which is not a regular file, cannot be read as one."""
    if path.is_dir():
        return f"is a directory: {path}"
    if path.exists():
        return f"is not a regular file: {path}"
    return f"file not found: {path}"


def tls_context(smtp: SmtpSettings) -> ssl.SSLContext | None:
    """Return the server TLS context for STARTTLS, or None when no certificate is configured."""
    if smtp.tls_certificate is None or smtp.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(smtp.tls_certificate, smtp.tls_key)
    return context


def _load_smarthost(table: Table, unset: list[UnsetVariable]) -> Smarthost:
    host = table.string("host", required=True) or ""
    port = table.integer("port", 25, minimum=1, maximum=65535)
    password_env = table.string("password_env")
    value = _read_variable(table, "password_env", password_env, unset) if password_env is not None else None
    password = Secret(value) if value is not None else None
    if table.has("password"):
        table.raw("password")
        table.problem("password", "passwords are not read from the file; set password_env to the name of an environment variable")

    smarthost = Smarthost(
        host=host,
        port=port,
        starttls=table.boolean("starttls", True),
        username=table.string("username"),
        password=password,
        timeout=table.duration("timeout", timedelta(seconds=60)),
    )
    table.finish()
    return smarthost


def _listen_address(table: Table) -> str:
    """Read `listen`: an IP address, or a host name that the listener resolves when it starts."""
    listen = table.string("listen", "127.0.0.1") or "127.0.0.1"
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        # A name of digits only, such as 256.1.1.1, is a mistyped IPv4 address.
        if not _is_domain(listen) or listen.replace(".", "").isdigit():
            table.fail("listen", listen, "an IP address such as 127.0.0.1, 0.0.0.0 or ::1, or a host name such as localhost")
    return listen


def _load_delivery(table: Table, default_return_path: str) -> DeliverySettings:
    errors_before = len(table.errors)
    return_path = table.string("return_path", default_return_path) or default_return_path
    if not is_address(return_path):
        table.fail("return_path", return_path, "an email address")
    settings = DeliverySettings(
        retry_initial=table.duration("retry_initial", timedelta(seconds=30)),
        retry_max=table.duration("retry_max", timedelta(hours=1)),
        give_up_after=table.duration("give_up_after", timedelta(days=5)),
        concurrency=table.integer("concurrency", 4, minimum=1, maximum=100),
        return_path=return_path.lower(),
    )
    if settings.retry_initial > settings.retry_max and len(table.errors) == errors_before:
        table.problem(
            "retry_initial",
            "is longer than retry_max; the wait between attempts starts at retry_initial and doubles up to retry_max,"
            " so retry_initial must be the shorter",
        )
    return settings


def _load_zombie(table: Table) -> ZombieSettings | None:
    """Load [zombie], or return None when it is disabled.

    Every key is validated either way, so that turning the watch off needs
    only `enabled = false` and turning it back on finds no new errors.
    """
    enabled = table.boolean("enabled", True)
    share = table.raw("min_answered_share", 0.2)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        table.fail("min_answered_share", share, "a number from 0 to 1, such as 0.2")
        share = 0.2
    settings = ZombieSettings(
        conversations=table.integer("conversations", 20, minimum=1),
        min_answered_share=float(share),
        silent_business_hours=table.duration("silent_business_hours", timedelta(hours=24)),
        period=table.duration("period", timedelta(days=1)),
        check_every=table.duration("check_every", timedelta(minutes=15)),
    )
    return settings if enabled else None


def _load_http(table: Table, unset: list[UnsetVariable], require_secrets: bool = True) -> HttpSettings:
    token_env = table.string("token_env")
    token = table.string("token")
    if token_env is not None and token is not None:
        table.problem("token", "set either token or token_env, not both")
    if token_env is not None:
        token = _read_variable(table, "token_env", token_env, unset)
    # Neither the value nor any part of it goes into an error message.
    if token is not None and (len(token) < MIN_TOKEN_LENGTH or not _BEARER_TOKEN.fullmatch(token)):
        if token_env is not None and not require_secrets:
            # A command that does not serve HTTP only warns, as for an unset variable.
            usable = f"at least {MIN_TOKEN_LENGTH} characters of letters, digits and -._~+/"
            unset.append(UnsetVariable(table.key("token_env"), token_env, f"holds no usable token here ({usable})"))
            token = None
        else:
            table.problem(
                "token_env" if token_env is not None else "token",
                f"the token must be at least {MIN_TOKEN_LENGTH} characters of letters, digits and -._~+/"
                " (for example the output of: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')",
            )
            token = None
    settings = HttpSettings(
        enabled=table.boolean("enabled", True),
        listen=_listen_address(table),
        port=table.integer("port", 8025, minimum=0, maximum=65535),
        token=Secret(token) if token is not None else None,
    )
    table.finish()
    return settings


def _load_acknowledgements(table: Table) -> AcknowledgementSettings:
    patterns = []
    for pattern in table.strings("sender_patterns", list(DEFAULT_SENDER_PATTERNS)):
        regex = table.regex("sender_patterns", pattern, re.IGNORECASE)
        if regex is not None:
            patterns.append(regex)
    return AcknowledgementSettings(
        max_per_sender=table.integer("max_per_sender", 3, minimum=0),
        window=table.duration("window", timedelta(hours=1)),
        sender_patterns=tuple(patterns),
    )


def _load_prefix(table: Table) -> str:
    prefix = table.string("reference_prefix", "GR") or "GR"
    if not prefix.isascii() or not prefix.isalpha() or len(prefix) > 8:
        table.fail("reference_prefix", prefix, "1 to 8 ASCII letters")
        return "GR"
    return prefix.upper()
