"""Fixed SMTP replies, and the enhanced status codes (RFC 3463) given to aiosmtpd's own replies."""

from __future__ import annotations

import re

REPLY_ACCEPTED = "250 2.0.0 Ok: queued as {reference}"
REPLY_DUPLICATE = "250 2.0.0 Ok: already queued (duplicate of {message_id})"
REPLY_TEMPORARY = "451 4.3.0 Temporary local problem, try again later"
REPLY_BARE_LINE_ENDING = "550 5.5.2 Bare LF or bare CR in message; lines must end with CRLF"
# 500 is RFC 5321's reply to a syntax error in a command line, and X.5.2 is RFC 3463's code for a syntax error.
REPLY_BARE_LF_COMMAND = "500 5.5.2 Bare LF in command; lines must end with CRLF"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_TOO_MANY_HOPS = "554 5.4.6 Too many Received headers; mail loop suspected"
REPLY_RECIPIENT_OK = "250 2.1.5 Ok"
REPLY_NOT_OURS = "550 5.7.1 Recipient not accepted here; this server relays only to its own inboxes"
REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
REPLY_STORAGE_FULL = "452 4.3.1 Insufficient system storage, try again later"
REPLY_BAD_SENDER = "501 5.1.7 Invalid sender address"
REPLY_BAD_RECIPIENT = "501 5.1.3 Invalid recipient address"
REPLY_MALFORMED_SENDER = "553 5.1.7 Malformed sender address"
REPLY_MALFORMED_RECIPIENT = "553 5.1.3 Malformed recipient address"
REPLY_BAD_HELO = "501 5.5.2 Invalid host name in EHLO"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 A non-ASCII address needs the SMTPUTF8 parameter"
REPLY_VRFY = "252 2.5.2 Cannot verify the user; send mail and delivery will be attempted"
REPLY_VRFY_SYNTAX = "501 5.5.4 Syntax: VRFY <address>"
REPLY_EXPN = "502 5.5.1 EXPN is not available"
REPLY_UNKNOWN_COMMAND = "500 5.5.2 Command not recognized"
REPLY_HELP = "214 2.0.0 Supported commands: {commands}"
REPLY_HELP_SYNTAX = "214 2.0.0 Syntax: {syntax}"
REPLY_HELP_UNKNOWN = "504 5.5.4 No help for that command; supported commands: {commands}"
REPLY_BUSY = "421 4.7.0 Too many connections, try again later"
REPLY_BUSY_CLIENT = "421 4.7.0 Too many connections from your address, try again later"
REPLY_NEED_MAIL = "503 5.5.1 Error: need MAIL command"
REPLY_NEED_RCPT = "503 5.5.1 Error: need RCPT command"
# DATA after RCPT commands that were all rejected. RFC 5321 allows 503 or 554
# here, and 554 reports that the transaction failed for want of a recipient.
REPLY_NO_VALID_RECIPIENTS = "554 5.5.1 No valid recipients"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing the connection"
REPLY_TOO_MANY_JUNK = "421 4.7.0 Too many commands without mail, closing the connection"
REPLY_TOO_MANY_UNKNOWN = "421 4.7.0 Too many unknown commands, closing the connection"
# aiosmtpd's reply to the fifth unknown command of a session, after which it
# closes the connection. Outside QUIT and timeouts, RFC 5321 section 3.8 lets a
# server close the connection only after a 421 reply, so REPLY_TOO_MANY_UNKNOWN replaces it.
REPLY_TOO_MANY_UNKNOWN_STOCK = "502 5.5.1 Too many unrecognized commands, goodbye."
REPLY_DATA_TIMEOUT = "421 4.4.2 Timed out waiting for message data"
REPLY_IDLE_TIMEOUT = "421 4.4.2 No input for too long, closing the connection"
REPLY_STARTTLS_STOCK = "220 Ready to start TLS"  # aiosmtpd's text
REPLY_MALFORMED_STOCK = "553 5.1.3 Error: malformed address"  # aiosmtpd's text for MAIL and RCPT
REPLY_UNKNOWN_COMMAND_STOCK = '500 Error: command "'  # the start of aiosmtpd's text, which repeats the command
REPLY_STARTTLS = "220 2.0.0 Ready to start TLS"
REPLY_TLS_ACTIVE = "503 5.5.1 TLS is already active"
# Without a certificate the listener does not offer STARTTLS. 454 would mean
# the failure is temporary (RFC 3207 section 4), and it is not.
REPLY_NO_TLS = "502 5.5.1 TLS is not available"
REPLY_AUTH = "502 5.5.1 AUTH is not available; this server accepts mail only for its own inboxes"

_ENHANCED = re.compile(r"^\d{3} \d\.\d{1,3}\.\d{1,3}\b")
# Enhanced status codes (RFC 3463) for aiosmtpd's stock replies, by reply code.
# _COMMAND_ENHANCED takes precedence where the code depends on the command.
_DEFAULT_ENHANCED = {
    "221": "2.0.0",
    "250": "2.0.0",
    "451": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "552": "5.3.4",
    "553": "5.1.0",
    # aiosmtpd's one 554 rejects every command once a handle_STARTTLS hook
    # finds the TLS session too weak (RFC 3207 section 4.1), a security status.
    "554": "5.7.0",
    "555": "5.5.4",
}
# RFC 3463 section 3.2: a malformed sender is X.1.7 and a malformed recipient
# X.1.3. An accepted recipient is X.1.5 (destination address valid) and an
# accepted sender X.1.0 (other address status).
_COMMAND_ENHANCED = {
    ("MAIL", "250"): "2.1.0",
    ("MAIL", "553"): "5.1.7",
    ("RCPT", "250"): "2.1.5",
    ("RCPT", "553"): "5.1.3",
}


def with_enhanced_code(status: str, hostname: str, command: str = "") -> str:
    """Return `status` with the enhanced status code for its reply code and `command`, unless it has one."""
    code = status[:3]
    if status == REPLY_STARTTLS_STOCK:
        # The one 220 that is a status reply rather than a greeting.
        return REPLY_STARTTLS
    if status == REPLY_MALFORMED_STOCK:
        # aiosmtpd gives both MAIL and RCPT the recipient's code.
        return REPLY_MALFORMED_SENDER if command == "MAIL" else REPLY_MALFORMED_RECIPIENT
    if status.startswith(REPLY_UNKNOWN_COMMAND_STOCK):
        # The command name may contain any ASCII byte, control characters included.
        return REPLY_UNKNOWN_COMMAND
    if status == REPLY_TOO_MANY_UNKNOWN_STOCK:
        return REPLY_TOO_MANY_UNKNOWN
    if status[3:4] != " " or _ENHANCED.match(status) or code not in _DEFAULT_ENHANCED:
        return status
    # The last EHLO line and the HELO reply are not status replies.
    if status in ("250 HELP", f"250 {hostname}"):
        return status
    enhanced = _COMMAND_ENHANCED.get((command, code), _DEFAULT_ENHANCED[code])
    return f"{code} {enhanced} {status[4:]}"
