"""SMTP intake: an aiosmtpd server that replies 250 only once a message is committed.

`GuardrailSMTP` changes the protocol where a hardened MTA must differ from
stock aiosmtpd: a command line must end in CRLF, DATA is read in large
chunks, oversized data gets one 552 after the final dot, every reply carries
an enhanced status code, and concurrent connections are capped.
`IntakeHandler` runs the steps of a transaction: check the envelope, read
the message, reject bare CR or LF, route it, commit it, reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, syntax

from .clock import Clock
from .config import Config
from .escalation import UNROUTED_REASON
from .message import ATOM
from .metrics import Metrics
from .offload import ParseProcesses, ParseStalled
from .plan import MOVED_TEAM_REMOVED, Submission
from .prepare import (
    BareLineEnding,
    Site,
    TooManyHops,
    is_accepted_recipient,
    prepare_received,
    prepare_unrouted,
)
from .prepare import Envelope as PreparedEnvelope
from .replies import (
    REPLY_ACCEPTED,
    REPLY_AUTH,
    REPLY_BAD_HELO,
    REPLY_BAD_RECIPIENT,
    REPLY_BAD_SENDER,
    REPLY_BARE_LF_COMMAND,
    REPLY_BARE_LINE_ENDING,
    REPLY_BUSY,
    REPLY_BUSY_CLIENT,
    REPLY_DATA_TIMEOUT,
    REPLY_DUPLICATE,
    REPLY_EXPN,
    REPLY_HELP,
    REPLY_HELP_SYNTAX,
    REPLY_HELP_UNKNOWN,
    REPLY_IDLE_TIMEOUT,
    REPLY_NEED_MAIL,
    REPLY_NEED_RCPT,
    REPLY_NEEDS_SMTPUTF8,
    REPLY_NO_TLS,
    REPLY_NO_VALID_RECIPIENTS,
    REPLY_NOT_OURS,
    REPLY_RECIPIENT_OK,
    REPLY_SHUTTING_DOWN,
    REPLY_STORAGE_FULL,
    REPLY_TEMPORARY,
    REPLY_TLS_ACTIVE,
    REPLY_TOO_BIG,
    REPLY_TOO_MANY_ERRORS,
    REPLY_TOO_MANY_HOPS,
    REPLY_TOO_MANY_JUNK,
    REPLY_TOO_MANY_RECIPIENTS,
    REPLY_TOO_MANY_UNKNOWN,
    REPLY_VRFY,
    REPLY_VRFY_SYNTAX,
    with_enhanced_code,
)
from .rules import RuleSet
from .storage import FreeSpace, storage_problem
from .store import Outcome, Store

log = structlog.get_logger("guardrail.intake")

# Commands that carry no mail (NOOP, RSET, VRFY, EXPN, HELP) allowed between
# two DATA commands of a session. The next one gets 421, and a client that
# sends RSET between messages stays far below the limit.
JUNK_COMMAND_LIMIT = 100
# 5xx replies a client may draw before the connection is closed. An accepted
# message starts the count again.
ERROR_REPLY_LIMIT = 20

_END_OF_DATA = b"\r\n.\r\n"
_DOT_LINE = b"\r\n."  # a line that starts with a dot: the end of the data, or a dot added by the client
# A path in angle brackets with a dot-atom local part, or the null path.
_PLAIN_PATH = re.compile(rf"^\s*<((?:{ATOM}(?:\.{ATOM})*@[A-Za-z0-9.-]+)?)>(.*)$")
# A path up to its closing ">": a ">" inside a quoted local part or an address literal does not close it.
_CLOSED_PATH = re.compile(r'\s*<(?:"(?:[^"\\]|\\.)*"|\[[^\]]*\]|[^">\[])*>')
_CHUNK = 256 * 1024
_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")
# A Message-ID that a reply may repeat: printable ASCII, short enough to keep
# the reply line within 512 octets (RFC 5321 section 4.5.3.1.5).
_SHOWN_MESSAGE_ID = re.compile(r"<[!-~]{1,400}>")


def _scan_data(buffer: bytearray, start: int) -> tuple[int, int, bool]:
    """Search `buffer` from `start` for the end-of-data line.

    Return three values. The first is the offset of the CRLF before the
    final ".", or -1 while the end has not arrived. The second is where to
    search from once more data has arrived. The third is True when a line
    that starts with a dot, other than the final one, was passed.
    """
    stuffed = False
    hit = buffer.find(_DOT_LINE, start)
    while hit >= 0:
        if len(buffer) < hit + len(_END_OF_DATA):
            return -1, hit, stuffed  # the two bytes after the dot are still to come
        if buffer[hit + len(_DOT_LINE):hit + len(_END_OF_DATA)] == b"\r\n":
            return hit, hit, stuffed
        stuffed = True
        hit = buffer.find(_DOT_LINE, hit + len(_DOT_LINE))
    # The last two bytes may be a CRLF whose dot is still to come.
    return -1, max(0, len(buffer) - 2), stuffed


class BareLineFeed(Exception):
    """Error raised when a command line ends in LF without the CR before it."""


class CommandLineReader(asyncio.StreamReader):
    """A StreamReader that raises BareLineFeed for a command line that does not end in CRLF.

    aiosmtpd 1.4.6 reads each command with `readuntil()`, which stops at LF,
    and strips CR and LF from the end, so the command loop cannot tell the
    two line endings apart. RFC 5321 section 2.3.8 allows only CRLF. The
    line is consumed before the error is raised, so the loop goes on with
    the next line. The DATA reader uses `read()` and is not affected.
    """

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        line = await super().readuntil(separator)
        if separator == b"\n" and not line.endswith(b"\r\n"):
            raise BareLineFeed
        return line


class ConnectionTracker:
    """Counts open connections, per client address too, and transactions whose DATA is being processed."""

    def __init__(self, limit: int, per_client: int = 0) -> None:
        self.limit = limit
        self.per_client = per_client  # connections from one IP address, or 0 for no limit
        self.connections: set[GuardrailSMTP] = set()
        self.by_client: Counter[str] = Counter()
        self.busy = 0
        self.closing = False
        self.idle = asyncio.Event()
        self.idle.set()

    def open(self, connection: GuardrailSMTP, client: str) -> tuple[str, str] | None:
        """Count a new connection from IP address `client`, and return (reason, reply) when it is over a limit, else None."""
        over = None
        if len(self.connections) >= self.limit:
            over = ("too many connections", REPLY_BUSY)
        elif self.per_client and self.by_client[client] >= self.per_client:
            over = ("too many connections from one client", REPLY_BUSY_CLIENT)
        self.connections.add(connection)
        self.by_client[client] += 1
        return over

    def close(self, connection: GuardrailSMTP, client: str) -> None:
        """Stop counting a connection that `open` counted."""
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]

    def begin(self) -> None:
        self.busy += 1
        self.idle.clear()

    def end(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self.idle.set()


class GuardrailSMTP(SMTP):
    """aiosmtpd's SMTP protocol with a chunked, strict DATA reader."""

    def __init__(self, handler: IntakeHandler, *, tracker: ConnectionTracker, data_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._tracker = tracker
        self._data_timeout = data_timeout
        # Why the connection is rejected and its reply, when it is over a connection limit.
        self._rejection: tuple[str, str] | None = None
        self._client = ""  # the client's IP address
        self._lost = False
        # True from the 354 reply until the DATA reader finds the final dot, and the bytes received in that time.
        self._receiving_data = False
        self._data_bytes = 0
        # The command whose replies are being sent, for enhanced codes that depend on it.
        self._command = ""
        # NOOP, RSET, VRFY, EXPN and HELP commands since the connection opened or the last DATA.
        self._junk = 0
        # True once the current transaction has had a RCPT command after MAIL, accepted or not.
        self._rcpt_given = False
        # 5xx replies since the connection opened or the last message accepted.
        self._errors = 0
        self._closed_for_errors = False
        # The client closed its sending side; the session ends once its input is used up.
        self._half_closed = False
        self._input_ended = False

    def _create_envelope(self) -> Envelope:
        # aiosmtpd creates an envelope for each transaction: after HELO, EHLO, RSET, DATA and STARTTLS.
        self._rcpt_given = False
        return super()._create_envelope()

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio calls this once a connection, with the reader that aiosmtpd
        # created in its __init__ and that the transport feeds. Changing the class of
        # that same object keeps the feed and adds the line-ending check.
        reader.__class__ = CommandLineReader
        super()._cb_client_connected(reader, writer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # STARTTLS calls this again for the same connection, which is counted once.
        if self not in self._tracker.connections:
            peer = transport.get_extra_info("peername")
            self._client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            self._rejection = self._tracker.open(self, self._client)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if error is not None:
            # A reset or another socket error. Without an error, either the
            # client closed first (eof_received logs that) or we closed it.
            self._log_lost_during_data("connection error", error)
        self._tracker.close(self, self._client)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self.session is None or self.session.ssl is not None or self._tls_protocol is not None:
            self._log_lost_during_data("closed by client", None)
            return super().eof_received()
        # The client closed its sending side, as `nc -N` does after its last
        # command, and may still read. aiosmtpd would stop the session here
        # and drop what the client sent before. Instead the reader gets the
        # end of input, and the session replies to every complete command
        # first. The DATA reader then finds the final dot or the end, and
        # the command loop ends at the end of input (handle_exception).
        self._half_closed = True
        return asyncio.StreamReaderProtocol.eof_received(self)

    def data_received(self, data: bytes) -> None:
        if self._receiving_data:
            self._data_bytes += len(data)
        super().data_received(data)

    def _log_lost_during_data(self, reason: str, error: Exception | None) -> None:
        """Log a connection that ended before the DATA reader found the final dot. Nothing of that message is stored."""
        if not self._receiving_data:
            return
        self._receiving_data = False
        log.warning(
            "connection_lost", peer=_peer(self.session), state="DATA", bytes_received=self._data_bytes,
            reason=reason, error=repr(error) if error is not None else None,
        )

    def _timeout_cb(self) -> None:
        if self._tls_protocol is not None and self.session is not None and self.session.ssl is None:
            # Idle during the TLS handshake. Closing the TLS transport now
            # would end the connection without connection_lost, so the slot
            # and the session task would stay forever.
            log.warning("tls_handshake_timed_out", peer=_peer(self.session))
            self._reject("tls handshake timed out")
            assert self._original_transport is not None
            self._original_transport.abort()
            self.connection_lost(None)
            return
        if self.transport is not None and self.transport.get_write_buffer_size() > 0:
            # The client has left replies unread for a whole timeout. close()
            # would wait until they are sent, which a client that never reads
            # puts off for good, so the connection would keep its slot.
            self.transport.abort()
            return
        if self.transport is not None and not self.transport.is_closing():
            # The 421 reply tells the client why the connection ends, so its
            # log shows a timeout rather than a broken connection.
            self.transport.write(REPLY_IDLE_TIMEOUT.encode() + b"\r\n")
            log.info("connection_closed", peer=_peer(self.session), reason="idle timeout")
        super()._timeout_cb()

    @property
    def _offers_starttls(self) -> bool:
        return self.tls_context is not None and self._tls_protocol is None

    @syntax("STARTTLS", when="_offers_starttls")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # RFC 3207 section 4.2: a client must not start TLS twice.
            await self.push(REPLY_TLS_ACTIVE)
            return
        if self.tls_context is None:
            await self.push(REPLY_NO_TLS)
            return
        await super().smtp_STARTTLS(arg)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError) and self._half_closed:
            # The command loop reached the end of a half-closed client's input:
            # every complete command has its reply, so the session ends here.
            # aiosmtpd still pushes a reply on the way out, which push drops.
            self._input_ended = True
            if self.transport is not None:
                self.transport.close()
            raise asyncio.CancelledError
        if isinstance(error, BareLineFeed):
            # aiosmtpd pushes the returned reply, and the session goes on. A
            # client that keeps sending such lines reaches ERROR_REPLY_LIMIT.
            log.warning("bare_lf_rejected", peer=_peer(self.session), reason="bare LF at the end of a command line")
            self._reject("bare line ending")
            return REPLY_BARE_LF_COMMAND
        # aiosmtpd passes the handler only the error, so the peer is added here for its log line.
        return await self.event_handler.handle_exception(error, peer=_peer(self.session))

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        await self._greet(super().smtp_HELO, hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        await self._greet(super().smtp_EHLO, hostname)

    async def _greet(self, command: Callable[[str], Awaitable[None]], hostname: str) -> None:
        """Run aiosmtpd's HELO or EHLO `command` unless the name is refused.

        aiosmtpd ends the transaction and sets the session's protocol before
        the handler receives the name, yet after a refused HELO or EHLO the server
        stays in the state it was in (RFC 5321 section 4.1.4). So the name is
        refused here, before aiosmtpd changes anything.
        """
        if hostname and _is_malformed(hostname):
            await self.push(REPLY_BAD_HELO)
            return
        await command(hostname)

    async def smtp_AUTH(self, arg: str) -> None:
        # Mail is accepted only for our own inboxes, so no sender needs to log
        # in. Without a @syntax line, HELP does not list AUTH either.
        await self.push(REPLY_AUTH)

    async def _handle_client(self) -> None:
        if self._rejection is not None:
            reason, reply = self._rejection
            log.warning("connection_rejected", peer=_peer(self.session), reason=reason)
            self._reject(reason)
            await self.push(reply)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def _reject(self, reason: str) -> None:
        metrics = getattr(self.event_handler, "metrics", None)
        if metrics is not None:
            metrics.messages_rejected.labels(reason).inc()

    async def push(self, status: Any) -> None:
        if self._closed_for_errors or self._input_ended:
            return
        if isinstance(status, str):
            status = with_enhanced_code(status, self.hostname, self._command)
            if status == REPLY_TOO_MANY_UNKNOWN:
                # aiosmtpd closes the connection after this reply.
                log.warning("connection_closed", peer=_peer(self.session), reason="too many unknown commands")
                self._reject("too many unknown commands")
        await super().push(status)
        if isinstance(status, str) and status.startswith("5"):
            await self._count_error()

    async def _count_error(self) -> None:
        """Count a 5xx reply. At ERROR_REPLY_LIMIT, reply 421, close the connection and raise CancelledError.

        A client that draws one rejection after another (unknown recipients,
        bad commands) is probing or broken; each rejection is also a log line.
        """
        self._errors += 1
        if self._errors < ERROR_REPLY_LIMIT:
            return
        log.warning("connection_closed", peer=_peer(self.session), reason="too many errors", errors=self._errors)
        self._reject("too many errors")
        await super().push(REPLY_TOO_MANY_ERRORS)
        self._closed_for_errors = True
        assert self.transport is not None
        self.transport.close()
        # End the session here. Commands that the client pipelined behind this
        # one would otherwise run until the close reaches the session, and a
        # message among them could be stored after the client received 421.
        raise asyncio.CancelledError

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._run_command("MAIL", super().smtp_MAIL, arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if self.envelope is not None and self.envelope.mail_from:
            self._rcpt_given = True
        await self._run_command("RCPT", super().smtp_RCPT, arg)

    async def _run_command(self, name: str, command: Callable[[str | None], Awaitable[None]], arg: str | None) -> None:
        """Run aiosmtpd's `command`, with `name` set so that its replies get that command's enhanced codes."""
        self._command = name
        try:
            await command(arg)
        finally:
            self._command = ""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL and RCPT argument with the email
        # package's full RFC 5322 parser, a tenth of intake's time in
        # profiles. Plain <local@domain> addresses take this path; anything
        # else (quoted local parts, source routes) still goes to aiosmtpd.
        match = _PLAIN_PATH.match(arg)
        if match is None:
            if arg.lstrip().startswith("<") and _CLOSED_PATH.match(arg) is None:
                # The email package reads a path without its closing ">" as
                # complete, but RFC 5321 section 4.1.2 requires it.
                return None, None
            try:
                return super()._getaddr(arg)
            except Exception:  # noqa: BLE001 - a client's argument must never end the command with 451
                # The email package's parser (Python 3.11.7) raises IndexError
                # on "<" or '"', and AttributeError or UnboundLocalError on
                # some domain literals ("a@[ x", "a@[ "). All are malformed.
                return None, None
        return match.group(1) or "<>", match.group(2).lstrip()

    async def _too_much_junk(self) -> bool:
        """Count a command that carries no mail. Past JUNK_COMMAND_LIMIT, reply 421, close the connection and return True.

        Each command restarts the idle timeout, so without this limit a
        client sending NOOP now and then would keep its connection slot.
        """
        self._junk += 1
        if self._junk <= JUNK_COMMAND_LIMIT:
            return False
        log.warning("connection_closed", peer=_peer(self.session), reason="too many commands without mail", commands=self._junk)
        self._reject("too many commands without mail")
        await self.push(REPLY_TOO_MANY_JUNK)
        assert self.transport is not None
        self.transport.close()
        return True

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._too_much_junk():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._too_much_junk():
            await super().smtp_RSET(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str | None) -> None:
        if await self._too_much_junk():
            return
        # RFC 5321 section 4.3.2 lists 214 as the success reply to HELP.
        commands = self._helped_commands()
        listed = " ".join(commands)
        name = (arg or "").upper()
        if not name:
            await self.push(REPLY_HELP.format(commands=listed))
        elif name not in commands:
            await self.push(REPLY_HELP_UNKNOWN.format(commands=listed))
        else:
            method = self._smtp_methods[name]
            text = method.__smtp_syntax__
            assert self.session is not None
            if self.session.extended_smtp and method.__smtp_syntax_extended__:
                text += method.__smtp_syntax_extended__
            await self.push(REPLY_HELP_SYNTAX.format(syntax=text))

    def _helped_commands(self) -> list[str]:
        """Return the names of the commands that have a @syntax line and are offered now, sorted."""
        return sorted(name for name, method in self._smtp_methods.items() if self._syntax_available(method))

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str | None) -> None:
        if await self._too_much_junk():
            return
        # The argument is neither parsed nor repeated: every address gets the
        # same 252 (RFC 5321 section 3.5.3), so VRFY reveals no inboxes.
        await self.push(REPLY_VRFY if arg else REPLY_VRFY_SYNTAX)

    # Without a @syntax line, HELP does not list EXPN, which is never available.
    async def smtp_EXPN(self, arg: str | None) -> None:
        if await self._too_much_junk():
            return
        await self.push(REPLY_EXPN)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # Mirrors the checks of aiosmtpd 1.4.6's smtp_DATA; only the reading differs.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.mail_from:
            await self.push(REPLY_NEED_MAIL)
            return
        if not self.envelope.rcpt_tos:
            # After RCPT commands that were all rejected, as a pipelining
            # client finds out only now, "need RCPT command" would be false.
            await self.push(REPLY_NO_VALID_RECIPIENTS if self._rcpt_given else REPLY_NEED_RCPT)
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self._tracker.closing:
            # Shutting down: the client retries the whole transaction later.
            await self.push(REPLY_SHUTTING_DOWN)
            assert self.transport is not None
            self.transport.close()
            return

        # Counting starts before the 354 reply, because the client may send
        # data as soon as the reply is written. A pipelining client's data
        # may already wait in the reader, behind the DATA command.
        self._data_bytes = len(self._reader._buffer)  # type: ignore[attr-defined]
        self._receiving_data = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            self._tracker.begin()
            self._junk = 0
            try:
                await self._finish_data()
            finally:
                self._tracker.end()
        finally:
            self._receiving_data = False

    async def _finish_data(self) -> None:
        assert self.envelope is not None
        try:
            async with asyncio.timeout(self._data_timeout):
                content, too_big, stuffed = await self._read_data()
        except TimeoutError:
            self._receiving_data = False  # closed by us, so not logged as connection_lost
            log.warning("data_timed_out", peer=_peer(self.session))
            self._reject("data timed out")
            await self.push(REPLY_DATA_TIMEOUT)
            assert self.transport is not None
            self.transport.close()
            return

        if stuffed:
            # RFC 5321 section 4.5.2: remove the leading dot the client added
            # to every line that starts with one.
            content = content.replace(b"\r\n.", b"\r\n")
            if content.startswith(b"."):
                content = content[1:]
        # RFC 1870 section 5 sizes the message without the dots added for transparency.
        if too_big or (self.data_size_limit and len(content) > self.data_size_limit):
            log.warning("message_rejected", peer=_peer(self.session), reason="too big")
            self._reject("too big")
            self._set_post_data_state()
            await self.push(REPLY_TOO_BIG)
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._handle_message()
        self._set_post_data_state()
        if status.startswith("2"):
            self._errors = 0
        await self.push(status)

    async def _handle_message(self) -> str:
        """Run the DATA hook on the received message and return its reply, finishing it even when the client leaves.

        A client that resets the connection after its final dot makes
        aiosmtpd cancel the session, possibly while a parse process routes
        the message. The hook runs in a task of its own, so the message is
        still stored, and the sender's retry, which got no reply, is stored
        as a duplicate.
        """
        handling = asyncio.get_running_loop().create_task(self._call_handler_hook("DATA"))
        try:
            return await asyncio.shield(handling)
        except asyncio.CancelledError:
            # The daemon's stop waits for this message as for any other in DATA.
            self._tracker.begin()
            handling.add_done_callback(partial(self._handled_after_close, _peer(self.session)))
            raise

    def _handled_after_close(self, peer: str, handling: asyncio.Future[str]) -> None:
        """Log the reply that a client which left after its final dot never got. Runs as a done callback."""
        self._tracker.end()
        if handling.cancelled():
            log.warning("message_not_accepted", peer=peer, reason="cancelled after the client disconnected")
        elif handling.exception() is not None:
            log.error("message_not_accepted", peer=peer, error=repr(handling.exception()),
                      reason="failed after the client disconnected")
        else:
            log.info("reply_not_sent", peer=peer, reply=handling.result(),
                     reason="the client disconnected before the reply to its final dot")

    async def _read_data(self) -> tuple[bytes, bool, bool]:
        """Read up to the end-of-data line; return the content as sent, whether it is surely too big, and whether it is dot-stuffed.

        The content keeps its final CRLF and its dot-stuffing. Once it is too
        big even without the stuffing, the rest is read and dropped, so the
        client gets its single reply after the final dot.
        """
        reader = self._reader
        # Stuffing adds at most one byte to a line of three (".", CR, LF), so
        # data beyond 4/3 of the limit is over it once unstuffed.
        limit = (self.data_size_limit or 0) * 4 // 3
        # The CRLF that ended the DATA command line starts the first line, so
        # an empty message (".\r\n" at once) is found like any other end.
        buffer = bytearray(b"\r\n")
        scanned = 0
        dropped = 0
        stuffed = False
        while True:
            # One pass finds both the end and any dot-stuffing, so content
            # without stuffed lines needs no second pass to undo it.
            end, scanned, seen = _scan_data(buffer, scanned)
            stuffed = stuffed or seen
            if end >= 0:
                break
            # Trim only after the search: a chunk can hold the end-of-data line.
            if limit and len(buffer) + dropped > limit + len(_END_OF_DATA) + 2:
                keep = len(_END_OF_DATA) - 1
                dropped += len(buffer) - keep
                del buffer[:-keep]
                scanned = 0
            chunk = await reader.read(_CHUNK)
            if not chunk:
                self._log_lost_during_data("closed by client", None)
                raise ConnectionResetError("connection closed during DATA")
            self._reset_timeout()
            buffer += chunk

        self._receiving_data = False
        leftover = bytes(buffer[end + len(_END_OF_DATA):])
        if leftover:
            # Commands the client sent right after the final dot belong to the
            # command loop; StreamReader has no unread, so put them back.
            reader._buffer[0:0] = leftover  # type: ignore[attr-defined]
        content = bytes(buffer[2:end + 2])
        return content, dropped > 0 or (limit > 0 and len(content) > limit), stuffed


def _protocol(session: Session) -> str:
    """Return the session's protocol for the Received header: SMTP, ESMTP (RFC 5321) or ESMTPS (RFC 3848)."""
    if not session.extended_smtp:
        return "SMTP"
    return "ESMTPS" if session.ssl is not None else "ESMTP"


def _peer(session: Session | None) -> str:
    if session is None or not session.peer:
        return ""
    peer = session.peer
    if isinstance(peer, tuple):
        return f"[{peer[0]}]:{peer[1]}"
    return str(peer)


# How many stalled messages intake remembers, to tell a sender's retry.
STALLED_KEPT = 1000


@dataclass
class IntakeHandler:
    """The aiosmtpd handler: each hook is a short list of steps."""

    config: Config
    store: Store
    clock: Clock
    rules: Callable[[], RuleSet]
    on_committed: Callable[[Outcome], None] = lambda outcome: None
    site: Site = field(init=False)
    metrics: Metrics = field(default_factory=Metrics)
    parsers: ParseProcesses | None = None
    # Messages whose routing stalled a parse process and got 451, by a hash
    # of envelope and bytes, oldest first; at most STALLED_KEPT of them.
    stalled: dict[bytes, None] = field(default_factory=dict)
    free_space: FreeSpace = field(init=False)
    # True while MAIL gets 452 for want of disk space, so that the change is logged once.
    storage_low: bool = False

    def __post_init__(self) -> None:
        self.site = Site.from_config(self.config)
        self.free_space = FreeSpace(self.config.database_path.parent)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]) -> list[str]:
        # GuardrailSMTP._greet has refused a malformed name before aiosmtpd calls this.
        session.host_name = hostname
        # aiosmtpd lists AUTH once TLS is active, but AUTH is not offered here.
        offered = [line for line in responses[:-1] if not line.startswith("250-AUTH")]
        # aiosmtpd 1.4.6 reads commands in order from one buffer and replies
        # to each in turn, and the DATA reader hands back the commands sent
        # after the final dot. So pipelined groups (RFC 2920) work, although
        # aiosmtpd does not list the keyword.
        return [*offered, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        # A connection carries several transactions; each starts with MAIL.
        structlog.contextvars.clear_contextvars()
        if _is_malformed(address):
            log.warning("sender_rejected", peer=_peer(session), reason="control character or invalid UTF-8 in address")
            self.metrics.messages_rejected.labels("invalid sender").inc()
            return REPLY_BAD_SENDER
        if not address.isascii() and "SMTPUTF8" not in options:
            # RFC 6531 section 3.5: a non-ASCII address needs the SMTPUTF8 parameter.
            self.metrics.messages_rejected.labels("invalid sender").inc()
            return REPLY_NEEDS_SMTPUTF8
        problem = self._storage_problem(options)
        if problem is not None:
            self.metrics.messages_rejected.labels("insufficient storage").inc()
            return REPLY_STORAGE_FULL
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    def _storage_problem(self, options: list[str]) -> str | None:
        """Return why the disk has no room for the message that MAIL with `options` announces, or None.

        Without a reading of the free space, the message is accepted: a
        commit that fails for want of space still gets 451.
        """
        free = self.free_space.bytes()
        if free is None:
            return None
        minimum = self.config.min_free_space
        low = storage_problem(free, minimum)
        if low is not None and not self.storage_low:
            log.error("storage_low", detail=low, reply="452 4.3.1 to every MAIL until space is freed")
        elif low is None and self.storage_low:
            log.warning("storage_recovered", free_bytes=free)
        self.storage_low = low is not None
        if low is not None:
            return low
        # The disk has room in general, but not for the size this client announced.
        problem = storage_problem(free, minimum, _declared_size(options))
        if problem is not None:
            log.warning("sender_deferred", reason="the announced size does not fit on the disk", detail=problem)
        return problem

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        if _is_malformed(address):
            log.warning("recipient_rejected", peer=_peer(session), reason="control character or invalid UTF-8 in address")
            self.metrics.messages_rejected.labels("invalid recipient").inc()
            return REPLY_BAD_RECIPIENT
        if not address.isascii() and not envelope.smtp_utf8:
            # RFC 6531: a non-ASCII recipient needs the SMTPUTF8 parameter on the transaction's MAIL.
            log.warning("recipient_rejected", peer=_peer(session), recipient=address, reason="non-ASCII address without SMTPUTF8")
            self.metrics.messages_rejected.labels("invalid recipient").inc()
            return REPLY_NEEDS_SMTPUTF8
        if address in ("", "<>"):
            # The null path is a sender's only (RFC 5321 section 4.1.1.3).
            log.warning("recipient_rejected", peer=_peer(session), reason="null recipient")
            self.metrics.messages_rejected.labels("invalid recipient").inc()
            return REPLY_BAD_RECIPIENT
        if not is_accepted_recipient(address, self.site):
            log.warning("recipient_rejected", peer=_peer(session), recipient=address, reason="not an inbox of ours")
            self.metrics.messages_rejected.labels("relay denied").inc()
            return REPLY_NOT_OURS
        if address.lower() in (accepted.lower() for accepted in envelope.rcpt_tos):
            # A repeated recipient gets the message once and does not count toward the limit.
            return REPLY_RECIPIENT_OK
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            self.metrics.messages_rejected.labels("too many recipients").inc()
            return REPLY_TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return REPLY_RECIPIENT_OK

    async def handle_exception(self, error: Exception, peer: str = "") -> str:
        if isinstance(error, TLSSetupException):
            # Scanners and broken clients fail handshakes all day; aiosmtpd closes the connection.
            log.warning("tls_handshake_failed", peer=peer, error=repr(error.__cause__ or error))
        else:
            log.error("smtp_session_failed", peer=peer, error=repr(error))
        return REPLY_TEMPORARY

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        try:
            return await self._receive(session, envelope, started)
        except Exception as error:  # noqa: BLE001 - answer 451 so the sender retries
            log.error("message_not_accepted", error=repr(error), reason="internal failure before commit")
            self.metrics.messages_rejected.labels("temporary failure").inc()
            return REPLY_TEMPORARY

    async def _receive(self, session: Session, envelope: Envelope, started: float) -> str:
        structlog.contextvars.clear_contextvars()
        raw = envelope.original_content or b""
        facts = PreparedEnvelope(
            mail_from="" if envelope.mail_from in (None, "<>") else str(envelope.mail_from),
            rcpt_tos=tuple(address.lower() for address in envelope.rcpt_tos),
            peer=_peer(session),
            helo=session.host_name or "",
            protocol=_protocol(session),
        )
        now = self.clock.now()
        try:
            prepared = await self.parsers.prepare(facts, raw, now) if self.parsers is not None else None
        except ParseStalled as error:
            if self._first_stall(facts, raw, str(error)):
                return REPLY_TEMPORARY
            reason = f"{UNROUTED_REASON} ({error}); a rule's regular expression may backtrack on this message"
            log.error("routing_gave_up", peer=facts.peer, route=self.rules().default_route.name, reason=reason)
            self.metrics.messages_parsed.labels("without routing").inc()
            prepared = prepare_unrouted(facts, raw, self.rules(), self.site, now, reason)
        if prepared is None:
            prepared = prepare_received(facts, raw, self.rules(), self.site, now)
            self.metrics.messages_parsed.labels("daemon").inc()
        else:
            self.metrics.messages_parsed.labels("parse process").inc()
        if isinstance(prepared, BareLineEnding):
            log.warning("bare_lf_rejected", peer=facts.peer, reason="bare LF or bare CR in DATA")
            self.metrics.messages_rejected.labels("bare line ending").inc()
            return REPLY_BARE_LINE_ENDING
        if isinstance(prepared, TooManyHops):
            structlog.contextvars.bind_contextvars(peer=facts.peer, message_id=prepared.message_id)
            log.warning("message_rejected", reason="too many Received headers", hops=prepared.received_count)
            self.metrics.messages_rejected.labels("too many hops").inc()
            return REPLY_TOO_MANY_HOPS
        submission = prepared
        summary = submission.summary
        structlog.contextvars.bind_contextvars(
            peer=facts.peer, message_id=summary.message_id, route=submission.route, team=submission.team
        )
        outcome = await self.store.queue_submission(submission)
        return self._committed(outcome, submission, len(raw), started)

    def _first_stall(self, facts: PreparedEnvelope, raw: bytes, error: str) -> bool:
        """Return True, remember the message and log it, when its routing stalls for the first time.

        A stall can be passing (a loaded machine), so the first one gets a
        temporary failure. A retry of the same message that stalls again
        would stall on every retry until the sender gave up, so the caller
        prepares it without routing (see prepare_unrouted).
        """
        key = hashlib.sha256(repr((facts.mail_from, facts.rcpt_tos)).encode() + raw).digest()
        if key in self.stalled:
            del self.stalled[key]
            return False
        self.stalled[key] = None
        while len(self.stalled) > STALLED_KEPT:
            del self.stalled[next(iter(self.stalled))]
        log.error("message_not_accepted", reason="routing stalled", error=error,
                  detail="a retry that stalls again goes to the default route")
        self.metrics.messages_rejected.labels("routing stalled").inc()
        return True

    def _committed(self, outcome: Outcome, submission: Submission, size: int, started: float) -> str:
        """Notify the workers of a committed message and log it, then return the reply to its final dot."""
        self.metrics.intake_seconds.observe(time.perf_counter() - started)
        if outcome.disposition == "duplicate":
            message_id = submission.summary.message_id
            log.info("message_duplicate", detail=f"duplicate of {message_id or 'a message without Message-ID'}")
            self.metrics.messages_accepted.labels("duplicate").inc()
            return REPLY_DUPLICATE.format(message_id=_shown_message_id(message_id))
        self.on_committed(outcome)
        self._log_outcome(outcome, submission, size, started)
        return REPLY_ACCEPTED.format(reference=outcome.reference or f"message {outcome.message_row}")

    def _log_outcome(self, outcome: Outcome, submission: Submission, size: int, started: float) -> None:
        structlog.contextvars.bind_contextvars(
            conversation=outcome.reference, conversation_id=outcome.conversation_id, route=outcome.route, team=outcome.team,
            destination=outcome.destination.describe() if outcome.destination else None,
        )
        log.info(
            "message_accepted", disposition=outcome.disposition, size=size, thread=outcome.thread_reason or None,
            deadline=outcome.deadline.isoformat() if outcome.deadline else None,
            copied_to=list(outcome.copied_to) or None,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if submission.staff_unverified:
            log.warning("staff_sender_not_verified", reason=submission.staff_unverified)
        if outcome.moved_from:
            # A removed team is a rules change to look into; the other reason is the rules at work.
            level = log.warning if outcome.move_reason == MOVED_TEAM_REMOVED else log.info
            level("conversation_team_changed", from_team=outcome.moved_from, reason=outcome.move_reason)
        self.metrics.messages_accepted.labels(outcome.disposition).inc()
        self.metrics.messages_routed.labels(outcome.route or "none").inc()
        if outcome.ack_decision == "sent":
            self.metrics.acks_sent.inc()
            log.info("ack_queued", language=submission.ack.language if submission.ack else None)
        elif outcome.ack_decision == "suppressed":
            self.metrics.acks_suppressed.labels(_signal_label(outcome.ack_signal)).inc()
            log.info("ack_suppressed", signal=outcome.ack_signal)
        if outcome.ack_limit_reached and submission.ack is not None:
            log.warning("ack_limit_reached", address=submission.ack.to_address,
                        detail=f"acknowledgement limit reached for {submission.ack.to_address}")
        if outcome.ack_problem and submission.ack is not None:
            self.metrics.ack_template_fallbacks.inc()
            log.warning("ack_template_fallback", template=submission.ack.template.name,
                        language=submission.ack.language, problem=outcome.ack_problem)
        if outcome.answered:
            log.info("conversation_answered", by=submission.sender)
        if outcome.reopened:
            log.info("conversation_reopened", by=submission.sender)
        if outcome.thanked:
            log.info("thanks_received", by=submission.sender)
        if outcome.escalation_reason.startswith(UNROUTED_REASON):
            # The team is staffed, and routing_gave_up gave the reason.
            log.warning("conversation_escalated_at_once", reason=outcome.escalation_reason)
        elif outcome.escalation_reason:
            log.warning("team_unstaffed", reason=outcome.escalation_reason)


def _declared_size(options: list[str]) -> int:
    """Return the SIZE parameter of MAIL FROM (RFC 1870) among `options`, or 0 when there is none."""
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isascii() and value.isdigit():
            return int(value)
    return 0


def _signal_label(signal: str) -> str:
    """Return a signal without the addresses and subjects in it, to keep label values few."""
    label = re.sub(r"\S+@\S+", "ADDRESS", signal)
    # repr quotes a subject that contains an apostrophe in double quotes.
    label = re.sub(r"'.*'|\".*\"", "'...'", label)
    return label.split(":")[0] if label.lower().startswith(("auto-submitted", "x-auto-response-suppress")) else label


def _is_utf8(text: str) -> bool:
    # aiosmtpd keeps bytes that are not UTF-8 as surrogate escapes.
    return _SURROGATE_ESCAPE.search(text) is None


def _has_control_characters(text: str) -> bool:
    return _CONTROL_CHARACTER.search(text) is not None


def _is_malformed(text: str) -> bool:
    """Return True for a client name or address with control characters or bytes that are not UTF-8."""
    return _has_control_characters(text) or not _is_utf8(text)


def _shown_message_id(message_id: str) -> str:
    """Return `message_id` for a reply line, or "an earlier message" when it is missing or unsafe to repeat."""
    return message_id if _SHOWN_MESSAGE_ID.fullmatch(message_id) else "an earlier message"
