"""The group committer alone: how many prepared messages the store commits per second.

Messages are built as bench/intake.py builds them and prepared (summary,
routing, acknowledgement) before the clock starts. The figure is then the
store's alone: the writer thread's planning, inserts and COMMIT with its
fsync, and the hand-off of each result to the event loop. C coroutines each call
`Store.accept` in a loop, as C SMTP connections do in the daemon. No SMTP,
no parse processes, no delivery.

Set beside bench/intake.py's figures, it shows how much of the daemon's
time per message is the store's own work, and how much is the cost of
sharing two cores and one interpreter lock with the rest of the daemon.

Run from the repository root, in a virtualenv with guardrail installed:

    python bench/store.py [--sizes 4096,65536] [--concurrency 1,10,50] [--messages 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _revision import REPO, source_revision
from intake import RECIPIENT, MessageFactory

from guardrail.config import load_config
from guardrail.plan import Submission
from guardrail.prepare import Envelope, Site, prepare_message
from guardrail.rules import load_rules
from guardrail.store import Store


def prepared_messages(size: int, count: int, cell_id: str) -> list[Submission]:
    """Return `count` distinct messages of about `size` bytes, routed by the example rules and ready to commit."""
    config = load_config(REPO / "config.example.toml")
    rules = load_rules(config.rules_dir, REPO)
    site = Site.from_config(config)
    factory = MessageFactory(size, cell_id)
    now = datetime.now(UTC)
    submissions = []
    for sequence in range(count):
        sender, raw = factory.build(sequence % 10, sequence)
        envelope = Envelope(sender, (RECIPIENT,), "127.0.0.1", "bench.example.net")
        submission = prepare_message(envelope, raw, rules, site, now)
        assert isinstance(submission, Submission)
        submissions.append(submission.with_rendered_ack(site.reference_prefix, site.hostname))
    return submissions


async def commit_all(database: Path, submissions: list[Submission], concurrency: int) -> tuple[float, float]:
    """Commit every submission through C concurrent callers. Return (wall seconds, CPU seconds of this process)."""
    store = await Store.open(database)
    pending = iter(submissions)

    async def caller() -> None:
        for submission in pending:
            await store.accept(submission)

    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,65536", help="message sizes in bytes (default 4096,65536)")
    parser.add_argument("--concurrency", default="1,10,50", help="concurrent callers (default 1,10,50)")
    parser.add_argument("--messages", type=int, default=5000, help="messages committed per cell (default 5000)")
    arguments = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    print(f"python {platform.python_version()}, event loop {'uvloop' if uvloop else 'asyncio'},"
          f" guardrail from {REPO} at {source_revision()}")
    print(f"{'size':>8} {'C':>4} {'msg/s':>8} {'CPU us/msg':>11}")
    for size in (int(text) for text in arguments.sizes.split(",")):
        for concurrency in (int(text) for text in arguments.concurrency.split(",")):
            submissions = prepared_messages(size, arguments.messages, f"s{size}c{concurrency}")
            with tempfile.TemporaryDirectory(prefix="guardrail-store-bench-") as folder:
                run = commit_all(Path(folder) / "guardrail.db", submissions, concurrency)
                wall, cpu = uvloop.run(run) if uvloop else asyncio.run(run)
            count = len(submissions)
            print(f"{size // 1024:>5} KiB {concurrency:>4} {count / wall:>8.0f} {cpu / count * 1e6:>11.0f}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
