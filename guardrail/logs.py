"""Configure structlog once: JSON lines off a terminal, readable lines on one.

Standard-library loggers (aiosmtpd, asyncio) go through the same renderer, so
every line the daemon writes has one format.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# C0 and C1 control characters, DEL and the bidirectional marks, overrides and isolates.
_TERMINAL_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """Return `text` with each control or bidirectional formatting character written as its Python escape, such as \\x1b.

    Senders choose subjects, addresses and SMTP command text, and a terminal
    acts on escape sequences among them (retitling, clearing the screen).
    """
    return _TERMINAL_UNSAFE.sub(lambda match: repr(match.group())[1:-1], text)


def _escape_for_terminal(
    logger: structlog.typing.WrappedLogger, method_name: str, event_dict: structlog.typing.EventDict,
) -> structlog.typing.EventDict:
    """Escape the control characters of every string in `event_dict`.

    The console renderer prints the event name and values without spaces as they are.
    """
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = terminal_safe(value)
    return event_dict


def _name_library_event(
    logger: structlog.typing.WrappedLogger, method_name: str, event_dict: structlog.typing.EventDict,
) -> structlog.typing.EventDict:
    """Give a line that another library logs the event `library_log`, with its logger's name and its text as `detail`.

    aiosmtpd writes the client's words into its messages ("... unrecognised:
    FOO"), so as event names they would be as many as clients can invent.
    """
    record = event_dict.get("_record")
    if record is not None:
        event_dict["detail"] = event_dict["event"]
        event_dict["event"] = "library_log"
        event_dict["logger"] = record.name
    return event_dict


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Send every log event to stderr in `log_format` ("auto", "json" or "console")."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Drops calls below the level before any processor runs.
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )
    # JSON escapes control characters itself. The escaping runs before
    # format_exc_info, so a traceback keeps its line breaks.
    escape: list[structlog.typing.Processor] = [_escape_for_terminal] if use_console else []
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _name_library_event],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *escape,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # aiosmtpd logs every command line (addresses included) at INFO, and a
    # line per DATA line at DEBUG; our own events already cover what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
