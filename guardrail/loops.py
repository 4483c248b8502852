"""Pure decisions about mail loops.

guardrail stamps everything it sends with a loop-marker header naming its own
host. A message that comes back carrying that marker has already been through
this daemon, so it is stored but never forwarded again.
"""

from __future__ import annotations

from .message import Summary

LOOP_HEADER = "X-Guardrail-Loop"


def has_our_loop_marker(summary: Summary, hostname: str) -> bool:
    """Return True when the message carries our loop marker for `hostname`."""
    ours = hostname.strip().lower()
    return any(value.strip().lower() == ours for value in summary.header(LOOP_HEADER))


def has_too_many_hops(summary: Summary, max_received: int) -> bool:
    """Return True when the Received headers show more hops than `max_received`.

    RFC 5321 section 6.3 recommends treating a large hop count as a loop.
    """
    return summary.received_count > max_received
