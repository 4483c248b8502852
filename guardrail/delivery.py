"""The outbox worker: delivers what intake committed, and retries what failed.

Every row of the outbox is work that must leave the process. The worker takes
due rows, delivers each to a maildir or over SMTP, and records the outcome in
the same store, so a restart resumes exactly where the last process stopped.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import structlog
import tenacity

from .clock import Clock
from .config import Config
from .errors import (
    PartialDeliveryError,
    PermanentDeliveryError,
    StorageError,
    TemporaryDeliveryError,
)
from .escalation import decode_fallback
from .loops import LOOP_HEADER
from .maildir import write_maildirs
from .metrics import Metrics
from .outbox import REQUEUED_AT, retry_window_start
from .rules import Destination
from .rules_sla import Webhook
from .store import AttemptResult, OutboxRow, Store
from .team_copies import COPY_HEADER
from .webhooks import WebhookSender

log = structlog.get_logger("guardrail.delivery")

# At most this many rows bound for maildirs are delivered by one attempt task.
MAILDIR_BATCH = 32
# The worker looks for due rows at least this often, woken or not.
RESCAN_EVERY = timedelta(minutes=1)


def retry_delay(attempt: int, initial: timedelta, maximum: timedelta) -> timedelta:
    """Return how long to wait after failed attempt number `attempt` (1-based).

    Exponential backoff with jitter: about initial * 2**(attempt-1), plus up to
    `initial` of random jitter, never more than `maximum`.
    """
    wait = tenacity.wait_exponential_jitter(
        multiplier=initial.total_seconds(),
        max=maximum.total_seconds(),
        jitter=initial.total_seconds(),
    )
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return timedelta(seconds=wait(state))


@dataclass(frozen=True)
class RetryPolicy:
    """The retry schedule of one kind of outbox row after temporary failures."""

    initial: timedelta  # the backoff after the first failed attempt, doubled after each further one
    maximum: timedelta  # the maximum backoff
    give_up_after: timedelta  # a row this old fails for good at its next temporary failure
    attempts: int | None = None  # the maximum number of attempts of one row, or None for no limit but give_up_after


def retry_policy(kind: str, config: Config) -> RetryPolicy:
    """Return the retry policy of outbox rows of `kind`, from `[webhooks]` for webhooks and `[delivery]` for mail."""
    delivery = config.delivery
    if kind == "webhook":
        webhooks = config.webhooks
        return RetryPolicy(webhooks.retry_initial, webhooks.retry_max, delivery.give_up_after, webhooks.attempts)
    return RetryPolicy(delivery.retry_initial, delivery.retry_max, delivery.give_up_after)


def gives_up(policy: RetryPolicy, attempts: int, age: timedelta) -> bool:
    """Return True when a row whose attempt number `attempts` failed for now, `age` after it was queued, fails for good."""
    if policy.attempts is not None and attempts >= policy.attempts:
        return True
    return age >= policy.give_up_after


def after_partial(target: dict[str, Any], error: PartialDeliveryError) -> dict[str, Any]:
    """Return an outbox target after an attempt that reached some recipients.

    The target is addressed to the deferred recipients, and adds the accepted
    ones to its "delivered" list and those rejected for good to "undelivered".
    """
    return {
        **target,
        "addresses": list(error.deferred),
        "delivered": [*target.get("delivered", ()), *error.accepted],
        "undelivered": [*target.get("undelivered", ()), *error.rejected],
    }


def reach(target: dict[str, Any], *, failed: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return the recipients of an outbox target that have the message, and those that will not get it.

    Once the row has failed, the recipients it is still addressed to will not get it either.
    """
    delivered = tuple(target.get("delivered", ()))
    undelivered = tuple(target.get("undelivered", ()))
    if failed:
        undelivered += tuple(target.get("addresses", ()))
    return delivered, undelivered


def clean_header_value(value: str) -> str:
    """Return `value` with CR, LF and NUL replaced, safe to place in a header."""
    return value.replace("\r", " ").replace("\n", " ").replace("\x00", " ")


def received_name(helo: str) -> str:
    """Return the HELO name as the Received header's from clause shows it.

    A client can send anything as its name. Characters that a domain or an
    address literal cannot contain (parentheses, semicolons, quotes, spaces)
    would open a comment or end the clause early for a parser of the
    header, so each becomes "?". Letters and digits outside ASCII stay, as in
    an internationalized domain. Brackets stay only where they enclose the
    whole name as an address literal, such as "[192.0.2.7]".
    """
    is_literal = len(helo) > 2 and helo.startswith("[") and helo.endswith("]")
    inner = helo[1:-1] if is_literal else helo
    name = "".join(character if character.isalnum() or character in ".-_:" else "?" for character in inner)
    if is_literal:
        return f"[{name}]"
    return name or "unknown"


def trace_headers(
    *,
    hostname: str,
    envelope: dict[str, object],
    for_address: str,
    copy_for: str = "",
    owner: str = "",
) -> bytes:
    """Build the headers prepended to a forwarded message; the body is never touched.

    X-Guardrail-Conversation and X-Guardrail-Route are left out when they
    have no value, as for postmaster mail, which opens no conversation. A
    copy for team `copy_for` of a conversation that team `owner` owns gets
    an X-Guardrail-Copy header that names both teams.
    """
    received_at = envelope["received_at"]
    assert isinstance(received_at, datetime)
    lines = [
        f"Received: from {received_name(str(envelope['helo']))} ({clean_header_value(str(envelope['peer']))})",
        f"\tby {hostname} (guardrail) with {envelope.get('protocol') or 'ESMTP'} id {envelope['message_row']}",
        f"\tfor <{clean_header_value(for_address)}>; {format_datetime(received_at)}",
    ]
    for name, key in (("X-Guardrail-Conversation", "reference"), ("X-Guardrail-Route", "route")):
        value = clean_header_value(str(envelope.get(key) or "")).strip()
        if value:
            lines.append(f"{name}: {value}")
    if copy_for:
        lines.append(f"{COPY_HEADER}: for team {clean_header_value(copy_for)}; conversation owned by team {clean_header_value(owner)}")
    lines.append(f"{LOOP_HEADER}: {hostname}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]
    original_sender: str = ""


class Transport:
    """Hands finished bytes to a maildir or to the smarthost."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._hostname = config.smtp.hostname

    def writes_maildir(self, destination_kind: str) -> bool:
        """Return True when a destination of this kind ("maildir" or "smtp") is delivered into a maildir."""
        return destination_kind == "maildir" or self._config.smarthost is None

    def maildir_for(self, destination: Destination, envelope: Envelope) -> tuple[Path, bytes] | None:
        """Return the maildir that `destination` is delivered to and the header lines to put first, or None for SMTP."""
        if not self.writes_maildir(destination.kind):
            return None
        if destination.kind == "maildir":
            # A maildir is final delivery: Return-Path carries the sender's
            # own envelope address, as a local delivery agent would write it.
            header = f"Return-Path: <{clean_header_value(envelope.original_sender)}>\r\n".encode()
            return Path(destination.maildir), header
        # Without a smarthost nothing leaves the machine: mail meant for
        # other hosts lands in the outbound maildir, addressed in headers.
        header = (
            f"Return-Path: <{clean_header_value(envelope.sender)}>\r\n"
            f"X-Guardrail-Envelope-To: {clean_header_value(', '.join(envelope.recipients))}\r\n"
        ).encode()
        return self._config.outbound_maildir, header

    async def send(self, destination: Destination, data: bytes, envelope: Envelope, name: str) -> None:
        """Deliver `data`; raise TemporaryDeliveryError or PermanentDeliveryError on failure."""
        target = self.maildir_for(destination, envelope)
        if target is None:
            await self._send_smtp(data, envelope)
            return
        folder, header = target
        [result] = await asyncio.to_thread(write_maildirs, [(folder, name, header + data)])
        if isinstance(result, Exception):
            raise result

    async def _send_smtp(self, data: bytes, envelope: Envelope) -> None:
        smarthost = self._config.smarthost
        assert smarthost is not None
        client = aiosmtplib.SMTP(
            hostname=smarthost.host,
            port=smarthost.port,
            local_hostname=self._hostname,
            start_tls=True if smarthost.starttls else False,
            username=smarthost.username,
            password=smarthost.password.reveal() if smarthost.password else None,
            timeout=smarthost.timeout.total_seconds(),
        )
        # A non-ASCII address needs the SMTPUTF8 parameter (RFC 6531), which
        # aiosmtplib's sendmail (checked with 5.1) adds only when it is passed.
        addresses = (envelope.sender, *envelope.recipients)
        mail_options = [] if all(address.isascii() for address in addresses) else ["SMTPUTF8"]
        try:
            async with client:
                if not data.isascii():
                    # RFC 6152: 8-bit data goes with BODY=8BITMIME to a server that
                    # offers it. One that does not gets it as it is, as most accept it.
                    if client.is_ehlo_or_helo_needed:
                        await client.ehlo()
                    if client.supports_extension("8BITMIME"):
                        mail_options.append("BODY=8BITMIME")
                # sendmail raises only when every recipient is rejected. Otherwise it
                # returns the rejected ones, which have not got the message.
                refused, _ = await client.sendmail(envelope.sender, list(envelope.recipients), data, mail_options=mail_options)
        except aiosmtplib.SMTPNotSupported as error:
            raise PermanentDeliveryError(
                f"smarthost {smarthost.host}:{smarthost.port} does not offer SMTPUTF8, which a non-ASCII address needs; "
                f"relay through one that does: {error}"
            ) from error
        except aiosmtplib.SMTPRecipientsRefused as error:
            codes = [refused.code for refused in error.recipients]
            message = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in error.recipients)
            if all(code >= 500 for code in codes):
                raise PermanentDeliveryError(f"smarthost rejected every recipient: {message}") from error
            if all(code < 500 for code in codes):
                raise TemporaryDeliveryError(f"smarthost deferred recipients: {message}") from error
            # Retrying the ones rejected for good would only repeat their rejection until give_up_after.
            deferred = tuple(r.recipient for r in error.recipients if r.code < 500)
            rejected = tuple(r.recipient for r in error.recipients if r.code >= 500)
            replies = {r.recipient: f"{r.code} {r.message}" for r in error.recipients}
            raise PartialDeliveryError(
                f"smarthost deferred some recipients and rejected the others for good: {message}", deferred, rejected,
                replies=replies,
            ) from error
        except aiosmtplib.SMTPAuthenticationError as error:
            # A credentials problem is ours to fix, not the destination's: keep the mail queued.
            raise TemporaryDeliveryError(f"smarthost authentication failed: {error.code} {error.message}") from error
        except aiosmtplib.SMTPResponseException as error:
            text = f"smarthost replied {error.code} {error.message}"
            if 500 <= error.code < 600:
                raise PermanentDeliveryError(text) from error
            raise TemporaryDeliveryError(text) from error
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as error:
            raise TemporaryDeliveryError(f"smarthost {smarthost.host}:{smarthost.port} unreachable: {error!r}") from error
        if refused:
            deferred = tuple(address for address, reply in refused.items() if reply.code < 500)
            rejected = tuple(address for address, reply in refused.items() if reply.code >= 500)
            accepted = tuple(address for address in envelope.recipients if address not in refused)
            replies = {address: f"{reply.code} {reply.message}" for address, reply in refused.items()}
            message = "; ".join(f"{address}: {reply}" for address, reply in replies.items())
            raise PartialDeliveryError(
                f"smarthost accepted the message for some recipients and rejected {message}", deferred, rejected, accepted,
                replies,
            )


def maildir_name(row: OutboxRow, hostname: str) -> str:
    """Return a stable maildir file name for an outbox row, the same on every retry."""
    safe_host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{int(row.created_at.timestamp())}.G{row.id}.{safe_host}"


# Writes (folder, name, data) files into maildirs and returns one result per
# file, as write_maildirs does.
FileWriter = Callable[[list[tuple[Path, str, bytes]]], Awaitable[list[bool | Exception]]]


async def write_in_thread(files: list[tuple[Path, str, bytes]]) -> list[bool | Exception]:
    """Write `files` with write_maildirs in a worker thread."""
    return await asyncio.to_thread(write_maildirs, files)


class DeliveryWorker:
    """The outbox runner: at most `delivery.concurrency` attempt tasks at a time.

    A task delivers one row over SMTP or to a webhook, or up to MAILDIR_BATCH
    rows to maildirs. Rows bound for maildirs share one trip to a worker
    thread, one fsync of each new/ folder and one commit of their results,
    which is most of what a maildir delivery costs. Only one maildir task
    runs at a time: writing to local disk gains nothing from running in
    parallel, and one task leaves CPU time to intake while mail arrives.
    """

    def __init__(
        self,
        store: Store,
        config: Config,
        clock: Clock,
        transport: Transport | None = None,
        *,
        metrics: Metrics | None = None,
        write_files: FileWriter | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._write_files = write_files or write_in_thread
        self._store = store
        self._config = config
        self._clock = clock
        self._transport = transport or Transport(config)
        self._webhooks = WebhookSender(config.webhooks, clock)
        self._in_flight: dict[int, asyncio.Task[None]] = {}  # outbox row id to the task delivering it
        self._tasks: set[asyncio.Task[None]] = set()
        self._maildir_task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()  # set when an attempt task ends
        self.wake = asyncio.Event()  # set when there may be new work
        self.alive = False
        self.on_recorded: Callable[[AttemptResult], None] = lambda result: None

    @property
    def in_flight(self) -> int:
        """Return how many outbox rows are being delivered."""
        return len(self._in_flight)

    async def run(self) -> None:
        """Deliver due rows until cancelled."""
        self.alive = True
        try:
            while True:
                self.wake.clear()
                self._finished.clear()
                free = self._config.delivery.concurrency - len(self._tasks)
                if free <= 0:
                    # Every slot is busy: new work waits for an attempt to finish.
                    await self._finished.wait()
                    continue
                limit = free + MAILDIR_BATCH
                # One reading of the clock for both queries: a row that falls
                # due between two readings would be neither due nor next.
                now = self._clock.now()
                rows = await self._store.due_outbox(now, set(self._in_flight), limit)
                if self._start_due(rows, free):
                    # Some due rows wait for a slot or for the maildir task,
                    # so querying again before an attempt finishes finds them again.
                    await self._finished.wait()
                    continue
                if len(rows) == limit:
                    continue  # More rows may be due.
                await self._clock.sleep_until(await self._next_wake(now), self.wake)
        finally:
            self.alive = False
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._webhooks.close()

    def _start_due(self, rows: list[OutboxRow], free: int) -> bool:
        """Start tasks for `rows` in at most `free` slots; return True if a row was left waiting."""
        maildir_rows = [row for row in rows if self._to_maildir(row)]
        other_rows = [row for row in rows if not self._to_maildir(row)]
        left = False
        if maildir_rows and self._maildir_task is None:
            batch = maildir_rows[:MAILDIR_BATCH]
            self._maildir_task = self._start(batch, self._attempt_maildirs(batch))
            free -= 1
            left = len(maildir_rows) > len(batch)
        elif maildir_rows:
            left = True
        for row in other_rows[:free]:
            self._start([row], self._attempt(row))
        return left or len(other_rows) > free

    async def _next_wake(self, now: datetime) -> datetime:
        """Return when to look for due rows again: when the next row falls due, and at most RESCAN_EVERY from `now`."""
        # New work wakes the worker at once. The rescan, like an MTA's queue
        # run, bounds the delay for a row whose wake-up was missed.
        next_due = await self._store.next_outbox_due(after=now)
        rescan = now + RESCAN_EVERY
        return rescan if next_due is None else min(next_due, rescan)

    def _to_maildir(self, row: OutboxRow) -> bool:
        if row.kind == "deliver":
            return self._transport.writes_maildir(row.target.get("kind", ""))
        # Mail guardrail wrote itself always has an SMTP destination.
        return row.kind == "mail" and self._transport.writes_maildir("smtp")

    def _start(self, rows: list[OutboxRow], attempt: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(attempt, name=f"guardrail-outbox-{rows[0].id}")
        self._tasks.add(task)
        for row in rows:
            self._in_flight[row.id] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if self._maildir_task is task:
                self._maildir_task = None
            for row in rows:
                self._in_flight.pop(row.id, None)
            self._finished.set()
            self.wake.set()

        task.add_done_callback(finished)
        return task

    async def _attempt(self, row: OutboxRow) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**_row_context(row))
        attempts = row.attempts + 1
        try:
            await self._deliver(row)
        except PermanentDeliveryError as error:
            result = self._failed(row, attempts, str(error))
        except PartialDeliveryError as error:
            result = self._partial(row, attempts, error)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - anything unexpected is retried, never dropped
            result = self._retry_or_give_up(row, attempts, error)
        else:
            log.info("delivered", attempts=attempts)
            result = self._done(row, attempts)
        await self._record(result)

    async def _attempt_maildirs(self, rows: list[OutboxRow]) -> None:
        """Deliver `rows`, all bound for maildirs, with one trip to a worker thread."""
        # Each row's log context is passed to its log lines, and bound only
        # around the calls that log on their own.
        structlog.contextvars.clear_contextvars()
        results: list[tuple[AttemptResult, dict[str, Any]]] = []
        written: list[tuple[OutboxRow, dict[str, Any]]] = []
        files: list[tuple[Path, str, bytes]] = []
        for row in rows:
            context = _row_context(row)
            try:
                destination, data, envelope, details = await self._compose(row)
                context.update(details)
                target = self._transport.maildir_for(destination, envelope)
                # _to_maildir chose this row by the rule maildir_for applies.
                assert target is not None
            except PermanentDeliveryError as error:
                with structlog.contextvars.bound_contextvars(**context):
                    results.append((self._failed(row, row.attempts + 1, str(error)), context))
            except Exception as error:  # noqa: BLE001 - anything unexpected is retried, never dropped
                with structlog.contextvars.bound_contextvars(**context):
                    results.append((self._retry_or_give_up(row, row.attempts + 1, error), context))
            else:
                folder, header = target
                files.append((folder, maildir_name(row, self._config.smtp.hostname), header + data))
                written.append((row, context))
        outcomes = await self._write_files(files) if files else []
        for (row, context), outcome in zip(written, outcomes):
            attempts = row.attempts + 1
            if isinstance(outcome, Exception):
                with structlog.contextvars.bound_contextvars(**context):
                    result = self._retry_or_give_up(row, attempts, outcome)
            else:
                log.info("delivered", attempts=attempts, **context)
                result = self._done(row, attempts)
            results.append((result, context))
        await asyncio.gather(*(self._record(result, context) for result, context in results))

    def _done(self, row: OutboxRow, attempts: int) -> AttemptResult:
        return AttemptResult(
            row.id, row.conversation_id, row.message_row, self._clock.now(), "done", attempts, kind=row.kind,
            requeued=REQUEUED_AT in row.target,
        )

    async def _record(self, result: AttemptResult, context: dict[str, Any] | None = None) -> None:
        try:
            await self._store.record_attempt(result)
        except StorageError as error:
            # The row stays pending, so the attempt is repeated later.
            log.error("attempt_not_recorded", error=str(error), state=result.state, **(context or {}))
        else:
            self.on_recorded(result)

    def _failed(self, row: OutboxRow, attempts: int, error: str) -> AttemptResult:
        purpose = row.target.get("purpose", "")
        self._metrics.delivery_failures.labels(row.kind, "yes").inc()
        if row.kind == "webhook":
            self._metrics.webhook_failures.inc()
        # A webhook or an escalation mail may carry the mail to send in its place.
        mail = decode_fallback(row.target.get("fallback")) if row.kind == "webhook" or purpose == "escalation" else None
        fallback = None
        if mail is not None:
            fallback = {"target": {"kind": "smtp", "addresses": list(mail.recipients), "purpose": "escalation"}, "payload": mail.data}
        if row.kind == "webhook":
            log.error("escalation_failed", error=error, attempts=attempts, channel="webhook",
                      fallback="escalation mail" if fallback else "none (the level's mail was sent)")
        elif purpose == "escalation":
            log.error("escalation_failed", error=error, attempts=attempts, channel="mail",
                      fallback=f"escalation mail to {', '.join(mail.recipients)}" if mail else "none (nobody else to tell)")
        else:
            log.error("delivery_failed", error=error, attempts=attempts)
        delivered, undelivered = reach(row.target, failed=True)
        return AttemptResult(row.id, row.conversation_id, row.message_row, self._clock.now(), "failed", attempts,
                             error=error, kind=row.kind, fallback=fallback, delivered=delivered, undelivered=undelivered)

    def _partial(self, row: OutboxRow, attempts: int, error: PartialDeliveryError) -> AttemptResult:
        """Return the result of an attempt that reached some recipients: the next attempt goes to the deferred ones only."""
        if error.deferred:
            advanced = replace(row, target=after_partial(row.target, error))
            return replace(
                self._retry_or_give_up(advanced, attempts, error), recipients=error.deferred, rejected=_rejected(error),
                team=row.target.get("team", ""),
            )
        # Every recipient that can get the message has it, so the message does
        # not escalate. The store records each rejected address, and the
        # rejected-address alarm mails the route's owner about it once a period.
        self._metrics.delivery_failures.labels(row.kind, "yes").inc()
        log.error("delivery_failed", error=str(error), attempts=attempts, rejected=list(error.rejected))
        return AttemptResult(row.id, row.conversation_id, row.message_row, self._clock.now(), "done", attempts,
                             error=str(error), kind=row.kind, rejected=_rejected(error), team=row.target.get("team", ""))

    def _retry_or_give_up(self, row: OutboxRow, attempts: int, error: Exception) -> AttemptResult:
        """Return the result of an attempt that failed for now: pending until a stored time, or failed once its policy gives up."""
        now = self._clock.now()
        text = str(error) if isinstance(error, TemporaryDeliveryError) else f"unexpected error: {error!r}"
        policy = retry_policy(row.kind, self._config)
        if gives_up(policy, attempts, now - retry_window_start(row.created_at, row.target)):
            return self._failed(row, attempts, f"gave up after {attempts} attempts: {text}")
        delay = retry_delay(attempts, policy.initial, policy.maximum)
        self._metrics.delivery_failures.labels(row.kind, "no").inc()
        log.warning("delivery_deferred", error=text, attempts=attempts, retry_in_seconds=round(delay.total_seconds(), 1))
        delivered, undelivered = reach(row.target, failed=False)
        return AttemptResult(row.id, row.conversation_id, row.message_row, now, "pending", attempts,
                             next_attempt_at=now + delay, error=text, kind=row.kind, delivered=delivered, undelivered=undelivered)

    async def _deliver(self, row: OutboxRow) -> None:
        if row.kind == "webhook":
            await self._post_webhook(row)
            return
        destination, data, envelope, details = await self._compose(row)
        structlog.contextvars.bind_contextvars(**details)
        await self._transport.send(destination, data, envelope, maildir_name(row, self._config.smtp.hostname))

    async def _compose(self, row: OutboxRow) -> tuple[Destination, bytes, Envelope, dict[str, Any]]:
        """Return where a deliver or mail row goes, the bytes to send, the envelope and what to log about it."""
        if row.kind == "deliver" and row.message_row is not None:
            return await self._compose_forward(row)
        if row.kind == "mail":
            return await self._compose_mail(row)
        raise PermanentDeliveryError(f"outbox row kind {row.kind!r} is not known to this version")

    async def _compose_forward(self, row: OutboxRow) -> tuple[Destination, bytes, Envelope, dict[str, Any]]:
        destination = Destination.from_record(row.target)
        raw, envelope = row.message or await self._store.message_for_delivery(row.message_row)  # type: ignore[arg-type]
        recipients = destination.addresses or (str(envelope["rcpt_tos"][0]) if envelope["rcpt_tos"] else "",)
        # A delivery to the postmaster owner records the postmaster recipient
        # it was received for, which its Received header names in place of the owner.
        received_for = row.target.get("received_for") or recipients[0]
        copy_for, owner = row.target.get("copy_for", ""), row.target.get("owner", "")
        data = trace_headers(
            hostname=self._config.smtp.hostname, envelope=envelope, for_address=received_for, copy_for=copy_for, owner=owner,
        ) + raw
        details = {"destination": destination.describe(), "conversation": envelope["reference"], "route": envelope["route"]}
        if copy_for:
            details["copy_for"] = copy_for
        return destination, data, Envelope(self._config.delivery.return_path, tuple(recipients), str(envelope["mail_from"])), details

    async def _compose_mail(self, row: OutboxRow) -> tuple[Destination, bytes, Envelope, dict[str, Any]]:
        """Compose a message guardrail wrote itself (acknowledgement or escalation)."""
        recipients = tuple(row.target["addresses"])
        data = row.payload if row.payload is not None else await self._store.outbox_payload(row.id)
        # An acknowledgement carries a null return path (RFC 3834 section 3.3).
        sender = row.target.get("sender", self._config.delivery.return_path)
        details = {"destination": "smtp " + ", ".join(recipients), "purpose": row.target.get("purpose")}
        return Destination("smtp", addresses=recipients), data, Envelope(sender, recipients, sender), details

    async def _post_webhook(self, row: OutboxRow) -> None:
        """POST a webhook row's body once. A failure raises, and the caller records it."""
        webhook = Webhook(row.target["url"], row.target.get("format", "json"), row.target.get("secret_env"))
        structlog.contextvars.bind_contextvars(destination=f"webhook {webhook.url}")
        body = json.loads(row.payload if row.payload is not None else await self._store.outbox_payload(row.id))
        await self._webhooks.post(row.id, webhook, body)


def _rejected(error: PartialDeliveryError) -> tuple[tuple[str, str], ...]:
    """Return each recipient rejected for good with the smarthost's reply to it."""
    return tuple((address, error.replies.get(address, str(error))) for address in error.rejected)


def _row_context(row: OutboxRow) -> dict[str, Any]:
    """Return the log fields that name an outbox row."""
    return {"outbox_id": row.id, "kind": row.kind, "conversation_id": row.conversation_id}
