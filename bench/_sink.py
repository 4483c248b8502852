"""A bare aiosmtpd server that accepts every message at once: the baseline for bench/intake.py.

It listens on 127.0.0.1, replies 250 to DATA without storing anything, and
stops on SIGTERM or SIGINT. Run it as `python bench/_sink.py --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session


class AcceptAll:
    """An aiosmtpd handler whose DATA hook replies 250 at once."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    handler = AcceptAll()
    # An explicit hostname: without one aiosmtpd resolves this host's FQDN on
    # every new connection, which a benchmark would measure as server time.
    server = await loop.create_server(lambda: SMTP(handler, hostname="sink.bench", loop=loop), host="127.0.0.1", port=port)
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    async with server:
        await stopping.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Bare aiosmtpd sink for the intake benchmark.")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 to listen on")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="event loop to run on")
    arguments = parser.parse_args()
    if arguments.loop == "uvloop":
        import uvloop

        uvloop.run(serve(arguments.port))
    else:
        asyncio.run(serve(arguments.port))


if __name__ == "__main__":
    main()
