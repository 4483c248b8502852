"""STARTTLS on the listener: offered only with a certificate, and mail sent over it is accepted as usual."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from conftest import converse_sync, maildir_messages, message, wait_until, write_config
from structlog.testing import capture_logs

from guardrail.config import load_config
from guardrail.errors import ConfigErrors


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for mx.test.example and its key, new ones each call; return both paths."""
    certificate, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mx.test.example",
         "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True,
    )
    return certificate, key


def trusting_context() -> ssl.SSLContext:
    """Return a client TLS context that accepts the test's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def send_over_tls(port: int, data: bytes) -> tuple[bool, bool, tuple[int, bytes], int, str | None]:
    """Send `data` after STARTTLS.

    Return whether EHLO offered STARTTLS before and after it, the STARTTLS
    reply, the DATA reply code and the TLS version in use.
    """
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.ehlo()
        offered = client.has_extn("starttls")
        reply = client.starttls(context=trusting_context())
        version = client.sock.version()  # type: ignore[union-attr]
        client.ehlo()
        offered_again = client.has_extn("starttls")
        client.mail("alice@example.com")
        client.rcpt("support@example.org")
        data_code, _ = client.data(data)
    return offered, offered_again, reply, data_code, version


async def test_starttls_then_mail_is_delivered(tmp_path: Path, start_daemon) -> None:
    certificate, key = make_certificate(tmp_path)
    daemon = await start_daemon(write_config(tmp_path, smtp={"tls_certificate": certificate.name, "tls_key": key.name}))

    offered, offered_again, reply, data_code, version = await asyncio.to_thread(send_over_tls, daemon.port, message())

    assert offered is True
    assert reply == (220, b"2.0.0 Ready to start TLS")
    assert version in ("TLSv1.2", "TLSv1.3")
    # RFC 3207: after the handshake the server no longer offers STARTTLS.
    assert offered_again is False
    assert data_code == 250
    support = tmp_path / "var" / "maildir" / "support"
    await wait_until(lambda: maildir_messages(support), what="the delivery")
    [delivered] = maildir_messages(support)
    assert b"Printer on floor 3 jams" in delivered
    # RFC 3848: the trace header says the message came over TLS.
    assert b"\tby mx.test.example (guardrail) with ESMTPS id " in delivered


async def test_no_certificate_no_starttls(tmp_path: Path, start_daemon) -> None:
    daemon = await start_daemon(write_config(tmp_path))

    replies = await asyncio.to_thread(
        converse_sync, daemon.port, b"EHLO client.test.example\r\nSTARTTLS\r\nQUIT\r\n"
    )

    assert not any("STARTTLS" in line for line in replies)
    assert "502 5.5.1 TLS is not available" in replies


def test_key_without_certificate_is_an_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, smtp={"tls_key": "key.pem"})

    with pytest.raises(ConfigErrors) as raised:
        load_config(path)

    assert [str(error) for error in raised.value.errors] == [
        f"{path}: smtp.tls_certificate: missing; set it with tls_key to the PEM file of the certificate chain"
    ]


def test_unreadable_certificate_is_an_error(tmp_path: Path) -> None:
    _, key = make_certificate(tmp_path)
    (tmp_path / "other.pem").write_text("not a certificate\n")
    path = write_config(tmp_path, smtp={"tls_certificate": "other.pem", "tls_key": key.name})

    with pytest.raises(ConfigErrors) as raised:
        load_config(path)

    [error] = raised.value.errors
    assert str(error).startswith(f"{path}: smtp.tls_certificate: loading {tmp_path / 'other.pem'} with the key {key} failed: ")
    assert str(error).endswith("expected a PEM certificate chain and the PEM private key that matches it")


def served_certificate(port: int) -> bytes:
    """Return the certificate, in DER, that the listener presents after STARTTLS."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.starttls(context=trusting_context())
        return client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]


def der(certificate: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(certificate.read_text())


async def test_reload_serves_renewed_certificate(tmp_path: Path, start_daemon) -> None:
    certificate, key = make_certificate(tmp_path)
    first = der(certificate)
    daemon = await start_daemon(write_config(tmp_path, smtp={"tls_certificate": certificate.name, "tls_key": key.name}))
    assert await asyncio.to_thread(served_certificate, daemon.port) == first

    make_certificate(tmp_path)  # A renewal writes new files in place.
    renewed = der(certificate)
    assert renewed != first
    with capture_logs() as renewal_events:
        daemon.reload()
    assert await asyncio.to_thread(served_certificate, daemon.port) == renewed
    assert [event["event"] for event in renewal_events if event["event"].startswith("tls_")] == ["tls_reloaded"]

    # A file broken mid-renewal keeps the certificate that works.
    certificate.write_text("half written\n")
    with capture_logs() as broken_events:
        daemon.reload()
    assert await asyncio.to_thread(served_certificate, daemon.port) == renewed
    [failure] = [event for event in broken_events if event["event"] == "tls_reload_failed"]
    assert failure["certificate"] == str(certificate)


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        return connection.recv(1024)


def start_tls_then(port: int, after: bytes) -> bytes:
    """Say EHLO and STARTTLS, send `after` in place of a TLS handshake, and return what the server sends until it closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"EHLO client.test.example\r\n")
        while not received.endswith(b"250 HELP\r\n"):
            received += connection.recv(4096)
        connection.sendall(b"STARTTLS\r\n")
        while b"Ready to start TLS\r\n" not in received:
            received += connection.recv(4096)
        if after:
            connection.sendall(after)
        try:
            while chunk := connection.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    return received


async def test_silent_handshake_frees_its_slot(tmp_path: Path, start_daemon) -> None:
    certificate, key = make_certificate(tmp_path)
    smtp = {"tls_certificate": certificate.name, "tls_key": key.name, "timeout": "1s", "max_connections": 1}
    daemon = await start_daemon(write_config(tmp_path, smtp=smtp))

    with capture_logs() as events:
        # Returns once the server gives up on the handshake and closes the connection.
        await asyncio.to_thread(start_tls_then, daemon.port, b"")
        reply = await asyncio.to_thread(greeting, daemon.port)

    assert reply.startswith(b"220 ")
    assert [event["event"] for event in events if event["event"].startswith("tls_")] == ["tls_handshake_timed_out"]


async def test_failed_handshake_is_a_warning(tmp_path: Path, start_daemon) -> None:
    certificate, key = make_certificate(tmp_path)
    smtp = {"tls_certificate": certificate.name, "tls_key": key.name, "max_connections": 1}
    daemon = await start_daemon(write_config(tmp_path, smtp=smtp))

    with capture_logs() as events:
        await asyncio.to_thread(start_tls_then, daemon.port, b"this is not a TLS ClientHello\r\n" * 4)
        reply = await asyncio.to_thread(greeting, daemon.port)

    assert reply.startswith(b"220 ")
    [failure] = [event for event in events if event["event"] == "tls_handshake_failed"]
    assert failure["log_level"] == "warning"
    assert failure["peer"].startswith("[127.0.0.1]:")
    assert not [event for event in events if event["log_level"] == "error"]


def commands_inside_tls(port: int) -> tuple[bool, tuple[int, bytes], tuple[int, bytes]]:
    """Return whether EHLO inside TLS offers AUTH, and the replies to AUTH and to a second STARTTLS."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.starttls(context=trusting_context())
        client.ehlo()
        return client.has_extn("auth"), client.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA=="), client.docmd("STARTTLS")


async def test_inside_tls_no_auth_no_second_starttls(tmp_path: Path, start_daemon) -> None:
    certificate, key = make_certificate(tmp_path)
    daemon = await start_daemon(write_config(tmp_path, smtp={"tls_certificate": certificate.name, "tls_key": key.name}))

    offers_auth, auth, again = await asyncio.to_thread(commands_inside_tls, daemon.port)

    assert offers_auth is False
    assert auth == (502, b"5.5.1 AUTH is not available; this server accepts mail only for its own inboxes")
    assert again == (503, b"5.5.1 TLS is already active")


def help_before_and_inside_tls(port: int) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as client:
        client.ehlo()
        before = client.docmd("HELP")
        client.starttls(context=trusting_context())
        client.ehlo()
        return before, client.docmd("HELP")


async def test_help_lists_starttls_while_offered(tmp_path: Path, start_daemon) -> None:
    certificate, key = make_certificate(tmp_path)
    daemon = await start_daemon(write_config(tmp_path, smtp={"tls_certificate": certificate.name, "tls_key": key.name}))

    before, inside = await asyncio.to_thread(help_before_and_inside_tls, daemon.port)

    assert before == (214, b"2.0.0 Supported commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET STARTTLS VRFY")
    assert inside == (214, b"2.0.0 Supported commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY")


def test_missing_key_file_names_its_key(tmp_path: Path) -> None:
    certificate, _ = make_certificate(tmp_path)
    path = write_config(tmp_path, smtp={"tls_certificate": certificate.name, "tls_key": "tls/key.pem"})

    with pytest.raises(ConfigErrors) as raised:
        load_config(path)

    assert [str(error) for error in raised.value.errors] == [
        f"{path}: smtp.tls_key: file not found: {tmp_path / 'tls' / 'key.pem'};"
        " expected a PEM file (a relative path starts at the config's folder)"
    ]
