"""guardrail: an SMTP relay in front of a shared inbox."""

__version__ = "0.1.0"
