"""Escalation webhooks over HTTP with httpx, retried with tenacity.

Retries cover 5xx, 429, timeouts and connection errors; any other 4xx is
final. Every try of one outbox row carries the same Idempotency-Key, so a
receiver can drop repeats, including those after a restart.
"""

from __future__ import annotations

import os
from datetime import timedelta

import httpx
import tenacity

from .clock import Clock
from .config import WebhookSettings
from .errors import PermanentDeliveryError, TemporaryDeliveryError
from .escalation import SIGNATURE_HEADER, sign, webhook_payload
from .rules_sla import Webhook


def _seconds(duration: timedelta) -> float:
    return duration.total_seconds()


class WebhookSender:
    """Posts escalation bodies; raises PermanentDeliveryError once retries are exhausted or pointless."""

    def __init__(self, settings: WebhookSettings, clock: Clock, client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._client = client or httpx.AsyncClient(timeout=_seconds(settings.timeout), follow_redirects=False)

    async def close(self) -> None:
        await self._client.aclose()

    async def post(self, outbox_id: int, webhook: Webhook, body: dict[str, object]) -> int:
        """Post `body` to `webhook`; return the number of tries it took."""
        payload = webhook_payload(webhook, body)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": f"guardrail-outbox-{outbox_id}",
            "User-Agent": "guardrail",
        }
        if webhook.secret_env:
            secret = os.environ.get(webhook.secret_env)
            if not secret:
                raise PermanentDeliveryError(f"environment variable {webhook.secret_env!r} with the webhook secret is not set")
            headers[SIGNATURE_HEADER] = sign(secret, int(self._clock.now().timestamp()), payload)

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(TemporaryDeliveryError),
            stop=tenacity.stop_after_attempt(self._settings.attempts),
            wait=tenacity.wait_exponential_jitter(
                multiplier=_seconds(self._settings.retry_initial),
                max=_seconds(self._settings.retry_max),
                jitter=_seconds(self._settings.retry_initial),
            ),
            reraise=True,
        )
        tries = 0
        try:
            async for attempt in retrying:
                with attempt:
                    tries += 1
                    await self._post_once(webhook.url, payload, headers)
        except TemporaryDeliveryError as error:
            raise PermanentDeliveryError(f"webhook failed after {tries} tries: {error}") from error
        return tries

    async def _post_once(self, url: str, payload: bytes, headers: dict[str, str]) -> None:
        try:
            response = await self._client.post(url, content=payload, headers=headers)
        except httpx.TimeoutException as error:
            raise TemporaryDeliveryError(f"webhook {url} timed out") from error
        except httpx.TransportError as error:
            raise TemporaryDeliveryError(f"webhook {url} unreachable: {error!r}") from error
        status = response.status_code
        if 200 <= status < 300:
            return
        if status == 429 or status >= 500:
            raise TemporaryDeliveryError(f"webhook {url} returned HTTP {status}")
        raise PermanentDeliveryError(f"webhook {url} returned HTTP {status}; not retried")

