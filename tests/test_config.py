"""Config and rule errors name the file, the key, the bad value and the fix."""

from __future__ import annotations

import json
import os
import shutil
from datetime import date, timedelta
from pathlib import Path

import pytest
from conftest import DATA, ROUTES, TEAMS, example_copy, rules_folder, write_config

from guardrail.cli import main
from guardrail.config import default_parse_processes, load_config
from guardrail.daemon import load_ruleset
from guardrail.errors import ConfigErrors
from guardrail.rules import load_rules

ROOT = Path(__file__).resolve().parents[1]


def rule_errors(tmp_path: Path, text: str) -> list[str]:
    folder = rules_folder(tmp_path, text)
    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)
    return [str(error) for error in caught.value.errors]


def test_example_config_loads() -> None:
    config = load_config(ROOT / "config.example.toml")
    assert config.smtp.port == 2525
    assert config.smtp.inboxes == {"support@example.com", "billing@example.com", "hello@example.com"}
    assert config.database_path == ROOT / "var" / "guardrail.db"
    assert config.smarthost is None
    assert config.delivery.retry_initial == timedelta(seconds=30)


def test_example_config_lists_the_default_sender_patterns() -> None:
    import tomllib

    from guardrail.loops import DEFAULT_SENDER_PATTERNS

    text = (ROOT / "config.example.toml").read_text()
    start = text.index("# sender_patterns = [")
    end = text.index("# ]", start) + len("# ]")
    commented = "\n".join(line.removeprefix("#") for line in text[start:end].splitlines())
    assert tuple(tomllib.loads(commented)["sender_patterns"]) == DEFAULT_SENDER_PATTERNS


def test_paths_may_start_at_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    path = write_config(
        tmp_path / "etc",
        smtp={"tls_certificate": "~/tls/missing.pem", "tls_key": "~/tls/missing.key"},
        sections={"database": {"path": "~/state/guardrail.db"}, "outbound": {"maildir": "~/outbound"}},
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    assert [str(error) for error in caught.value.errors] == [
        f"{path}: smtp.tls_certificate: file not found: {home / 'tls' / 'missing.pem'};"
        " expected a PEM file (a relative path starts at the config's folder)",
        f"{path}: smtp.tls_key: file not found: {home / 'tls' / 'missing.key'};"
        " expected a PEM file (a relative path starts at the config's folder)",
    ]
    config = load_config(write_config(
        tmp_path / "etc2", sections={"database": {"path": "~/state/guardrail.db"}, "outbound": {"maildir": "~/outbound"}},
    ))
    assert config.database_path == home / "state" / "guardrail.db"
    assert config.outbound_maildir == home / "outbound"


def test_unknown_user_home_is_config_error(tmp_path: Path) -> None:
    rules = TEAMS.replace('"var/maildir/billing"', '"~nosuchuser-guardrail/billing"') + ROUTES
    path = write_config(tmp_path, rules=rules, sections={"database": {"path": "~nosuchuser-guardrail/guardrail.db"}})
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    expected = 'expected a path whose "~" names a user of this machine, or one without "~"'
    assert [str(error) for error in caught.value.errors] == [
        f"{path}: database.path: invalid value '~nosuchuser-guardrail/guardrail.db'; {expected}",
    ]
    config = load_config(write_config(tmp_path, rules=rules))
    with pytest.raises(ConfigErrors) as caught:
        load_ruleset(config)
    [error] = caught.value.errors
    assert str(error).endswith(f"destination.maildir: invalid value '~nosuchuser-guardrail/billing'; {expected}")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write_config(tmp_path, smtp={"prot": 25})
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    (error,) = caught.value.errors
    assert str(error).startswith(f"{path}: smtp.prot: unknown key")


@pytest.mark.parametrize(
    ("smtp", "sections", "error"),
    [
        ({"max_recipent": 5}, {}, "smtp.max_recipent: unknown key; did you mean 'max_recipients'?"),
        ({}, {"databse": {"path": "var/guardrail.db"}}, "databse: unknown key; did you mean 'database'?"),
        ({"zzz": 1}, {}, "smtp.zzz: unknown key; check its spelling against config.example.toml or the README"),
    ],
    ids=["key", "section", "no-close-key"],
)
def test_unknown_key_names_closest_key(tmp_path: Path, smtp: dict[str, object], sections: dict[str, dict[str, object]], error: str) -> None:
    path = write_config(tmp_path, smtp=smtp, sections=sections)

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(found) for found in caught.value.errors] == [f"{path}: {error}"]


def test_unknown_team_key_names_closest_key(tmp_path: Path) -> None:
    rules = TEAMS.replace('name = "support"\n', 'name = "support"\nfirst_respons = "4h"\n', 1)
    path = rules_folder(tmp_path, rules + ROUTES) / "rules.toml"

    with pytest.raises(ConfigErrors) as caught:
        load_rules(path.parent, tmp_path)

    assert [str(found) for found in caught.value.errors] == [
        f"{path}: team[0] (support).first_respons: unknown key; did you mean 'first_response'?",
    ]


@pytest.mark.parametrize("value", [-1, 65, "two", True])
def test_parse_processes_must_be_a_count(tmp_path: Path, value: object) -> None:
    path = write_config(tmp_path, smtp={"parse_processes": value})
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    (error,) = caught.value.errors
    written = "true" if value is True else repr(value)
    assert str(error) == f"{path}: smtp.parse_processes: invalid value {written}; expected an integer of at least 0 and at most 64"


@pytest.mark.parametrize(("cpus", "expected"), [(None, 2), (1, 2), (2, 2), (3, 2), (4, 3), (5, 4), (64, 4)])
def test_parse_process_default_by_cpus(cpus: int | None, expected: int) -> None:
    assert default_parse_processes(cpus) == expected


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, smtp={"port": "abc", "max_message_size": "lots"},
        sections={"log": {"format": "xml"}, "database": {"min_free_space": "plenty"}},
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    messages = [str(error) for error in caught.value.errors]
    assert f"{path}: smtp.port: invalid value 'abc'; expected an integer of at least 0 and at most 65535" in messages
    assert any("smtp.max_message_size: invalid value 'lots'" in message for message in messages)
    assert any("log.format: invalid value 'xml'; expected one of 'auto', 'json', 'console'" in message for message in messages)
    assert any("database.min_free_space: invalid value 'plenty'" in message for message in messages)
    assert len(messages) == 4


@pytest.mark.parametrize("value", ["1TiB", "5 TB", "2.5GiB"])
def test_size_error_lists_units(tmp_path: Path, value: str) -> None:
    path = write_config(tmp_path, sections={"database": {"min_free_space": value}})
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    (error,) = caught.value.errors
    assert str(error) == (
        f"{path}: database.min_free_space: invalid value {value!r}; expected a positive whole number of bytes,"
        ' or of B, KB, MB, GB, KiB, MiB or GiB, such as 1048576 or "25MiB"'
    )


def test_missing_password_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GUARDRAIL_TEST_PASSWORD", raising=False)
    path = write_config(tmp_path, sections={"smarthost": {"host": "127.0.0.1", "password_env": "GUARDRAIL_TEST_PASSWORD"}})
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    assert "smarthost.password_env: environment variable 'GUARDRAIL_TEST_PASSWORD' is not set" in str(caught.value)


def test_password_never_shows_in_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDRAIL_TEST_PASSWORD", "hunter2-secret")
    path = write_config(tmp_path, sections={"smarthost": {"host": "127.0.0.1", "password_env": "GUARDRAIL_TEST_PASSWORD"}})
    config = load_config(path)
    assert config.smarthost is not None
    assert config.smarthost.password is not None
    assert config.smarthost.password.reveal() == "hunter2-secret"
    assert "hunter2-secret" not in repr(config)


def test_invalid_regex_names_route_and_pattern(tmp_path: Path) -> None:
    errors = rule_errors(tmp_path, """
[[team]]
name = "vip-desk"
[[team]]
name = "frontdesk"
[[route]]
name = "vip"
team = "vip-desk"
any = [{ from.regex = '(ceo@example\\.com' }]
[[route]]
name = "default"
team = "frontdesk"
default = true
""")
    (error,) = errors
    assert "route[0] (vip).any[0].from.regex: invalid regular expression '(ceo@example\\\\.com'" in error
    assert "missing ), unterminated subpattern" in error


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        # re.compile raises OverflowError and RecursionError for these, not re.error.
        ("a{4294967296}", "the repetition number is too large"),
        ("(" * 1000 + "a" + ")" * 1000, "nested too deeply"),
    ],
)
def test_uncompilable_regex_is_rule_error(tmp_path: Path, pattern: str, reason: str) -> None:
    errors = rule_errors(
        tmp_path,
        f'[[team]]\nname = "t"\n[[route]]\nname = "r"\nteam = "t"\nany = [{{ subject.regex = \'{pattern}\' }}]\n'
        '[[route]]\nname = "d"\nteam = "t"\ndefault = true\n',
    )
    (error,) = errors
    assert "route[0] (r).any[0].subject.regex: invalid regular expression" in error
    assert reason in error


def test_uncompilable_sender_pattern_is_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, sections={"acknowledgements": {"sender_patterns": ["x{4294967296}"]}})

    assert main(["check", "--config", str(path)]) == 2
    assert "acknowledgements.sender_patterns: invalid regular expression 'x{4294967296}'" in capsys.readouterr().err


def test_bad_toml_escape_names_file_and_line(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, "")
    shutil.copy(DATA / "routing" / "rules-bad-toml-escape.toml", folder / "rules.toml")
    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)
    (error,) = caught.value.errors
    assert error.path == folder / "rules.toml"
    assert error.line == 5
    assert "single quotes" in str(error)


def test_route_to_unknown_team_is_an_error(tmp_path: Path) -> None:
    errors = rule_errors(tmp_path, """
[[team]]
name = "legal"
[[route]]
name = "contracts"
team = "lgeal"
any = [{ subject.contains = "contract" }]
[[route]]
name = "default"
team = "legal"
default = true
""")
    assert errors == [f"{tmp_path / 'rules' / 'rules.toml'}: route[0] (contracts).team: team 'lgeal' does not exist; defined teams: legal"]


def test_missing_default_route_is_an_error(tmp_path: Path) -> None:
    errors = rule_errors(tmp_path, '[[team]]\nname = "t"\n[[route]]\nname = "r"\nteam = "t"\nany = [{ subject.is = "x" }]\n')
    assert errors == [f"{tmp_path / 'rules' / 'rules.toml'}: route: no default route; add a [[route]] with default = true"]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ('{ subjekt.is = "x" }', "any[0].subjekt: unknown field"),
        ('{ subject.like = "x" }', "any[0].subject.like: unknown operator"),
        ('{ subject.is = 3 }', "any[0].subject.is: invalid value 3"),
        ('{ subject.is = "x", from.is = "y" }', "a condition has exactly one field"),
        ('{ header.X-A.is = "1", header.X-B.is = "2" }', "name one header per condition"),
    ],
)
def test_condition_errors(tmp_path: Path, condition: str, expected: str) -> None:
    errors = rule_errors(
        tmp_path,
        f'[[team]]\nname = "t"\n[[route]]\nname = "r"\nteam = "t"\nany = [{condition}]\n'
        '[[route]]\nname = "d"\nteam = "t"\ndefault = true\n',
    )
    assert len(errors) == 1
    assert expected in errors[0]


def test_check_exits_2_and_lists_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, smtp={"port": -1}, rules='[[team]]\nname = "t"\n')

    status = main(["check", "--config", str(path)])

    assert status == 2
    output = capsys.readouterr().err
    assert "smtp.port: invalid value -1" in output
    # The rules are checked in the same run, though the config has an error.
    assert "route: no routes defined; add at least a [[route]] with default = true" in output
    assert "2 error(s), 0 warning(s)" in output


def test_check_reports_rule_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, rules='[[team]]\nname = "t"\n[[route]]\nname = "r"\nteam = "x"\ndefault = true\n')
    assert main(["check", "--config", str(path)]) == 2
    assert "route[0] (r).team: team 'x' does not exist" in capsys.readouterr().err



def test_check_example_config_only_asks_for_inspection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = example_copy(tmp_path)

    assert main(["check", "--config", str(config)]) == 1
    output = capsys.readouterr()
    assert output.out.startswith("ok: ")
    assert "never inspected" in output.err
    assert "0 error(s), 1 warning(s)" in output.err

    assert main(["inspect", "--config", str(config), "--by", "Dana Duty", "--note", "routes and teams reviewed"]) == 0
    assert main(["check", "--config", str(config)]) == 0


def test_check_json_lists_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = example_copy(tmp_path)
    with (tmp_path / "rules" / "20-routes.toml").open("a") as rules:
        rules.write('\n[[route]]\nname = "billing-again"\nteam = "billing"\nany = [{ rcpt.is = "billing@example.com" }]\n')

    assert main(["check", "--config", str(config), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    messages = {finding["where"]: finding["message"] for finding in report["findings"]}
    assert report["exit"] == 1
    assert messages[str(tmp_path / "rules" / "20-routes.toml")].startswith(
        "route[4] (billing-again): can never match: route 'billing-inbox' comes first"
    )
    assert all(finding["level"] == "warning" for finding in report["findings"])


def test_check_warns_of_backtracking_regex(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = example_copy(tmp_path)
    rules = tmp_path / "rules" / "20-routes.toml"
    with rules.open("a") as handle:
        handle.write("\n[[route]]\nname = \"urgent\"\nteam = \"support\"\nall = [{ subject.regex = '(a+)+$' }]\n")
    assert main(["inspect", "--config", str(config), "--by", "Dana Duty", "--note", "routes and teams reviewed"]) == 0
    capsys.readouterr()

    # A warning, not an error: the rules still load and check exits 1, as for any warning.
    assert main(["check", "--config", str(config)]) == 1
    output = capsys.readouterr()
    assert output.out.startswith("ok: ")
    expected = (
        f"warning: {rules}: route[4] (urgent).all[0].subject.regex: the pattern '(a+)+$' can take exponential time on some"
        " inputs; rewrite it without a repeat inside a repeat, or make the inner repeat possessive (such as a++ for a+)"
        " or atomic ((?>...))"
    )
    assert output.err.splitlines() == [expected, "0 error(s), 1 warning(s)"]

    rules.write_text(rules.read_text().replace("'(a+)+$'", "'(a++)+$'"))
    assert main(["inspect", "--config", str(config), "--by", "Dana Duty", "--note", "made the repeat possessive"]) == 0
    assert main(["check", "--config", str(config)]) == 0


@pytest.mark.parametrize(("condition", "warned"), [("body.regex", True), ("header.X-Note.regex", True), ("from.regex", False)])
def test_check_warns_of_slow_search(tmp_path: Path, capsys: pytest.CaptureFixture[str], condition: str, warned: bool) -> None:
    # Address patterns must match the whole address, so a search never retries them at every position.
    config = example_copy(tmp_path)
    rules = tmp_path / "rules" / "20-routes.toml"
    with rules.open("a") as handle:
        handle.write(f"\n[[route]]\nname = \"trailing\"\nteam = \"support\"\nall = [{{ {condition} = '[a-z]+@x\\.example' }}]\n")
    assert main(["inspect", "--config", str(config), "--by", "Dana Duty", "--note", "routes and teams reviewed"]) == 0
    capsys.readouterr()

    assert main(["check", "--config", str(config)]) == (1 if warned else 0)
    errors = capsys.readouterr().err
    assert ("grows with the square of the text's length" in errors) is warned


def test_route_command_explains_decision(capsys: pytest.CaptureFixture[str]) -> None:
    message = DATA / "routing" / "m3-real-vip-mixed-case.eml"
    status = main(["route", "--config", str(ROOT / "config.example.toml"), str(message), "--rcpt", "billing@example.com"])
    assert status == 0
    output = capsys.readouterr().out
    assert "route:       billing-inbox" in output
    assert "team:        billing" in output
    assert "destination: maildir " in output
    assert "because:     rcpt is 'billing@example.com' matched 'billing@example.com'" in output


@pytest.mark.parametrize(
    ("rcpts", "lines"),
    [
        (["postmaster@example.com"], ["route:       postmaster", "destination: smtp ops@example.com"]),
        (["Postmaster"], ["route:       postmaster", "because:     every recipient is postmaster"]),
        (
            ["billing@example.com", "postmaster@example.com"],
            ["route:       billing-inbox", "postmaster:  a copy goes to ops@example.com"],
        ),
    ],
)
def test_route_command_takes_postmaster(capsys: pytest.CaptureFixture[str], rcpts: list[str], lines: list[str]) -> None:
    message = DATA / "routing" / "m3-real-vip-mixed-case.eml"
    arguments = [argument for rcpt in rcpts for argument in ("--rcpt", rcpt)]
    assert main(["route", "--config", str(ROOT / "config.example.toml"), str(message), *arguments]) == 0
    output = capsys.readouterr().out.splitlines()
    assert all(line in output for line in lines), output


def test_route_command_shows_hop_rejection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    looping = tmp_path / "looping.eml"
    looping.write_bytes(b"Received: from a by b\r\n" * 31 + b"From: alice@example.com\r\nSubject: Loop\r\n\r\nHello\r\n")

    assert main(["route", "--config", str(ROOT / "config.example.toml"), str(looping)]) == 0
    output = capsys.readouterr().out
    assert output == "rejected:    554 5.4.6, 31 Received headers (max_received_headers is 30)\n"


POSITIVE = 'expected a positive duration such as "30s", "5m", "2h" or "1d"'
CONFIG_DURATIONS = [
    ("smtp", "timeout"),
    ("smtp", "data_timeout"),
    ("database", "busy_timeout"),
    ("smarthost", "timeout"),
    ("delivery", "retry_initial"),
    ("delivery", "retry_max"),
    ("delivery", "give_up_after"),
    ("conversations", "duplicate_window"),
    ("acknowledgements", "window"),
    ("webhooks", "timeout"),
    ("webhooks", "retry_initial"),
    ("webhooks", "retry_max"),
    ("inspection", "max_age"),
    ("zombie", "silent_business_hours"),
    ("zombie", "period"),
    ("zombie", "check_every"),
]


TOO_LONG = 'expected a duration of at most "36500d" (100 years)'


@pytest.mark.parametrize(("value", "expected"), [("0s", POSITIVE), ("36501d", TOO_LONG)])
@pytest.mark.parametrize(("section", "key"), CONFIG_DURATIONS)
def test_config_duration_out_of_range(tmp_path: Path, section: str, key: str, value: str, expected: str) -> None:
    values = {key: value}
    if section == "smarthost":
        values["host"] = "127.0.0.1"
    path = write_config(tmp_path, sections={section: values})

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(error) for error in caught.value.errors] == [f"{path}: {section}.{key}: invalid value '{value}'; {expected}"]


@pytest.mark.parametrize(
    ("value", "written"),
    [(0, "0"), (0.0, "0.0"), ("0ms", "'0ms'"), ("0.0000001ms", "'0.0000001ms'"), (-5, "-5"),
     (float("inf"), "inf"), ("99999999999w", "'99999999999w'"), (True, "true")],
)
def test_smtp_timeout_rejects_value(tmp_path: Path, value: object, written: str) -> None:
    path = write_config(tmp_path, smtp={"timeout": value})

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(error) for error in caught.value.errors] == [f"{path}: smtp.timeout: invalid value {written}; {POSITIVE}"]


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        (TEAMS.replace('name = "support"', 'name = "support"\nfirst_response = "0h"', 1) + ROUTES, "team[0] (support).first_response"),
        (TEAMS + ROUTES.replace('name = "billing"', 'name = "billing"\nfirst_response = "0h"', 1), "route[0] (billing).first_response"),
        (TEAMS + ROUTES + '[escalation]\nunstaffed_horizon = "0h"\n', "escalation.unstaffed_horizon"),
    ],
)
def test_rule_duration_must_be_positive(tmp_path: Path, rules: str, key: str) -> None:
    errors = rule_errors(tmp_path, rules)
    assert errors == [f"{tmp_path / 'rules' / 'rules.toml'}: {key}: invalid value '0h'; {POSITIVE}"]


def test_config_duration_of_100_years_loads(tmp_path: Path) -> None:
    path = write_config(tmp_path, sections={"conversations": {"duplicate_window": "36500d"}})
    assert load_config(path).duplicate_window == timedelta(days=36500)


@pytest.mark.parametrize(
    ("rules", "key"),
    [
        (TEAMS.replace('name = "support"', 'name = "support"\nfirst_response = "36501d"', 1) + ROUTES, "team[0] (support).first_response"),
        (TEAMS + ROUTES.replace('name = "billing"', 'name = "billing"\nfirst_response = "36501d"', 1), "route[0] (billing).first_response"),
        (TEAMS + ROUTES + '[escalation]\nunstaffed_horizon = "36501d"\n', "escalation.unstaffed_horizon"),
        (
            TEAMS.replace(
                'name = "support"',
                'name = "support"\nescalation = [{ after = "36501d", name = "Sam Ortiz", address = "sam@example.org" }]',
                1,
            ) + ROUTES,
            "team[0] (support).escalation[0].after",
        ),
    ],
)
def test_rule_duration_at_most_100_years(tmp_path: Path, rules: str, key: str) -> None:
    errors = rule_errors(tmp_path, rules)
    assert f"{tmp_path / 'rules' / 'rules.toml'}: {key}: invalid value '36501d'; {TOO_LONG}" in errors


OFFICE = """
[[calendar]]
name = "office"
timezone = "Europe/Paris"
hours = { mon = ["09:00-17:00"], tue = ["09:00-17:00"], wed = ["09:00-17:00"], thu = ["09:00-17:00"], fri = ["09:00-17:00"] }
"""
OFFICE_SUPPORT = 'name = "support"\ncalendar = "office"'


@pytest.mark.parametrize(
    ("rules", "key", "value"),
    [
        # Around the clock, the next 400 days (to the end of the last one) hold about 401 days of
        # business time; 8 hours a working day hold about 95.
        (TEAMS.replace('name = "support"', 'name = "support"\nfirst_response = "500d"', 1) + ROUTES, "team[0] (support).first_response", "500d"),
        (OFFICE + TEAMS.replace('name = "support"', OFFICE_SUPPORT + '\nfirst_response = "100d"', 1) + ROUTES,
         "team[0] (support).first_response", "100d"),
        (OFFICE + TEAMS.replace('name = "support"', OFFICE_SUPPORT, 1) + ROUTES.replace('default = true', 'default = true\nfirst_response = "2400h"'),
         "route[1] (default).first_response", "2400h"),
    ],
)
def test_first_response_beyond_calendar_horizon(tmp_path: Path, rules: str, key: str, value: str) -> None:
    errors = rule_errors(tmp_path, rules)
    assert errors == [
        f"{tmp_path / 'rules' / 'rules.toml'}: {key}: '{value}' of business time does not fit in the next 400 days"
        " of the team's calendar, so no deadline could be set; use a shorter first_response"
    ]


def test_reach_check_uses_load_day(tmp_path: Path) -> None:
    # Forty days of holidays from the load day leave 360 days of business time in the next 400.
    closed = ", ".join(str(date(2030, 6, 1) + timedelta(days=number)) for number in range(40))
    calendar = f'[[calendar]]\nname = "closed"\ntimezone = "UTC"\nholidays = [{closed}]\n'
    rules = calendar + TEAMS.replace('name = "support"', 'name = "support"\ncalendar = "closed"\nfirst_response = "370d"', 1) + ROUTES
    folder = rules_folder(tmp_path, rules)
    load_rules(folder, tmp_path, today=date(2026, 1, 1))
    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path, today=date(2030, 6, 1))
    assert [error.key for error in caught.value.errors] == ["team[0] (support).first_response"]


@pytest.mark.parametrize(
    "rules",
    [
        TEAMS.replace('name = "support"', 'name = "support"\nfirst_response = "399d"', 1) + ROUTES,
        OFFICE + TEAMS.replace('name = "support"', OFFICE_SUPPORT + '\nfirst_response = "90d"', 1) + ROUTES,
        # A calendar without business hours makes the team unstaffed, which is no error here.
        OFFICE.replace('hours = {', 'hours = {}\n# {') + TEAMS.replace('name = "support"', OFFICE_SUPPORT, 1) + ROUTES,
    ],
)
def test_first_response_within_calendar_horizon(tmp_path: Path, rules: str) -> None:
    ruleset = load_rules(rules_folder(tmp_path, rules), tmp_path)
    assert ruleset.teams["support"].first_response >= timedelta(hours=4)


ZOMBIE_KEYS = {"conversations": 20, "min_answered_share": 0.2, "silent_business_hours": "24h", "period": "1d", "check_every": "15m"}


def test_disabled_zombie_keeps_its_keys(tmp_path: Path) -> None:
    path = write_config(tmp_path, sections={"zombie": {"enabled": False, **ZOMBIE_KEYS}})
    assert load_config(path).zombie is None


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("check_every", "0s", f"invalid value '0s'; {POSITIVE}"),
        ("min_answered_share", 2, "invalid value 2; expected a number from 0 to 1, such as 0.2"),
        ("conversations", 0, "invalid value 0; expected an integer of at least 1"),
        ("every", "15m", "unknown key"),
    ],
)
def test_zombie_keys_checked_when_disabled(tmp_path: Path, enabled: bool, key: str, value: object, problem: str) -> None:
    path = write_config(tmp_path, sections={"zombie": {"enabled": enabled, key: value}})

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    (error,) = caught.value.errors
    assert str(error).startswith(f"{path}: zombie.{key}: {problem}")


TEMPLATE = '[[template]]\nname = {name}\nlanguage = {language}\nsubject = "s"\nbody = "b"\nplain_subject = "s"\nplain_body = "b"\n'
EMPTY_NAMES = [
    # (rules added to a valid set, key of the one expected error)
    ('[[team]]\nname = {blank}\ndestination = {{ maildir = "x" }}\n', "team[2].name"),
    ('[[route]]\nname = {blank}\nteam = "support"\nany = [{{ subject.is = "x" }}]\n', "route[2].name"),
    ("[[calendar]]\nname = {blank}\n", "calendar[0].name"),
    (TEMPLATE.replace("{name}", "{blank}").replace("{language}", '"en"'), "template[0].name"),
    (TEMPLATE.replace("{name}", '"custom"').replace("{language}", "{blank}"), "template[0].language"),
]


@pytest.mark.parametrize("blank", ['""', '"  "'], ids=["empty", "blank"])
@pytest.mark.parametrize(("extra", "key"), EMPTY_NAMES, ids=["team", "route", "calendar", "template", "language"])
def test_empty_name_is_rejected(tmp_path: Path, extra: str, key: str, blank: str) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES + extra.format(blank=blank))
    value = blank.strip('"')
    assert errors == [f"{tmp_path / 'rules' / 'rules.toml'}: {key}: invalid value {value!r}; must not be empty"]


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('{ name = "Sam Ortiz",', '{ name = "",', "team[0] (support).members[0].name"),
        ('address = "sam@example.org"', 'address = " "', "team[0] (support).members[0].address"),
    ],
    ids=["name", "address"],
)
def test_empty_member_is_rejected(tmp_path: Path, old: str, new: str, key: str) -> None:
    errors = rule_errors(tmp_path, TEAMS.replace(old, new) + ROUTES)
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'rules' / 'rules.toml'}: {key}: invalid value")
    assert errors[0].endswith("; must not be empty")


@pytest.mark.parametrize("zone", ["", "Mars/Olympus", "Europe", "../etc", "zone.tab"])
def test_unknown_timezone_is_rejected(tmp_path: Path, zone: str) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES + f'[[calendar]]\nname = "office"\ntimezone = "{zone}"\n')
    expected = (
        f"{tmp_path / 'rules' / 'rules.toml'}: calendar[0] (office).timezone: invalid value {zone!r};"
        ' expected an IANA time zone such as "Europe/Paris"'
    )
    assert errors == [expected]


@pytest.mark.parametrize(
    ("owner", "key"),
    [
        ('{ name = "", address = "dana@example.org" }', "route[0] (billing).owner.name"),
        ('{ name = "Dana Duty", address = "dana" }', "route[0] (billing).owner.address"),
    ],
)
def test_bad_owner_reported_once(tmp_path: Path, owner: str, key: str) -> None:
    routes = ROUTES.replace('name = "billing"\n', f'name = "billing"\nowner = {owner}\n', 1)
    errors = rule_errors(tmp_path, TEAMS + routes)
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'rules' / 'rules.toml'}: {key}: invalid value")


ACKNOWLEDGEMENTS = (ROOT / "rules" / "30-acknowledgements.toml").read_text()
FALLBACK = '[escalation]\nfallback = { name = "Dana Duty", address = "duty-manager@example.org" }\n'
UNKNOWN_HUMAN_KEY = [
    # (rules.toml, the key path of its misspelled key), each beside a complete name and address
    (
        TEAMS + FALLBACK + ROUTES.replace('name = "billing"\n', 'name = "billing"\nowner = { name = "Olga", address = "olga@example.org", adress = "o@example.org" }\n', 1),
        "route[0] (billing).owner.adress",
    ),
    (
        TEAMS.replace('name = "support"\n', 'name = "support"\nescalation_contact = { name = "Ann", nmae = "Ann Lee", address = "ann@example.org" }\n', 1)
        + FALLBACK + ROUTES,
        "team[0] (support).escalation_contact.nmae",
    ),
    (
        TEAMS + ROUTES + '[escalation]\nfallback = { name = "Fay", address = "fay@example.org", adress = "fay@example.org" }\n',
        "escalation.fallback.adress",
    ),
]


def write_human_rules(folder: Path, rules: str) -> Path:
    """Write `rules` beside the shipped templates, without the shared fallback human."""
    directory = rules_folder(folder, rules, shared=False)
    (directory / "00-acknowledgements.toml").write_text(ACKNOWLEDGEMENTS)
    return directory / "rules.toml"


@pytest.mark.parametrize(("rules", "key"), UNKNOWN_HUMAN_KEY, ids=["route-owner", "escalation-contact", "fallback"])
def test_unknown_key_in_human_rejected(tmp_path: Path, rules: str, key: str) -> None:
    path = write_human_rules(tmp_path, rules)

    with pytest.raises(ConfigErrors) as caught:
        load_rules(path.parent, tmp_path)

    expected = f"{path}: {key}: unknown key; allowed keys: name, address"
    assert [str(error) for error in caught.value.errors] == [expected]


@pytest.mark.parametrize(("rules", "key"), UNKNOWN_HUMAN_KEY, ids=["route-owner", "escalation-contact", "fallback"])
def test_check_rejects_unknown_human_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], rules: str, key: str) -> None:
    config = write_config(tmp_path)
    (tmp_path / "rules" / "00-shared.toml").unlink()
    path = write_human_rules(tmp_path, rules)

    assert main(["check", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"error: {path}: {key}: unknown key; allowed keys: name, address" in error
    assert "1 error(s), 0 warning(s)" in error


@pytest.mark.parametrize("hostname", ["mx.example.com\r\nX-Injected: yes", "my host", "mx_1.example.com", "-mx.example.com",
                                      "mx..example.com", "mx.example.com.", "a" * 64 + ".example.com", "mx.exämple.com"])
def test_smtp_hostname_must_be_domain(tmp_path: Path, hostname: str) -> None:
    # The name goes into the greeting, Received headers and our Message-IDs.
    path = write_config(tmp_path, smtp={"hostname": "placeholder"})
    # A JSON string is also a TOML basic string, with CR and LF escaped.
    path.write_text(path.read_text().replace('"placeholder"', json.dumps(hostname, ensure_ascii=False)))

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(error) for error in caught.value.errors] == [
        f"{path}: smtp.hostname: invalid value {hostname!r}; expected a domain name such as mx.example.com"
        " (labels of letters, digits and hyphens, up to 63 characters each, joined by dots)"
    ]


@pytest.mark.parametrize("hostname", ["mx.example.com", "localhost", "MX-1.Example.COM", "a" * 63 + ".example.com", "1.example"])
def test_smtp_hostname_accepts_domains(tmp_path: Path, hostname: str) -> None:
    assert load_config(write_config(tmp_path, smtp={"hostname": hostname})).smtp.hostname == hostname


REMOVE_OR_SET = "must not be empty; remove the key or give it a value"


@pytest.mark.parametrize(
    ("section", "key", "problem"),
    [
        ("smtp", "hostname", REMOVE_OR_SET),
        ("smtp", "listen", REMOVE_OR_SET),
        ("database", "path", REMOVE_OR_SET),
        ("rules", "directory", REMOVE_OR_SET),
        ("conversations", "reference_prefix", REMOVE_OR_SET),
        ("delivery", "return_path", REMOVE_OR_SET),
        ("postmaster", "owner", "must not be empty"),
    ],
)
def test_empty_config_string_is_rejected(tmp_path: Path, section: str, key: str, problem: str) -> None:
    path = write_config(tmp_path, smtp={key: ""} if section == "smtp" else None, sections={section: {key: ""}} if section != "smtp" else None)

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(error) for error in caught.value.errors] == [f"{path}: {section}.{key}: invalid value ''; {problem}"]


LIST_OF_DATES = "expected a list of dates such as [2026-12-24]"


@pytest.mark.parametrize(
    ("holidays", "error"),
    [
        ("5", f"holidays: invalid value 5; {LIST_OF_DATES}"),
        ("true", f"holidays: invalid value true; {LIST_OF_DATES}"),
        ("2026-12-24", f"holidays: invalid value 2026-12-24; {LIST_OF_DATES}"),
        ('"2026-12-24"', f"holidays: invalid value '2026-12-24'; {LIST_OF_DATES}"),
        ('{ christmas = 2026-12-25 }', f"holidays: invalid value {{'christmas': datetime.date(2026, 12, 25)}}; {LIST_OF_DATES}"),
        ("[2026-12-24, 5]", "holidays[1]: invalid value 5; expected a date such as 2026-12-24"),
        ('[2026-12-24, "24 Dec"]', "holidays[1]: invalid value '24 Dec'; expected a date such as 2026-12-24"),
        ("[2026-12-24T00:00:00]", "holidays[0]: invalid value 2026-12-24T00:00:00; expected a date such as 2026-12-24"),
    ],
    ids=["integer", "boolean", "date", "string", "table", "list-integer", "list-text", "list-datetime"],
)
def test_holidays_wrong_type_one_error(tmp_path: Path, holidays: str, error: str) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES + f'[[calendar]]\nname = "office"\nholidays = {holidays}\n')
    assert errors == [f"{tmp_path / 'rules' / 'rules.toml'}: calendar[0] (office).{error}"]


def test_holidays_accept_dates_and_iso_text(tmp_path: Path) -> None:
    teams = TEAMS.replace('name = "support"', 'name = "support"\ncalendar = "office"', 1)
    calendar = '[[calendar]]\nname = "office"\nholidays = [2026-12-24, "2026-12-31"]\n'

    rules = load_rules(rules_folder(tmp_path, teams + ROUTES + calendar), tmp_path)

    assert rules.teams["support"].calendar.holidays == {date(2026, 12, 24), date(2026, 12, 31)}


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ('country = "FR"\nsubdivision = "ZZ"', "subdivision: invalid value 'ZZ'; expected a subdivision of FR: "),
        ('country = "DE"\nsubdivision = "by"', "subdivision: invalid value 'by'; expected a subdivision of DE: BB, BE, BW, BY,"),
        ('country = "ZZ"', "country: invalid value 'ZZ'; expected a country code known to the holidays package"),
        ('country = "ZZ"\nsubdivision = "BY"', "country: invalid value 'ZZ'; expected a country code known to the holidays package"),
        ('subdivision = "BY"', "subdivision: 'BY' is set without country; set country to its country code, such as \"DE\""),
    ],
    ids=["unknown-subdivision", "lower-case-subdivision", "unknown-country", "unknown-country-with-subdivision", "no-country"],
)
def test_holiday_region_error_names_key(tmp_path: Path, keys: str, error: str) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES + f'[[calendar]]\nname = "office"\n{keys}\n')
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'rules' / 'rules.toml'}: calendar[0] (office).{error}")


def test_long_subdivision_list_is_shortened(tmp_path: Path) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES + '[[calendar]]\nname = "office"\ncountry = "IT"\nsubdivision = "ZZ"\n')
    assert len(errors) == 1
    assert errors[0].endswith(" more")


@pytest.mark.parametrize(
    ("smtp", "error"),
    [
        ({"inboxes": ["support@@example.org"]}, "smtp.inboxes: invalid value 'support@@example.org'; expected an email address such as support@example.com"),
        ({"inboxes": ["support@example..org"]}, "smtp.inboxes: invalid value 'support@example..org'; expected an email address such as support@example.com"),
        ({"inboxes": ["support@.example.org"]}, "smtp.inboxes: invalid value 'support@.example.org'; expected an email address such as support@example.com"),
        ({"inboxes": [], "inbox_domains": ["*.example.org"]}, "smtp.inbox_domains: invalid value '*.example.org'; expected a domain name such as example.com"),
        ({"inboxes": [], "inbox_domains": ["exa mple.org"]}, "smtp.inbox_domains: invalid value 'exa mple.org'; expected a domain name such as example.com"),
    ],
    ids=["two-at-signs", "empty-label", "leading-dot", "wildcard-domain", "space-in-domain"],
)
def test_inbox_with_bad_domain_rejected(tmp_path: Path, smtp: dict[str, object], error: str) -> None:
    path = write_config(tmp_path, smtp=smtp)

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(found) for found in caught.value.errors] == [f"{path}: {error}"]


def test_inbox_with_international_domain_accepted(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, smtp={"inboxes": ["support@bücher.example"], "inbox_domains": ["bücher.example"]}))

    assert config.smtp.inboxes == {"support@bücher.example"}
    assert config.smtp.inbox_domains == {"bücher.example"}


def test_postmaster_owner_with_two_at_signs_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, sections={"postmaster": {"owner": "ops@@example.org"}})

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(found) for found in caught.value.errors] == [
        f"{path}: postmaster.owner: invalid value 'ops@@example.org'; expected an email address such as ops@example.com",
    ]


@pytest.mark.parametrize(
    ("smtp", "error"),
    [
        ({"inboxes": "support@example.org"}, "smtp.inboxes: invalid value 'support@example.org'; expected a list of strings"),
        ({"inboxes": 5}, "smtp.inboxes: invalid value 5; expected a list of strings"),
        ({"inboxes": [], "inbox_domains": "example.org"}, "smtp.inbox_domains: invalid value 'example.org'; expected a list of strings"),
        ({"inboxes": []}, "smtp.inboxes: missing; list at least one address we accept mail for, such as support@example.com"),
    ],
    ids=["inboxes-string", "inboxes-integer", "domains-string", "both-empty"],
)
def test_inboxes_error_reported_once(tmp_path: Path, smtp: dict[str, object], error: str) -> None:
    path = write_config(tmp_path, smtp=smtp)

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(found) for found in caught.value.errors] == [f"{path}: {error}"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("smtp = 5\n", "smtp: invalid value 5; expected a table"),
        ('postmaster = "ops@example.org"\n[smtp]\ninboxes = ["support@example.org"]\n', "postmaster: invalid value 'ops@example.org'; expected a table"),
        ('smarthost = "mail.example.org"\n[smtp]\ninboxes = ["support@example.org"]\n', "smarthost: invalid value 'mail.example.org'; expected a table"),
    ],
    ids=["smtp", "postmaster", "smarthost"],
)
def test_section_not_a_table_reported_once(tmp_path: Path, text: str, error: str) -> None:
    path = write_config(tmp_path)
    owner = "" if text.startswith("postmaster") else '[postmaster]\nowner = "ops@example.org"\n'
    path.write_text(text + owner)

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(found) for found in caught.value.errors] == [f"{path}: {error}"]


@pytest.mark.parametrize(
    ("rules", "error"),
    [
        (
            TEAMS.replace('{ maildir = "var/maildir/support" }', '"var/x"') + ROUTES,
            (
                "team[0] (support).destination: invalid value 'var/x';"
                ' expected a table such as { maildir = "PATH" } or { smtp = ["ADDRESS", ...] }'
            ),
        ),
        ("route = [5]\n" + TEAMS, "route[0]: invalid value 5; expected a table"),
        (TEAMS + ROUTES.replace('name = "billing"\n', 'name = "billing"\nowner = "dana@example.org"\n'), "route[0] (billing).owner: invalid value 'dana@example.org'; expected a table"),
    ],
    ids=["destination", "route", "owner"],
)
def test_rule_not_a_table_reported_once(tmp_path: Path, rules: str, error: str) -> None:
    assert rule_errors(tmp_path, rules) == [f"{tmp_path / 'rules' / 'rules.toml'}: {error}"]


def test_tls_certificate_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls.key").write_text("")
    path = write_config(tmp_path, smtp={"tls_certificate": "tls", "tls_key": "tls.key"})

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    expected = (
        f"{path}: smtp.tls_certificate: is a directory: {tmp_path / 'tls'};"
        " expected a PEM file (a relative path starts at the config's folder)"
    )
    assert [str(error) for error in caught.value.errors] == [expected]


def _directory(path: Path) -> None:
    path.mkdir(parents=True)


def _text_file(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("not a database, just some notes\n")


def _fifo(path: Path) -> None:
    path.parent.mkdir(parents=True)
    os.mkfifo(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_directory, "is a directory; expected the path of an SQLite database file, such as var/guardrail.db"),
        (_text_file, "is not an SQLite database; point database.path at the daemon's database"),
        (_fifo, "is not a regular file; expected the path of an SQLite database file"),
    ],
    ids=["directory", "text-file", "fifo"],
)
@pytest.mark.parametrize("command", ["check", "run", "status"])
def test_unusable_database_path_is_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, problem: str, command: str,
) -> None:
    path = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    make(database)

    assert main([command, "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"error: {path}: database.path: {database} {problem}" in error
    assert "Traceback" not in error


def test_damaged_database_is_check_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)

    assert main(["check", "--config", str(path)]) == 2
    assert f"error: {path}: database.path: {database} is not an SQLite database, or its header is damaged" in capsys.readouterr().err


def test_empty_database_file_is_accepted(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    database = tmp_path / "var" / "guardrail.db"
    database.parent.mkdir(parents=True)
    database.touch()

    assert load_config(path).database_path == database


@pytest.mark.parametrize("section", ["smtp", "http"])
@pytest.mark.parametrize("listen", ["not an address", "127.0.0.1:2525", "256.1.1.1", "[::1]"])
def test_listen_address_checked(tmp_path: Path, section: str, listen: str) -> None:
    settings = {"listen": listen}
    path = write_config(tmp_path, smtp=settings) if section == "smtp" else write_config(tmp_path, sections={"http": settings})

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(error) for error in caught.value.errors] == [
        f"{path}: {section}.listen: invalid value {listen!r}; expected an IP address such as 127.0.0.1, 0.0.0.0"
        " or ::1, or a host name such as localhost"
    ]


@pytest.mark.parametrize("listen", ["127.0.0.1", "0.0.0.0", "::1", "::", "localhost"])
def test_listen_address_accepted(tmp_path: Path, listen: str) -> None:
    assert load_config(write_config(tmp_path, smtp={"listen": listen})).smtp.listen == listen


def test_retry_initial_longer_than_max_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, sections={"delivery": {"retry_initial": "2h", "retry_max": "1m"}})

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [str(error) for error in caught.value.errors] == [
        f"{path}: delivery.retry_initial: is longer than retry_max; the wait between attempts starts at retry_initial"
        " and doubles up to retry_max, so retry_initial must be the shorter"
    ]


def test_bad_retry_max_gives_one_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, sections={"delivery": {"retry_initial": "2h", "retry_max": "soon"}})

    with pytest.raises(ConfigErrors) as caught:
        load_config(path)

    assert [error.key for error in caught.value.errors] == ["delivery.retry_max"]


def test_invalid_level_gets_its_own_error_only(tmp_path: Path) -> None:
    # A webhook or human that is there but invalid explains the level, so no
    # second error reports that the level names neither.
    errors = rule_errors(tmp_path, """
[[team]]
name = "support"
destination = { maildir = "var/maildir/support" }
escalation = [
    { after = "0m", name = "Sam Ortiz", address = "sam@example.org" },
    { after = "1h", webhook = { url = "ftp://hooks.example.org/x" } },
    { after = "2h", name = "Dana Duty", address = "not an address" },
    { after = "3h", name = "Dana Duty", address = "dana@example.org" },
]

[[route]]
name = "default"
team = "support"
default = true
""")
    path = tmp_path / "rules" / "rules.toml"
    assert errors == [
        f"{path}: team[0] (support).escalation[1].webhook.url: invalid value 'ftp://hooks.example.org/x'; expected an http:// or https:// URL",
        f"{path}: team[0] (support).escalation[2].address: invalid value 'not an address'; expected an email address such as dana@example.com",
    ]


def test_empty_level_needs_human_or_webhook(tmp_path: Path) -> None:
    errors = rule_errors(tmp_path, """
[[team]]
name = "support"
destination = { maildir = "var/maildir/support" }
escalation = [{ after = "1h" }, { after = "2h", name = "Dana Duty", address = "dana@example.org" }]

[[route]]
name = "default"
team = "support"
default = true
""")
    path = tmp_path / "rules" / "rules.toml"
    assert errors == [f"{path}: team[0] (support).escalation[0]: a level needs a named human (name and address) or a rotation, a webhook, or both"]


@pytest.mark.parametrize(("value", "expected"), [
    ('""', "invalid value ''; must not be empty; remove the key or give it a value"),
    ('"mx example.org"', "invalid value 'mx example.org'; expected one word without spaces, such as the host name of the MTA in front"),
    ('"mx.example.org;"', "invalid value 'mx.example.org;'; expected one word without spaces, such as the host name of the MTA in front"),
    ("3", "invalid value 3; expected a string"),
])
def test_invalid_authserv_id(tmp_path: Path, value: str, expected: str) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES + f"[staff]\nauthserv_id = {value}\n")
    assert errors == [f"{tmp_path / 'rules' / 'rules.toml'}: staff.authserv_id: {expected}"]


def test_authserv_id_in_two_files(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, TEAMS + ROUTES + '[staff]\nauthserv_id = "mx.example.org"\n')
    (folder / "20-staff.toml").write_text('[staff]\nauthserv_id = "mx2.example.org"\n')
    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)
    assert [str(error) for error in caught.value.errors] == [
        f"{folder / 'rules.toml'}: staff.authserv_id: the authserv-id is set in more than one file; keep one",
    ]


def test_authserv_id_is_lower_case(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, TEAMS + ROUTES + '[staff]\nauthserv_id = " MX.Example.ORG "\n')
    assert load_rules(folder, tmp_path).staff_authserv_id == "mx.example.org"


@pytest.mark.parametrize(("smtp_listen", "http_listen"), [
    ("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::1", "::"), ("::", "::1"), ("0.0.0.0", "0.0.0.0"),
    ("::1", "0:0:0:0:0:0:0:1"),
])
def test_http_port_clashes_with_smtp(tmp_path: Path, smtp_listen: str, http_listen: str) -> None:
    config = write_config(
        tmp_path, smtp={"listen": smtp_listen, "port": 20526}, sections={"http": {"enabled": True, "listen": http_listen, "port": 20526}},
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(config)
    assert [str(error) for error in caught.value.errors] == [
        f"{config}: http.port: 20526 is also smtp.port on the same address; give the HTTP listener another port",
    ]


@pytest.mark.parametrize(("smtp_listen", "http_listen"), [("127.0.0.1", "127.0.0.2"), ("0.0.0.0", "::1"), ("::1", "127.0.0.1"), ("127.0.0.1", "::")])
def test_http_port_on_another_address(tmp_path: Path, smtp_listen: str, http_listen: str) -> None:
    config = write_config(
        tmp_path, smtp={"listen": smtp_listen, "port": 20526}, sections={"http": {"enabled": True, "listen": http_listen, "port": 20526}},
    )
    assert load_config(config).http.port == 20526


def test_second_default_route_names_both(tmp_path: Path) -> None:
    second = '[[route]]\nname = "catch-all"\nteam = "billing"\ndefault = true\n'
    errors = rule_errors(tmp_path, TEAMS + ROUTES + second)
    rules_file = tmp_path / "rules" / "rules.toml"
    assert errors == [
        f"{rules_file}: route[2] (catch-all).default: a second default route;"
        f" 'default' in {rules_file} is the default already; keep exactly one",
    ]


def test_invalid_authserv_peer(tmp_path: Path) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES + '[staff]\nauthserv_id = "mx.example.org"\nauthserv_peers = ["127.0.0.1", "mx.example.org"]\n')
    assert errors == [
        f"{tmp_path / 'rules' / 'rules.toml'}: staff.authserv_peers[1]: invalid value 'mx.example.org';"
        " expected an IP address or network, such as '127.0.0.1' or '10.0.0.0/24'",
    ]


@pytest.mark.parametrize(("peers", "warned"), [("", True), ('authserv_peers = ["127.0.0.1"]\n', False)])
def test_check_warns_of_authserv_id_without_peers(tmp_path: Path, capsys: pytest.CaptureFixture[str], peers: str, warned: bool) -> None:
    config = write_config(tmp_path, rules=TEAMS + ROUTES + '[staff]\nauthserv_id = "mx.example.org"\n' + peers)
    main(["check", "--config", str(config)])
    warning = "warning: staff.authserv_id: set without authserv_peers, so the Authentication-Results header is read on mail from any client"
    assert (warning in capsys.readouterr().err) is warned


@pytest.mark.parametrize(
    ("arguments", "lines"),
    [
        ([], ["sender:      ceo@example.com, a customer", "ack:         from support@example.com, in en, if the message opens a conversation"]),
        (["--mail-from", "<>"], ["sender:      <>, software (null envelope sender)", "ack:         none (null envelope sender)"]),
        (["--mail-from", "root"], ["sender:      root, a customer", "ack:         none (envelope sender has no domain)"]),
        # As written in MAIL FROM, which the daemon gets without the brackets.
        (["--mail-from", "<ceo@example.com>"], [
            "sender:      ceo@example.com, a customer",
            "ack:         from support@example.com, in en, if the message opens a conversation",
        ]),
    ],
)
def test_route_command_shows_sender_and_ack(capsys: pytest.CaptureFixture[str], arguments: list[str], lines: list[str]) -> None:
    message = DATA / "routing" / "m3-real-vip-mixed-case.eml"
    assert main(["route", "--config", str(ROOT / "config.example.toml"), str(message), *arguments]) == 0
    output = capsys.readouterr().out.splitlines()
    assert [line for line in output if line.startswith(("sender:", "ack:"))] == lines


def test_route_command_shows_staff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    staff = tmp_path / "staff.eml"
    staff.write_bytes(b"From: Sam Ortiz <sam@example.org>\r\nSubject: Re: Printer\r\n\r\nFixed.\r\n")
    assert main(["route", "--config", str(config), str(staff)]) == 0
    output = capsys.readouterr().out.splitlines()
    assert "sender:      sam@example.org, staff" in output
    assert "ack:         none (sender is a team member)" in output


def test_route_command_takes_mail_from_in_brackets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    staff = tmp_path / "staff.eml"
    staff.write_bytes(b"From: Sam Ortiz <sam@example.org>\r\nSubject: Re: Printer\r\n\r\nFixed.\r\n")
    assert main(["route", "--config", str(config), str(staff), "--mail-from", "<sam@example.org>"]) == 0
    assert "sender:      sam@example.org, staff" in capsys.readouterr().out.splitlines()


def test_route_command_staff_envelope_customer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A forwarder may put a staff address in the envelope sender of a customer's message.
    config = write_config(tmp_path)
    customer = tmp_path / "customer.eml"
    customer.write_bytes(b"From: Ann <ann@example.com>\r\nSubject: Re: Printer\r\n\r\nFixed.\r\n")
    assert main(["route", "--config", str(config), str(customer), "--mail-from", "<sam@example.org>"]) == 0
    assert "sender:      sam@example.org, a customer" in capsys.readouterr().out.splitlines()


def test_authserv_peers_need_authserv_id(tmp_path: Path) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES + '[staff]\nauthserv_peers = ["127.0.0.1"]\n')
    assert errors == [
        f"{tmp_path / 'rules' / 'rules.toml'}: staff.authserv_peers:"
        " reads the header that authserv_id names, so set authserv_id too, or remove this key",
    ]


def test_route_command_without_from_or_for_postmaster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nameless = tmp_path / "nameless.eml"
    nameless.write_bytes(b"Subject: Who wrote this\r\n\r\nHello\r\n")
    assert main(["route", "--config", str(ROOT / "config.example.toml"), str(nameless)]) == 0
    output = capsys.readouterr().out.splitlines()
    assert "note:        the message has no From address, so the null sender is assumed; give --mail-from to choose one" in output

    message = DATA / "routing" / "m3-real-vip-mixed-case.eml"
    assert main(["route", "--config", str(ROOT / "config.example.toml"), str(message), "--rcpt", "postmaster@example.com"]) == 0
    output = capsys.readouterr().out.splitlines()
    assert "sender:      ceo@example.com, not checked (mail to postmaster)" in output


BILLING_CONDITION = '{ subject.contains = "invoice" }'


@pytest.mark.parametrize(("rules", "expected"), [
    (TEAMS + ROUTES + '[staff]\ndomains = ["@example.com"]\n',
     "staff.domains[0]: invalid value '@example.com'; expected a domain without @ or spaces, such as example.com"),
    (TEAMS + ROUTES + '[staff]\naddresses = ["ann"]\n',
     "staff.addresses[0]: invalid value 'ann'; expected an email address such as ann@example.com"),
    (TEAMS + ROUTES.replace(BILLING_CONDITION, '{ header."X Pri:ority".is = "1" }'),
     "route[0] (billing).any[1].header.X Pri:ority: invalid value 'X Pri:ority';"
     " expected a header field name: printable ASCII without spaces or colons, such as X-Priority"),
    (TEAMS + ROUTES.replace(BILLING_CONDITION, '{ rcpt.is = "" }'),
     "route[0] (billing).any[1].rcpt.is: invalid value ''; expected non-empty strings"),
    (TEAMS + ROUTES.replace(BILLING_CONDITION, '{ subject.contains = ["invoice", " "] }'),
     "route[0] (billing).any[1].subject.contains: invalid value ['invoice', ' ']; expected non-empty strings"),
])
def test_rule_value_that_cannot_work(tmp_path: Path, rules: str, expected: str) -> None:
    assert rule_errors(tmp_path, rules) == [f"{tmp_path / 'rules' / 'rules.toml'}: {expected}"]


# Each place in the rules that names a person or a mailbox, as (text with ADDRESS, the key an error names).
RULE_ADDRESSES = [
    (TEAMS.replace('"sam@example.org"', '"ADDRESS"') + ROUTES, "team[0] (support).members[0].address"),
    (TEAMS.replace('{ maildir = "var/maildir/support" }', '{ smtp = ["ADDRESS"] }') + ROUTES, "team[0] (support).destination.smtp"),
    (TEAMS.replace('members = [{ name = "Sam Ortiz", address = "sam@example.org" }]',
                   'escalation = [{ after = "0m", name = "Sam Ortiz", address = "ADDRESS" }]') + ROUTES,
     "team[0] (support).escalation[0].address"),
    (TEAMS.replace('members = [{ name = "Sam Ortiz", address = "sam@example.org" }]',
                   'escalation_contact = { name = "Dana Duty", address = "ADDRESS" }') + ROUTES,
     "team[0] (support).escalation_contact.address"),
]


@pytest.mark.parametrize("address", ["sam@", "@example.org", "sam ortiz@example.org", "sam@example..org", "sam@exa mple.org"])
@pytest.mark.parametrize(("rules", "key"), RULE_ADDRESSES, ids=["member", "smtp-destination", "escalation", "escalation-contact"])
def test_rule_address_that_mail_cannot_reach(tmp_path: Path, rules: str, key: str, address: str) -> None:
    # A typo in an escalation address would otherwise show only when the escalation is due, as a failed delivery.
    errors = rule_errors(tmp_path, rules.replace("ADDRESS", address))
    assert len(errors) == 1
    assert errors[0].startswith(f"{tmp_path / 'rules' / 'rules.toml'}: {key}: invalid value ")
    assert "expected an email address" in errors[0]


def test_unparsed_file_hides_no_names(tmp_path: Path) -> None:
    # After an unclosed quote in the teams file, only the syntax errors are reported, not one "does not
    # exist" error per route, calendar and template that names something defined in that file.
    folder = rules_folder(tmp_path, ROUTES)
    (folder / "10-teams.toml").write_text(TEAMS.replace('name = "billing"', 'name = "billing') + 'calendar = "office"\n')
    (folder / "05-calendars.toml").write_text('[[calendar]]\nname = "office"\ntimezone = "UTC"\nhours = "24x7\n')
    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)

    assert [(Path(error.path).name, error.line) for error in caught.value.errors] == [("05-calendars.toml", 4), ("10-teams.toml", 8)]
    assert all("invalid TOML" in error.problem for error in caught.value.errors)


def test_quoted_default_one_error(tmp_path: Path) -> None:
    # default = "true" gives neither "route has no conditions" nor "no default route" besides its own error.
    errors = rule_errors(tmp_path, TEAMS + ROUTES.replace("default = true", 'default = "true"'))
    assert errors == [
        f"{tmp_path / 'rules' / 'rules.toml'}: route[1] (default).default: invalid value 'true'; expected true or false",
    ]


def test_undefined_team_name_error(tmp_path: Path) -> None:
    errors = rule_errors(tmp_path, TEAMS + ROUTES.replace('team = "billing"', 'team = "billling"'))
    assert errors == [
        f"{tmp_path / 'rules' / 'rules.toml'}: route[0] (billing).team: team 'billling' does not exist; defined teams: billing, support",
    ]


def test_check_warns_rejected_route_recipient(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A route for a new inbox whose address was not added to [smtp] inboxes: its mail gets 550.
    rules = TEAMS + ROUTES.replace('{ rcpt.is = "billing@example.org" }', '{ all = [{ rcpt.is = ["billing@example.org", "sales@example.org"] }] }')
    config = write_config(tmp_path, rules=rules)
    main(["inspect", "--config", str(config), "--by", "Dana Duty", "--note", "reviewed"])
    capsys.readouterr()

    assert main(["check", "--config", str(config)]) == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tmp_path / 'rules' / 'rules.toml'}: route[0] (billing).any[0].all[0].rcpt.is: 'sales@example.org' is not"
        " an address that [smtp] inboxes or inbox_domains accept, so the daemon rejects mail to it with 550 and this"
        " condition never matches; add it to [smtp] inboxes, or correct it",
    ]


def test_check_warns_maildir_is_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("a file where the support maildir should be")
    config = write_config(tmp_path, rules=TEAMS.replace('"var/maildir/support"', f'"{tmp_path / "taken"}"', 1) + ROUTES)

    assert main(["check", "--config", str(config)]) == 1
    errors = capsys.readouterr().err
    assert f"destination.maildir: {tmp_path / 'taken'} exists and is not a folder" in errors
    assert "team support" in errors
    assert "team billing" not in errors
