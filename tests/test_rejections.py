"""The rejected-address alarm's decisions: whom to tell, the mail's text, and which addresses are skipped."""

from __future__ import annotations

import asyncio
import contextlib
import email
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SHARED_RULES
from structlog.testing import capture_logs

from guardrail.clock import ManualClock, format_instant, parse_instant
from guardrail.escalation import Sender
from guardrail.loops import LOOP_HEADER
from guardrail.rejections import QUOTED_REPLY, RejectedFigures, find_rejected_addresses
from guardrail.rules import RuleSet, load_rules
from guardrail.sla import RejectionWatch

NOW = datetime(2025, 11, 4, 9, 0, tzinfo=timezone.utc)
SENDER = Sender(hostname="mx.example.org", from_address="postmaster@example.org", answer_command="guardrail answer")

RULES = SHARED_RULES.replace("duty-manager@example.org", "duty@example.org") + """
[[team]]
name = "support"
destination = { smtp = ["team@example.net", "second@example.net"] }
members = [{ name = "Ann", address = "ann@example.org" }]

[[team]]
name = "billing"
destination = { smtp = ["billing@example.net", "old@example.net"] }
members = [{ name = "Bo", address = "bo@example.org" }]
escalation_contact = { name = "Bill Lead", address = "billing-lead@example.org" }

[[route]]
name = "vip"
team = "support"
owner = { name = "Vera Owner", address = "vip-owner@example.org" }
all = [{ rcpt.is = "vip@example.com" }]

[[route]]
name = "invoices"
team = "billing"
all = [{ rcpt.is = "billing@example.com" }]

[[route]]
name = "default"
team = "support"
default = true
"""


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "teams.toml").write_text(RULES)
    return load_rules(folder, tmp_path)


def figures(address: str = "second@example.net", team: str = "support", route: str = "default", **changes: object) -> RejectedFigures:
    values: dict[str, object] = {
        "address": address, "team": team, "route": route, "count": 3,
        "first": NOW - timedelta(hours=2), "last": NOW - timedelta(minutes=5),
        "reply": "smarthost accepted the message for some recipients and rejected second@example.net: 550 5.1.1 no such user",
    }
    values.update(changes)
    return RejectedFigures(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rejected", "expected"), [
    # The route's owner comes first, then the team's escalation contact, then the fallback human.
    (figures(route="vip"), "vip-owner@example.org"),
    (figures("old@example.net", team="billing", route="invoices"), "billing-lead@example.org"),
    (figures(), "duty@example.org"),
    # A route or team removed from the rules since the rejection: the team's contact, or the fallback.
    (figures(route="gone"), "duty@example.org"),
    (figures("old@example.net", team="billing", route="gone"), "billing-lead@example.org"),
    (figures(team="gone", route="gone"), "duty@example.org"),
    # A conversation-less delivery has neither team nor route.
    (figures(team="", route=""), "duty@example.org"),
])
def test_alarm_goes_to_the_owner(rules: RuleSet, rejected: RejectedFigures, expected: str) -> None:
    [alarm] = find_rejected_addresses([rejected], rules, NOW, SENDER, set())
    assert alarm.owner.address == expected
    assert email.message_from_bytes(alarm.data)["To"].endswith(f"<{expected}>")


def test_recently_alarmed_addresses_are_skipped(rules: RuleSet) -> None:
    rejected = [figures(), figures("old@example.net", team="billing", route="invoices")]
    alarms = find_rejected_addresses(rejected, rules, NOW, SENDER, {("second@example.net", "support")})
    assert [alarm.address for alarm in alarms] == ["old@example.net"]


def test_address_of_two_teams_alarms_each_owner(rules: RuleSet) -> None:
    # One address in both teams' destinations: each team's owner hears of it, and skipping is per team.
    rejected = [figures("shared@example.net"), figures("shared@example.net", team="billing", route="invoices")]
    alarms = find_rejected_addresses(rejected, rules, NOW, SENDER, set())
    assert [(alarm.team, alarm.owner.address) for alarm in alarms] == [
        ("support", "duty@example.org"), ("billing", "billing-lead@example.org"),
    ]
    assert [email.message_from_bytes(alarm.data)["Subject"] for alarm in alarms] == [
        "Address shared@example.net rejects team support's mail", "Address shared@example.net rejects team billing's mail",
    ]
    alarms = find_rejected_addresses(rejected, rules, NOW, SENDER, {("shared@example.net", "support")})
    assert [alarm.team for alarm in alarms] == ["billing"]


def test_alarm_mail_text(rules: RuleSet, tmp_path: Path) -> None:
    [alarm] = find_rejected_addresses([figures()], rules, NOW, SENDER, set())
    mail = email.message_from_bytes(alarm.data)
    assert mail["Subject"] == "Address second@example.net rejects team support's mail"
    assert mail["From"] == "guardrail <postmaster@example.org>"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail[LOOP_HEADER] == "mx.example.org"
    body = mail.get_payload(decode=True).decode()
    assert "Its last reply: smarthost accepted the message for some recipients and rejected" in body
    assert "Messages rejected: 3, from 2025-11-04T07:00:00+00:00 to 2025-11-04T08:55:00+00:00" in body
    assert f"the destination of team support in {tmp_path / 'rules' / 'teams.toml'}" in " ".join(body.split())
    assert alarm.detail == (
        "second@example.net rejected 3 message(s) of team support from 2025-11-04T07:00:00+00:00 to 2025-11-04T08:55:00+00:00"
    )


def test_long_reply_is_shortened_to_one_line(rules: RuleSet) -> None:
    reply = "550 5.1.1 " + "x" * 2000 + "\r\nBcc: evil@example.com"
    [alarm] = find_rejected_addresses([figures(reply=reply)], rules, NOW, SENDER, set())
    body = email.message_from_bytes(alarm.data).get_payload(decode=True).decode()
    [line] = [line for line in body.splitlines() if line.startswith("Its last reply: ")]
    assert len(line) == len("Its last reply: ") + QUOTED_REPLY
    assert line.endswith("…")
    assert "Bcc:" not in body


async def settle() -> None:
    """Let the watch's task run until it waits again: a bounded number of event-loop turns."""
    for _ in range(20):
        await asyncio.sleep(0)


class CountingStore:
    """A store whose rejections name the same addresses again and again; it counts the checks it is asked for."""

    def __init__(self, *figure: RejectedFigures) -> None:
        self.checks = 0
        self.alarmed: dict[tuple[str, str], str] = {}
        self.figures = list(figure or [figures()])

    async def raise_rejection_alarms(self, now: datetime, period: timedelta, planner: Callable[..., list[Any]]) -> list[Any]:
        self.checks += 1
        alarms = planner(self.figures, {key: at for key, at in self.alarmed.items() if parse_instant(at) > now - period})
        for alarm in alarms:
            self.alarmed[alarm.address, alarm.team] = format_instant(now)
        return alarms


async def test_watch_skips_checks_for_an_alarmed_address(rules: RuleSet) -> None:
    store = CountingStore()
    clock = ManualClock(NOW)
    watch = RejectionWatch(store, clock, lambda: rules, SENDER)  # type: ignore[arg-type]
    task = asyncio.create_task(watch.run())
    try:
        await settle()
        assert store.checks == 1
        assert list(store.alarmed) == [("second@example.net", "support")]
        # Each later delivery rejected for the alarmed address would read a day of rejections for nothing.
        for _ in range(3):
            watch.rejected([("second@example.net", "support")])
            await settle()
        assert store.checks == 1
        # Another address is checked, the same address for another team too, and the first one after the period.
        watch.rejected([("other@example.net", "support")])
        await settle()
        assert store.checks == 2
        watch.rejected([("second@example.net", "billing")])
        await settle()
        assert store.checks == 3
        await clock.advance(timedelta(days=1, seconds=1))
        watch.rejected([("second@example.net", "support")])
        await settle()
        assert store.checks == 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_alarm_without_team(rules: RuleSet) -> None:
    # A postmaster copy belongs to no conversation, so its rejection names no team.
    [alarm] = find_rejected_addresses([figures("owner@example.net", team="", route="")], rules, NOW, SENDER, set())
    mail = email.message_from_bytes(alarm.data)
    assert mail["Subject"] == "Address owner@example.net rejects mail"
    body = " ".join(mail.get_payload(decode=True).decode().split())
    assert "The mail server rejected mail for owner@example.net." in body
    assert "in the config's [postmaster] owner or the rule files" in body
    assert "team" not in alarm.detail


def rules_without_fallback(tmp_path: Path) -> RuleSet:
    """Load one team whose chain starts with a webhook and ends with Lee Lead, and no fallback human."""
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "teams.toml").write_text((ROOT / "rules" / "30-acknowledgements.toml").read_text() + """
[[team]]
name = "support"
destination = { smtp = ["team@example.net", "second@example.net"] }
members = [{ name = "Ann", address = "ann@example.org" }]
escalation = [{ after = "0m", webhook = { url = "http://127.0.0.1:9/hook" } }, { after = "1h", name = "Lee Lead", address = "lee@example.org" }]

[[route]]
name = "default"
team = "support"
default = true
""")
    rules = load_rules(folder, tmp_path)
    assert rules.fallback is None
    return rules


def test_alarm_without_fallback_goes_to_chain(tmp_path: Path) -> None:
    # Without a fallback human, the first person of the team's escalation chain gets the alarm.
    rules = rules_without_fallback(tmp_path)
    [alarm] = find_rejected_addresses([figures()], rules, NOW, SENDER, set())
    assert alarm.owner.address == "lee@example.org"


async def test_watch_logs_unowned_address_once(tmp_path: Path) -> None:
    # A rejection outside any team, such as of a postmaster copy, with no fallback human has no one to mail.
    rules = rules_without_fallback(tmp_path)
    store = CountingStore(figures(team="", route=""))
    clock = ManualClock(NOW)
    watch = RejectionWatch(store, clock, lambda: rules, SENDER)  # type: ignore[arg-type]
    with capture_logs() as logs:
        task = asyncio.create_task(watch.run())
        try:
            await settle()
            for _ in range(3):
                watch.rejected([("second@example.net", "")])
                await settle()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert store.alarmed == {}
    assert store.checks == 1
    assert [entry["address"] for entry in logs if entry["event"] == "rejected_address_unowned"] == ["second@example.net"]
