"""The HTTP listener: health, Prometheus metrics and a small JSON API.

A Starlette app served by uvicorn inside the daemon's event loop. Every path
except /healthz needs `Authorization: Bearer TOKEN`; without a configured
token those paths return 401. Errors are JSON objects: {"error": "..."}.

    GET  /healthz                              the process is alive
    GET  /readyz                               database writable, disk space left, rules loaded, loops running
    GET  /metrics                              Prometheus text format
    GET  /v1/conversations?state=&team=&limit= conversations, newest first
    GET  /v1/conversations/REF                 one conversation and its timeline
    POST /v1/conversations/REF/answered        mark it answered: {"by": "name"}, optional
    GET  /v1/contacts/ADDRESS                  the open conversations of an address
    GET  /v1/alarms?limit=                     abandoned-route and rejected-address alarms, newest first
    GET  /v1/outbox?state=&limit=              outbox rows still to be sent, or those that failed
    POST /v1/outbox/ID/retry                   queue a failed row again, or make a pending one due now: {"by": "name"}, optional
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import uvicorn
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import store_admin
from .config import Secret
from .conversations import MAX_NAME_LENGTH, is_storable_name
from .errors import StorageError
from .storage import free_bytes, storage_problem
from .store import Store
from .store_queries import (
    CONVERSATION_STATES,
    check_writable,
    count_open_conversations,
    find_conversation,
    list_alarms,
    list_conversations,
    open_conversations_of,
    outbox_depth,
)

if TYPE_CHECKING:
    from .daemon import Daemon

log = structlog.get_logger("guardrail.http")

PUBLIC_PATHS = frozenset({"/healthz"})
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# An address has at most a handful of open conversations; this only bounds the reply.
CONTACT_LIMIT = 100
# RFC 5321 section 4.5.3.1.3: a path is at most 256 octets with its angle brackets.
MAX_ADDRESS_LENGTH = 254
MAX_ANSWERED_BODY = 4096
# The states that GET /v1/outbox lists.
OUTBOX_LISTED_STATES = ("pending", "failed")
# Readiness probes often time out after about a second. A longer wait for the
# write lock would fail the probe anyway, so the check gives up sooner.
READY_WRITE_TIMEOUT = timedelta(seconds=1)
START_TIMEOUT = timedelta(seconds=10)
STOP_TIMEOUT = timedelta(seconds=5)


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status, headers=headers)


class RequireToken:
    """ASGI middleware that returns 401 unless the request carries the bearer token.

    Paths in PUBLIC_PATHS pass without one. New routes are therefore
    protected unless someone adds them there.
    """

    def __init__(self, app: ASGIApp, token: Secret | None) -> None:
        self.app = app
        self._token = token.reveal().encode() if token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        problem, challenge = self._problem(Headers(scope=scope).get("authorization", ""))
        if not problem:
            await self.app(scope, receive, send)
            return
        log.warning("http_request_unauthorized", path=scope["path"], reason=problem)
        response = _error(401, problem, {"WWW-Authenticate": challenge})
        await response(scope, receive, send)

    def _problem(self, authorization: str) -> tuple[str, str]:
        """Return why the request is not allowed and the WWW-Authenticate value, or ("", "")."""
        challenge = 'Bearer realm="guardrail"'
        if self._token is None:
            return "no API token is configured; set token_env or token in the [http] section and restart guardrail", challenge
        scheme, _, credentials = authorization.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            return "missing bearer token; send the header Authorization: Bearer TOKEN", challenge
        # RFC 6750 section 3.1 names the error of a token that does not match.
        if not hmac.compare_digest(credentials.encode(), self._token):
            return "invalid bearer token", f'{challenge}, error="invalid_token"'
        return "", ""


class _Api:
    """The endpoints; each reads the daemon's current store, rules and clock."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _store(self) -> Store:
        if self.daemon.store is None:
            raise HTTPException(503, "the daemon is stopping; the database is closed")
        return self.daemon.store

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(self, request: Request) -> Response:
        daemon = self.daemon
        problem = await asyncio.to_thread(check_writable, daemon.config.database_path, READY_WRITE_TIMEOUT)
        space = await asyncio.to_thread(_disk_check, daemon.config.database_path.parent, daemon.config.min_free_space)
        checks = {
            "database": problem or ("ok" if daemon.store is not None else "the database is closed"),
            "disk": space,
            "rules": "ok" if daemon.rules is not None else "no rule set is loaded",
            "outbox_worker": "ok" if daemon.worker is not None and daemon.worker.alive else "not running",
            "escalation_scheduler": "ok" if daemon.scheduler is not None and daemon.scheduler.alive else "not running",
        }
        ready = all(value == "ok" for value in checks.values())
        body = {"ready": ready, "checks": checks, "rules": daemon.rules.digest if daemon.rules is not None else None}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        store = self._store()
        metrics = self.daemon.metrics
        depth = await outbox_depth(store)
        age = (self.daemon.clock.now() - depth.oldest_created_at).total_seconds() if depth.oldest_created_at else 0.0
        metrics.outbox_depth.set(depth.pending)
        metrics.outbox_oldest_age.set(max(age, 0.0))
        metrics.open_conversations.set(await count_open_conversations(store))
        # The scraper's Accept header picks the classic text format or OpenMetrics.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(metrics.registry), headers={"Content-Type": content_type})

    async def conversations(self, request: Request) -> Response:
        query = _query(request, ("state", "team", "limit"))
        state = query.get("state")
        if state is not None and state not in CONVERSATION_STATES:
            raise HTTPException(400, f"invalid state {state!r}; expected one of {', '.join(CONVERSATION_STATES)}")
        limit = _limit(query.get("limit"))
        found = await list_conversations(self._store(), state=state, team=query.get("team"), limit=limit)
        return JSONResponse({"conversations": found})

    async def conversation(self, request: Request) -> Response:
        _query(request, ())
        reference = request.path_params["reference"].strip().upper()
        found = await find_conversation(self._store(), reference)
        if found is None:
            raise HTTPException(404, f"conversation {reference} not found")
        return JSONResponse(found)

    async def answered(self, request: Request) -> Response:
        reference = request.path_params["reference"].strip().upper()
        name = _name_in_body(await _small_body(request, MAX_ANSWERED_BODY))
        by = f"api:{name}" if name else "api"
        store = self._store()

        before = await store.mark_answered(reference, by, self.daemon.clock.now())
        if not before:
            raise HTTPException(404, f"conversation {reference} not found")
        changed = before == "open"
        found = await find_conversation(store, reference)
        assert found is not None
        del found["timeline"]

        structlog.contextvars.clear_contextvars()
        if changed:
            log.info("conversation_answered", conversation=reference, by=by, via="api")
        else:
            log.info("conversation_answer_repeated", conversation=reference, state=before, via="api")
        return JSONResponse({**found, "changed": changed})

    async def alarms(self, request: Request) -> Response:
        query = _query(request, ("limit",))
        found = await list_alarms(self._store(), limit=_limit(query.get("limit")))
        return JSONResponse({"alarms": found})

    async def outbox(self, request: Request) -> Response:
        query = _query(request, ("state", "limit"))
        state = query.get("state", "pending")
        if state not in OUTBOX_LISTED_STATES:
            raise HTTPException(400, f"invalid state {state!r}; expected one of {', '.join(OUTBOX_LISTED_STATES)}")
        self._store()
        config = self.daemon.config
        rows = await asyncio.to_thread(
            store_admin.queued_rows, config.database_path, state, _limit(query.get("limit")), busy_timeout=config.busy_timeout,
        )
        return JSONResponse({"state": state, "rows": [row.to_record() for row in rows]})

    async def retry(self, request: Request) -> Response:
        text = request.path_params["row"]
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= store_admin.MAX_INTEGER:
            raise HTTPException(400, f"invalid outbox row {text!r}; expected a number such as GET /v1/outbox lists")
        name = _name_in_body(await _small_body(request, MAX_ANSWERED_BODY))
        self._store()
        config = self.daemon.config
        done = await asyncio.to_thread(
            store_admin.requeue, config.database_path, self.daemon.clock.now(), f"api:{name}" if name else "api",
            ids=(int(text),), busy_timeout=config.busy_timeout,
        )
        if done.unknown:
            raise HTTPException(404, f"outbox row {text} not found")
        if done.skipped:
            row, reason = done.skipped[0]
            log.info("outbox_row_not_requeued", outbox_id=row.id, reason=reason, via="api")
            return JSONResponse({"error": f"outbox row {text} is not sent again: {reason}", "row": row.to_record()}, status_code=409)
        if self.daemon.worker is not None:
            self.daemon.worker.wake.set()
        structlog.contextvars.clear_contextvars()
        log.info("outbox_row_requeued", outbox_id=int(text), via="api")
        return JSONResponse({"row": done.sent_again[0].to_record()})

    async def contact(self, request: Request) -> Response:
        address = request.path_params["address"].strip().lower()
        if not _is_address(address):
            raise HTTPException(400, f"invalid address {address[:MAX_ADDRESS_LENGTH]!r}; expected an email address such as alice@example.com")
        # Team members take part in every conversation of their team; for
        # them only the conversations they started count.
        include_participants = not self.daemon.rules.is_staff(address)
        found = await open_conversations_of(self._store(), address, include_participants=include_participants, limit=CONTACT_LIMIT)
        conversations = [
            {
                "reference": item["reference"],
                "team": item["team"],
                "subject": item["subject"],
                "opened_at": item["opened_at"],
                "waiting_since": item["waiting_since"],
                "deadline": item["deadline"],
                "role": "sender" if item["customer"].lower() == address else "participant",
            }
            for item in found
        ]
        return JSONResponse({
            "address": address,
            "waiting": bool(conversations),
            "waiting_since": conversations[0]["waiting_since"] if conversations else None,
            "open_conversations": conversations,
        })


def _disk_check(folder: Path, min_free: int) -> str:
    """Return "ok", or why the file system holding `folder` has too little room for intake."""
    try:
        free = free_bytes(folder)
    except OSError as error:
        return f"cannot read the free space of {folder}: {error}"
    return storage_problem(free, min_free) or "ok"


def _query(request: Request, names: tuple[str, ...]) -> dict[str, str]:
    """Return the request's query parameters, or raise a 400 HTTPException for one not in `names` or one given twice."""
    pairs = request.query_params.multi_items()
    for name, _ in pairs:
        if name not in names:
            if len(names) > 1:
                expected = f"use {', '.join(names[:-1])} or {names[-1]}"
            else:
                expected = f"use {names[0]}" if names else "this path takes none"
            raise HTTPException(400, f"unknown query parameter {name!r}; {expected}")
    counts = Counter(name for name, _ in pairs)
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        raise HTTPException(400, f"query parameter {repeated[0]!r} is given {counts[repeated[0]]} times; give it once")
    return dict(pairs)


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    # str.isdigit() alone is true for "\u00b2", which int() rejects, and for
    # "\u0665" (Arabic-Indic five), which int() reads as 5.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise HTTPException(400, f"invalid limit {text!r}; expected an integer from 1 to {MAX_LIMIT}")
    return int(text)


def _is_address(text: str) -> bool:
    local, at, domain = text.rpartition("@")
    if not (at and local and domain) or len(text) > MAX_ADDRESS_LENGTH:
        return False
    return not any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in text)


async def _small_body(request: Request, limit: int) -> bytes:
    """Read the request body, or raise a 413 HTTPException once it exceeds `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body exceeds {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request body exceeds {limit} bytes")
    return bytes(body)


def _name_in_body(body: bytes) -> str:
    """Return the name in the body of a POST .../answered or .../retry request, or "" when the body is empty."""
    if not body.strip():
        return ""
    try:
        data = json.loads(body)
    except ValueError as error:
        raise HTTPException(400, f"the body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise HTTPException(400, 'the body must be a JSON object such as {"by": "carol"}')
    unknown = sorted(set(data) - {"by"})
    if unknown:
        raise HTTPException(400, f"unknown field {unknown[0]!r}; the only field is \"by\"")
    name = data.get("by", "")
    if not isinstance(name, str) or not is_storable_name(name):
        raise HTTPException(
            400, f'"by" must be a string of at most {MAX_NAME_LENGTH} characters without control characters or unpaired surrogates'
        )
    return name.strip()


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    return _error(error.status_code, str(error.detail), dict(error.headers or {}))


async def _storage_error(request: Request, error: Exception) -> Response:
    log.error("http_request_failed", path=request.url.path, error=repr(error))
    return _error(503, "the database is not available; see the daemon's log")


async def _unexpected_error(request: Request, error: Exception) -> Response:
    log.error("http_request_failed", path=request.url.path, error=repr(error))
    return _error(500, "internal error; see the daemon's log")


def build_app(daemon: Daemon) -> Starlette:
    """Return the ASGI app serving `daemon`'s health, metrics and JSON API."""
    api = _Api(daemon)
    routes = [
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics),
        Route("/v1/conversations", api.conversations),
        Route("/v1/conversations/{reference}", api.conversation),
        Route("/v1/conversations/{reference}/answered", api.answered, methods=["POST"]),
        Route("/v1/contacts/{address}", api.contact),
        Route("/v1/alarms", api.alarms),
        Route("/v1/outbox", api.outbox),
        Route("/v1/outbox/{row}/retry", api.retry, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(RequireToken, token=daemon.config.http.token)],
        exception_handlers={HTTPException: _http_error, StorageError: _storage_error, Exception: _unexpected_error},
    )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves SIGTERM and SIGINT to the daemon.

    uvicorn 0.55's `serve` replaces those handlers with signal.signal for as
    long as it runs, which would stop the daemon's own handlers from firing.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_requested = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        # uvicorn's own loop wakes every 0.1 s to poll should_exit and refresh
        # the Date header; waiting on an event lets an idle daemon sleep.
        await self.exit_requested.wait()


class HttpListener:
    """A running uvicorn server and the task that runs it."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish, and wait for the server to end."""
        self._server.should_exit = True
        if isinstance(self._server, _EmbeddedServer):
            self._server.exit_requested.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), STOP_TIMEOUT.total_seconds())
        except TimeoutError:
            log.error("http_stop_timed_out", seconds=STOP_TIMEOUT.total_seconds())
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        log.info("http_stopped")


def _bind(listen: str, port: int) -> socket.socket:
    """Bind the listening socket here, so that a busy port raises OSError instead of uvicorn's SystemExit."""
    family = socket.AF_INET6 if ":" in listen else socket.AF_INET
    return socket.create_server((listen, port), family=family)


async def serve_http(app: ASGIApp, listen: str, port: int) -> HttpListener:
    """Start serving `app` on `listen`:`port` in the running loop; port 0 picks a free port.

    Raises OSError when the address cannot be bound.
    """
    sock = _bind(listen, port)
    config = uvicorn.Config(
        app, log_config=None, lifespan="off", access_log=False, http="h11", ws="none",
        proxy_headers=False, server_header=False, date_header=False, reset_contextvars=True, log_level="warning",
        timeout_graceful_shutdown=int(STOP_TIMEOUT.total_seconds()),
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="guardrail-http")

    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT.total_seconds()
    while not server.started and not task.done() and loop.time() < deadline:
        await asyncio.sleep(0.005)
    if not server.started:
        task.cancel()
        outcome = (await asyncio.gather(task, return_exceptions=True))[0]
        sock.close()
        if isinstance(outcome, Exception):
            raise outcome
        raise OSError(f"the HTTP server on {listen}:{port} did not start within {START_TIMEOUT.total_seconds():.0f}s")

    bound = sock.getsockname()[1]
    log.info("http_started", listen=listen, port=bound)
    return HttpListener(server, task, bound)
