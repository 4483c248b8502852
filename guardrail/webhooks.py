"""Escalation webhooks over HTTP with httpx, one POST per delivery attempt.

A 2xx reply delivers the outbox row. 5xx, 429, timeouts and connection
errors are temporary, so the outbox worker stores the next attempt as it
does for deferred mail. Any other reply is final. Every attempt of one
outbox row carries the same Idempotency-Key, so a receiver can drop
repeats, including those after a restart.
"""

from __future__ import annotations

import os

import httpx

from .clock import Clock
from .config import WebhookSettings
from .errors import PermanentDeliveryError, TemporaryDeliveryError
from .escalation import SIGNATURE_HEADER, sign, webhook_payload
from .rules_sla import Webhook


def status_outcome(status: int) -> str:
    """Return what an HTTP reply status means for a webhook: "delivered", "temporary" or "permanent"."""
    if 200 <= status < 300:
        return "delivered"
    if status == 429 or status >= 500:
        return "temporary"
    return "permanent"


class WebhookSender:
    """Posts escalation bodies, once per call."""

    def __init__(self, settings: WebhookSettings, clock: Clock, client: httpx.AsyncClient | None = None) -> None:
        self._clock = clock
        self._client = client or httpx.AsyncClient(timeout=settings.timeout.total_seconds(), follow_redirects=False)

    async def close(self) -> None:
        await self._client.aclose()

    async def post(self, outbox_id: int, webhook: Webhook, body: dict[str, object]) -> None:
        """Post `body` to `webhook` once. Raise TemporaryDeliveryError or PermanentDeliveryError on failure."""
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
        await self._post_once(webhook.url, payload, headers)

    async def _post_once(self, url: str, payload: bytes, headers: dict[str, str]) -> None:
        try:
            response = await self._client.post(url, content=payload, headers=headers)
        except httpx.TimeoutException as error:
            raise TemporaryDeliveryError(f"webhook {url} timed out") from error
        except httpx.TransportError as error:
            raise TemporaryDeliveryError(f"webhook {url} unreachable: {error!r}") from error
        status = response.status_code
        outcome = status_outcome(status)
        if outcome == "temporary":
            raise TemporaryDeliveryError(f"webhook {url} returned HTTP {status}")
        if outcome == "permanent":
            raise PermanentDeliveryError(f"webhook {url} returned HTTP {status}; not retried")
