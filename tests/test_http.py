"""The HTTP listener over real HTTP: token check, health, metrics and the JSON API."""

from __future__ import annotations

import asyncio
import email
import json
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    ROUTES,
    SMTP_RULES,
    RecipientSinkHandler,
    converse,
    maildir_messages,
    message,
    send,
    settle,
    start_sink,
    wait_until,
    write_config,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from webhook_receiver import webhook_receiver

from guardrail.clock import ManualClock
from guardrail.config import load_config
from guardrail.errors import ConfigErrors

TOKEN = "test-api-token-4f9c2a7d1e"
TOKEN_ENV = "GUARDRAIL_TEST_API_TOKEN"
EHLO = b"EHLO client.test.example\r\n"


def escalating_teams(webhook_url: str | None = None) -> str:
    """Teams open around the clock that escalate to the duty manager one hour after a message."""
    webhook = f', webhook = {{ url = "{webhook_url}" }}' if webhook_url else ""
    return f"""
[[calendar]]
name = "always"
timezone = "UTC"
hours = "24x7"

[[team]]
name = "support"
destination = {{ maildir = "var/maildir/support" }}
members = [{{ name = "Sam Ortiz", address = "sam@example.org" }}]
calendar = "always"
first_response = "1h"
escalation = [{{ after = "0m", name = "Dana Duty", address = "duty-manager@example.org"{webhook} }}]

[[team]]
name = "billing"
destination = {{ maildir = "var/maildir/billing" }}
members = [{{ name = "Bea Keller", address = "bea@example.org" }}]
calendar = "always"
first_response = "1h"
""" + ROUTES


def http_config(folder: Path, *, rules: str | None = None, http: dict[str, Any] | None = None, sections: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a config whose listener takes port 0 and the token from TOKEN_ENV."""
    all_sections = {"http": {"port": 0, "token_env": TOKEN_ENV, **(http or {})}, **(sections or {})}
    return write_config(folder, rules=rules or escalating_teams(), sections=all_sections)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def closed_port() -> int:
    """Return a loopback TCP port that nothing listens on, so connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def advance_to(daemon, clock: ManualClock, until: datetime, tick: timedelta = timedelta(minutes=15)) -> None:
    """Move the clock to `until` in steps, letting the daemon handle each step."""
    for _ in range(1000):
        if clock.now() >= until:
            return
        await clock.set(min(clock.now() + tick, until))
        await settle(daemon, clock)
    raise AssertionError(f"the clock did not reach {until} in 1000 steps")


@pytest.fixture
def api_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


ClientFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def client_for() -> AsyncIterator[ClientFactory]:
    """Return a function that opens an HTTP client on a daemon's listener; all are closed at teardown."""
    clients: list[httpx.AsyncClient] = []

    def open_client(daemon, token: str | None = TOKEN) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        # trust_env=False: no proxy settings from the environment, so requests stay on loopback.
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{daemon.http_port}", headers=headers, timeout=10, trust_env=False
        )
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.aclose()


async def open_conversation(daemon, **fields: str) -> str:
    """Send one message from Alice to support and return the reference of the conversation it opens."""
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(**fields))
    rows = await daemon.store.fetch_all("SELECT reference FROM conversations ORDER BY id DESC LIMIT 1")
    return rows[0][0]


def sample(families: dict[str, Metric], name: str, **labels: str) -> float:
    """Return the value of sample `name` with exactly `labels`; fail if the scrape has no such sample."""
    # The parser names a family without the suffix of its samples: _total
    # for a counter, _count, _sum and _bucket for a histogram.
    family_name = re.sub(r"_(total|count|sum|bucket)$", "", name)
    family = families.get(family_name)
    assert family is not None, f"metric family {family_name} missing from the scrape"
    for item in family.samples:
        if item.name == name and item.labels == labels:
            return item.value
    raise AssertionError(f"no sample {name}{labels}; found {[(s.name, s.labels) for s in family.samples]}")


async def scrape(client: httpx.AsyncClient) -> dict[str, Metric]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


# -- token ---------------------------------------------------------------------

PROTECTED = [
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/conversations"),
    ("GET", "/v1/conversations/GR-000000"),
    ("POST", "/v1/conversations/GR-000000/answered"),
    ("GET", "/v1/contacts/alice@example.com"),
    ("GET", "/no-such-path"),
]


async def test_healthz_needs_no_token(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))

    response = await client_for(daemon, token=None).get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


async def test_missing_token_gets_401_everywhere(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))
    client = client_for(daemon, token=None)

    for method, path in PROTECTED:
        response = await client.request(method, path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == 'Bearer realm="guardrail"', path
        assert "Authorization: Bearer" in response.json()["error"], path


async def test_wrong_token_gets_401_and_changes_nothing(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))
    reference = await open_conversation(daemon)
    wrong = client_for(daemon, token=TOKEN + "x")
    basic = client_for(daemon, token=None)

    for method, path in [*PROTECTED, ("POST", f"/v1/conversations/{reference}/answered")]:
        response = await wrong.request(method, path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == 'Bearer realm="guardrail", error="invalid_token"', path
        assert response.json() == {"error": "invalid bearer token"}, path
    response = await basic.get("/readyz", headers={"Authorization": f"Basic {TOKEN}"})
    assert response.status_code == 401

    rows = await daemon.store.fetch_all("SELECT state FROM conversations WHERE reference = ?", (reference,))
    assert rows == [("open",)]


async def test_without_configured_token_only_healthz_answers(tmp_path: Path, start_daemon, client_for) -> None:
    config = write_config(tmp_path, sections={"http": {"port": 0}})
    with capture_logs() as events:
        daemon = await start_daemon(config)
    client = client_for(daemon, token="any-token-at-all-0123")

    readiness = await client.get("/readyz")
    health = await client.get("/healthz")

    assert readiness.status_code == 401
    assert "token_env" in readiness.json()["error"]
    assert health.status_code == 200
    assert "http_token_missing" in [event["event"] for event in events]


async def test_token_from_config_file_is_accepted(tmp_path: Path, start_daemon, client_for) -> None:
    config = write_config(tmp_path, sections={"http": {"port": 0, "token": TOKEN}})
    daemon = await start_daemon(config)

    response = await client_for(daemon).get("/readyz")

    assert response.status_code == 200
    assert TOKEN not in repr(daemon.config)


@pytest.mark.parametrize(
    ("http", "environment", "problem"),
    [
        ({"token": "short"}, {}, "at least 16 characters"),
        ({"token": "has spaces inside the token"}, {}, "at least 16 characters"),
        ({"token_env": TOKEN_ENV}, {TOKEN_ENV: "tiny"}, "at least 16 characters"),
        ({"token_env": "GUARDRAIL_TEST_UNSET_TOKEN"}, {}, "'GUARDRAIL_TEST_UNSET_TOKEN' is not set"),
        ({"token": TOKEN, "token_env": TOKEN_ENV}, {TOKEN_ENV: TOKEN}, "either token or token_env"),
        ({"prot": 8025}, {}, "http.prot: unknown key"),
    ],
)
def test_invalid_http_settings_are_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: dict[str, Any], environment: dict[str, str], problem: str
) -> None:
    monkeypatch.delenv("GUARDRAIL_TEST_UNSET_TOKEN", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = write_config(tmp_path, sections={"http": http})

    with pytest.raises(ConfigErrors) as raised:
        load_config(config)

    text = str(raised.value)
    assert problem in text
    for secret in [http.get("token"), *environment.values()]:
        if secret:
            assert secret not in text


# -- health and metrics ---------------------------------------------------------

async def test_readyz_reports_every_check(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))

    response = await client_for(daemon).get("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert body["checks"] == {"database": "ok", "disk": "ok", "rules": "ok", "outbox_worker": "ok", "escalation_scheduler": "ok"}
    assert body["rules"] == daemon.rules.digest


async def test_readyz_503_when_disk_space_low(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    # More free space than any file system has: the disk counts as full.
    daemon = await start_daemon(http_config(tmp_path, sections={"database": {"min_free_space": "100000000GiB"}}))

    response = await client_for(daemon).get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["disk"].endswith("less than 102400000000.0 MiB (database.min_free_space)")
    assert response.json()["checks"]["database"] == "ok"


async def test_readyz_503_while_database_locked(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))
    client = client_for(daemon)

    # The lock is taken in a thread: blocking the event loop would stall the
    # daemon's own transaction, which then never lets go of the lock.
    locker = sqlite3.connect(daemon.config.database_path, isolation_level=None, timeout=5, check_same_thread=False)
    try:
        await asyncio.to_thread(locker.execute, "BEGIN IMMEDIATE")
        locked = await client.get("/readyz")
        await asyncio.to_thread(locker.execute, "ROLLBACK")
    finally:
        locker.close()
    unlocked = await client.get("/readyz")

    assert locked.status_code == 503
    body = locked.json()
    assert body["ready"] is False
    assert "locked" in body["checks"]["database"]
    assert body["checks"]["outbox_worker"] == "ok"
    assert unlocked.status_code == 200


async def test_metrics_count_intake_outcomes_and_reloads(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    clock = ManualClock(at("2025-11-17T10:00:00"))
    config = http_config(tmp_path)
    daemon = await start_daemon(config, clock=clock)
    client = client_for(daemon)

    await open_conversation(daemon)
    automatic = message(sender="alerts@monitoring.example", message_id="<alert-1@monitoring.example>",
                        subject="Disk full", extra_headers="Auto-Submitted: auto-generated\r\n")
    await send(daemon.port, "alerts@monitoring.example", ["support@example.org"], automatic)
    relay = await converse(daemon.port, EHLO + b"MAIL FROM:<x@example.com>\r\nRCPT TO:<someone@elsewhere.example>\r\nQUIT\r\n")
    bare_lf = await converse(
        daemon.port,
        EHLO + b"MAIL FROM:<x@example.com>\r\nRCPT TO:<support@example.org>\r\nDATA\r\n"
        b"Subject: bare\nline\r\n.\r\nQUIT\r\n",
    )
    broken = tmp_path / "rules" / "99-broken.toml"
    broken.write_text("[[route]\n")
    failed_reload = daemon.reload()
    broken.unlink()
    good_reload = daemon.reload()
    await settle(daemon, clock)
    families = await scrape(client)

    assert any(line.startswith("550 5.7.1") for line in relay)
    assert any(line.startswith("550 5.5.2") for line in bare_lf)
    assert failed_reload is False
    assert good_reload is True
    assert sample(families, "guardrail_messages_accepted_total", disposition="new") == 2
    assert sample(families, "guardrail_messages_rejected_total", reason="relay denied") == 1
    assert sample(families, "guardrail_messages_rejected_total", reason="bare line ending") == 1
    assert sample(families, "guardrail_messages_routed_total", route="default") == 2
    assert sample(families, "guardrail_acknowledgements_sent_total") == 1
    assert sample(families, "guardrail_acknowledgements_suppressed_total", signal="Auto-Submitted") == 1
    assert sample(families, "guardrail_rule_reloads_total", result="failed") == 1
    assert sample(families, "guardrail_rule_reloads_total", result="succeeded") == 1
    assert sample(families, "guardrail_rules_info", hash=daemon.rules.digest) == 1
    # Only the person's conversation waits for a reply. The automatic one needs none.
    assert sample(families, "guardrail_open_conversations") == 1
    assert sample(families, "guardrail_outbox_depth") == 0
    assert sample(families, "guardrail_outbox_oldest_age_seconds") == 0
    # Each accepted message is timed from its final dot to its reply.
    assert sample(families, "guardrail_intake_seconds_count") == 2
    assert sample(families, "guardrail_intake_seconds_bucket", le="+Inf") == 2
    assert 0 < sample(families, "guardrail_intake_seconds_sum") < 60
    # Every transaction is timed and counted: the two messages, their deliveries and acknowledgement.
    commits = sample(families, "guardrail_commit_seconds_count")
    assert commits >= 2
    assert sample(families, "guardrail_commit_batch_size_count") == commits
    assert sample(families, "guardrail_commit_batch_size_sum") >= 5


async def test_metrics_count_escalations_and_failures(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    with webhook_receiver(statuses=[404]) as receiver:
        clock = ManualClock(at("2025-11-17T10:00:00"))
        config = http_config(
            tmp_path, rules=escalating_teams(receiver.url),
            sections={
                # Nothing listens on the smarthost's port, so every mail waits in the outbox.
                "smarthost": {"host": "127.0.0.1", "port": closed_port(), "starttls": False, "timeout": "5s"},
                "delivery": {"retry_initial": "1d", "retry_max": "1d"},
            },
        )
        daemon = await start_daemon(config, clock=clock)
        client = client_for(daemon)
        await open_conversation(daemon)
        await settle(daemon, clock)
        before = await scrape(client)

        await advance_to(daemon, clock, at("2025-11-17T11:00:00"))
        after = await scrape(client)

    assert sample(before, "guardrail_deadlines_missed_total") == 0
    assert sample(before, "guardrail_outbox_depth") == 1
    assert sample(before, "guardrail_outbox_oldest_age_seconds") == 0
    assert sample(after, "guardrail_deadlines_missed_total") == 1
    assert sample(after, "guardrail_escalations_total", level="1", outcome="queued") == 1
    assert sample(after, "guardrail_webhook_failures_total") == 1
    assert sample(after, "guardrail_delivery_failures_total", kind="webhook", final="yes") == 1
    # The acknowledgement and the escalation mail each failed once and wait for their retry.
    assert sample(after, "guardrail_delivery_failures_total", kind="mail", final="no") == 2
    assert sample(after, "guardrail_outbox_depth") == 2
    assert sample(after, "guardrail_outbox_oldest_age_seconds") == 3600
    assert sample(after, "guardrail_open_conversations") == 1
    assert len(receiver.requests) == 1


# -- conversations ----------------------------------------------------------------

async def test_conversations_filter_by_state_and_team(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(http_config(tmp_path), clock=clock)
    client = client_for(daemon)
    billing = await open_conversation(daemon, subject="Invoice 42 is wrong", message_id="<invoice@example.com>")
    await clock.advance(timedelta(minutes=5))
    support = await open_conversation(daemon, subject="Printer jams", message_id="<printer@example.com>")
    assert (await client.post(f"/v1/conversations/{billing}/answered")).status_code == 200

    everything = (await client.get("/v1/conversations")).json()["conversations"]
    open_only = (await client.get("/v1/conversations", params={"state": "open"})).json()["conversations"]
    billing_only = (await client.get("/v1/conversations", params={"team": "billing"})).json()["conversations"]
    answered_support = (await client.get("/v1/conversations", params={"state": "answered", "team": "support"})).json()
    newest = (await client.get("/v1/conversations", params={"limit": "1"})).json()["conversations"]

    assert [item["reference"] for item in everything] == [support, billing]
    assert [item["reference"] for item in open_only] == [support]
    assert [(item["reference"], item["state"]) for item in billing_only] == [(billing, "answered")]
    assert answered_support == {"conversations": []}
    assert [item["reference"] for item in newest] == [support]
    first = everything[0]
    assert first["team"] == "support"
    assert first["route"] == "default"
    assert first["subject"] == "Printer jams"
    assert first["customer"] == "alice@example.com"
    assert first["opened_at"] == "2025-11-17T10:05:00+00:00"
    assert first["deadline"] == "2025-11-17T11:05:00+00:00"
    assert first["escalation_level"] == 0
    assert first["delivery_failed"] is False


@pytest.mark.parametrize(
    ("path", "query", "problem"),
    [
        ("/v1/conversations", [("state", "closed")], "invalid state 'closed'"),
        ("/v1/conversations", [("status", "open")], "unknown query parameter 'status'"),
        ("/v1/conversations", [("limit", "0")], "invalid limit '0'"),
        ("/v1/conversations", [("limit", "many")], "invalid limit 'many'"),
        # Digits that are not ASCII: int() rejects the first and reads the second as 5.
        ("/v1/conversations", [("limit", "\u00b2")], "invalid limit '\u00b2'"),
        ("/v1/conversations", [("limit", "\u0665")], "invalid limit '\u0665'"),
        # Which of two values would count is not obvious, so neither does.
        ("/v1/conversations", [("state", "open"), ("state", "answered")], "query parameter 'state' is given 2 times"),
        ("/v1/conversations/GR-000000", [("verbose", "1")], "unknown query parameter 'verbose'; this path takes none"),
    ],
)
async def test_api_rejects_bad_query(
    tmp_path: Path, start_daemon, client_for, api_token: str, path: str, query: list[tuple[str, str]], problem: str
) -> None:
    daemon = await start_daemon(http_config(tmp_path))

    response = await client_for(daemon).get(path, params=query)

    assert response.status_code == 400
    assert problem in response.json()["error"]


async def test_timeline_shows_whole_history(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(http_config(tmp_path), clock=clock)
    client = client_for(daemon)
    reference = await open_conversation(daemon)
    await settle(daemon, clock)
    await advance_to(daemon, clock, at("2025-11-17T11:15:00"))
    answered = await client.post(f"/v1/conversations/{reference.lower()}/answered", json={"by": "carol"})

    response = await client.get(f"/v1/conversations/{reference}")

    assert answered.status_code == 200
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "answered"
    assert body["answered_by"] == "api:carol"
    assert body["escalation_level"] == 1
    timeline = body["timeline"]
    assert [entry["kind"] for entry in timeline] == [
        "received", "deadline_set", "acknowledgement", "delivered", "delivered", "escalated", "delivered", "answered",
    ]
    received, deadline_set, acknowledgement, first_delivery, second_delivery, escalated, third_delivery, answer = timeline
    assert deadline_set["at"] == "2025-11-17T10:00:00+00:00"
    assert deadline_set["detail"] == {"deadline": "2025-11-17T11:00:00+00:00"}
    assert received["at"] == "2025-11-17T10:00:00+00:00"
    assert received["detail"]["route"] == "default"
    assert received["detail"]["team"] == "support"
    assert received["detail"]["mail_from"] == "alice@example.com"
    assert received["detail"]["message_id"] == "<m1@example.com>"
    assert received["detail"]["route_reasons"] != []
    assert acknowledgement["detail"]["decision"] == "sent"
    assert acknowledgement["detail"]["to"] == "alice@example.com"
    assert acknowledgement["detail"]["language"] == "en"
    assert acknowledgement["detail"]["variant"] == "template"
    assert {first_delivery["detail"]["purpose"], second_delivery["detail"]["purpose"]} == {"forward", "acknowledgement"}
    assert escalated["at"] == "2025-11-17T11:00:00+00:00"
    assert escalated["detail"]["level"] == 1
    assert escalated["detail"]["to"] == "duty-manager@example.org"
    assert third_delivery["detail"]["purpose"] == "escalation"
    assert answer["at"] == "2025-11-17T11:15:00+00:00"
    assert answer["detail"] == {"by": "api:carol"}


async def test_suppressed_acknowledgement_shows_signal(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))
    reference = await open_conversation(daemon, extra_headers="Auto-Submitted: auto-replied\r\n")

    body = (await client_for(daemon).get(f"/v1/conversations/{reference}")).json()

    (acknowledgement,) = [entry for entry in body["timeline"] if entry["kind"] == "acknowledgement"]
    assert acknowledgement["detail"]["decision"] == "suppressed"
    assert acknowledgement["detail"]["signal"].startswith("Auto-Submitted")
    assert body["deadline"] is None


async def test_api_answer_stops_escalation(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(http_config(tmp_path), clock=clock)
    client = client_for(daemon)
    reference = await open_conversation(daemon)
    await settle(daemon, clock)
    await clock.set(at("2025-11-17T10:30:00"))

    with capture_logs() as events:
        first = await client.post(f"/v1/conversations/{reference}/answered", json={"by": "carol"})
        repeated = await client.post(f"/v1/conversations/{reference}/answered", json={"by": "dan"})
    await advance_to(daemon, clock, at("2025-11-17T13:00:00"))
    timeline = (await client.get(f"/v1/conversations/{reference}")).json()["timeline"]

    assert first.status_code == 200
    assert first.json()["changed"] is True
    assert first.json()["state"] == "answered"
    assert first.json()["answered_at"] == "2025-11-17T10:30:00+00:00"
    assert first.json()["answered_by"] == "api:carol"
    assert repeated.status_code == 200
    assert repeated.json()["changed"] is False
    assert repeated.json()["answered_by"] == "api:carol"
    assert "escalated" not in [entry["kind"] for entry in timeline]
    outbound = [email.message_from_bytes(data) for data in maildir_messages(tmp_path / "var" / "outbound")]
    assert [m for m in outbound if m["Auto-Submitted"] == "auto-generated"] == []
    answered_events = [event for event in events if event["event"] == "conversation_answered"]
    assert [(event["conversation"], event["by"]) for event in answered_events] == [(reference, "api:carol")]
    assert [event["event"] for event in events].count("conversation_answer_repeated") == 1
    assert TOKEN not in repr(events)


async def test_unknown_reference_gets_404(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))
    client = client_for(daemon)

    shown = await client.get("/v1/conversations/GR-000000")
    answered = await client.post("/v1/conversations/GR-000000/answered")
    elsewhere = await client.get("/v1/nothing-here")

    assert shown.status_code == 404
    assert shown.json() == {"error": "conversation GR-000000 not found"}
    assert answered.status_code == 404
    assert answered.json() == {"error": "conversation GR-000000 not found"}
    assert elsewhere.status_code == 404
    assert "error" in elsewhere.json()


@pytest.mark.parametrize(
    ("content", "status", "problem"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'["carol"]', 400, "must be a JSON object"),
        (b'{"by": "carol", "note": "x"}', 400, "unknown field 'note'"),
        (b'{"by": 42}', 400, '"by" must be a string'),
        # JSON can escape half of a surrogate pair, which no UTF-8 text holds.
        (b'{"by": "carol \\ud800"}', 400, "without control characters or unpaired surrogates"),
        (b'{"by": "' + b"x" * 5000 + b'"}', 413, "exceeds 4096 bytes"),
    ],
)
async def test_answered_rejects_bad_body(
    tmp_path: Path, start_daemon, client_for, api_token: str, content: bytes, status: int, problem: str
) -> None:
    daemon = await start_daemon(http_config(tmp_path))
    reference = await open_conversation(daemon)

    response = await client_for(daemon).post(f"/v1/conversations/{reference}/answered", content=content)

    assert response.status_code == status
    assert problem in response.json()["error"]
    rows = await daemon.store.fetch_all("SELECT state FROM conversations")
    assert rows == [("open",)]


# -- contacts ---------------------------------------------------------------------

async def test_contact_lists_open_conversations(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(http_config(tmp_path), clock=clock)
    client = client_for(daemon)
    first = await open_conversation(daemon, extra_headers="Reply-To: bob@example.com\r\n")
    await clock.set(at("2025-11-17T10:20:00"))
    second = await open_conversation(daemon, subject="Scanner too", message_id="<m2@example.com>")

    alice = await client.get("/v1/contacts/alice@example.com")
    shouting = await client.get("/v1/contacts/ALICE@Example.COM")
    bob = await client.get("/v1/contacts/bob@example.com")
    member = await client.get("/v1/contacts/sam@example.org")
    stranger = await client.get("/v1/contacts/nobody@example.net")

    assert alice.status_code == 200
    assert alice.json() == {
        "address": "alice@example.com",
        "waiting": True,
        "waiting_since": "2025-11-17T10:00:00+00:00",
        "open_conversations": [
            {"reference": first, "team": "support", "subject": "Printer on floor 3 jams",
             "opened_at": "2025-11-17T10:00:00+00:00", "waiting_since": "2025-11-17T10:00:00+00:00",
             "deadline": "2025-11-17T11:00:00+00:00", "role": "sender"},
            {"reference": second, "team": "support", "subject": "Scanner too",
             "opened_at": "2025-11-17T10:20:00+00:00", "waiting_since": "2025-11-17T10:20:00+00:00",
             "deadline": "2025-11-17T11:20:00+00:00", "role": "sender"},
        ],
    }
    assert shouting.json() == alice.json()
    assert [(item["reference"], item["role"]) for item in bob.json()["open_conversations"]] == [(first, "participant")]
    # A team member takes part in every conversation of the team but is not waiting for an answer.
    assert member.json()["waiting"] is False
    assert stranger.json() == {"address": "nobody@example.net", "waiting": False, "waiting_since": None, "open_conversations": []}


async def test_contact_not_waiting_after_answer(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))
    client = client_for(daemon)
    reference = await open_conversation(daemon)
    before = await client.get("/v1/contacts/alice@example.com")

    await client.post(f"/v1/conversations/{reference}/answered", json={"by": "sam"})
    after = await client.get("/v1/contacts/alice@example.com")

    assert before.json()["waiting"] is True
    assert after.json() == {"address": "alice@example.com", "waiting": False, "waiting_since": None, "open_conversations": []}


async def test_contact_waits_since_reopening(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    clock = ManualClock(at("2025-11-17T10:00:00"))
    daemon = await start_daemon(http_config(tmp_path), clock=clock)
    client = client_for(daemon)
    reference = await open_conversation(daemon)
    await clock.set(at("2025-11-17T10:30:00"))
    await send(daemon.port, "sam@example.org", ["support@example.org"], message(
        sender="Sam Ortiz <sam@example.org>", subject=f"Re: [{reference}] Printer", message_id="<answer@example.org>",
        extra_headers="In-Reply-To: <m1@example.com>\r\n",
    ))
    answered = await client.get("/v1/contacts/alice@example.com")
    await clock.set(at("2025-11-17T12:00:00"))
    await send(daemon.port, "alice@example.com", ["support@example.org"], message(
        subject=f"Re: [{reference}] Printer", message_id="<again@example.com>",
        extra_headers="In-Reply-To: <answer@example.org>\r\n",
    ))

    reopened = (await client.get("/v1/contacts/alice@example.com")).json()

    assert answered.json()["waiting"] is False
    assert reopened["waiting"] is True
    assert reopened["waiting_since"] == "2025-11-17T12:00:00+00:00"
    [conversation] = reopened["open_conversations"]
    assert conversation["reference"] == reference
    assert conversation["opened_at"] == "2025-11-17T10:00:00+00:00"
    assert conversation["waiting_since"] == "2025-11-17T12:00:00+00:00"
    assert conversation["deadline"] == "2025-11-17T13:00:00+00:00"


async def test_contact_rejects_invalid_address(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    daemon = await start_daemon(http_config(tmp_path))

    response = await client_for(daemon).get("/v1/contacts/not-an-address")

    assert response.status_code == 400
    assert "invalid address 'not-an-address'" in response.json()["error"]


async def smarthost_daemon(tmp_path: Path, start_daemon, sink, rules: str):
    """Start a daemon at 2025-11-17 10:00 UTC whose smarthost is `sink`."""
    config = http_config(tmp_path, rules=rules, sections={
        "smarthost": {"host": "127.0.0.1", "port": sink.port, "starttls": False, "timeout": "10s"},
    })
    return await start_daemon(config, clock=ManualClock(at("2025-11-17T10:00:00")))


async def test_api_lists_alarms(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    rules = SMTP_RULES.replace('["team@example.net"]', '["team@example.net", "second@example.net"]')
    sink = await start_sink(handler=RecipientSinkHandler(rcpt_replies={"second@example.net": "550 5.1.1 no such user"}))
    try:
        daemon = await smarthost_daemon(tmp_path, start_daemon, sink, rules)
        client = client_for(daemon)
        assert (await client.get("/v1/alarms")).json() == {"alarms": []}
        await send(daemon.port, "alice@example.com", ["support@example.org"], message())
        await wait_until(lambda: sink.to("duty-manager@example.org"), what="the rejected-address alarm")

        response = await client.get("/v1/alarms", params={"limit": "5"})
        bad = await client.get("/v1/alarms", params={"since": "1d"})
    finally:
        sink.server.close()
        await sink.server.wait_closed()

    assert response.status_code == 200
    [alarm] = response.json()["alarms"]
    assert alarm["at"] == "2025-11-17T10:00:00+00:00"
    assert alarm["kind"] == "address"
    assert alarm["about"] == "second@example.net"
    assert alarm["detail"].startswith("second@example.net rejected 1 message(s) of team support from ")
    assert bad.status_code == 400
    assert bad.json() == {"error": "unknown query parameter 'since'; use limit"}


# -- outbox -----------------------------------------------------------------------

async def test_api_lists_and_retries_outbox(tmp_path: Path, start_daemon, client_for, api_token: str) -> None:
    sink = await start_sink(handler=RecipientSinkHandler(rcpt_replies={"team@example.net": "550 5.1.1 no such user"}))
    try:
        daemon = await smarthost_daemon(tmp_path, start_daemon, sink, SMTP_RULES)
        client = client_for(daemon)
        await send(daemon.port, "alice@example.com", ["support@example.org"], message())

        async def forward_failed() -> bool:
            rows = (await client.get("/v1/outbox", params={"state": "failed"})).json()["rows"]
            return any(row["purpose"] == "forward" for row in rows)

        await wait_until(forward_failed, what="the failed forward in GET /v1/outbox")
        listed = (await client.get("/v1/outbox", params={"state": "failed", "limit": "10"})).json()
        [failed] = [row for row in listed["rows"] if row["purpose"] == "forward"]
        # The team's address is fixed at the smarthost, so the row is sent again at once.
        sink.handler.rcpt_replies.clear()
        retried = await client.post(f"/v1/outbox/{failed['id']}/retry", json={"by": "carol"})
        await wait_until(lambda: sink.to("team@example.net"), what="the forward sent again")
        again = await client.post(f"/v1/outbox/{failed['id']}/retry")
        unknown = await client.post("/v1/outbox/999999/retry")
        invalid = await client.post("/v1/outbox/first/retry")
        bad_state = await client.get("/v1/outbox", params={"state": "done"})
        events = await daemon.store.fetch_all("SELECT detail FROM events WHERE kind = 'requeued'")
    finally:
        sink.server.close()
        await sink.server.wait_closed()

    assert listed["state"] == "failed"
    assert failed["to"] == "team support: smtp team@example.net"
    assert failed["last_error"].endswith("550 5.1.1 no such user")
    assert retried.status_code == 200
    assert retried.json()["row"]["id"] == failed["id"]
    assert retried.json()["row"]["state"] == "pending"
    assert len(sink.to("team@example.net")) == 1
    assert [json.loads(detail)["by"] for (detail,) in events] == ["api:carol"]
    assert again.status_code == 409
    assert again.json()["error"] == f"outbox row {failed['id']} is not sent again: it was already sent or withdrawn"
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "outbox row 999999 not found"}
    assert invalid.status_code == 400
    assert bad_state.status_code == 400
    assert bad_state.json() == {"error": "invalid state 'done'; expected one of pending, failed"}
