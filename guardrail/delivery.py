"""The outbox worker: delivers what intake committed, and retries what failed.

Every row of the outbox is work that must leave the process. The worker takes
due rows, delivers each to a maildir or over SMTP, and records the outcome in
the same store, so a restart resumes exactly where the last process stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import aiosmtplib
import structlog
import tenacity

from .clock import Clock
from .config import Config
from .errors import PermanentDeliveryError, StorageError, TemporaryDeliveryError
from .escalation import decode_fallback
from .loops import LOOP_HEADER
from .metrics import Metrics
from .rules import Destination
from .rules_sla import Webhook
from .store import AttemptResult, OutboxRow, Store
from .webhooks import WebhookSender

log = structlog.get_logger("guardrail.delivery")


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


def clean_header_value(value: str) -> str:
    """Return `value` with CR, LF and NUL replaced, safe to place in a header."""
    return value.replace("\r", " ").replace("\n", " ").replace("\x00", " ")


def trace_headers(
    *,
    hostname: str,
    envelope: dict[str, object],
    for_address: str,
) -> bytes:
    """Build the headers prepended to a forwarded message; the body is never touched."""
    received_at = envelope["received_at"]
    assert isinstance(received_at, datetime)
    lines = [
        f"Received: from {clean_header_value(str(envelope['helo']) or 'unknown')} ({clean_header_value(str(envelope['peer']))})",
        f"\tby {hostname} (guardrail) with ESMTP id {envelope['message_row']}",
        f"\tfor <{clean_header_value(for_address)}>; {format_datetime(received_at)}",
        f"X-Guardrail-Conversation: {clean_header_value(str(envelope['reference']))}",
        f"X-Guardrail-Route: {clean_header_value(str(envelope['route']))}",
        f"{LOOP_HEADER}: {hostname}",
    ]
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

    async def send(self, destination: Destination, data: bytes, envelope: Envelope, name: str) -> None:
        """Deliver `data`; raise TemporaryDeliveryError or PermanentDeliveryError on failure."""
        if destination.kind == "maildir":
            # A maildir is final delivery: Return-Path carries the sender's
            # own envelope address, as a local delivery agent would write it.
            header = f"Return-Path: <{clean_header_value(envelope.original_sender)}>\r\n".encode()
            await asyncio.to_thread(write_maildir, Path(destination.maildir), name, header + data, self._hostname)
        elif self._config.smarthost is None:
            # Without a smarthost nothing leaves the machine: mail meant for
            # other hosts lands in the outbound maildir, addressed in headers.
            header = (
                f"Return-Path: <{clean_header_value(envelope.sender)}>\r\n"
                f"X-Guardrail-Envelope-To: {clean_header_value(', '.join(envelope.recipients))}\r\n"
            ).encode()
            await asyncio.to_thread(write_maildir, self._config.outbound_maildir, name, header + data, self._hostname)
        else:
            await self._send_smtp(data, envelope)

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
        try:
            async with client:
                await client.sendmail(envelope.sender, list(envelope.recipients), data)
        except aiosmtplib.SMTPRecipientsRefused as error:
            codes = [refused.code for refused in error.recipients]
            message = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in error.recipients)
            if all(code >= 500 for code in codes):
                raise PermanentDeliveryError(f"smarthost rejected every recipient: {message}") from error
            raise TemporaryDeliveryError(f"smarthost deferred recipients: {message}") from error
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


def write_maildir(folder: Path, name: str, data: bytes, hostname: str) -> bool:
    """Write `data` into maildir `folder` as new/NAME; return False if it is already there.

    The file is written to tmp/, fsynced, then linked into new/, so a reader
    never sees a partial message and a repeated delivery of the same outbox
    row does not create a second copy.
    """
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    final = folder / "new" / name
    if final.exists():
        return False
    temporary = folder / "tmp" / f"{name}.{os.getpid()}.{time.monotonic_ns()}"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, final)
    except FileExistsError:
        return False
    finally:
        temporary.unlink()
    directory = os.open(folder / "new", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


def maildir_name(row: OutboxRow, hostname: str) -> str:
    """Return a stable maildir file name for an outbox row, the same on every retry."""
    safe_host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{int(row.created_at.timestamp())}.G{row.id}.{safe_host}"


class DeliveryWorker:
    """Runs the outbox: at most `delivery.concurrency` attempts at a time."""

    def __init__(
        self, store: Store, config: Config, clock: Clock, transport: Transport | None = None, *, metrics: Metrics | None = None
    ) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self._config = config
        self._clock = clock
        self._transport = transport or Transport(config)
        self._webhooks = WebhookSender(config.webhooks, clock)
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.alive = False
        self.on_recorded: Callable[[AttemptResult], None] = lambda result: None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        """Deliver due rows until cancelled."""
        self.alive = True
        try:
            while True:
                self.wake.clear()
                free = self._config.delivery.concurrency - len(self._in_flight)
                if free <= 0:
                    # Every slot is busy, so wait until a finished attempt sets wake.
                    await self.wake.wait()
                    continue
                rows = await self._store.due_outbox(self._clock.now(), set(self._in_flight), free)
                for row in rows:
                    self._start(row)
                if len(rows) == free:
                    continue  # More rows may be due, so query again when a slot frees.
                await self._clock.sleep_until(await self._next_wake(), self.wake)
        finally:
            self.alive = False
            for task in self._in_flight.values():
                task.cancel()
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
            await self._webhooks.close()

    async def _next_wake(self) -> datetime:
        now = self._clock.now()
        next_due = await self._store.next_outbox_due(after=now)
        if next_due is not None:
            return next_due
        # Nothing scheduled: sleep until woken by new work or a finished attempt.
        return now + timedelta(days=365)

    def _start(self, row: OutboxRow) -> None:
        task = asyncio.create_task(self._attempt(row), name=f"guardrail-outbox-{row.id}")
        self._in_flight[row.id] = task

        def finished(_: asyncio.Task[None]) -> None:
            self._in_flight.pop(row.id, None)
            self.wake.set()

        task.add_done_callback(finished)

    async def _attempt(self, row: OutboxRow) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(outbox_id=row.id, kind=row.kind, conversation_id=row.conversation_id)
        attempts = row.attempts + 1
        now = self._clock.now
        try:
            await self._deliver(row)
        except PermanentDeliveryError as error:
            result = self._failed(row, attempts, str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - anything unexpected is retried, never dropped
            result = self._retry_or_give_up(row, attempts, error)
        else:
            log.info("delivered", attempts=attempts)
            result = AttemptResult(row.id, row.conversation_id, row.message_row, now(), "done", attempts, kind=row.kind)
        try:
            await self._store.record_attempt(result)
        except StorageError as error:
            # The row stays pending, so the attempt is repeated later.
            log.error("attempt_not_recorded", error=str(error), state=result.state)
        else:
            self.on_recorded(result)

    def _failed(self, row: OutboxRow, attempts: int, error: str) -> AttemptResult:
        purpose = row.target.get("purpose", "")
        self._metrics.delivery_failures.labels(row.kind, "yes").inc()
        if row.kind == "webhook":
            self._metrics.webhook_failures.inc()
        fallback = None
        if row.kind == "webhook":
            mail = decode_fallback(row.target.get("fallback"))
            if mail is not None:
                fallback = {"target": {"kind": "smtp", "addresses": list(mail.recipients), "purpose": "escalation"}, "payload": mail.data}
            log.error("escalation_failed", error=error, attempts=attempts, channel="webhook",
                      fallback="escalation mail" if fallback else "none (the level's mail was sent)")
        elif purpose == "escalation":
            log.error("escalation_failed", error=error, attempts=attempts, channel="mail")
        else:
            log.error("delivery_failed", error=error, attempts=attempts)
        return AttemptResult(row.id, row.conversation_id, row.message_row, self._clock.now(), "failed", attempts,
                             error=error, kind=row.kind, fallback=fallback)

    def _retry_or_give_up(self, row: OutboxRow, attempts: int, error: Exception) -> AttemptResult:
        now = self._clock.now()
        text = str(error) if isinstance(error, TemporaryDeliveryError) else f"unexpected error: {error!r}"
        if now - row.created_at >= self._config.delivery.give_up_after:
            return self._failed(row, attempts, f"gave up after {attempts} attempts: {text}")
        delay = retry_delay(attempts, self._config.delivery.retry_initial, self._config.delivery.retry_max)
        self._metrics.delivery_failures.labels(row.kind, "no").inc()
        log.warning("delivery_deferred", error=text, attempts=attempts, retry_in_seconds=round(delay.total_seconds(), 1))
        return AttemptResult(row.id, row.conversation_id, row.message_row, now, "pending", attempts,
                             next_attempt_at=now + delay, error=text, kind=row.kind)

    async def _deliver(self, row: OutboxRow) -> None:
        if row.kind == "deliver" and row.message_row is not None:
            await self._forward(row)
        elif row.kind == "mail":
            await self._send_mail(row)
        elif row.kind == "webhook":
            await self._post_webhook(row)
        else:
            raise PermanentDeliveryError(f"outbox row kind {row.kind!r} is not known to this version")

    async def _forward(self, row: OutboxRow) -> None:
        destination = Destination.from_record(row.target)
        structlog.contextvars.bind_contextvars(destination=destination.describe())
        raw, envelope = row.message or await self._store.message_for_delivery(row.message_row)  # type: ignore[arg-type]
        structlog.contextvars.bind_contextvars(conversation=envelope["reference"], route=envelope["route"])
        recipients = destination.addresses or (str(envelope["rcpt_tos"][0]) if envelope["rcpt_tos"] else "",)
        data = trace_headers(hostname=self._config.smtp.hostname, envelope=envelope, for_address=recipients[0]) + raw
        await self._transport.send(
            destination,
            data,
            Envelope(self._config.delivery.return_path, tuple(recipients), str(envelope["mail_from"])),
            maildir_name(row, self._config.smtp.hostname),
        )

    async def _send_mail(self, row: OutboxRow) -> None:
        """Send a message guardrail wrote itself (acknowledgement or escalation)."""
        recipients = tuple(row.target["addresses"])
        structlog.contextvars.bind_contextvars(destination="smtp " + ", ".join(recipients), purpose=row.target.get("purpose"))
        data = row.payload if row.payload is not None else await self._store.outbox_payload(row.id)
        # An acknowledgement carries a null return path (RFC 3834 section 3.3).
        sender = row.target.get("sender", self._config.delivery.return_path)
        destination = Destination("smtp", addresses=recipients)
        await self._transport.send(destination, data, Envelope(sender, recipients, sender), maildir_name(row, self._config.smtp.hostname))

    async def _post_webhook(self, row: OutboxRow) -> None:
        webhook = Webhook(row.target["url"], row.target.get("format", "json"), row.target.get("secret_env"))
        structlog.contextvars.bind_contextvars(destination=f"webhook {webhook.url}")
        body = json.loads(row.payload if row.payload is not None else await self._store.outbox_payload(row.id))
        tries = await self._webhooks.post(row.id, webhook, body)
        log.info("webhook_delivered", tries=tries)
