"""The deployment files: the systemd unit, the container file and the Postfix snippets agree with guardrail."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import write_config

from guardrail.cli import main
from guardrail.commands import EXIT_FAILURE, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "guardrail.service"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
POSTFIX = ROOT / "deploy" / "postfix"
INSTALLED_GUARDRAIL = "/opt/guardrail/venv/bin/guardrail"

requires_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def unit_settings(text: str, section: str) -> dict[str, list[str]]:
    """Return every key of `section` in a systemd unit file with all its values, in order."""
    settings: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def local_unit(tmp_path: Path) -> Path:
    """Copy the unit into tmp_path with ExecStart naming this environment's guardrail script.

    systemd-analyze verify reports an ExecStart binary that doesn't exist, and
    /opt/guardrail is where the unit expects an installation, not where the
    tests run.
    """
    script = Path(sys.executable).with_name("guardrail")
    assert script.exists(), f"the guardrail entry point is missing beside {sys.executable}; run pip install -e ."
    text = UNIT.read_text()
    assert INSTALLED_GUARDRAIL in text
    path = tmp_path / "guardrail.service"
    path.write_text(text.replace(INSTALLED_GUARDRAIL, str(script)))
    return path


def systemd_version() -> int:
    output = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    match = re.match(r"systemd (\d+)", output)
    return int(match.group(1)) if match else 0


@requires_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local_unit(tmp_path))], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    # Unknown keys and invalid values are only warnings: verify still exits 0.
    assert result.stderr == ""


@requires_systemd_analyze
def test_unit_sandbox_exposure_stays_low(tmp_path: Path) -> None:
    if systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")

    # The exposure score runs from 0.0 (locked down) to 10.0 (unprotected), and
    # --threshold takes it times ten. A score of 5.0 or more rates "MEDIUM" or worse.
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=49", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_unit_sets_sandboxing_keys() -> None:
    service = unit_settings(UNIT.read_text(), "Service")

    assert service.get("NoNewPrivileges") == ["yes"]
    assert service.get("ProtectSystem") == ["strict"]
    assert service.get("StateDirectory") == ["guardrail"]
    assert service.get("WorkingDirectory") == ["/var/lib/guardrail"]
    assert service.get("DynamicUser") == ["yes"]
    assert service.get("ExecStart") == [f"{INSTALLED_GUARDRAIL} run --config /etc/guardrail/guardrail.toml"]


def test_unit_restarts_except_on_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, smtp={"port": "abc"})

    status = main(["run", "--config", str(config)])
    service = unit_settings(UNIT.read_text(), "Service")

    assert status == EXIT_USAGE
    assert service.get("Restart") == ["on-failure"]
    assert service.get("RestartPreventExitStatus") == [str(EXIT_USAGE)]
    assert str(EXIT_FAILURE) not in service["RestartPreventExitStatus"][0].split()


def test_containerfile_runs_guardrail_unprivileged() -> None:
    instructions = [
        line.split(None, 1) for line in CONTAINERFILE.read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    values: dict[str, list[str]] = {}
    for keyword, argument in instructions:
        values.setdefault(keyword.upper(), []).append(argument.strip())

    assert values["FROM"] == ["python:3.11-slim"]
    assert json.loads(values["CMD"][-1]) == ["guardrail", "run", "--config", "/etc/guardrail/guardrail.toml"]
    assert values["USER"][-1] not in ("root", "0")
    assert json.loads(values["VOLUME"][-1]) == ["/var/lib/guardrail"]
    assert values["EXPOSE"][-1].split() == ["2525", "8025"]


def test_dockerignore_keeps_files_the_image_copies() -> None:
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    copied = re.findall(r"^COPY (.+) /src/", CONTAINERFILE.read_text(), re.MULTILINE)

    assert patterns[0] == "*"
    for sources in copied:
        for source in sources.split():
            assert f"!{source}" in patterns or f"!{source}/" in patterns, f"{source} is excluded from the build context"


def test_postfix_transport_targets_default_smtp_port() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    ports = set(re.findall(r"smtp:\[127\.0\.0\.1\]:(\d+)", (POSTFIX / "guardrail_transport").read_text()))

    assert ports == {str(example["smtp"]["port"])}


def test_postfix_readme_names_reinjection_port() -> None:
    (listener_port,) = re.findall(r"^127\.0\.0\.1:(\d+)\s+inet\s", (POSTFIX / "master.cf").read_text(), re.MULTILINE)
    readme = (POSTFIX / "README.md").read_text()
    smarthost_ports = re.findall(r"^\s*port = (\d+)", readme, re.MULTILINE)

    assert smarthost_ports == [listener_port]
    assert f"127.0.0.1:{listener_port}" in readme
