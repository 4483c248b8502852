"""Config and rule files are read once, as bytes: only regular UTF-8 files are parsed."""

from __future__ import annotations

import codecs
import hashlib
import os
from pathlib import Path

import pytest
from conftest import DATA, ROUTES, TEAMS, rules_folder, write_config

from guardrail.cli import main
from guardrail.errors import ConfigError, ConfigErrors
from guardrail.rules import load_rules

LATIN_1 = "# café\n".encode("latin-1")
NOT_UTF8 = [
    # (file contents, expected problem)
    (LATIN_1, "not UTF-8 (byte 0xe9 at offset 5); save the file as UTF-8"),
    (b"a = 1\n# \xff\n", "not UTF-8 (byte 0xff at offset 8); save the file as UTF-8"),
    ("# café\n".encode("utf-16"), "not UTF-8 (it starts with a UTF-16 or UTF-32 byte order mark); save the file as UTF-8"),
    (codecs.BOM_UTF16_BE + "# x\n".encode("utf-16-be"), "not UTF-8 (it starts with a UTF-16 or UTF-32 byte order mark)"),
]


def extra_file_error(tmp_path: Path, contents: bytes) -> ConfigError:
    """Load the rules with an extra file holding `contents`; return the one error it causes."""
    folder = rules_folder(tmp_path, TEAMS + ROUTES)
    (folder / "50-extra.toml").write_bytes(contents)

    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)

    (error,) = caught.value.errors
    return error


@pytest.mark.parametrize(("contents", "problem"), NOT_UTF8)
def test_rule_file_not_utf8(tmp_path: Path, contents: bytes, problem: str) -> None:
    error = extra_file_error(tmp_path, contents)

    assert error.path == tmp_path / "rules" / "50-extra.toml"
    assert problem in str(error)


@pytest.mark.parametrize(("contents", "problem"), NOT_UTF8)
@pytest.mark.parametrize("command", ["check", "route"])
def test_cli_reports_file_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], contents: bytes, problem: str, command: str,
) -> None:
    config = write_config(tmp_path)
    config.write_bytes(contents + config.read_bytes())
    arguments = [command, "--config", str(config)]
    if command == "route":
        arguments.append(str(DATA / "routing" / "m3-real-vip-mixed-case.eml"))

    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert f"error: {config}" in error
    assert problem in error
    assert "Traceback" not in error


def test_not_utf8_error_names_line(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, TEAMS + ROUTES)
    (folder / "50-extra.toml").write_bytes(b"# one\n# two\n" + LATIN_1)

    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)

    (error,) = caught.value.errors
    assert error.line == 3
    assert "byte 0xe9 at offset 17" in str(error)


@pytest.mark.parametrize(("contents", "line"), [(b"# one\nmatch = [1,\n", 2), (b"# one\nmatch = [1,", 2), (b"a = [", 1)])
def test_toml_error_at_end_names_line(tmp_path: Path, contents: bytes, line: int) -> None:
    error = extra_file_error(tmp_path, contents)

    assert error.line == line
    assert "invalid TOML: Invalid value (at end of document)" in str(error)


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    folder = rules_folder(tmp_path, TEAMS + ROUTES)
    (folder / "rules.toml").write_bytes(codecs.BOM_UTF8 + (TEAMS + ROUTES).encode())

    rules = load_rules(folder, tmp_path)

    assert set(rules.teams) == {"support", "billing"}


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (os.mkfifo, "is a named pipe (FIFO), not a regular file; expected a TOML file"),
        (os.mkdir, "is a directory, not a regular file; expected a TOML file"),
    ],
)
def test_rule_file_must_be_regular(tmp_path: Path, make, problem: str) -> None:
    folder = rules_folder(tmp_path, TEAMS + ROUTES)
    make(folder / "50-special.toml")

    with pytest.raises(ConfigErrors) as caught:
        load_rules(folder, tmp_path)

    assert [str(error) for error in caught.value.errors] == [f"{folder / '50-special.toml'}: {problem}"]


@pytest.mark.timeout(20)
def test_check_rejects_fifo_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "guardrail.toml"
    os.mkfifo(config)

    assert main(["check", "--config", str(config)]) == 2
    assert f"error: {config}: is a named pipe (FIFO), not a regular file" in capsys.readouterr().err


def test_rule_files_are_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = rules_folder(tmp_path, TEAMS + ROUTES)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    def no_second_read(self: Path) -> bytes:
        raise AssertionError(f"{self} read a second time")

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(Path, "read_bytes", no_second_read)
    rules = load_rules(folder, tmp_path)

    monkeypatch.undo()

    files = sorted(folder.glob("*.toml"))
    assert sorted(opened) == [str(path) for path in files]
    expected = hashlib.sha256()
    for path in files:
        expected.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    assert rules.digest == expected.hexdigest()
