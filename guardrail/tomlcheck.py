"""Typed reads from parsed TOML tables that collect every error they find.

Config and rule loading both read through `Table`, so every error names the
file, the dotted key, the bad value and what is expected, and loading reports
all problems at once instead of stopping at the first.
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
import stat
import tomllib
from datetime import date, time, timedelta
from pathlib import Path
from typing import Any

from .errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_DURATION_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
# The maximum duration of any key. Windows reach back from now and deadlines
# forward, and datetime ends at year 9999. A duration of thousands of years
# would overflow there, so that every message would fail its commit with 451.
MAX_DURATION = timedelta(days=36500)
MAX_DURATION_TEXT = '"36500d" (100 years)'
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_TOML_LINE = re.compile(r"at line (\d+)")


def read_toml(path: Path, errors: list[ConfigError]) -> dict[str, Any] | None:
    """Parse a TOML file, or record why it could not be read and return None."""
    raw = read_file(path, errors)
    if raw is None:
        return None
    return parse_toml(path, raw, errors)


def read_file(path: Path, errors: list[ConfigError], *, expected: str = "a TOML file") -> bytes | None:
    """Return the bytes of the regular file at `path`, or record why it could not be read and return None.

    A named pipe, a device or a directory is rejected without reading, because
    reading a pipe blocks until some other process writes to it.
    """
    try:
        # O_NONBLOCK makes opening a named pipe return at once instead of
        # waiting for a writer; it does not change reads of a regular file.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        errors.append(ConfigError(path, "", "file not found"))
        return None
    except OSError as error:
        errors.append(ConfigError(path, "", f"cannot be read: {error.strerror}"))
        return None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        errors.append(ConfigError(path, "", f"{_file_kind(mode)}, not a regular file; expected {expected}"))
        return None
    with os.fdopen(descriptor, "rb") as handle:
        try:
            return handle.read()
        except OSError as error:
            errors.append(ConfigError(path, "", f"cannot be read: {error.strerror}"))
            return None


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    return "is a special file"


def parse_toml(path: Path, raw: bytes, errors: list[ConfigError]) -> dict[str, Any] | None:
    """Parse `raw`, the contents of the TOML file `path`, or record why it is invalid and return None."""
    text = _decode_utf8(path, raw, errors)
    if text is None:
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        match = _TOML_LINE.search(str(error))
        line = int(match.group(1)) if match else None
        if line is None and "end of document" in str(error):
            # tomllib names no line for an error at the end of the text, such as an array left open.
            line = text.count("\n") + (0 if text.endswith("\n") else 1)
        hint = ""
        if "escape" in str(error).lower():
            hint = (
                "; inside double quotes a backslash starts an escape, so write"
                " regular expressions in single quotes ('...') instead"
            )
        errors.append(ConfigError(path, "", f"invalid TOML: {error}{hint}", line=line))
    return None


def _decode_utf8(path: Path, raw: bytes, errors: list[ConfigError]) -> str | None:
    """Decode `raw` as UTF-8 (TOML 1.0 files are UTF-8), skipping a leading byte order mark."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        errors.append(ConfigError(path, "", "not UTF-8 (it starts with a UTF-16 or UTF-32 byte order mark); save the file as UTF-8"))
        return None
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = raw[:offset].count(b"\n") + 1
        problem = f"not UTF-8 (byte 0x{raw[offset]:02x} at offset {offset}); save the file as UTF-8"
        errors.append(ConfigError(path, "", problem, line=line))
        return None


def parse_duration(value: Any) -> timedelta | None:
    """Parse "30s", "5m", "2h", "1d", "1w", "250ms" or a number of seconds.

    Return None when the value is invalid, negative or too long for a timedelta.
    """
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            return timedelta(seconds=value) if value >= 0 else None
        if isinstance(value, str):
            match = _DURATION.match(value)
            if match:
                return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    except OverflowError:  # inf, or more days than timedelta allows (999999999)
        return None
    return None


def parse_size(value: Any) -> int | None:
    """Parse a byte count: an integer, or text such as "25MB" or "10MiB"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = (match.group(2) or "b").lower()
            return int(match.group(1)) * _SIZE_UNITS[unit]
    return None


def toml_text(value: Any) -> str:
    """Return `value` roughly as it is written in TOML, for error messages: true, not True."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (date, time)):  # TOML writes dates and times bare, in ISO 8601
        return value.isoformat()
    return repr(value)


class Table:
    """One TOML table being validated: reads keys and remembers which were used."""

    def __init__(
        self,
        path: Path,
        data: Any,
        prefix: str,
        errors: list[ConfigError],
        *,
        expected: str = "a table",
    ) -> None:
        self.path = path
        self.prefix = prefix
        self.errors = errors
        self._used: set[str] = set()
        self._is_table = True
        if not isinstance(data, dict):
            self.fail("", data, expected)
            data = {}
            # Its keys read as missing now, which the error above already explains.
            self._is_table = False
        self.data: dict[str, Any] = data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, value: Any, expected: str) -> None:
        """Record that key `name` holds `value` where `expected` was needed."""
        if not self._is_table:
            return
        key = self.key(name) if name else self.prefix
        self.errors.append(ConfigError(self.path, key, f"invalid value {toml_text(value)}; expected {expected}"))

    def problem(self, name: str, text: str) -> None:
        """Record a problem with key `name` described by `text`."""
        if not self._is_table:
            return
        key = self.key(name) if name else self.prefix
        self.errors.append(ConfigError(self.path, key, text))

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = None) -> Any:
        self._used.add(name)
        return self.data.get(name, default)

    def string(
        self, name: str, default: str | None = None, *, required: bool = False, allow_empty: bool = False,
    ) -> str | None:
        """Return the string under `name`, or `default` when unset or invalid.

        An empty or blank string is an error unless `allow_empty` is set,
        because falling back to the default or dropping the entry would hide it.
        """
        value = self.raw(name)
        if value is None:
            if required:
                self.problem(name, "missing; this key is required")
            return default
        if not isinstance(value, str):
            self.fail(name, value, "a string")
            return default
        if not allow_empty and not value.strip():
            fix = "" if required else "; remove the key or give it a value"
            self.problem(name, f"invalid value {toml_text(value)}; must not be empty{fix}")
            return default
        return value

    def local_path(self, name: str, base: Path, default: str | None = None) -> Path | None:
        """Return the path under `name`, or `default`, resolved against folder `base`; None when unset or invalid.

        A leading "~" or "~user" is that home folder, and a relative path starts at `base`.
        """
        value = self.string(name)
        text = value if value is not None else default
        if text is None:
            return None
        try:
            return base / Path(text).expanduser()
        except RuntimeError:  # "~" or "~user" names no known home folder
            self.fail(name, text, 'a path whose "~" names a user of this machine, or one without "~"')
            return None

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(name)
        if value is None:
            return default
        in_range = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        if in_range and maximum is not None:
            in_range = value <= maximum
        if not in_range:
            upper = f" and at most {maximum}" if maximum is not None else ""
            self.fail(name, value, f"an integer of at least {minimum}{upper}")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, value, "true or false")
            return default
        return value

    def duration(self, name: str, default: timedelta) -> timedelta:
        """Return the duration under `name`, which must be more than zero, or `default` when unset or invalid."""
        value = self.raw(name)
        if value is None:
            return default
        parsed = parse_duration(value)
        if parsed is None or parsed <= timedelta(0):
            self.fail(name, value, 'a positive duration such as "30s", "5m", "2h" or "1d"')
            return default
        if parsed > MAX_DURATION:
            self.fail(name, value, f"a duration of at most {MAX_DURATION_TEXT}")
            return default
        return parsed

    def size(self, name: str, default: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        parsed = parse_size(value)
        if parsed is None or parsed == 0:
            self.fail(name, value, 'a positive whole number of bytes, or of B, KB, MB, GB, KiB, MiB or GiB, such as 1048576 or "25MiB"')
            return default
        return parsed

    def strings(self, name: str, default: list[str] | None = None) -> list[str]:
        value = self.raw(name)
        if value is None:
            return list(default or [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.fail(name, value, "a list of strings")
            return list(default or [])
        return value

    def regex(self, name: str, pattern: str, flags: int = 0) -> re.Pattern[str] | None:
        """Compile `pattern`, or record under key `name` why it does not compile and return None."""
        try:
            return re.compile(pattern, flags)
        except re.error as error:
            reason = str(error)
        except OverflowError as error:
            reason = str(error)  # a repeat count of 2**32 or more
        except RecursionError:
            # re's parser recurses for each group: about 500 nested groups reach Python's recursion limit.
            reason = "groups nested too deeply"
        self.problem(name, f"invalid regular expression {pattern!r}: {reason}")
        return None

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if value not in choices:
            self.fail(name, value, "one of " + ", ".join(repr(choice) for choice in choices))
            return default
        return value

    def table(self, name: str, expected: str = "a table") -> Table:
        """Return the table under `name`. `expected` describes the value in the error when it is not a table."""
        self._used.add(name)
        return Table(self.path, self.data.get(name, {}), self.key(name), self.errors, expected=expected)

    def finish(self, allowed: tuple[str, ...] = ()) -> None:
        """Record every key that no read asked for as unknown.

        The error lists `allowed` when it is given, else names the closest key
        that was read but is not set, as a likely correction of a misspelling.
        """
        for name in self.data:
            if name not in self._used:
                self.problem(name, f"unknown key; {self._unknown_key_hint(name, allowed)}")

    def _unknown_key_hint(self, name: str, allowed: tuple[str, ...]) -> str:
        if allowed:
            return f"allowed keys: {', '.join(allowed)}"
        unset = sorted(key for key in self._used if key not in self.data)
        matches = difflib.get_close_matches(name, unset, n=1)
        if matches:
            return f"did you mean {matches[0]!r}?"
        return "check its spelling against config.example.toml or the README"
