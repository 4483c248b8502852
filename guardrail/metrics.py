"""Prometheus metrics, one registry per daemon so that tests can run several.

Counters and histograms are updated where things happen. Gauges that
describe stored state (outbox depth, open conversations) are read from the
database when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


class Metrics:
    """Every metric guardrail exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.messages_accepted = Counter(
            "guardrail_messages_accepted", "Messages answered 250, by disposition", ["disposition"], registry=registry
        )
        self.messages_rejected = Counter(
            "guardrail_messages_rejected", "Messages and recipients rejected, by reason", ["reason"], registry=registry
        )
        self.messages_parsed = Counter(
            "guardrail_messages_parsed", "Messages parsed and routed, by where: a parse process or the daemon itself",
            ["where"], registry=registry,
        )
        self.maildir_files = Counter(
            "guardrail_maildir_files_written",
            "Maildir files written or found already there, by where: the maildir process or the daemon itself",
            ["where"], registry=registry,
        )
        self.messages_routed = Counter("guardrail_messages_routed", "Messages routed, by route", ["route"], registry=registry)
        self.acks_sent = Counter("guardrail_acknowledgements_sent", "Acknowledgements queued", registry=registry)
        self.acks_suppressed = Counter(
            "guardrail_acknowledgements_suppressed", "Acknowledgements not sent, by signal", ["signal"], registry=registry
        )
        self.ack_template_fallbacks = Counter(
            "guardrail_acknowledgement_template_fallbacks", "Acknowledgements sent with the plain template", registry=registry
        )
        self.deadlines_missed = Counter(
            "guardrail_deadlines_missed", "Conversations that reached their deadline unanswered", registry=registry
        )
        self.escalations = Counter(
            "guardrail_escalations", "Escalations, by level and outcome", ["level", "outcome"], registry=registry
        )
        self.delivery_failures = Counter(
            "guardrail_delivery_failures", "Outbox attempts that failed, by kind and whether they will be retried",
            ["kind", "final"], registry=registry,
        )
        self.webhook_failures = Counter("guardrail_webhook_failures", "Webhooks that failed after every retry", registry=registry)
        self.alarms = Counter(
            "guardrail_alarms", "Alarms mailed, by kind: an abandoned route or a rejected address", ["kind"], registry=registry
        )
        self.reloads = Counter("guardrail_rule_reloads", "Rule reloads, by result", ["result"], registry=registry)
        self.rules = Info("guardrail_rules", "The active rule set", registry=registry)
        self.outbox_depth = Gauge("guardrail_outbox_depth", "Pending outbox rows", registry=registry)
        self.outbox_oldest_age = Gauge(
            "guardrail_outbox_oldest_age_seconds", "Age of the oldest pending outbox row", registry=registry
        )
        self.open_conversations = Gauge("guardrail_open_conversations", "Conversations awaiting an answer, without those that need no reply", registry=registry)

        # Bucket bounds in seconds, from a fast commit on an idle machine to a
        # transaction that waited seconds for the database lock.
        seconds = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
        self.intake_seconds = Histogram(
            "guardrail_intake_seconds",
            "Time from a message's final dot to its 250 reply: parsing, routing and the wait for its commit",
            buckets=seconds, registry=registry,
        )
        self.commit_seconds = Histogram(
            "guardrail_commit_seconds", "Time the writer thread spent on one transaction, its fsync included",
            buckets=seconds, registry=registry,
        )
        self.commit_batch_size = Histogram(
            "guardrail_commit_batch_size", "Writes committed together in one transaction: messages, delivery results and others",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry,
        )

    def observe_commit(self, seconds: float, size: int) -> None:
        """Record one transaction of the writer thread, which calls this."""
        self.commit_seconds.observe(seconds)
        self.commit_batch_size.observe(size)

    def set_rules(self, digest: str) -> None:
        self.rules.info({"hash": digest})
