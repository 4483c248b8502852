"""guardrail behind a real Postfix, wired with the lines shipped in deploy/postfix/.

Each test starts its own Postfix instance from a config folder of its own:
queue, log and mailboxes live beside it and every listener is on 127.0.0.1,
so the system Postfix is never touched. The transport map, the main.cf lines
and the reinjection listener are read from deploy/postfix/ and only their
ports and paths are replaced, so the shipped configuration is what runs.

The mail path under test: a client sends to Postfix's inbound listener, and
the transport map hands the inbox address to guardrail. guardrail sends the
team's copy and the acknowledgement back through the reinjection listener,
and Postfix's virtual delivery agent writes them to local maildirs.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import pytest
from conftest import maildir_messages, message, send, wait_until, write_config

from guardrail.daemon import Daemon

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "postfix"
SBIN = Path("/usr/sbin")

# Distinct names, so that each Received header shows which server added it.
POSTFIX_HOSTNAME = "mail.example.com"
GUARDRAIL_HOSTNAME = "guardrail.example.com"

INBOX = "support@example.com"
TEAM_ADDRESS = "team@example.com"
CUSTOMER = "alice@example.net"

# Mailboxes of Postfix's virtual delivery agent, relative to the mailbox base
# (a trailing slash means maildir). The inbox needs an entry only so that
# Postfix accepts the address. The transport map then sends it to guardrail.
MAILBOXES = {
    INBOX: "support/",
    "sam@example.com": "sam/",
    CUSTOMER: "alice/",
    # guardrail's default return path: bounces of its forwards would land here.
    "postmaster@example.com": "postmaster/",
}
# The team address is a list, as it usually is: Postfix expands it to the
# mailbox of the team's one member.
ALIASES = {TEAM_ADDRESS: "sam@example.com"}

# The stock master.cf services, without chroot, and the inbound listener on a
# loopback port. The reinjection listener is appended from deploy/postfix/.
SERVICES = """\
{inbound}  inet  n  -  n  -  -  smtpd
pickup     unix  n  -  n  60  1  pickup
cleanup    unix  n  -  n  -  0  cleanup
qmgr       unix  n  -  n  300  1  qmgr
rewrite    unix  -  -  n  -  -  trivial-rewrite
bounce     unix  -  -  n  -  0  bounce
defer      unix  -  -  n  -  0  bounce
trace      unix  -  -  n  -  0  bounce
verify     unix  -  -  n  -  1  verify
flush      unix  n  -  n  1000?  0  flush
proxymap   unix  -  -  n  -  -  proxymap
smtp       unix  -  -  n  -  -  smtp
relay      unix  -  -  n  -  -  smtp
showq      unix  n  -  n  -  -  showq
error      unix  -  -  n  -  -  error
retry      unix  -  -  n  -  -  error
discard    unix  -  -  n  -  -  discard
local      unix  -  n  n  -  -  local
virtual    unix  -  n  n  -  -  virtual
anvil      unix  -  -  n  -  1  anvil
scache     unix  -  -  n  -  1  scache
postlog    unix-dgram  n  -  n  -  1  postlogd
"""

RULES = """
[[team]]
name = "support"
destination = {{ smtp = ["{destination}"] }}
members = [{{ name = "Sam Ortiz", address = "sam@example.com" }}]

[[route]]
name = "default"
team = "support"
default = true
"""


def require_postfix() -> None:
    """Skip the test when Postfix can't run here, or fail it in CI, where .ci/run installs Postfix."""
    problem = None
    if not (SBIN / "postfix").exists():
        problem = "Postfix is not installed (Debian package postfix)"
    elif os.geteuid() != 0:
        problem = "Postfix's master process must start as root"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(problem)
    pytest.skip(problem)


def run(*command: str | Path) -> str:
    """Run a Postfix command and return its standard output. A non-zero exit fails the test."""
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited {result.returncode}: {result.stderr}"
    return result.stdout


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def inline_table(entries: dict[str, str]) -> str:
    """Return `entries` as a Postfix inline: lookup table."""
    return "inline:{ " + ", ".join(f"{{ {key} = {value} }}" for key, value in entries.items()) + " }"


def shipped_main_cf(config_dir: Path) -> str:
    """Return the settings of deploy/postfix/main.cf, with /etc/postfix replaced by `config_dir`."""
    lines = [line for line in (DEPLOY / "main.cf").read_text().splitlines() if line.strip() and not line.startswith("#")]
    return "\n".join(lines).replace("/etc/postfix/", f"{config_dir}/") + "\n"


def shipped_reinjection_service(port: int) -> str:
    """Return the reinjection listener of deploy/postfix/master.cf, listening on `port` instead."""
    text = "\n".join(line for line in (DEPLOY / "master.cf").read_text().splitlines() if not line.startswith("#"))
    listener = re.compile(r"^127\.0\.0\.1:\d+(?=\s+inet\s)", re.MULTILINE)
    assert len(listener.findall(text)) == 1, "deploy/postfix/master.cf should define exactly one loopback listener"
    return listener.sub(f"127.0.0.1:{port}", text).strip() + "\n"


def shipped_transport(guardrail_port: int) -> str:
    """Return deploy/postfix/guardrail_transport, pointing at guardrail's port instead of 2525."""
    text = (DEPLOY / "guardrail_transport").read_text()
    assert "]:2525" in text, "deploy/postfix/guardrail_transport should hand the inboxes to port 2525"
    return text.replace("]:2525", f"]:{guardrail_port}")


@dataclass
class Postfix:
    """One private Postfix instance: its config folder, ports and mailboxes."""

    directory: Path
    inbound_port: int
    reinjection_port: int

    @property
    def config_dir(self) -> Path:
        return self.directory / "etc"

    @property
    def mailbox_base(self) -> Path:
        return self.directory / "mail"

    def mailbox(self, address: str) -> Path:
        return self.mailbox_base / MAILBOXES[address]

    def log(self) -> str:
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def queue(self) -> list[dict[str, object]]:
        """Return every message in Postfix's queue, as postqueue -j describes it."""
        output = run(SBIN / "postqueue", "-c", self.config_dir, "-j")
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    async def is_queue_empty(self) -> bool:
        return not await asyncio.to_thread(self.queue)

    def write_config(self, guardrail_port: int) -> None:
        """Write main.cf, master.cf and the transport map, and create the mailbox base."""
        # postfix check creates the queue's subfolders and the data folder,
        # with the owners Postfix expects, inside a root-owned queue folder.
        self.config_dir.mkdir(parents=True)
        (self.directory / "spool").mkdir()
        mailbox_user = pwd.getpwnam("nobody")
        self.mailbox_base.mkdir()
        os.chown(self.mailbox_base, mailbox_user.pw_uid, mailbox_user.pw_gid)

        main_cf = f"""\
compatibility_level = 3.6
queue_directory = {self.directory}/spool
data_directory = {self.directory}/data
maillog_file = {self.directory}/maillog
maillog_file_prefixes = {self.directory}
mail_owner = postfix
setgid_group = postdrop
myhostname = {POSTFIX_HOSTNAME}
mydomain = example.com
myorigin = $myhostname
mydestination =
relayhost =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_dns_support_level = disabled
smtp_host_lookup = native
alias_maps =
alias_database =
virtual_mailbox_domains = example.com, example.net
virtual_mailbox_base = {self.mailbox_base}
virtual_mailbox_maps = {inline_table(MAILBOXES)}
virtual_alias_maps = {inline_table(ALIASES)}
virtual_uid_maps = static:{mailbox_user.pw_uid}
virtual_gid_maps = static:{mailbox_user.pw_gid}
virtual_minimum_uid = {mailbox_user.pw_uid}
"""
        (self.config_dir / "main.cf").write_text(main_cf + shipped_main_cf(self.config_dir))
        services = SERVICES.format(inbound=f"127.0.0.1:{self.inbound_port}")
        (self.config_dir / "master.cf").write_text(services + shipped_reinjection_service(self.reinjection_port))
        transport = self.config_dir / "guardrail_transport"
        transport.write_text(shipped_transport(guardrail_port))
        run(SBIN / "postmap", "-c", self.config_dir, f"hash:{transport}")

    def start(self) -> None:
        run(SBIN / "postfix", "-c", self.config_dir, "check")
        run(SBIN / "postfix", "-c", self.config_dir, "start")

    def stop(self) -> None:
        """Stop this instance's master process and wait up to 20 s for it to exit."""
        pid_file = self.directory / "spool" / "pid" / "master.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().split()[0])
        subprocess.run([str(SBIN / "postfix"), "-c", str(self.config_dir), "stop"], capture_output=True, timeout=60, check=False)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)
        raise AssertionError(f"Postfix master process {pid} did not exit within 20 s of postfix stop")


PostfixFactory = Callable[[int, int], Postfix]


@pytest.fixture
def start_postfix() -> Iterator[PostfixFactory]:
    """Return a function that starts a private Postfix in front of guardrail's port, stopped at teardown.

    Each instance gets its own folder under the system's temporary folder, not
    in tmp_path, because Postfix's daemons and its virtual delivery agent run
    as unprivileged users, who can't pass through pytest's private folders.
    """
    require_postfix()
    started: list[Postfix] = []

    def start(guardrail_port: int, reinjection_port: int) -> Postfix:
        directory = Path(tempfile.mkdtemp(prefix="guardrail-postfix-"))
        directory.chmod(0o755)
        instance = Postfix(directory, free_port(), reinjection_port)
        started.append(instance)
        instance.write_config(guardrail_port)
        instance.start()
        return instance

    yield start
    for instance in started:
        try:
            instance.stop()
        finally:
            shutil.rmtree(instance.directory)


async def start_guardrail(
    folder: Path, start_daemon: Callable[[Path], Awaitable[Daemon]], reinjection_port: int, destination: str
) -> Daemon:
    """Start guardrail with its smarthost set to Postfix's reinjection listener."""
    config = write_config(
        folder,
        rules=RULES.format(destination=destination),
        smtp={"hostname": GUARDRAIL_HOSTNAME, "inboxes": [INBOX]},
        sections={
            "smarthost": {"host": "127.0.0.1", "port": reinjection_port, "starttls": False},
            "http": {"enabled": False},
        },
    )
    return await start_daemon(config)


def parse(data: bytes) -> Message:
    return message_from_bytes(data)


def postfix_received(copy: Message) -> list[str]:
    """Return the Received headers that Postfix's smtpd added to `copy`."""
    return [value for value in copy.get_all("Received", []) if "(Postfix)" in value]


def stored_files(folder: Path) -> list[bytes]:
    """Return the files in a maildir's new/ folder as Postfix wrote them, by name."""
    return [path.read_bytes() for path in sorted((folder / "new").iterdir())]


async def wait_for_mail(postfix: Postfix, address: str, what: str) -> None:
    """Wait up to 15 s for a message in `address`'s maildir, and show Postfix's log on timeout."""
    folder = postfix.mailbox(address)
    try:
        await wait_until(lambda: maildir_messages(folder), timeout=15, what=what)
    except AssertionError as error:
        raise AssertionError(f"{error}; Postfix log:\n{postfix.log()[-4000:]}") from None


async def wait_for_quiet(postfix: Postfix, daemon: Daemon, outbox_rows: int) -> None:
    """Wait until Postfix's queue is empty and guardrail has recorded `outbox_rows` finished deliveries."""
    assert daemon.store is not None

    async def is_outbox_finished() -> bool:
        rows = await daemon.store.fetch_all("SELECT state FROM outbox")
        return len(rows) == outbox_rows and all(state != "pending" for (state,) in rows)

    await wait_until(is_outbox_finished, timeout=15, what=f"{outbox_rows} finished outbox rows")
    await wait_until(postfix.is_queue_empty, timeout=15, what="Postfix's queue to empty")
    await wait_until(daemon.is_idle, timeout=5, what="guardrail's delivery worker to go idle")


async def test_inbox_mail_reaches_team_through_postfix(tmp_path: Path, start_daemon, start_postfix) -> None:
    reinjection_port = free_port()
    daemon = await start_guardrail(tmp_path / "guardrail", start_daemon, reinjection_port, TEAM_ADDRESS)
    postfix = await asyncio.to_thread(start_postfix, daemon.port, reinjection_port)

    rejected_recipients = await send(
        postfix.inbound_port,
        CUSTOMER,
        [INBOX],
        message(sender=f"Alice Example <{CUSTOMER}>", to=INBOX, message_id="<printer@example.net>"),
    )
    await wait_for_mail(postfix, "sam@example.com", "the team's copy in sam's maildir")
    await wait_for_mail(postfix, CUSTOMER, "the acknowledgement in alice's maildir")
    await wait_for_quiet(postfix, daemon, outbox_rows=2)
    (reference,), = await daemon.store.fetch_all("SELECT reference FROM conversations")
    outbox = await daemon.store.fetch_all("SELECT kind, state FROM outbox ORDER BY kind")
    team_copies = stored_files(postfix.mailbox("sam@example.com"))
    acknowledgements = stored_files(postfix.mailbox(CUSTOMER))

    assert rejected_recipients == {}
    assert outbox == [("deliver", "done"), ("mail", "done")]

    assert len(team_copies) == 1
    team_copy = parse(team_copies[0])
    assert team_copy["X-Guardrail-Conversation"] == reference
    assert team_copy["X-Guardrail-Route"] == "default"
    assert team_copy["X-Guardrail-Loop"] == GUARDRAIL_HOSTNAME
    assert any("(guardrail)" in value for value in team_copy.get_all("Received", []))
    # One Received line from the inbound listener, one from the reinjection listener.
    assert len(postfix_received(team_copy)) == 2
    # Postfix expanded the team's list address to its member.
    assert team_copy["Delivered-To"] == "sam@example.com"
    assert team_copy["Return-Path"] == "<postmaster@example.com>"
    assert team_copy["Message-ID"] == "<printer@example.net>"
    # The virtual delivery agent stores lines with LF endings.
    assert team_copy.get_payload() == "Hello,\nthe printer jams.\n"

    assert len(acknowledgements) == 1
    acknowledgement = parse(acknowledgements[0])
    assert acknowledgement["Auto-Submitted"] == "auto-replied"
    assert f"[{reference}]" in acknowledgement["Subject"]
    assert acknowledgement["In-Reply-To"] == "<printer@example.net>"
    # The null envelope sender of RFC 3834 survives Postfix.
    assert acknowledgement["Return-Path"] == "<>"
    assert len(postfix_received(acknowledgement)) == 1

    assert not postfix.mailbox(INBOX).exists()
    # Nothing bounced back to guardrail's return path.
    assert not postfix.mailbox("postmaster@example.com").exists()


async def test_forward_to_inbox_stops_at_guardrail(tmp_path: Path, start_daemon, start_postfix) -> None:
    # A team whose destination is the inbox itself: the forward goes back
    # through the transport map to guardrail, which must store it and stop.
    reinjection_port = free_port()
    daemon = await start_guardrail(tmp_path / "guardrail", start_daemon, reinjection_port, INBOX)
    postfix = await asyncio.to_thread(start_postfix, daemon.port, reinjection_port)

    await send(postfix.inbound_port, CUSTOMER, [INBOX], message(sender=CUSTOMER, to=INBOX))
    await wait_for_mail(postfix, CUSTOMER, "the acknowledgement in alice's maildir")

    async def has_stored_both() -> bool:
        (count,), = await daemon.store.fetch_all("SELECT COUNT(*) FROM messages")
        return count == 2

    await wait_until(has_stored_both, timeout=15, what="guardrail to store its own forward coming back")
    await wait_for_quiet(postfix, daemon, outbox_rows=2)
    dispositions = await daemon.store.fetch_all("SELECT disposition FROM messages ORDER BY id")
    outbox = await daemon.store.fetch_all("SELECT kind, state FROM outbox ORDER BY kind")

    assert dispositions == [("new",), ("loop",)]
    assert outbox == [("deliver", "done"), ("mail", "done")]
    assert len(maildir_messages(postfix.mailbox(CUSTOMER))) == 1
    assert not postfix.mailbox(INBOX).exists()
    assert not postfix.mailbox("sam@example.com").exists()
    assert not postfix.mailbox("postmaster@example.com").exists()
