"""TLS alerts that say why a peer was refused, both ways.

Under TLS 1.3 the server judges the client's certificate after the client has finished its
handshake, and this gateway decides after its own handshake too (the status check may need the
network). OpenSSL can only choose an alert while it verifies a chain (from an ``X509_V_ERR_*``
code, never ``access_denied``) and has no call that sends an alert afterwards. So a refusing
server seals the alert record itself: it keeps the server's application traffic secret (from
OpenSSL's key log callback, until the decision) and counts the records OpenSSL sealed with it
(the two session tickets OpenSSL 4 sends), which gives the record's sequence number
(RFC 8446, section 5.3). Over TLS 1.2 nothing is sealed and the connection is only closed.

The caller's side reads a received alert from OpenSSL's error text and calls it a refusal.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from OpenSSL import SSL

from s2sgw.interfaces import Reason

SECRET = "s2sgw_server_traffic_secret"  # attribute on the TLS protocol until the decision

# RFC 8446 section 6 alert descriptions.
ALERTS: dict[str, int] = {
    "bad_certificate": 42,
    "unsupported_certificate": 43,
    "certificate_revoked": 44,
    "certificate_expired": 45,
    "certificate_unknown": 46,
    "unknown_ca": 48,
    "access_denied": 49,
    "internal_error": 80,
    "certificate_required": 116,
}

# The alert a refusal sends, by the Reason the gateway refused for.
ALERT_FOR_REASON: dict[str, str] = {
    Reason.IDENTITY_NOT_ALLOWED: "access_denied",
    Reason.IDENTITY_MISMATCH: "access_denied",
    Reason.REVOKED: "certificate_revoked",
    Reason.EXPIRED: "certificate_expired",
    Reason.UNTRUSTED_CHAIN: "unknown_ca",
    Reason.NO_IDENTITY: "bad_certificate",
    Reason.BAD_CERTIFICATE: "bad_certificate",
    Reason.NOT_YET_VALID: "bad_certificate",
    Reason.STATUS_UNKNOWN: "certificate_unknown",
    Reason.STATUS_INVALID: "certificate_unknown",
    Reason.CA_UNREACHABLE: "certificate_unknown",
}

# What a caller reads as "the remote refused my certificate or me".
REFUSAL_ALERTS = frozenset(ALERTS) - {"internal_error"} | {"handshake_failure"}

_SUITES: dict[str, tuple[type, int, hashes.HashAlgorithm]] = {
    "TLS_AES_128_GCM_SHA256": (AESGCM, 16, hashes.SHA256()),
    "TLS_AES_256_GCM_SHA384": (AESGCM, 32, hashes.SHA384()),
    "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, 32, hashes.SHA256()),
}

_ALERT_TEXT = re.compile(r"\b(?:ssl|tls)(?:v1|v13|v1\.3)?\s+alert\s+([a-z0-9 _]+)", re.IGNORECASE)


def keep_server_secret(connection: SSL.Connection, line: bytes) -> None:
    """Key log callback of server contexts: keep only the server's first application secret."""
    try:
        label, _random, secret = line.split(b" ")
        if label != b"SERVER_TRAFFIC_SECRET_0":
            return
        target = connection.get_app_data()
        if target is not None:
            setattr(target, SECRET, bytes.fromhex(secret.decode("ascii")))
    except BaseException:  # a callback must never fail a handshake
        pass


def forget_secret(tls_protocol: Any) -> None:
    """Drop the kept secret: an admitted connection will never need it."""
    if getattr(tls_protocol, SECRET, None) is not None:
        setattr(tls_protocol, SECRET, None)


def _expand_label(secret: bytes, label: bytes, length: int, algorithm: hashes.HashAlgorithm) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


def sealed_alert(suite: str, secret: bytes, sequence: int, description: int) -> bytes:
    """A fatal TLS 1.3 alert record protected with ``secret`` (RFC 8446 sections 5.2, 7.3)."""
    aead, key_length, algorithm = _SUITES[suite]
    key = _expand_label(secret, b"key", key_length, algorithm)
    iv = _expand_label(secret, b"iv", 12, algorithm)
    nonce = bytes(a ^ b for a, b in zip(iv, sequence.to_bytes(12, "big"), strict=True))
    inner = bytes([2, description, 21])  # fatal, description, content type alert
    header = b"\x17\x03\x03" + struct.pack("!H", len(inner) + 16)
    return header + aead(key).encrypt(nonce, inner, header)


class RecordCounter:
    """Counts the TLS records in a byte stream, across arbitrary chunk boundaries."""

    def __init__(self) -> None:
        self.records = 0
        self._header = b""
        self._body_left = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._body_left:
                step = min(self._body_left, len(view))
                self._body_left -= step
                view = view[step:]
                continue
            need = 5 - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == 5:
                self.records += 1
                self._body_left = struct.unpack("!H", self._header[3:5])[0]
                self._header = b""


def received_alert(text: str) -> str | None:
    """The alert name (``access_denied``) in OpenSSL's words for a received alert, if any."""
    match = _ALERT_TEXT.search(text)
    if match is None:
        return None
    return "_".join(match.group(1).strip().lower().split())
