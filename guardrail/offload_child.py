"""The parse process: runs `prepare_received` for the daemon on another CPU.

The daemon starts this module with `python -m guardrail.offload_child` and
talks to it over stdin and stdout in length-prefixed pickle frames (see
offload.py). The same process also writes maildir files for the outbox
worker on request. Its only state is the rules and site settings the daemon
sends. It exits when its stdin closes, which also happens when the daemon
dies. Signals from a terminal or a service manager are the daemon's to handle,
so this process ignores SIGINT and SIGTERM.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import signal
import struct
import sys
from typing import Any, BinaryIO

from .maildir import write_maildirs
from .plan import Submission
from .prepare import Site, prepare_received
from .rules import RuleSet

FRAME_HEADER = struct.Struct(">I")

# Bytes each pipe to and from the daemon holds. Linux makes pipes 64 KiB by
# default, so a larger message would cross in several writes, each waking both
# processes. 1 MiB is the largest size an unprivileged process may set
# without changing /proc/sys/fs/pipe-max-size.
PIPE_SIZE = 1024 * 1024


def read_frame(stream: BinaryIO) -> Any | None:
    """Return the next unpickled frame, or None at the end of the stream."""
    header = stream.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None
    (size,) = FRAME_HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)


def encode_frame(value: Any) -> bytes:
    """Return `value` pickled behind its 4-byte big-endian length."""
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(body)) + body


def write_frame(stream: BinaryIO, value: Any) -> None:
    """Write one frame to `stream` and flush it."""
    stream.write(encode_frame(value))
    stream.flush()


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Process prepare requests from `requests` until it ends, writing each result to `replies`."""
    site: Site | None = None
    rules: RuleSet | None = None
    while (frame := read_frame(requests)) is not None:
        kind = frame[0]
        if kind == "site":
            site = frame[1]
        elif kind == "rules":
            rules = frame[1]
            write_frame(replies, ("ready",))
        elif kind == "maildirs":
            _, request_id, files = frame
            try:
                results: object = write_maildirs(files)
            except Exception as error:  # noqa: BLE001 - the daemon writes the files itself
                results = repr(error)
            write_frame(replies, (request_id, results))
        elif kind == "prepare":
            _, request_id, envelope, raw, now = frame
            try:
                assert site is not None and rules is not None, "prepare before site and rules"
                result = prepare_received(envelope, raw, rules, site, now)
                if isinstance(result, Submission):
                    # Rendering here spares the daemon's commit that work.
                    result = result.with_rendered_ack(site.reference_prefix, site.hostname).detached()
                reply = (request_id, result)
            except Exception as error:  # noqa: BLE001 - the daemon prepares it again itself
                reply = (request_id, repr(error))
            write_frame(replies, reply)


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> bool:
    """Return True after making the pipe at `fd` hold `size` bytes; False where the system does not allow it.

    A pipe's size belongs to the pipe, so either end may set it.
    """
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if set_size is None:
        return False
    try:
        fcntl.fcntl(fd, set_size, size)
    except OSError:
        # Not a pipe (a test may pass a file), or the user's pipe memory limit is reached.
        return False
    return True


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    widen_pipe(sys.stdin.fileno())
    widen_pipe(sys.stdout.fileno())
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # Anything printed by accident goes to stderr instead of corrupting a frame.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
